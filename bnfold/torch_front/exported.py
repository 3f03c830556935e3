"""Fold BatchNorm in the aten graph of an ``ExportedProgram``'s module.

``ep.module()`` has no ``nn.Conv2d`` objects left, only aten calls reading
``get_attr`` weights, so this pass works on graph nodes. Sites are named like
the eager front ("conv1 -> bn1"), from the weights' attribute paths.

Each call of a module is its own node here, so a weight read by several nodes
(a conv module called twice) is cloned for the folded node, which the eager
front cannot do without changing forward(). Only this front folds a BN past
an average or max pool or an add/cat of convs so far (the pool or join stays, the
BN node goes); the eager front could too, with module-level weights, but does not yet.
The node helpers live in :mod:`.aten_graph`, the pools in :mod:`.pools`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold import layouts
from bnfold.affine import (
    Affine,
    Rounding,
    Unfoldable,
    add_parts,
    balanced_over,
    concat_parts,
    fold_after,
    fold_before,
)
from bnfold.layouts import LayoutError
from bnfold.options import DEFAULT_VERIFY, VerifyOptions
from bnfold.report import (
    Code,
    Folded,
    FoldKind,
    FoldReport,
    FoldResult,
    Lowered,
    LowerForm,
    Refusal,
    VerifyResult,
)
from bnfold.torch_front import pools
from bnfold.torch_front import verify as checking
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    Found,
    arg_node,
    bn_affine,
    bn_output,
    check_bn_node,
    check_stats,
    fetch,
    is_linear_op,
    layout_of,
    new_attr,
    owner_path,
    remove_bn,
    replace_arg,
    traced_shape,
    uses_batch_stats,
)
from bnfold.torch_front.branch_sum import MergeSite, apply_merge, find_merges, why_not_tap
from bnfold.torch_front.census import batchnorm_count, refusal_naming
from bnfold.torch_front.graph import (
    explain_both,
    is_eval_dropout,
    is_nonlinear,
    metadata_only_inputs,
    site_label,
)
from bnfold.torch_front.tensors import as_parameter, exact_values, to_float64

aten = torch.ops.aten

# Ops that keep the elements and their order, only regrouping axes.
_RESHAPE_OPS: dict[Any, str] = {
    aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten",
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten._unsafe_view.default: "view",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.squeeze.dims: "squeeze",
    aten.squeeze.default: "squeeze",
}


@dataclass(frozen=True)
class Site:
    """One foldable pair, by node names: ``linear op -> BN op``, or with ``before``
    ``BN op -> linear op``; either possibly through ``between``, one of
    :data:`_RESHAPE_OPS`."""

    linear_node: str
    bn_node: str
    linear: str  # module path of the weight, e.g. "layer1.0.conv1"
    bn: str
    before: bool = False
    between: str = ""  # "flatten", "view", "unsqueeze", ...
    kind: FoldKind = FoldKind.ADJACENT

    @property
    def site(self) -> str:
        return site_label(self.linear, self.bn, self.between, self.before)


_JOIN_OPS: dict[Any, str] = {aten.add.Tensor: "add", aten.cat.default: "cat"}


@dataclass(frozen=True)
class JoinSite:
    """``BN(add(L_a(x), L_b(y)))`` or ``BN(cat([L_a(x), L_b(y), ...], 1))``, by node names.

    Each L a conv*/conv_transpose*/linear node whose only reader is the join;
    on an add every term takes the BN's scale and the first also its shift, on
    a cat each term takes its own channels (:func:`bnfold.affine.add_parts`,
    :func:`bnfold.affine.concat_parts`). The join stays; the BN goes.
    """

    linear_nodes: tuple[str, ...]
    join_node: str
    bn_node: str
    linears: tuple[str, ...]  # module paths of the terms' weights
    bn: str
    join: str  # "add" or "cat"

    @property
    def linear(self) -> str:
        return ", ".join(self.linears)

    @property
    def site(self) -> str:
        return f"{self.linear} -> {self.join} -> {self.bn}"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.OVER_ADD if self.join == "add" else FoldKind.OVER_CONCAT


AnySite = Site | JoinSite | MergeSite


def find_sites(gm: fx.GraphModule) -> tuple[list[AnySite], list[Refusal]]:
    """Every BN node of ``gm``: a foldable site or a refusal; and every branch sum
    that merges into one conv (:class:`~bnfold.torch_front.branch_sum.MergeSite`,
    which takes its identity BNs and a BN after the sum along).

    Matches:  batch_norm(conv{1,2,3}d | conv_transpose{1,2,3}d | linear(x, W, B?))
              with W, B and the BN statistics read by get_attr; else (before)
              conv*/conv_transpose*/linear(batch_norm(x), W, B?). Either
              also through one reshape (view, flatten, (un)squeeze) when each
              linear channel lies inside one BN channel
              (:func:`bnfold.layouts.channel_block`). After: also
              batch_norm(avg_pool*d | adaptive_avg_pool*d | max_pool*d |
              adaptive_max_pool*d(conv*(x))) (:mod:`.pools`), the pool left in
              place and the BN folded into the conv before it; and
              batch_norm(add | cat(linear ops)) into every term (:class:`JoinSite`).
    Refuses:
      TRAINING_MODE    batch_norm with training=True
      NO_RUNNING_STATS running_mean/var missing
      NOT_CONSTANT     a weight, bias or statistic is not a get_attr
      BRANCHING        the linear op's output has other readers or is an output
      NONLINEAR_INPUT / OP_BETWEEN / STANDALONE   the BN input is not a linear op
      NOT_PER_CHANNEL  the linear output's channels are not on axis 1, or the
                       reshape splits a linear channel over several BN channels
      POOL_PADDING     through an average pool (kind THROUGH_POOL): it counts
                       padded zeros (count_include_pad with padding) or has a
                       divisor_override, and the shift is nonzero; adaptive
                       average pools always pass
      NEGATIVE_SCALE   through a max pool: a BN scale is negative
      TRAINING_MODE    also: through a max pool whose indices are read
      MERGE_MOVES_CHANNEL  linear(x[B, N, K]) reshaped to 2-D, but not to
                       (B*N, C) (a batch merge folds, kind BATCH_MERGE:
                       :func:`bnfold.layouts.merges_leading_axes`)
      NOT_LINEAR_TERM  an add/cat term is no conv/conv_transpose/linear (or one
                       op twice); see :func:`_match_join` for the join's other codes
      UNSUPPORTED_DTYPE / BAD_SHAPE
      ZERO_PADDING     before: a zero-padded conv or a conv_transpose, nonzero shift
      BRANCH_MISMATCH / UNCENTRED_TAP / BRANCHING   an identity BN's branch sum does
                       not merge (:mod:`bnfold.torch_front.branch_sum`)
    """
    merges = find_merges(gm)
    merged = {name for merge in merges for name in merge.bn_nodes}  # they go with the merge
    sites: list[AnySite] = list(merges)
    refused: list[Refusal] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in BN_OPS and node.name not in merged:
            result: Site | JoinSite | Refusal = _match(gm, node)
            if isinstance(result, Refusal) and result.code in _NO_LINEAR_BESIDE:
                result = why_not_tap(gm, node) or result
            if isinstance(result, Refusal) and result.code not in _BN_ITSELF:
                result = _match_join(gm, node) or result
            if isinstance(result, Refusal) and result.code not in _BN_ITSELF:
                result = _prefer_before(result, _match_before(gm, node))
            if isinstance(result, Site | JoinSite):
                sites.append(result)
            else:
                refused.append(result)
    return sites, refused


def _match(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal:
    bn_name = owner_path(bn.args[1:5]) or bn.name
    x = arg_node(bn.args[0])
    reader, between = bn, ""  # reader: what reads the linear op's output
    if _reshapes_linear(x):
        reader, between, x = x, _RESHAPE_OPS[x.target], arg_node(x.args[0])
    elif (pool := _pooled_conv(x)) is not None:
        reader, between, x = pool, pools.pool_name(pool), arg_node(pool.args[0])
    if not is_linear_op(x):
        return _why_not_linear(bn_name, x)
    lin_name = owner_path(x.args[1:3]) or x.name
    kind = _fold_kind(x, reader)
    site = Site(x.name, bn.name, lin_name, bn_name, between=between, kind=kind)
    if bn.target == aten.batch_norm.default and bn.args[5]:
        return Refusal(site.site, Code.TRAINING_MODE, "batch_norm called with training=True")
    if bn.args[3] is None or bn.args[4] is None:
        return Refusal(site.site, Code.NO_RUNNING_STATS, f"{bn_name} has no running statistics")
    merge = kind is FoldKind.BATCH_MERGE
    if found := _check_linear(gm, x, reader, merge) or _check_bn(gm, x, bn, reader, merge):
        return Refusal(site.site, *found)
    return site


def _fold_kind(lin: fx.Node, reader: fx.Node) -> FoldKind:
    if pools.is_pool(reader):
        return FoldKind.THROUGH_POOL
    return FoldKind.BATCH_MERGE if _merges_batch(lin, reader) else FoldKind.ADJACENT


def _pooled_conv(value: fx.Node) -> fx.Node | None:
    """The pool whose values ``value`` is, when it pools a conv's output (channels
    on axis 1, which pools keep); None otherwise."""
    pool = pools.pool_of(value)
    source = None if pool is None or not pool.args else pool.args[0]
    if not isinstance(source, fx.Node) or not is_linear_op(source):
        return None
    return pool if source.target != aten.linear.default else None


def _check_pool(gm: fx.GraphModule, pool: fx.Node, bn: fx.Node) -> Found:
    """``pool(BN(y)) == BN(pool(y))`` (:func:`bnfold.torch_front.pools.check_pool`)."""
    try:
        affine = bn_affine(gm, bn)
    except Unfoldable:
        return None  # apply_site reports it as BAD_VALUES
    return pools.check_pool(pool, affine)


def _merges_batch(lin: fx.Node, reader: fx.Node) -> bool:
    """``linear(x[B, N, K])`` reshaped to 2-D for the BN: the batch-merge fold.

    Only ``aten.linear`` keeps its channels last; a conv's are on axis 1.
    """
    if reader.target not in _RESHAPE_OPS or lin.target != aten.linear.default:
        return False
    return layouts.merges_leading_axes(traced_shape(reader), traced_shape(lin)) is not None


def _reshapes_linear(node: fx.Node) -> bool:
    """A reshape whose input is a linear op's output (then the BN may fold through it)."""
    source = node.args[0] if node.args else None
    return node.target in _RESHAPE_OPS and isinstance(source, fx.Node) and is_linear_op(source)


