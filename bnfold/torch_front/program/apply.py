"""Apply one ``.pt2`` fold site in place: the linear ops' new weights and biases,
the BN node removed (a branch-sum merge: :func:`bnfold.torch_front.branch_sum.apply_merge`).
"""

from __future__ import annotations

from torch import fx, nn

from bnfold.affine import (
    Affine,
    Rounding,
    balanced_over,
    fold_after,
    fold_before,
)
from bnfold.rules.join import JoinSpec
from bnfold.sites import Site
from bnfold.torch_front.aten_graph import (
    arg_node,
    bn_affine,
    fetch,
    layout_of,
    remove_bn,
    replace_arg,
)
from bnfold.torch_front.branch_sum import apply_merge
from bnfold.torch_front.program.checks import out_channels
from bnfold.torch_front.program.sites import AnySite, MergeSite, bn_key, linear_keys
from bnfold.torch_front.tensors import as_parameter, to_float64


def apply_site(gm: fx.GraphModule, site: AnySite, rounding: Rounding = Rounding.NEAREST) -> int:
    """Fold one site in place: new weight/bias attributes, the BN node removed.

    The weight is cast to its dtype as ``rounding`` says.

    A weight or bias that another node also reads is not overwritten: the folded
    node gets a new attribute (``<name>_folded``) and the others keep the original.
    All values are computed before anything changes, so a raise leaves ``gm`` as it was.

    Returns:
        Bytes added by such clones (0 when nothing was shared).

    Raises:
        Unfoldable: bad statistics or overflow.  LayoutError: bad groups.
    """
    if isinstance(site, MergeSite):
        return apply_merge(gm, site, rounding)
    nodes = {n.name: n for n in gm.graph.nodes}
    bn = nodes[bn_key(site)]
    lins = [nodes[key] for key in linear_keys(site)]
    affine = bn_affine(gm, bn)
    parts = _join_parts(gm, site, lins, affine) if site.join else [affine]
    folds = [
        _folded_params(gm, lin, part, site.before, rounding)
        for lin, part in zip(lins, parts, strict=True)
    ]
    added = 0  # every value is computed above, before anything changes
    for lin, (new_w, new_b), path in zip(lins, folds, site.linears, strict=True):
        added += replace_arg(gm, lin, 1, new_w, f"{path}.weight")
        added += replace_arg(gm, lin, 2, new_b, f"{path}.bias")
    remove_bn(gm, bn, arg_node(bn.args[0]))  # the linear op, a reshape or pool of it, the join
    gm.recompile()
    return added


def _join_parts(
    gm: fx.GraphModule, site: Site, lins: list[fx.Node], affine: Affine
) -> list[Affine]:
    """Each term's share of the BN's affine (:meth:`bnfold.rules.join.JoinSpec.parts`)."""
    channels = tuple(out_channels(gm, lin) for lin in lins)
    return JoinSpec(site.label, "add" if site.join == "add" else "cat", channels).parts(affine)


def _folded_params(
    gm: fx.GraphModule, lin: fx.Node, affine: Affine, before: bool, rounding: Rounding
) -> tuple[nn.Parameter, nn.Parameter]:
    """New weight and bias of ``lin`` with ``affine`` folded after (or before) it."""
    weight = fetch(gm, lin.args[1])
    bias_node = lin.args[2] if len(lin.args) > 2 else None
    bias = None if bias_node is None else fetch(gm, bias_node)
    b = None if bias is None else to_float64(bias)
    layout = layout_of(lin)
    if before:
        per_input = affine.spread(layout.in_channels(tuple(weight.shape)))
        w64, b64 = fold_before(to_float64(weight), b, per_input, layout)
    else:
        per_output = affine.spread(layout.out_channels(tuple(weight.shape)))
        w64, b64 = fold_after(to_float64(weight), b, per_output, layout)
    return as_parameter(w64, weight, balanced_over(layout, rounding)), as_parameter(
        b64, weight if bias is None else bias
    )
