"""Rule: an ONNX branch sum merged into one Conv (the tree: :mod:`bnfold.rules.branch_sum`).

Matches:  the trees of :mod:`bnfold.rules.branch_sum` as ONNX Add, Sub and
          Mul-by-a-constant nodes over Conv, BatchNormalization and the input,
          read through :class:`OnnxSums`: RepVGG, MobileOne, RepGhost, RepViT's
          ``BN(conv(x) + conv1(x) + x)``, FastViT's RepMixer
          ``x + layer_scale * (mixer(x) - BN(x))``. The branch BNs after each
          conv fold first (the after rule), so every conv term is a plain Conv
          with a constant weight. A BN reading the tree's top folds into the merge.
Produces: one Conv (the first of the largest kernel, under its name) with the
          merged kernel and bias (:func:`bnfold.core.reparam.merge_branches`),
          taking over the output and name of the top Add (or of that BN).
          Reported as one ``reparam`` fold, one ``identity_tap`` fold per identity
          BN and an ``adjacent`` one for a BN after the tree. Computed in float64,
          cast once (balanced with ``--rounding balanced``); the merged kernel
          keeps its float64 value, so a fold that lands on the merged conv later
          (a Mul after the block, a BN through a pool, another pass) still rounds
          it once.
Refuses (on each identity BN of the tree): the codes of
          :mod:`bnfold.rules.branch_sum`, BRANCH_MISMATCH also for a Conv using
          auto_pad, and the codes of reading a conv or BN (NOT_CONSTANT, BAD_VALUES, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.core.cast import Unfoldable, balanced_over
from bnfold.core.geometry import ConvGeometry
from bnfold.core.layouts import LayoutError
from bnfold.core.reparam import Branch, Tap, merge_branches
from bnfold.onnx_front.constants import constant_array, is_constant, reads_data
from bnfold.onnx_front.folded import DeferredWeight, ExactBias
from bnfold.onnx_front.graph_edit import drop_if_dead, set_constant_input
from bnfold.onnx_front.rules.base import (
    FoldPlan,
    LinearOp,
    MatchOptions,
    batchnorm_affine,
    describe_linear,
    label,
    readers,
)
from bnfold.onnx_front.shapes import Shapes
from bnfold.report import Code, Folded, FoldKind, Refusal
from bnfold.rules import branch_sum as rule
from bnfold.rules.branch_sum import SumTree, TreeOp
from bnfold.rules.family import Refused
from bnfold.sites import Site

Tree = SumTree[ir.Node, ir.Value]


class OnnxSums:
    """An ONNX graph as the tree walk of :mod:`bnfold.rules.branch_sum` reads it."""

    def __init__(self, ir_version: int) -> None:
        self.ir_version = ir_version
        self.shapes = Shapes(ir_version)

    def label(self, node: ir.Node) -> str:
        return label(node)

    def producer(self, value: ir.Value) -> ir.Node | None:
        return value.producer()

    def output(self, node: ir.Node) -> ir.Value | None:
        return node.outputs[0]

    def operands(self, node: ir.Node) -> tuple[ir.Value, ir.Value]:
        a, b = node.inputs
        assert a is not None and b is not None  # op() checked
        return a, b

    def op(self, node: ir.Node) -> TreeOp | None:
        if node.op_type not in _TREE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if len(node.inputs) != 2 or any(v is None for v in node.inputs):
            return None
        return _TREE_OPS[node.op_type]

    def is_constant(self, value: ir.Value) -> bool:
        return is_constant(value, self.ir_version)

    def constant(self, value: ir.Value) -> np.ndarray | None:
        return constant_array(value, self.ir_version)

    def leaf(self, node: ir.Node) -> rule.Leaf | None:
        return _LEAVES.get(node.op_type)

    def data_input(self, node: ir.Node) -> ir.Value | None:
        return node.inputs[0]

    def only_reader_is(self, value: ir.Value, node: ir.Node) -> bool:
        uses = [u for u in value.uses() if reads_data(u.node, u.idx)]
        return not value.is_graph_output() and len(uses) == 1 and uses[0].node is node

    def sole_reader(self, node: ir.Node) -> ir.Node | None:
        out = node.outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or len(uses) != 1 or readers(out) != 1:
            return None
        return uses[0].node

    def readers(self, node: ir.Node) -> list[ir.Node]:
        return [use.node for use in node.outputs[0].uses()]

    def rank(self, leaves: Sequence[ir.Node], source: ir.Value) -> int | None:
        """A conv's weight rank, else the source's; None if unknown."""
        for leaf in leaves:
            conv = leaf if leaf.op_type == "Conv" else leaf.inputs[0].producer()  # type: ignore[union-attr]
            weight = None if conv is None or conv.op_type != "Conv" else conv.inputs[1]
            if (rank := self.shapes.rank(weight)) is not None:
                return rank
        return self.shapes.rank(source)


_TREE_OPS: dict[str, TreeOp] = {"Add": "add", "Sub": "sub", "Mul": "mul"}
_LEAVES: dict[str, rule.Leaf] = {"Conv": "conv", "BatchNormalization": "bn"}


def sum_tree(top: ir.Node, ir_version: int, pending: bool = False) -> Tree | None:
    """The tree topped by the Add ``top`` (:func:`bnfold.rules.branch_sum.sum_tree`).

    Raises:
        Refused: BRANCHING, the leaves read one input but one is also read elsewhere.
    """
    return rule.sum_tree(OnnxSums(ir_version), top, pending)


@dataclass(frozen=True)
class BranchMerge:
    """A checked merge of a :class:`SumTree` into its survivor Conv, ready to apply."""

    tree: Tree
    survivor: LinearOp
    weight: DeferredWeight  # the merged kernel: its float64 value and the one cast
    bias: ExactBias
    entries: list[Folded]
    trailing_bn: ir.Node | None = None  # a BN after the tree, folded into the merge

    @property
    def plans(self) -> tuple[FoldPlan, ...]:
        # The merged kernel is computed and held here (a block's few small kernels),
        # not planned against the memory budget.
        return ()

    def apply(self, model: ir.Model) -> None:
        """Write the merged weight and bias, hand the top's output over, remove the rest."""
        conv = self.survivor.node
        set_constant_input(conv, 1, self.weight, model)
        set_constant_input(conv, 2, self.bias, model, suffix="_bias")
        last = self.trailing_bn or self.tree.top
        top_out = last.outputs[0]
        graph = conv.graph
        assert graph is not None
        name = top_out.name
        ir.convenience.replace_all_uses_with(top_out, conv.outputs[0], replace_graph_outputs=True)
        conv.outputs[0].shape, conv.outputs[0].type = top_out.shape, top_out.type
        gone = [*self.tree.ops, *(n for n in self.tree.convs if n is not conv)]
        gone += self.tree.identities
        if self.trailing_bn is not None:
            gone.insert(0, self.trailing_bn)
        # Every input, not only parameters: a Mul's constant may be its first input.
        inputs = [v for n in gone for v in n.inputs if v is not None]
        for node in gone:
            graph.remove(node, safe=True)
        top_out.name = None
        conv.outputs[0].name = name
        for value in inputs:
            drop_if_dead(value)