_BN_ITSELF = (Code.TRAINING_MODE, Code.NO_RUNNING_STATS)
# An identity BN of a branch sum has no linear op beside it; the sum's refusal says more.
_NO_LINEAR_BESIDE = (Code.STANDALONE, Code.NONLINEAR_INPUT)


def _match_join(gm: fx.GraphModule, bn: fx.Node) -> JoinSite | Refusal | None:
    """The BN after an add or channel cat of linear ops; None if its input is no join.

    Refuses: NOT_LINEAR_TERM (a term is no conv/conv_transpose/linear, or the
    same node twice), NOT_PER_CHANNEL (a cat not over axis 1), BAD_SHAPE (the
    terms' channels do not make the BN's), and the checks of every after-fold.
    """
    join = arg_node(bn.args[0])
    if join.op != "call_function" or join.target not in _JOIN_OPS or uses_batch_stats(bn):
        return None
    if bn.args[3] is None or bn.args[4] is None:
        return None  # no statistics: the BN's own refusal says so
    kind = _JOIN_OPS[join.target]
    terms = _join_terms(join)
    if kind == "add" and (len(join.args) != 2 or join.kwargs.get("alpha", 1) != 1):
        return None  # x + alpha * y: not a plain sum
    if any(not isinstance(t, fx.Node) or t.op == "get_attr" for t in terms):
        return None  # add(x, 2.0), a constant bias: no join of activations
    bn_name = owner_path(bn.args[1:5]) or bn.name
    site = JoinSite(
        tuple(t.name for t in terms),
        join.name,
        bn.name,
        tuple(owner_path(t.args[1:3]) or t.name for t in terms),
        bn_name,
        kind,
    )
    if found := _check_join(gm, join, bn, terms):
        return Refusal(site.site, *found)
    return site


