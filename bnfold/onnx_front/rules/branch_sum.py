"""Rule: a sum of conv branches and identity BNs reading one input, as one Conv.

Matches:  Add(... Add(Conv_a(x), Conv_b(x)) ..., BN(x)), any tree of Adds whose
          leaves are Convs reading ``x``, BatchNormalizations of ``x`` itself, or
          ``x`` itself, as in RepVGG, MobileOne and RepGhost train-time blocks and
          RepViT's ``BN(conv(x) + conv1(x) + x)``. The branch BNs after each conv
          fold first (the after rule), so here every conv term is a plain Conv
          with a constant weight. A BN reading the sum folds into the merge.
Produces: one Conv (the first of the largest kernel, under its name) whose
          weight is the sum of every conv's kernel zero-padded, centred, to the
          largest, plus one centred tap per channel for each identity BN (its
          scale; 1 for a bare ``x``), and whose bias sums the biases and the BNs'
          shifts, then times a BN after the sum; it takes over the output and
          name of the top Add (or of that BN). Reported as one ``reparam`` fold,
          one ``identity_tap`` fold per identity BN and an ``adjacent`` one for
          a BN after the sum. Computed in float64, cast once (balanced with
          ``--rounding balanced``); the merged kernel keeps its float64 value,
          so a fold that lands on the merged conv later (a Mul after the
          block, a BN through a pool, another pass) still rounds it once.
Refuses (on each identity BN of the sum; a sum of convs alone is not a BN site):
  BRANCH_MISMATCH  the convs differ in strides, dilations, group or channel
                   counts, use auto_pad, or the identity term needs stride 1 and
                   as many input as output channels
  UNCENTRED_TAP    a smaller kernel or the identity tap would not sit centred
                   in the largest kernel with the padding it has (an odd size
                   difference, an even kernel, asymmetric or unequal padding)
  BRANCHING        a term is also read outside the sum
  and the codes of reading a conv or BN (NOT_CONSTANT, BAD_VALUES, ...).

The sum is planned at its top Add only: an Add whose one reader is the Add of
a larger branch sum leaves the merge to it, so each block is merged once. A
plain residual ``conv(x) + x`` with no BN in or after it is left as built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.affine import Affine, Unfoldable, balanced_over, centred_kernel, identity_kernel
from bnfold.conv_geometry import off_centre_axis
from bnfold.layouts import LayoutError
from bnfold.onnx_front.constants import is_constant, reads_data
from bnfold.onnx_front.folded import DeferredWeight, ExactBias
from bnfold.onnx_front.graph_edit import drop_if_dead, set_constant_input
from bnfold.onnx_front.rules.base import (
    FoldPlan,
    LinearOp,
    MatchOptions,
    Refused,
    batchnorm_affine,
    describe_linear,
    label,
    readers,
)
from bnfold.report import Code, Folded, FoldKind, Refusal


@dataclass(frozen=True)
class SumTree:
    """The Adds of one sum and its leaves, grouped by kind, all reading ``source``."""

    adds: tuple[ir.Node, ...]  # top first
    convs: tuple[ir.Node, ...]
    identities: tuple[ir.Node, ...]  # BatchNormalization(source)
    source: ir.Value
    bare: int = 0  # terms that are ``source`` itself, an identity of scale 1

    @property
    def top(self) -> ir.Node:
        return self.adds[0]

    def site(self) -> str:
        terms = [label(n) for n in (*self.convs, *self.identities)] + ["x"] * self.bare
        return " + ".join(terms) + f" -> {label(self.top)}"

    @property
    def has_identity(self) -> bool:
        return bool(self.identities) or self.bare > 0


@dataclass(frozen=True)
class BranchMerge:
    """A checked merge of a :class:`SumTree` into its survivor Conv, ready to apply."""

    tree: SumTree
    survivor: LinearOp
    weight: DeferredWeight  # the merged kernel: its float64 value and the one cast
    bias: ExactBias
    entries: list[Folded]
    trailing_bn: ir.Node | None = None  # a BN after the sum, folded into the merge

    @property
    def plans(self) -> tuple[FoldPlan, ...]:
        # The merged kernel is computed and held here (a block's few small kernels),
        # not planned against the memory budget.
        return ()

    def apply(self, model: ir.Model) -> None:
        """Write the merged weight and bias, hand the top Add's output over, remove the rest."""
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
        gone = [*self.tree.adds, *(n for n in self.tree.convs if n is not conv)]
        gone += self.tree.identities
        if self.trailing_bn is not None:
            gone.insert(0, self.trailing_bn)
        params = [v for n in gone for v in n.inputs[1:] if v is not None]
        for node in gone:
            graph.remove(node, safe=True)
        top_out.name = None
        conv.outputs[0].name = name
        for value in params:
            drop_if_dead(value)