def plan_branch_merge(node: ir.Node, ir_version: int, options: MatchOptions) -> BranchMerge | None:
    """Plan the merge of the tree topped by the Add or Sub ``node``; None if it is none.

    Raises:
        Refused: a precondition fails (see the module docstring).
    """
    view = OnnxSums(ir_version)
    tree = rule.sum_tree(view, node)
    if tree is None or (not tree.has_identity and len(tree.convs) < 2):
        return None
    if rule.defers_to_reader(view, node):
        return None
    convs = [describe_linear(conv, ir_version, options) for conv in tree.convs]
    survivor = max(convs, key=lambda c: np.prod(c.weight_shape[2:]))
    trailing = _trailing_bn(tree, survivor, ir_version)
    if tree.bare and not tree.identities and trailing is None:
        return None  # a plain residual around a conv: no BN to remove, left as built
    _require_same_geometry(convs, survivor)
    try:
        after = None if trailing is None else trailing[1]
        weight, bias = _merged(tree, convs, survivor, ir_version, after)
    except LayoutError as err:
        raise Refused(Code.UNCENTRED_TAP, str(err)) from None
    dtype = survivor.weight_array.dtype
    balance = balanced_over(survivor.layout, options.rounding)
    try:
        cast_weight = DeferredWeight.of_exact(weight, dtype, balance)
        cast_bias = ExactBias.of(bias, dtype)
    except Unfoldable as err:
        raise Refused(Code.BAD_VALUES, str(err)) from None
    bn_after = None if trailing is None else trailing[0]
    entries = _entries(tree, survivor, bn_after)
    return BranchMerge(tree, survivor, cast_weight, cast_bias, entries, bn_after)


def _trailing_bn(tree: Tree, survivor: LinearOp, ir_version: int) -> tuple[ir.Node, Affine] | None:
    """The inference BN reading the tree alone, and its affine; None if none can fold.

    Folding it here rounds the merged kernel once; folding it after the merge
    would round it again.
    """
    out = tree.top.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    bn = uses[0].node
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
        return None
    try:
        return bn, batchnorm_affine(bn, survivor.channels, ir_version)
    except Refused:
        return None  # it stays, and says why when it is planned itself