def _join_terms(join: fx.Node) -> list[Any]:
    """What an add sums, or the tensors a cat joins."""
    if join.target == aten.cat.default:
        return list(join.args[0])  # type: ignore[arg-type]
    return list(join.args[:2])


def _check_join(gm: fx.GraphModule, join: fx.Node, bn: fx.Node, terms: list[fx.Node]) -> Found:
    for term in terms:
        if not is_linear_op(term):
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.target}, not a conv or linear op"
        if terms.count(term) > 1:
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.name} twice"
    for term in terms:
        if found := _check_linear(gm, term, join, merge=False):
            return found
    if join.target == aten.cat.default:
        dim = int(join.args[1]) if len(join.args) > 1 else int(join.kwargs.get("dim", 0))  # type: ignore[arg-type]
        rank = len(traced_shape(join))
        if dim not in (1, 1 - rank):
            return Code.NOT_PER_CHANNEL, f"{join.name} joins axis {dim}, not the channels"
    channels = [_out_channels(gm, t) for t in terms]
    if join.target == aten.add.Tensor and len(set(channels)) != 1:
        return Code.BAD_SHAPE, f"{join.name} sums ops of {channels} channels"
    total = sum(channels) if join.target == aten.cat.default else channels[0]
    return check_bn_node(bn) or check_stats(gm, bn, total)