def plan_branch_merge(node: ir.Node, ir_version: int, options: MatchOptions) -> BranchMerge | None:
    """Plan the merge of the branch sum topped by the Add ``node``; None if it is none.

    Raises:
        Refused: a precondition fails (see the module docstring).
    """
    tree = sum_tree(node, ir_version)
    if tree is None or (not tree.has_identity and len(tree.convs) < 2):
        return None
    if _defers_to_reader(node, ir_version):
        return None
    convs = [describe_linear(conv, ir_version, options) for conv in tree.convs]
    survivor = max(convs, key=lambda c: np.prod(c.weight_shape[2:]))
    trailing = _trailing_bn(tree, survivor, ir_version)
    if tree.bare and not tree.identities and trailing is None:
        return None  # a plain residual around a conv: no BN to remove, left as built
    _require_same_geometry(convs, survivor)
    try:
        weight, bias = _merged(tree, convs, survivor, ir_version)
    except LayoutError as err:
        raise Refused(Code.UNCENTRED_TAP, str(err)) from None
    if trailing is not None:
        affine = trailing[1]
        weight *= survivor.layout.expand(affine.scale, survivor.weight_shape)
        bias = bias * affine.scale + affine.shift
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


def _trailing_bn(
    tree: SumTree, survivor: LinearOp, ir_version: int
) -> tuple[ir.Node, Affine] | None:
    """The inference BN reading the sum alone, and its affine; None if none can fold.

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
    tree: SumTree, convs: list[LinearOp], survivor: LinearOp, ir_version: int
) -> tuple[np.ndarray, np.ndarray]:
    """The merged kernel and bias in float64: padded kernels and identity taps summed."""
    kernel = survivor.weight_shape[2:]
    weight = np.zeros(survivor.weight_shape)
    bias = np.zeros(survivor.channels)
    for conv in convs:
        _require_centred(conv, survivor)
        weight += centred_kernel(conv.exact_weight(), kernel)
        conv_bias = conv.exact_bias()
        bias += 0.0 if conv_bias is None else conv_bias
    if tree.has_identity:
        _require_identity_fits(survivor)
    if tree.bare:
        ones = np.full(survivor.channels, float(tree.bare))
        weight += identity_kernel(ones, survivor.weight_shape[1], kernel)
    for bn in tree.identities:
        affine = batchnorm_affine(bn, survivor.channels, ir_version)
        weight += identity_kernel(affine.scale, survivor.weight_shape[1], kernel)
        bias += affine.shift
    return weight, bias


def why_not_tap(bn: ir.Node, ir_version: int, options: MatchOptions) -> Refusal | None:
    """The refusal of the branch sum an identity BN is a term of, or None.

    None when the BN is no identity term of a branch sum, or when the sum merges
    (then the BN goes with it when its top Add is planned).
    """
    top = _top_add(bn, ir_version)
    if top is None:
        return None
    try:
        tree = sum_tree(top, ir_version)
        if tree is not None and bn in tree.identities:
            plan_branch_merge(top, ir_version, options)
    except Refused as refused:
        return Refusal(f"{label(bn)} -> {label(top)}", refused.code, refused.detail)
    return None


def sum_tree(add: ir.Node, ir_version: int, pending: bool = False) -> SumTree | None:
    """The branch sum topped by ``add``, or None when its leaves do not all read one input.

    With ``pending``, a leaf may still be ``BN(Conv(x))`` whose BN the after rule
    folds later this round: that is how an inner Add sees that a larger sum will
    merge it (graph order can visit it before a sibling branch's BN folds).

    Raises:
        Refused: BRANCHING, the leaves read one input but one is also read elsewhere.
    """
    if not _is_sum(add, ir_version):
        return None
    adds: list[ir.Node] = []
    leaves: list[ir.Node] = []
    shared: list[ir.Node] = []
    bare: list[ir.Value] = []
    _collect(add, ir_version, adds, leaves, shared, bare)
    convs = tuple(n for n in leaves if n.op_type == "Conv")
    if not leaves or (not convs and not pending):
        return None
    source = _source_of(leaves[0], pending)
    if source is None or any(_source_of(n, pending) is not source for n in leaves):
        return None
    if any(v is not source for v in bare):
        return None
    if shared:
        raise Refused(
            Code.BRANCHING,
            f"{label(shared[0])}'s output is also read outside the sum at {label(add)}",
        )
    identities = tuple(n for n in leaves if n.op_type == "BatchNormalization")
    return SumTree(tuple(adds), convs, identities, source, bare=len(bare))


def _source_of(leaf: ir.Node, pending: bool) -> ir.Value | None:
    """What a leaf reads; with ``pending``, what the conv under a foldable BN reads."""
    source = leaf.inputs[0]
    producer = None if source is None else source.producer()
    folds_later = (
        pending
        and leaf.op_type == "BatchNormalization"
        and producer is not None
        and producer.op_type == "Conv"
        and _only_reader_is(source, leaf)  # type: ignore[arg-type]
    )
    return producer.inputs[0] if folds_later else source  # type: ignore[union-attr]


def _is_sum(node: ir.Node, ir_version: int) -> bool:
    """An Add of two computed values (not a bias Add of a constant)."""
    return (
        node.op_type == "Add"
        and node.domain in ("", "ai.onnx")
        and len(node.inputs) == 2
        and all(v is not None and not is_constant(v, ir_version) for v in node.inputs)
    )


def _collect(
    add: ir.Node,
    ir_version: int,
    adds: list[ir.Node],
    leaves: list[ir.Node],
    shared: list[ir.Node],
    bare: list[ir.Value],
) -> None:
    """Walk the Adds below ``add``: Conv and BN leaves to ``leaves``, other values to ``bare``.

    Leaves whose output is also read elsewhere go to ``shared`` too. An Add that
    another node reads too is a value of its own (so no branch sum).
    """
    adds.append(add)
    for value in add.inputs:
        assert value is not None
        producer = value.producer()
        if producer is None or producer in adds:  # a graph input, or Adds in a cycle
            bare.append(value)
        elif _is_sum(producer, ir_version) and _only_reader_is(value, add):
            _collect(producer, ir_version, adds, leaves, shared, bare)
        elif producer.op_type in ("Conv", "BatchNormalization"):
            if not _only_reader_is(value, add):
                shared.append(producer)
            leaves.append(producer)
        else:
            bare.append(value)  # the sum's input itself, or no branch sum


def _only_reader_is(value: ir.Value, node: ir.Node) -> bool:
    uses = [u for u in value.uses() if reads_data(u.node, u.idx)]
    return not value.is_graph_output() and len(uses) == 1 and uses[0].node is node


def _sole_add_reader(add: ir.Node, ir_version: int) -> ir.Node | None:
    out = add.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or readers(out) != 1:
        return None
    reader = uses[0].node
    return reader if _is_sum(reader, ir_version) else None


def _defers_to_reader(add: ir.Node, ir_version: int) -> bool:
    """``add`` is an inner Add of a larger branch sum, which merges it."""
    reader = _sole_add_reader(add, ir_version)
    try:
        return reader is not None and sum_tree(reader, ir_version, pending=True) is not None
    except Refused:  # the larger sum does not merge: this one may
        return False


def _top_add(bn: ir.Node, ir_version: int) -> ir.Node | None:
    out = bn.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    seen = {add}
    while (reader := _sole_add_reader(add, ir_version)) is not None:
        if reader in seen:  # Adds reading each other in a cycle: no sum has a top
            return None
        seen.add(reader)
        add = reader
    return add


def _ints(node: ir.Node, name: str, default: int, rank: int) -> tuple[int, ...]:
    values = node.attributes.get_ints(name)
    return (default,) * rank if values is None else tuple(values)


def _geometry(conv: LinearOp) -> dict[str, object]:
    node, rank = conv.node, len(conv.weight_shape) - 2
    return {
        "strides": _ints(node, "strides", 1, rank),
        "dilations": _ints(node, "dilations", 1, rank),
        "group": node.attributes.get_int("group", 1),
        "weight rows and columns": conv.weight_shape[:2],
        "auto_pad": node.attributes.get_string("auto_pad", "NOTSET"),
    }


def _require_same_geometry(convs: list[LinearOp], survivor: LinearOp) -> None:
    expected = _geometry(survivor)
    if expected["auto_pad"] != "NOTSET":
        raise Refused(Code.BRANCH_MISMATCH, f"{label(survivor.node)} uses auto_pad")
    for conv in convs:
        for key, value in _geometry(conv).items():
            if value != expected[key]:
                raise Refused(
                    Code.BRANCH_MISMATCH,
                    f"{label(conv.node)} has {key} {value}, {label(survivor.node)} {expected[key]}",
                )


def _pads(conv: LinearOp) -> tuple[int, ...]:
    return _ints(conv.node, "pads", 0, 2 * (len(conv.weight_shape) - 2))


def _require_centred(conv: LinearOp, survivor: LinearOp) -> None:
    """Padding ``conv``'s kernel to the survivor's must grow its pads to the survivor's."""
    dilations = _ints(survivor.node, "dilations", 1, len(survivor.weight_shape) - 2)
    pads, target = _pads(conv), _pads(survivor)
    small, large = conv.weight_shape[2:], survivor.weight_shape[2:]
    if off_centre_axis(small, pads, large, target, dilations) is not None:
        raise Refused(
            Code.UNCENTRED_TAP,
            f"{label(conv.node)} (kernel {small}, pads {pads}) does not sit "
            f"centred in {label(survivor.node)} (kernel {large}, pads {target})",
        )


def _require_identity_fits(survivor: LinearOp) -> None:
    """The identity reads x unpadded at stride 1 with as many inputs as outputs."""
    rank = len(survivor.weight_shape) - 2
    strides = _ints(survivor.node, "strides", 1, rank)
    if any(s != 1 for s in strides) or survivor.in_channels != survivor.channels:
        raise Refused(
            Code.BRANCH_MISMATCH,
            f"an identity term needs stride 1 and equal channel counts; "
            f"{label(survivor.node)} has strides {strides}, "
            f"{survivor.in_channels} -> {survivor.channels} channels",
        )
    if any(k % 2 == 0 for k in survivor.weight_shape[2:]):
        raise Refused(Code.UNCENTRED_TAP, f"{label(survivor.node)}'s kernel has no centre tap")
    _require_centred_pads(survivor)


def _require_centred_pads(survivor: LinearOp) -> None:
    rank = len(survivor.weight_shape) - 2
    dilations = _ints(survivor.node, "dilations", 1, rank)
    target, kernel = _pads(survivor), survivor.weight_shape[2:]
    axis = off_centre_axis((1,) * rank, (0,) * 2 * rank, kernel, target, dilations)
    if axis is not None:
        grow = (kernel[axis] - 1) // 2 * dilations[axis]
        raise Refused(
            Code.UNCENTRED_TAP,
            f"an identity tap needs pads {grow} on axis {axis}; "
            f"{label(survivor.node)} has pads {target}",
        )


def _entries(tree: SumTree, survivor: LinearOp, bn_after: ir.Node | None) -> list[Folded]:
    conv = label(survivor.node)
    taps = [
        Folded(f"{label(bn)} -> {conv}", "BatchNormalization+Add", conv, label(bn),
               kind=FoldKind.IDENTITY_TAP)
        for bn in tree.identities
    ]  # fmt: skip
    if bn_after is not None:
        site = f"{conv} -> {label(tree.top)} -> {label(bn_after)}"
        taps.append(Folded(site, "Conv+Add+BatchNormalization", conv, label(bn_after)))
    ops = [n.op_type for n in (*tree.convs, *tree.identities)]
    pattern = "+".join([*ops, "Add"])
    # The merged conv computes the sum (or the BN after it) under its name: the
    # site verification compares. An identity tap's own value is gone in the fold.
    value = (bn_after or tree.top).outputs[0].name or ""
    merge = Folded(tree.site(), pattern, conv, label(tree.top), kind=FoldKind.REPARAM, value=value)
    return [*taps, merge]