def _merged(
    tree: Tree, convs: list[LinearOp], survivor: LinearOp, ir_version: int, after: Affine | None
) -> tuple[np.ndarray, np.ndarray]:
    """The merged kernel and bias in float64 (:func:`bnfold.core.reparam.merge_branches`):
    padded kernels and identity taps, each times its term's coefficient, summed; the
    tree's constants added to the bias; ``after`` (a BN reading the tree) folded in."""
    branches = []
    merged = _survivor(survivor)
    for term, conv in zip(tree.conv_terms, convs, strict=True):
        _require_centred(conv, survivor)
        coefficient = term.coefficient(merged)
        branches.append(Branch(conv.exact_weight(), conv.exact_bias(), coefficient))
    if tree.has_identity:
        _require_identity_fits(survivor)
    taps = []
    for term in tree.identity_terms:
        coefficient = term.coefficient(merged)
        if term.node is None:  # the source itself: a tap of 1
            taps.append(Tap(coefficient))
            continue
        affine = batchnorm_affine(term.node, survivor.channels, ir_version)
        taps.append(Tap(coefficient * affine.scale, coefficient * affine.shift))
    offsets = [offset.offset(merged) for offset in tree.offsets]
    return merge_branches(survivor.weight_shape, branches, taps, offsets, after)


def _survivor(conv: LinearOp) -> rule.Survivor:
    return rule.Survivor(label(conv.node), conv.channels, len(conv.weight_shape))


def why_not_tap(bn: ir.Node, ir_version: int, options: MatchOptions) -> Refusal | None:
    """The refusal of the tree an identity BN is a term of, or None.

    None when the BN is no identity term of a tree, or when the tree merges
    (then the BN goes with it when its top is planned).
    """
    top = rule.top_of(OnnxSums(ir_version), bn)
    if top is None:
        return None
    try:
        tree = sum_tree(top, ir_version)
        if tree is not None and bn in tree.identities:
            plan_branch_merge(top, ir_version, options)
    except Refused as refused:
        site = Site(FoldKind.IDENTITY_TAP, bn=label(bn), between=label(top))
        return site.refusal(refused.code, refused.detail)
    return None


def _ints(node: ir.Node, name: str, default: int, rank: int) -> tuple[int, ...]:
    values = node.attributes.get_ints(name)
    return (default,) * rank if values is None else tuple(values)


def geometry_of(conv: LinearOp) -> ConvGeometry:
    """A Conv's geometry from its attributes (their ONNX defaults where absent)."""
    node, rank = conv.node, len(conv.weight_shape) - 2
    return ConvGeometry(
        kernel=conv.weight_shape[2:],
        pads=_ints(node, "pads", 0, 2 * rank),
        strides=_ints(node, "strides", 1, rank),
        dilations=_ints(node, "dilations", 1, rank),
        groups=node.attributes.get_int("group", 1),
        in_channels=conv.in_channels,
        out_channels=conv.channels,
    )


def _properties(conv: LinearOp) -> dict[str, object]:
    """What every conv of a tree must share, as ONNX names it."""
    geometry = geometry_of(conv)
    return {
        "strides": geometry.strides,
        "dilations": geometry.dilations,
        "group": geometry.groups,
        "weight rows and columns": conv.weight_shape[:2],
        "auto_pad": conv.node.attributes.get_string("auto_pad", "NOTSET"),
    }


def _require_same_geometry(convs: list[LinearOp], survivor: LinearOp) -> None:
    expected = _properties(survivor)
    if expected["auto_pad"] != "NOTSET":
        raise Refused(Code.BRANCH_MISMATCH, f"{label(survivor.node)} uses auto_pad")
    terms = [(label(conv.node), _properties(conv)) for conv in convs]
    Refused.check(rule.same_geometry(terms, (label(survivor.node), expected)))


def _require_centred(conv: LinearOp, survivor: LinearOp) -> None:
    """Padding ``conv``'s kernel to the survivor's must grow its pads to the survivor's."""
    small, large = geometry_of(conv), geometry_of(survivor)
    Refused.check(rule.centred_in(small, large, label(conv.node), label(survivor.node)))


def _require_identity_fits(survivor: LinearOp) -> None:
    """The identity reads x unpadded at stride 1 with as many inputs as outputs."""
    Refused.check(rule.identity_tap_misfit(geometry_of(survivor), label(survivor.node)))


def _entries(tree: Tree, survivor: LinearOp, bn_after: ir.Node | None) -> list[Folded]:
    conv, top = label(survivor.node), label(tree.top)
    tap_pattern = f"BatchNormalization+{tree.top.op_type}"
    taps = [
        Site(FoldKind.IDENTITY_TAP, (conv,), label(bn)).folded(tap_pattern)
        for bn in tree.identities
    ]
    if bn_after is not None:
        after = Site(FoldKind.ADJACENT, (conv,), label(bn_after), between=top)
        taps.append(after.folded(f"Conv+{tree.top.op_type}+BatchNormalization"))
    ops = [n.op_type for n in (*tree.convs, *tree.identities)]
    tree_ops = list(dict.fromkeys(n.op_type for n in tree.ops))  # each kind once, top first
    pattern = "+".join([*ops, *tree_ops])
    # The merged conv computes the tree (or the BN after it) under its name: the
    # site verification compares. An identity tap's own value is gone in the fold.
    value = (bn_after or tree.top).outputs[0].name or ""
    merge = Site(FoldKind.REPARAM, (conv,), top, join=top, terms=tree.signed_terms(label))
    return [*taps, merge.folded(pattern, value=value)]