def _out_channels(gm: fx.GraphModule, lin: fx.Node) -> int:
    return layout_of(lin).out_channels(tuple(fetch(gm, lin.args[1]).shape))


def _prefer_before(after: Refusal, before: Site | Refusal | None) -> Site | Refusal:
    if before is None:
        return after
    return before if isinstance(before, Site) else explain_both(after, before)


def _match_before(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal | None:
    """``linear(bn(x))`` or ``linear(flatten(bn(x)))``; None if no linear op alone reads the BN."""
    out = bn_output(bn)
    if out is None or len(out.users) != 1:
        return None
    (reader,) = out.users
    source, between = out, ""
    if reader.target in _RESHAPE_OPS and len(reader.users) == 1:
        source, between, reader = reader, _RESHAPE_OPS[reader.target], next(iter(reader.users))
    elif (_copies_values(reader) or is_eval_dropout(reader)) and len(reader.users) == 1:
        source, reader = reader, next(iter(reader.users))
    if not is_linear_op(reader) or reader.args[0] is not source or source in reader.args[1:]:
        return None
    bn_name = owner_path(bn.args[1:5]) or bn.name
    lin_name = owner_path(reader.args[1:3]) or reader.name
    site = Site(reader.name, bn.name, lin_name, bn_name, before=True, between=between)
    if found := _check_before(gm, reader, bn, out, site):
        return Refusal(site.site, *found)
    return site


def _copies_values(pad: fx.Node) -> bool:
    """A reflect/replicate/circular pad: border values are copies, so they get the shift too.

    (An eager Conv with such a padding_mode exports as this pad and an unpadded conv.)
    """
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    return pad.target == aten.pad.default and mode in ("reflect", "replicate", "circular")


def _check_before(gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, out: fx.Node, site: Site) -> Found:
    params = [a for a in lin.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return Code.NOT_CONSTANT, f"{lin.name} weight or bias is computed"
    stats = bn.args[1:5]
    if not all(s is None or (isinstance(s, fx.Node) and s.op == "get_attr") for s in stats):
        return Code.NOT_CONSTANT, f"{bn.name} parameters are computed"
    weight = fetch(gm, lin.args[1])
    if not weight.is_floating_point():
        return Code.UNSUPPORTED_DTYPE, f"weight is {weight.dtype}"
    return _check_before_shapes(gm, lin, bn, out, site) or _check_exact_before(gm, lin, bn)


def _check_before_shapes(
    gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, out: fx.Node, site: Site
) -> Found:
    shape = traced_shape(out)
    # Directly (or through a reflect pad, which keeps channels) the op reads the BN's
    # output as is; through a reshape, compare with what the op reads.
    lin_in = traced_shape(arg_node(lin.args[0])) if site.between else shape
    weight_shape = tuple(fetch(gm, lin.args[1]).shape)
    if len(shape) < 2:
        return Code.NOT_PER_CHANNEL, f"{bn.name} output shape {shape} has no channel axis"
    if len(lin_in) != len(weight_shape):
        detail = f"{lin.name} input is {len(lin_in)}-D; it reads channels on axis 1"
        return Code.NOT_PER_CHANNEL, f"{detail} only at {len(weight_shape)}-D"
    features = layout_of(lin).in_channels(weight_shape)
    if features != lin_in[1]:
        return Code.BAD_SHAPE, f"{lin.name} reads {features} input features, its input is {lin_in}"
    if layouts.channel_block(shape, lin_in) is None:
        detail = f"{site.between} maps {shape} to {lin_in}: a channel would span BN channels"
        return Code.NOT_PER_CHANNEL, detail
    return check_stats(gm, bn, shape[1])


def _check_exact_before(gm: fx.GraphModule, lin: fx.Node, bn: fx.Node) -> Found:
    """The shift reaches the bias through every tap; zeros padded in never see it."""
    try:
        shift = bn_affine(gm, bn).shift
    except Unfoldable:
        return None  # apply_site reports it as BAD_VALUES
    if not np.any(shift != 0):
        return None
    if layout_of(lin).op == "ConvTranspose":
        return Code.ZERO_PADDING, "conv_transpose: border outputs receive fewer taps"
    if layout_of(lin).op == "Conv" and _zero_padded(lin):
        return Code.ZERO_PADDING, f"{lin.name} pads with zeros: the borders would see the shift"
    return None


def _zero_padded(conv: fx.Node) -> bool:
    """conv*(x, w, b, stride, padding, ...) / convolution(...): padding is args[4]."""
    padding = conv.args[4] if len(conv.args) > 4 else 0
    if isinstance(padding, str):
        return padding != "valid"
    values = padding if isinstance(padding, list | tuple) else [padding]
    return any(int(p) != 0 for p in values)  # type: ignore[arg-type]


def _why_not_linear(bn_name: str, x: fx.Node) -> Refusal:
    chain: list[str] = []
    node = x
    while node.op == "call_function" and len(chain) < 16:
        if is_linear_op(node):
            lin = owner_path(node.args[1:3]) or node.name
            code = Code.NONLINEAR_INPUT if any(map(is_nonlinear, chain)) else Code.OP_BETWEEN
            return Refusal(f"{lin} -> {bn_name}", code, f"{' -> '.join(reversed(chain))} between")
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1 or node.target in BN_OPS:
            break
        chain.append(str(node.target))
        node = inputs[0]
    code = Code.NONLINEAR_INPUT if is_nonlinear(str(x.target)) else Code.STANDALONE
    return Refusal(bn_name, code, f"{bn_name} is fed by {x.target}")


def _check_linear(gm: fx.GraphModule, lin: fx.Node, reader: fx.Node, merge: bool) -> Found:
    """The linear op: read only by ``reader`` (the BN or a reshape), constant weights.

    Its channels must be on axis 1, unless ``merge`` (a batch-merging reshape
    brings its last axis there; :func:`_check_bn` checks that).
    """
    readers = [u for u in lin.users if u is not reader and lin not in metadata_only_inputs(u)]
    if readers:
        return Code.BRANCHING, f"{lin.name} output also read by {[u.name for u in readers]}"
    values_read = pools.value_readers(reader)  # a max pool's indices are not its values
    if reader.target not in BN_OPS and len(values_read) != 1:
        return Code.BRANCHING, f"{reader.name} output also read by {len(values_read) - 1} more"
    params = [a for a in lin.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return Code.NOT_CONSTANT, f"{lin.name} weight or bias is computed"
    weight = fetch(gm, lin.args[1])
    if not weight.is_floating_point():
        return Code.UNSUPPORTED_DTYPE, f"weight is {weight.dtype}"
    out = lin.meta.get("val")
    if not merge and (out is None or out.ndim != weight.ndim):
        ndim = None if out is None else out.ndim
        return Code.NOT_PER_CHANNEL, f"{lin.name} output is {ndim}-D; channels must be on axis 1"
    return None


def _check_bn(gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, reader: fx.Node, merge: bool) -> Found:
    """The BN: only its normalized output read, constant statistics of its channel count."""
    if found := check_bn_node(bn):
        return found
    if reader is bn or pools.is_pool(reader):  # a pool keeps every channel
        channels = layout_of(lin).out_channels(tuple(fetch(gm, lin.args[1]).shape))
        if reader is not bn and (found := _check_pool(gm, reader, bn)):
            return found
    elif merge:
        bn_in, lin_out = traced_shape(reader), traced_shape(lin)
        if not layouts.merges_leading_axes(bn_in, lin_out):
            detail = (
                f"{reader.name} maps {lin_out} to {bn_in}: the BN's {bn_in[1]} channels "
                f"are not the {lin_out[-1]} features"
            )
            return Code.MERGE_MOVES_CHANNEL, detail
        channels = bn_in[1]
    else:
        bn_in, lin_out = traced_shape(reader), traced_shape(lin)
        if layouts.channel_block(bn_in, lin_out) is None:
            detail = f"{reader.name} maps {lin_out} to {bn_in}: a channel would span BN channels"
            return Code.NOT_PER_CHANNEL, detail
        channels = bn_in[1]
    return check_stats(gm, bn, channels)


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
    bn = nodes[site.bn_node]
    affine = bn_affine(gm, bn)
    if isinstance(site, JoinSite):
        lins = [nodes[n] for n in site.linear_nodes]
        parts = _join_parts(gm, site, lins, affine)
        folds = [
            _folded_params(gm, lin, part, False, rounding)
            for lin, part in zip(lins, parts, strict=True)
        ]
        paths = site.linears
    else:
        lins = [nodes[site.linear_node]]
        folds = [_folded_params(gm, lins[0], affine, site.before, rounding)]
        paths = (site.linear,)
    added = 0  # every value is computed above, before anything changes
    for lin, (new_w, new_b), path in zip(lins, folds, paths, strict=True):
        added += replace_arg(gm, lin, 1, new_w, f"{path}.weight")
        added += replace_arg(gm, lin, 2, new_b, f"{path}.bias")
    remove_bn(gm, bn, arg_node(bn.args[0]))  # the linear op, a reshape or pool of it, the join
    gm.recompile()
    return added


def _join_parts(
    gm: fx.GraphModule, site: JoinSite, lins: list[fx.Node], affine: Affine
) -> list[Affine]:
    if site.join == "add":
        return add_parts(affine, len(lins))
    return concat_parts(affine, [_out_channels(gm, lin) for lin in lins])


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


def fold_graph_module(
    make: Callable[[], fx.GraphModule],
    args: tuple[Any, ...],
    *,
    verify: VerifyOptions | None = DEFAULT_VERIFY,
    rounding: Rounding = Rounding.NEAREST,
    lower: LowerForm | None = None,
) -> FoldResult:
    """Fold every site of a fresh ``make()`` module; verify and drop folds that fail.

    ``make`` must return a new module each call sharing no mutable state with
    the others (``ep.module`` does: folds assign new Parameters, never write
    into existing tensors). Sites are found and applied in rounds until none is
    new (Conv -> BN -> BN: the second BN follows the conv once the first is
    gone). A failing fold is found by re-folding fresh copies one site at a
    time, keeping those that pass. ``verify`` None skips verification.
    With ``lower``, every inference batch_norm left is then lowered
    (:func:`lower_left`) before the whole module is verified.
    """
    with exact_values():  # a weight folded twice is still rounded once
        report = FoldReport(front="torch", rounding=rounding)
        original = make()
        report.ops_before = _op_counts(original)
        check = None if verify is None else checking.Check.of(original, args, verify)
        gm = make()
        added = _fold_to_fixpoint(gm, report, rounding)
        fold_refusals = list(report.refused)  # what lowering starts from, again after a rollback
        if lower is not None:
            lower_left(gm, report, lower)
        verification = None if check is None else check(gm)
        if check is not None and verification is not None and not verification.passed:
            report.refused, report.lowered = fold_refusals, []
            gm, verification, added = _rollback(make, list(added), check, report, rounding)
            if lower is not None:  # the rollback refolded fresh copies: lower those again
                lower_left(gm, report, lower)
                verification = check(gm)
        report.folded = [entry for s, n in added.items() for entry in _entries(original, s, n)]
        report.ops_after = _op_counts(gm)
        found, training = graph_batchnorms(original)
        report.batchnorm = batchnorm_count(
            len(found), training, graph_batchnorms(gm)[0], report.refused, len(report.lowered)
        )
        return FoldResult(gm, report, verification)


# --- lowering: lower_standalone ------------------------------------------------------

_CONV_OF_RANK = {3: aten.conv1d.default, 4: aten.conv2d.default, 5: aten.conv3d.default}


def lower_left(gm: fx.GraphModule, report: FoldReport, form: LowerForm) -> None:
    """Rewrite every inference batch_norm still in ``gm`` as plain aten ops.

    Matches:  batch_norm nodes with running statistics (not training=True).
    Produces: ``add(mul(x, s), t)`` with ``s``, ``t`` of shape ``[C, 1, ...]``, or
              with ``form`` conv a 1x1 depthwise ``conv{1,2,3}d(x, s, t, groups=C)``
              (a rank-2 input has no spatial axis: mul-add, with a note); ``s``
              and ``t`` are the BN's affine (:func:`bnfold.affine.bn_to_affine`)
              in float64, cast once to the input's dtype, as new attributes.
    Refuses (the BN stays, its refusal extended): NOT_CONSTANT (statistics not
    attributes), UNKNOWN_RANK (no traced shape), BAD_VALUES.
    The BN's refusal moves from ``report.refused`` to ``report.lowered``.
    """
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]:
        if uses_batch_stats(bn):
            continue
        owner = owner_path(bn.args[1:5]) or bn.name
        refusal = refusal_naming(owner, report.refused) or Refusal(
            owner, Code.UNTRACEABLE, "no finder reported this BatchNorm"
        )
        outcome = _lower_one(gm, bn, form, refusal)
        if refusal in report.refused:
            report.refused.remove(refusal)
        if isinstance(outcome, Refusal):
            report.refused.append(outcome)
        else:
            report.lowered.append(outcome)
    gm.recompile()


def _lower_one(
    gm: fx.GraphModule, bn: fx.Node, form: LowerForm, refusal: Refusal
) -> Lowered | Refusal:
    """Lower one batch_norm node, or say why it stays."""
    stats = bn.args[3:5]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stats):
        return refusal.not_lowered(Code.NOT_CONSTANT, "running statistics are not attributes")
    traced = bn.meta.get("val")
    if not isinstance(traced, torch.Tensor):
        return refusal.not_lowered(Code.UNKNOWN_RANK, "the BatchNorm carries no traced shape")
    rank = traced.dim()
    conv = _CONV_OF_RANK.get(rank) if form is LowerForm.CONV else None
    like = torch.empty(0, dtype=traced.dtype, device=fetch(gm, stats[0]).device)
    try:
        affine = bn_affine(gm, bn)
        channels = affine.scale.shape[0]
        s_shape = (channels, 1) + (1,) * (rank - 2) if conv else (channels,) + (1,) * (rank - 2)
        scale = as_parameter(affine.scale.reshape(s_shape), like)
        shift = as_parameter(affine.shift.reshape((channels,) if conv else s_shape), like)
    except Unfoldable as err:
        return refusal.not_lowered(Code.BAD_VALUES, str(err))
    owner = owner_path(stats) or bn.name
    s = new_attr(gm, bn, f"{owner}.lowered_scale", scale)
    t = new_attr(gm, bn, f"{owner}.lowered_shift", shift)
    x = arg_node(bn.args[0])
    with gm.graph.inserting_before(bn):
        if conv is not None:
            ones, zeros = [1] * (rank - 2), [0] * (rank - 2)
            out = gm.graph.call_function(conv, (x, s, t, ones, zeros, ones, channels))
        else:
            product = gm.graph.call_function(aten.mul.Tensor, (x, s))
            out = gm.graph.call_function(aten.add.Tensor, (product, t))
    remove_bn(gm, bn, out)
    used = LowerForm.CONV if conv is not None else LowerForm.MUL_ADD
    note = "" if used is form else f"rank-{rank} input has no spatial axis for a conv: mul-add"
    return Lowered(owner, used, refusal.code, refusal.detail, note)


def graph_batchnorms(gm: fx.GraphModule) -> tuple[list[str], int]:
    """(module path of each inference batch_norm node, number of training-mode ones)."""
    bns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]
    inference = [
        owner_path(n.args[1:5]) or n.name
        for n in bns
        if not (n.target == aten.batch_norm.default and n.args[5])
    ]
    return inference, len(bns) - len(inference)


