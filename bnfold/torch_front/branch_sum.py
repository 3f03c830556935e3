"""A branch sum of an exported program's aten graph, merged into one conv: the .pt2
adapter of :mod:`bnfold.rules.branch_sum`.

Matches:  the trees of :mod:`bnfold.rules.branch_sum` as aten nodes, read through
          :class:`FxSums`: ``add`` / ``add_`` / ``sub`` / ``sub_`` (alpha 1) and
          ``mul`` / ``mul_`` by a constant (a Python number or a ``get_attr``
          tensor) over conv{1,2,3}d / convolution nodes, batch_norm /
          _native_batch_norm_legit_no_training nodes of ``x`` and ``x`` itself:
          RepVGG, MobileOne (whose ``0 + ...`` is a constant add of the tree) and
          RepGhost blocks, RepViT's ``BN(conv(x) + conv1(x) + x)`` and FastViT's
          RepMixer ``x + layer_scale * (mixer(x) - BN(x))``, as on the ONNX front.
          Once the BN making ``x`` folds into the conv before the block, ``x`` is
          that conv's output: a leaf the other leaves read is ``x`` itself. The
          branch BNs after each conv fold first (the adjacent fold, an earlier
          round), so every conv term has a constant weight of its own. A
          batch_norm reading the tree alone folds into the merge.
Produces: one conv node (the first of the largest kernel) with the merged kernel
          and bias (:func:`bnfold.core.reparam.merge_branches`); the readers of the
          top add (or of that BN) read it, and the other convs, the tree's ops and
          the BNs go. Reported as one ``reparam`` fold, one ``identity_tap`` per
          identity BN and an ``adjacent`` one for a BN after the tree. Computed in
          float64 from the branches' exact values, cast once (balanced with
          ``--rounding balanced``).
Refuses (on each identity BN of the tree): the codes of :mod:`bnfold.rules.branch_sum`;
  BRANCH_MISMATCH also for convs of another weight dtype, or a term whose shape is
  not the sum's (a broadcast); and the codes of reading a conv or BN: NOT_CONSTANT,
  UNSUPPORTED_DTYPE, NOT_PER_CHANNEL (an unbatched conv), TRAINING_MODE,
  NO_RUNNING_STATS, BAD_SHAPE, BAD_VALUES.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from bnfold.core.affine import Affine
from bnfold.core.cast import Unfoldable, balanced_over
from bnfold.core.geometry import ConvGeometry, per_axis, torch_pads
from bnfold.core.layouts import LayoutError
from bnfold.core.reparam import Branch, Tap, merge_branches
from bnfold.options import Rounding
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules import branch_sum as rule
from bnfold.rules.branch_sum import SumTree, TreeOp, centred_in, identity_tap_misfit, same_geometry
from bnfold.rules.family import Refused
from bnfold.sites import Site
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    CONV_OPS,
    bn_affine,
    check_bn_node,
    check_stats,
    drop_unread_attrs,
    fetch,
    is_linear_op,
    item_source,
    layout_of,
    remove_bn,
    replace_arg,
    traced_shape,
    uses_batch_stats,
)
from bnfold.torch_front.program.sites import FINDER, MergeSite, bn_path, linear_path, op_name
from bnfold.torch_front.tensors import as_parameter, to_float64

aten = torch.ops.aten

Tree = SumTree[fx.Node, object]

_TREE_OPS: dict[object, TreeOp] = {
    aten.add.Tensor: "add",
    aten.add_.Tensor: "add",
    aten.sub.Tensor: "sub",
    aten.sub_.Tensor: "sub",
    aten.mul.Tensor: "mul",
    aten.mul_.Tensor: "mul",
}


# Ops that only view or reshape a tensor: over a constant, a constant (timm's
# LayerScale2d multiplies by ``gamma.view(1, -1, 1, 1)``).
_VIEW_OPS = frozenset(
    {
        aten.view.default, aten._unsafe_view.default, aten.reshape.default,
        aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    }
)  # fmt: skip


class FxSums:
    """An aten graph as the tree walk of :mod:`bnfold.rules.branch_sum` reads it.

    What an op reads is a node or a Python number. A number is a constant, and so
    is a ``get_attr`` tensor, or a view of a constant (:data:`_VIEW_OPS`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def label(self, node: fx.Node) -> str:
        return node.name

    def producer(self, value: object) -> fx.Node | None:
        if not isinstance(value, fx.Node):
            return None
        if value.op == "call_function" and value.target == aten.batch_norm.default:
            return value
        return item_source(value, BN_OPS) or value

    def output(self, node: fx.Node) -> fx.Node | None:
        """The node carrying a BN's normalized output (the decomposed op's item 0)."""
        if node.target not in BN_OPS or node.target == aten.batch_norm.default:
            return node
        items = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else None

    def operands(self, node: fx.Node) -> tuple[object, object]:
        return node.args[0], node.args[1]

    def op(self, node: fx.Node) -> TreeOp | None:
        if node.op != "call_function" or node.target not in _TREE_OPS or len(node.args) != 2:
            return None
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return _TREE_OPS[node.target]

    def is_constant(self, value: object) -> bool:
        if not isinstance(value, fx.Node):
            return _is_number(value)
        return value.op == "get_attr" or (value.target in _VIEW_OPS and _views_constant(value))

    def constant(self, value: object) -> np.ndarray | None:
        if _is_number(value):
            return np.asarray(float(value))  # type: ignore[arg-type]  # an int or float
        if not self.is_constant(value):
            return None
        tensor = self._tensor(value)  # type: ignore[arg-type]  # a constant node
        return to_float64(tensor) if tensor.is_floating_point() else tensor.detach().cpu().numpy()

    def _tensor(self, node: fx.Node) -> torch.Tensor:
        """The value of a constant node: an attribute, or a view of one."""
        if node.op == "get_attr":
            return fetch(self.gm, node)
        source = self._tensor(node.args[0])  # type: ignore[arg-type]  # the viewed constant
        return node.target(source, *node.args[1:], **node.kwargs)  # type: ignore[operator,no-any-return]

    def leaf(self, node: fx.Node) -> rule.Leaf | None:
        if node.op != "call_function":
            return None
        if node.target in BN_OPS:
            return "bn"
        return "conv" if _is_conv(node) else None

    def data_input(self, node: fx.Node) -> object:
        source = node.args[0] if node.args else None
        return source if isinstance(source, fx.Node) else None

    def only_reader_is(self, value: object, node: fx.Node) -> bool:
        """``node`` alone reads ``value``, once (a graph output is read by the output node).

        A shape read (``reshape_as``) counts too: the merge removes the value it reads.
        """
        assert isinstance(value, fx.Node)
        return list(value.users) == [node] and node.args.count(value) == 1

    def sole_reader(self, node: fx.Node) -> fx.Node | None:
        readers = list(node.users)
        if len(readers) != 1 or not self.only_reader_is(node, readers[0]):
            return None
        return readers[0]

    def readers(self, node: fx.Node) -> list[fx.Node]:
        out = self.output(node)
        return [] if out is None else list(out.users)

    def rank(self, leaves: Sequence[fx.Node], source: object) -> int | None:
        """A conv's weight rank, else the source's traced rank; None if unknown."""
        for leaf in leaves:
            conv = leaf if _is_conv(leaf) else self.data_input(leaf)
            if isinstance(conv, fx.Node) and _is_conv(conv):
                return int(fetch(self.gm, conv.args[1]).ndim)
        shape = traced_shape(source) if isinstance(source, fx.Node) else ()
        return len(shape) if shape else None


@dataclass(frozen=True, eq=False)  # holds tensors: never compared
class _Merge:
    """A checked merge: the site, its nodes and the merged parameters, cast."""

    site: MergeSite
    tree: Tree
    survivor: fx.Node
    trailing: fx.Node | None
    weight: nn.Parameter
    bias: nn.Parameter


def find_merges(gm: fx.GraphModule) -> list[MergeSite]:
    """Every branch sum of ``gm`` that merges, at its top add.

    A sum that does not merge is no site: its identity BNs report why
    (:func:`why_not_tap`).
    """
    view, merges = FxSums(gm), []
    for node in gm.graph.nodes:
        if not rule.is_sum(view, node):
            continue
        try:
            merge = _plan(gm, node, Rounding.NEAREST)
        except Refused:
            continue
        if merge is not None:
            merges.append(merge.site)
    return merges


def why_not_tap(gm: fx.GraphModule, bn: fx.Node) -> Refusal | None:
    """The refusal of the branch sum ``bn`` is an identity term of, or None.

    None when ``bn`` is no identity term of a branch sum, or when the sum merges
    (the BN goes with it).
    """
    view = FxSums(gm)
    top = rule.top_of(view, bn)
    if top is None:
        return None
    try:
        tree = rule.sum_tree(view, top, leaf_may_be_input=True)
        if tree is not None and bn in tree.identities:
            _plan(gm, top, Rounding.NEAREST)
    except Refused as refused:
        site = Site(FoldKind.IDENTITY_TAP, bn=bn_path(bn), between=top.name)
        return site.refusal(refused.code, refused.detail)
    return None


def apply_merge(gm: fx.GraphModule, site: MergeSite, rounding: Rounding) -> int:
    """Merge ``site`` in place; the values are computed before anything changes.

    Returns:
        Bytes added by cloning the survivor's weight or bias for it (another node
        reads them too).

    Raises:
        Unfoldable: the sum no longer is the one ``site`` names (a fold it built
            on is not there), or the merged values overflow.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    top = nodes.get(site.top_node)
    try:
        merge = None if top is None else _plan(gm, top, rounding)
    except Refused as refused:
        raise Unfoldable(f"{site.label}: {refused.detail}") from None
    if merge is None or merge.site != site:
        raise Unfoldable(f"{site.label}: the sum is no longer the one planned")
    return _rewrite(gm, merge)


def _rewrite(gm: fx.GraphModule, merge: _Merge) -> int:
    """The survivor computes the tree (or the BN after it); the rest of the tree goes."""
    tree, survivor = merge.tree, merge.survivor
    if merge.trailing is not None:
        remove_bn(gm, merge.trailing, survivor)
    else:
        tree.top.replace_all_uses_with(survivor)
    constants = [a for op in tree.ops for a in op.args if isinstance(a, fx.Node)]
    for op in tree.ops:  # top first: each op's one reader is gone before it
        gm.graph.erase_node(op)
    constants = _erase_unread_views(gm, constants)
    for bn in tree.identities:
        remove_bn(gm, bn, survivor)  # its reader went with the tree: nothing reads it
    gone = [conv for conv in tree.convs if conv is not survivor]
    params = [a for conv in gone for a in conv.args[1:3] if isinstance(a, fx.Node)]
    for conv in gone:
        gm.graph.erase_node(conv)
    drop_unread_attrs(gm, [*params, *constants])
    path = merge.site.merge.linear
    added = replace_arg(gm, survivor, 1, merge.weight, f"{path}.weight")
    added += replace_arg(gm, survivor, 2, merge.bias, f"{path}.bias")
    gm.recompile()
    return added


def _erase_unread_views(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[fx.Node]:
    """Erase the views of constants among ``nodes`` (and the views they read) that
    nothing reads any more; the rest of what they read is returned, for
    :func:`drop_unread_attrs`."""
    pending, left, erased = list(nodes), [], set()
    while pending:
        node = pending.pop()
        if node in erased:
            continue
        if node.op == "call_function" and node.target in _VIEW_OPS and not node.users:
            pending += [a for a in node.args if isinstance(a, fx.Node)]
            gm.graph.erase_node(node)
            erased.add(node)
        else:
            left.append(node)
    return left


def _plan(gm: fx.GraphModule, top: fx.Node, rounding: Rounding) -> _Merge | None:
    """The merge of the tree topped by ``top``; None if it is no branch sum to merge.

    Raises:
        Refused: a precondition fails (see the module docstring).
    """
    view = FxSums(gm)
    tree = rule.sum_tree(view, top, leaf_may_be_input=True)
    if tree is None or (not tree.has_identity and len(tree.convs) < 2):
        return None
    if rule.defers_to_reader(view, top, leaf_may_be_input=True):
        return None
    for conv in tree.convs:
        _require_constant_conv(gm, conv)
    survivor = max(tree.convs, key=lambda c: int(np.prod(_kernel(gm, c))))
    trailing = _trailing_bn(gm, top, survivor)
    if tree.bare and not tree.identities and trailing is None:
        return None  # a plain residual around a conv: no BN to remove, left as built
    _require_same_geometry(gm, tree, survivor)
    try:
        weight, bias = _merged(gm, tree, survivor, None if trailing is None else trailing[1])
    except LayoutError as err:
        raise Refused(Code.UNCENTRED_TAP, str(err)) from None
    like_w = fetch(gm, survivor.args[1])
    like_b = like_w if _bias(survivor) is None else fetch(gm, _bias(survivor))
    try:
        new_w = as_parameter(weight, like_w, balanced_over(layout_of(survivor), rounding))
        new_b = as_parameter(bias, like_b)
    except Unfoldable as err:
        raise Refused(Code.BAD_VALUES, str(err)) from None
    bn_after = None if trailing is None else trailing[0]
    return _Merge(_site(tree, survivor, bn_after), tree, survivor, bn_after, new_w, new_b)


def _site(tree: Tree, survivor: fx.Node, trailing: fx.Node | None) -> MergeSite:
    conv, top = linear_path(survivor), tree.top.name
    terms = tree.signed_terms(lambda n: bn_path(n) if n.target in BN_OPS else linear_path(n))
    keys = tuple(c.name for c in tree.convs)
    merge = Site(FoldKind.REPARAM, (conv,), top, join=top, terms=terms, finder=FINDER, keys=keys)
    taps = tuple(
        Site(FoldKind.IDENTITY_TAP, (conv,), bn_path(bn), finder=FINDER, keys=(bn.name,))
        for bn in tree.identities
    )
    after = None
    if trailing is not None:
        after = Site(FoldKind.ADJACENT, (conv,), bn_path(trailing), top, finder=FINDER,
                     keys=(trailing.name,))  # fmt: skip
    ops = [op_name(survivor)] * len(tree.convs) + ["batch_norm"] * len(tree.identities)
    tree_ops = list(dict.fromkeys(_TREE_OPS[op.target] for op in tree.ops))  # top first
    return MergeSite(merge, taps, after, "+".join([*ops, *tree_ops]), op_name(survivor))


def _views_constant(node: fx.Node) -> bool:
    """A view op over a ``get_attr`` tensor, or over another such view."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return False
    return source.op == "get_attr" or (source.target in _VIEW_OPS and _views_constant(source))


def _is_number(value: object) -> bool:
    """A Python int or float operand (not a bool): a constant of the tree."""
    return type(value) in (int, float)


def _is_conv(node: fx.Node) -> bool:
    """A conv, not a transposed one (``convolution`` says which in its args), nor a linear."""
    if not is_linear_op(node) or node.target == aten.linear.default:
        return False
    kind = CONV_OPS[node.target][0]
    return kind == "conv" or (kind == "convolution" and not node.args[6])


# --- the checks and the merged values -------------------------------------------------


def _require_constant_conv(gm: fx.GraphModule, conv: fx.Node) -> None:
    params = [a for a in conv.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        raise Refused(Code.NOT_CONSTANT, f"{conv.name} weight or bias is computed")
    weight = fetch(gm, conv.args[1])
    if not weight.is_floating_point():
        raise Refused(Code.UNSUPPORTED_DTYPE, f"{conv.name} weight is {weight.dtype}")
    if len(traced_shape(conv)) != weight.ndim:
        raise Refused(
            Code.NOT_PER_CHANNEL, f"{conv.name} runs unbatched: its channels are not on axis 1"
        )


def _trailing_bn(
    gm: fx.GraphModule, top: fx.Node, survivor: fx.Node
) -> tuple[fx.Node, Affine] | None:
    """The inference BN reading the sum alone, and its affine; None if none can fold.

    Folding it here rounds the merged kernel once; folding it after the merge
    would round it again.
    """
    readers = list(top.users)
    if len(readers) != 1 or readers[0].target not in BN_OPS:
        return None
    bn = readers[0]
    if bn.args[0] is not top or uses_batch_stats(bn) or bn.args[3] is None or bn.args[4] is None:
        return None
    if check_bn_node(bn) or check_stats(gm, bn, _channels(gm, survivor)):
        return None  # it stays, and says why when it is matched itself
    try:
        return bn, bn_affine(gm, bn)
    except Unfoldable:
        return None


def _identity_affine(gm: fx.GraphModule, bn: fx.Node, channels: int) -> Affine:
    """The affine of an identity BN term, or why it cannot be a tap."""
    if uses_batch_stats(bn):
        raise Refused(Code.TRAINING_MODE, f"{bn.name} is called with training=True")
    if bn.args[3] is None or bn.args[4] is None:
        raise Refused(Code.NO_RUNNING_STATS, f"{bn.name} has no running statistics")
    if found := check_bn_node(bn) or check_stats(gm, bn, channels):
        raise Refused(*found)
    try:
        return bn_affine(gm, bn)
    except Unfoldable as err:
        raise Refused(Code.BAD_VALUES, str(err)) from None


def _merged(
    gm: fx.GraphModule, tree: Tree, survivor: fx.Node, after: Affine | None
) -> tuple[np.ndarray, np.ndarray]:
    """The merged kernel and bias in float64 (:func:`bnfold.core.reparam.merge_branches`):
    padded kernels and identity taps summed, ``after`` (a BN reading the sum) folded in.

    Raises:
        LayoutError: a kernel cannot be centred (:func:`bnfold.core.reparam.centred_kernel`).
    """
    shape = tuple(fetch(gm, survivor.args[1]).shape)
    merged = rule.Survivor(survivor.name, shape[0], len(shape))
    branches = []
    for term in tree.conv_terms:
        conv = term.node
        assert conv is not None
        _require_centred(gm, conv, survivor)
        conv_bias = _bias(conv)
        bias = None if conv_bias is None else to_float64(fetch(gm, conv_bias))
        weight = to_float64(fetch(gm, conv.args[1]))
        branches.append(Branch(weight, bias, term.coefficient(merged)))
    if tree.has_identity:
        _require_identity_fits(gm, survivor)
    # The bare terms first, as one tap: the order these merges have always summed in.
    bare = [term.coefficient(merged) for term in tree.identity_terms if term.node is None]
    taps = [Tap(np.sum(bare, axis=0))] if bare else []
    for term in tree.identity_terms:
        if term.node is not None:
            coefficient = term.coefficient(merged)
            affine = _identity_affine(gm, term.node, merged.channels)
            taps.append(Tap(coefficient * affine.scale, coefficient * affine.shift))
    offsets = [offset.offset(merged) for offset in tree.offsets]
    return merge_branches(shape, branches, taps, offsets, after)


def _bias(conv: fx.Node) -> fx.Node | None:
    bias = conv.args[2] if len(conv.args) > 2 else None
    return bias if isinstance(bias, fx.Node) else None


def _kernel(gm: fx.GraphModule, conv: fx.Node) -> tuple[int, ...]:
    return tuple(fetch(gm, conv.args[1]).shape[2:])


def _channels(gm: fx.GraphModule, conv: fx.Node) -> int:
    return int(fetch(gm, conv.args[1]).shape[0])


def _geometry(gm: fx.GraphModule, conv: fx.Node) -> ConvGeometry:
    """conv*d(x, w, b, stride=1, padding=0, dilation=1, groups=1) (padding may be
    "same"/"valid"), or convolution(x, w, b, stride, padding, dilation, transposed,
    output_padding, groups)."""
    shape = tuple(fetch(gm, conv.args[1]).shape)
    kernel = shape[2:]

    def arg(index: int, default: object) -> object:
        return conv.args[index] if len(conv.args) > index else default

    dilations = per_axis(arg(5, 1), len(kernel))
    groups = int(arg(8 if CONV_OPS[conv.target][0] == "convolution" else 6, 1))  # type: ignore[call-overload]
    return ConvGeometry(
        kernel=kernel,
        pads=torch_pads(arg(4, 0), kernel, dilations),
        strides=per_axis(arg(3, 1), len(kernel)),
        dilations=dilations,
        groups=groups,
        in_channels=shape[1] * groups,
        out_channels=shape[0],
    )


def _properties(gm: fx.GraphModule, conv: fx.Node) -> dict[str, object]:
    """What every conv of a sum must share, as this front names it."""
    geometry, weight = _geometry(gm, conv), fetch(gm, conv.args[1])
    return {
        "strides": geometry.strides,
        "dilations": geometry.dilations,
        "groups": geometry.groups,
        "weight rows and columns": tuple(weight.shape[:2]),
        "weight dtype": weight.dtype,
    }


def _require_same_geometry(gm: fx.GraphModule, tree: Tree, survivor: fx.Node) -> None:
    terms = [(conv.name, _properties(gm, conv)) for conv in tree.convs]
    Refused.check(same_geometry(terms, (survivor.name, _properties(gm, survivor))))
    shape = traced_shape(tree.top)
    source = tree.source
    assert isinstance(source, fx.Node)  # what a conv or BN reads
    # a BN keeps its input's shape (and a decomposed one's node is a tuple)
    terms_read = [*tree.convs] + [source] * tree.has_identity
    for term in terms_read:
        if not shape or traced_shape(term) != shape:
            raise Refused(
                Code.BRANCH_MISMATCH,
                f"{term.name} is {traced_shape(term)}, the sum {shape}: a broadcast, not a merge",
            )


def _require_centred(gm: fx.GraphModule, conv: fx.Node, survivor: fx.Node) -> None:
    """Padding ``conv``'s kernel to the survivor's must grow its pads to the survivor's."""
    small, large = _geometry(gm, conv), _geometry(gm, survivor)
    Refused.check(centred_in(small, large, conv.name, survivor.name))


def _require_identity_fits(gm: fx.GraphModule, survivor: fx.Node) -> None:
    """The identity reads x unpadded at stride 1 with as many inputs as outputs."""
    Refused.check(identity_tap_misfit(_geometry(gm, survivor), survivor.name))