def _fold_to_fixpoint(
    gm: fx.GraphModule, report: FoldReport, rounding: Rounding
) -> dict[AnySite, int]:
    """Rounds of find and apply until no site is new; refusals of the last round are kept."""
    added: dict[AnySite, int] = {}
    failed = FoldReport(front="torch")
    tried: set[AnySite] = set()
    while True:
        sites, refused = find_sites(gm)
        fresh = [s for s in sites if s not in tried]
        tried.update(fresh)
        done = _apply_checked(gm, fresh, failed, rounding)
        added.update(done)
        if not done:  # a refused BN, or an add whose branch BNs folded, may be a site now
            break
    report.refused += refused + failed.refused
    return added


def _apply_checked(
    gm: fx.GraphModule, sites: list[AnySite], report: FoldReport, rounding: Rounding
) -> dict[AnySite, int]:
    """Apply each site, refusing those whose values cannot fold (nothing changes then).

    Returns the sites applied, in order, each with the bytes its clones added.
    """
    kept = {}
    for s in sites:
        try:
            kept[s] = apply_site(gm, s, rounding)
        except Unfoldable as e:
            report.refused += _refusals(s, Code.BAD_VALUES, str(e))
        except LayoutError as e:
            report.refused += _refusals(s, Code.BAD_GROUPS, str(e))
    return kept


def _folded(
    make: Callable[[], fx.GraphModule], sites: list[AnySite], rounding: Rounding
) -> tuple[fx.GraphModule, dict[AnySite, int]]:
    gm = make()
    return gm, {s: apply_site(gm, s, rounding) for s in sites}


def _rollback(
    make: Callable[[], fx.GraphModule],
    sites: list[AnySite],
    check: checking.Check,
    report: FoldReport,
    rounding: Rounding,
) -> tuple[fx.GraphModule, VerifyResult, dict[AnySite, int]]:
    kept: list[AnySite] = []
    for s in sites:
        try:
            trial = check(_folded(make, [*kept, s], rounding)[0])
        except Unfoldable as e:  # a merge whose branch folds were rolled back
            report.refused += _refusals(s, Code.VERIFICATION_FAILED, str(e))
            continue
        if trial.passed:
            kept.append(s)
        else:
            detail = checking.describe_failure(trial)
            report.refused += _refusals(s, Code.VERIFICATION_FAILED, detail)
    gm, added = _folded(make, kept, rounding)
    return gm, check(gm), added


def _refusals(s: AnySite, code: Code, detail: str) -> list[Refusal]:
    """A site not folded: one refusal, or for a merge one per BN it would remove."""
    return s.refusals(code, detail) if isinstance(s, MergeSite) else [Refusal(s.site, code, detail)]


def _entries(gm: fx.GraphModule, s: AnySite, bytes_added: int) -> list[Folded]:
    """The report's entries for one applied site (a merge makes several)."""
    if isinstance(s, MergeSite):
        return s.entries(bytes_added)
    pattern = _pattern(gm, s)
    return [Folded(s.site, pattern, s.linear, s.bn, "exported_program", bytes_added, s.kind)]


def _pattern(gm: fx.GraphModule, s: Site | JoinSite) -> str:
    """ "conv2d+batch_norm", "linear+view+batch_norm"; before: "batch_norm+flatten+linear";
    a join: "conv2d+conv2d+add+batch_norm"."""
    if isinstance(s, JoinSite):
        return "+".join([*(_node_kind(gm, n) for n in s.linear_nodes), s.join, "batch_norm"])
    chain = ("batch_norm", s.between, _op_kind(gm, s))
    return "+".join(p for p in (reversed(chain) if not s.before else chain) if p)


def _op_kind(gm: fx.GraphModule, s: Site) -> str:
    return _node_kind(gm, s.linear_node)


def _node_kind(gm: fx.GraphModule, linear_node: str) -> str:
    node = next(n for n in gm.graph.nodes if n.name == linear_node)
    name = str(node.target).split(".")[1]
    return str(layout_of(node).op) if name == "convolution" else name


def _op_counts(gm: fx.GraphModule) -> dict[str, int]:
    from bnfold.report import count_ops

    return count_ops([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
