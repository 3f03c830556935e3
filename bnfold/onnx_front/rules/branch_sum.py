"""Rule: a linear tree of conv branches and identity BNs reading one input, as one Conv.

Matches:  Add(... Add(Conv_a(x), Conv_b(x)) ..., BN(x)), any tree of Add, Sub and
          Mul-by-a-constant nodes whose leaves are Convs reading ``x``,
          BatchNormalizations of ``x`` itself, or ``x`` itself, as in RepVGG,
          MobileOne and RepGhost train-time blocks, RepViT's
          ``BN(conv(x) + conv1(x) + x)`` and FastViT's RepMixer
          ``x + layer_scale * (mixer(x) - BN(x))``. Each leaf carries the
          per-output-channel coefficient of its path: a Sub negates its
          subtrahend's leaves, a Mul by a scalar or per-channel constant scales
          its operand's. A constant added (or subtracted) inside the tree, scalar
          or per channel, goes to the bias (MobileOne's ``0 + BN(x)``). The
          branch BNs after each conv fold first (the after rule), so here every
          conv term is a plain Conv with a constant weight. A BN reading the
          tree's top folds into the merge.
Produces: one Conv (the first of the largest kernel, under its name) whose
          weight is the sum of every conv's kernel zero-padded, centred, to the
          largest, plus one centred tap per channel for each identity BN (its
          scale; 1 for a bare ``x``), each times its coefficient, and whose bias
          sums the biases, the BNs' shifts and the constants, each times its
          coefficient, then times a BN after the tree; it takes over the output
          and name of the top Add or Sub (or of that BN). Reported as one
          ``reparam`` fold, one ``identity_tap`` fold per identity BN and an
          ``adjacent`` one for a BN after the tree. Computed in float64, cast
          once (balanced with ``--rounding balanced``); the merged kernel keeps
          its float64 value, so a fold that lands on the merged conv later (a
          Mul after the block, a BN through a pool, another pass) still rounds
          it once.
Refuses (on each identity BN of the tree; a tree of convs alone is not a BN site):
  BRANCH_MISMATCH  the convs differ in strides, dilations, group or channel
                   counts, use auto_pad, or the identity term needs stride 1 and
                   as many input as output channels
  UNCENTRED_TAP    a smaller kernel or the identity tap would not sit centred
                   in the largest kernel with the padding it has (an odd size
                   difference, an even kernel, asymmetric or unequal padding)
  BRANCHING        a term is also read outside the tree
  BAD_SHAPE        a Mul's or an added constant's channel count is not the convs'
  and the codes of reading a conv or BN (NOT_CONSTANT, BAD_VALUES, ...).

A Mul by a value computed at run time, or by a constant that is not per
channel (one varying over a spatial axis, one that would broadcast the tree to
a larger shape), is no node of the tree: its result is a value of its own, so
the tree above it does not match and the sums below it merge on their own. A
tree op whose output another node reads too is likewise a value of its own.

The tree is planned at its top Add or Sub only: a node whose one reader leads,
through Muls and constant Adds, to the Add or Sub of a larger tree leaves the
merge to it, so each block is merged once. A plain residual ``conv(x) + x``
with no BN in or after it is left as built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.core.cast import Unfoldable, balanced_over
from bnfold.core.geometry import off_centre_axis
from bnfold.core.layouts import LayoutError
from bnfold.core.reparam import Branch, Tap, merge_branches
from bnfold.onnx_front.constants import constant_array, is_constant, reads_data
from bnfold.onnx_front.folded import DeferredWeight, ExactBias
from bnfold.onnx_front.graph_edit import drop_if_dead, set_constant_input
from bnfold.onnx_front.rules.base import (
    FoldPlan,
    LinearOp,
    MatchOptions,
    Refused,
    batchnorm_affine,
    describe_linear,
    is_float,
    label,
    per_channel_vector,
    rank_of,
    readers,
)
from bnfold.report import Code, Folded, FoldKind, Refusal


@dataclass(frozen=True)
class Term:
    """One leaf of a tree, times the coefficient of its path from the top.

    ``node`` is a Conv of the source, a BatchNormalization of it, or None for
    the source itself. ``constant`` is set instead for a constant the tree adds.
    The coefficient is ``sign`` (-1 under an odd number of Sub subtrahends)
    times every Mul constant on the path (``factors``, as stored: each becomes a
    per-channel vector once the merged conv's channels are known).
    """

    node: ir.Node | None
    sign: float = 1.0
    factors: tuple[np.ndarray, ...] = ()
    constant: np.ndarray | None = None

    @property
    def is_bare(self) -> bool:
        return self.node is None and self.constant is None

    def coefficient(self, survivor: LinearOp) -> np.ndarray:
        """The ``(C,)`` float64 coefficient of this term on ``survivor``'s output channels.

        Raises:
            Refused: BAD_SHAPE, a factor's channel count is not the survivor's.
        """
        coefficient = np.full(survivor.channels, self.sign)
        for factor in self.factors:
            coefficient = coefficient * _channel_vector(factor, survivor, "Mul")
        return coefficient


@dataclass(frozen=True)
class SumTree:
    """The Add/Sub/Mul nodes of one tree and its terms, all reading ``source``."""

    ops: tuple[ir.Node, ...]  # top first
    terms: tuple[Term, ...]  # Conv and BN leaves and bare sources, in walk order
    offsets: tuple[Term, ...]  # the constants the tree adds
    source: ir.Value

    @property
    def top(self) -> ir.Node:
        return self.ops[0]

    @property
    def conv_terms(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.node is not None and t.node.op_type == "Conv")

    @property
    def identity_terms(self) -> tuple[Term, ...]:
        """The BN leaves and bare sources, BNs first: taps on the merged kernel."""
        bns = [t for t in self.terms if t.node is not None and t.node.op_type != "Conv"]
        return (*bns, *(t for t in self.terms if t.is_bare))

    @property
    def convs(self) -> tuple[ir.Node, ...]:
        return tuple(t.node for t in self.conv_terms)  # type: ignore[misc]

    @property
    def identities(self) -> tuple[ir.Node, ...]:
        """The BatchNormalization(source) leaves."""
        return tuple(t.node for t in self.identity_terms if t.node is not None)

    @property
    def bare(self) -> int:
        """How many terms are ``source`` itself."""
        return sum(1 for t in self.terms if t.is_bare)

    def site(self) -> str:
        ordered = [*self.conv_terms, *self.identity_terms]
        names = [("x" if t.is_bare else label(t.node), t.sign < 0) for t in ordered]
        text = ("-" if names[0][1] else "") + names[0][0]
        text += "".join((" - " if negative else " + ") + name for name, negative in names[1:])
        return text + f" -> {label(self.top)}"

    @property
    def has_identity(self) -> bool:
        return any(t.node is None or t.node.op_type != "Conv" for t in self.terms)


@dataclass(frozen=True)
class BranchMerge:
    """A checked merge of a :class:`SumTree` into its survivor Conv, ready to apply."""

    tree: SumTree
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


def _trailing_bn(
    tree: SumTree, survivor: LinearOp, ir_version: int
) -> tuple[ir.Node, Affine] | None:
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
    tree: SumTree, convs: list[LinearOp], survivor: LinearOp, ir_version: int, after: Affine | None
) -> tuple[np.ndarray, np.ndarray]:
    """The merged kernel and bias in float64 (:func:`bnfold.core.reparam.merge_branches`):
    padded kernels and identity taps, each times its term's coefficient, summed; the
    tree's constants added to the bias; ``after`` (a BN reading the tree) folded in."""
    branches = []
    for term, conv in zip(tree.conv_terms, convs, strict=True):
        _require_centred(conv, survivor)
        coefficient = term.coefficient(survivor)
        branches.append(Branch(conv.exact_weight(), conv.exact_bias(), coefficient))
    if tree.has_identity:
        _require_identity_fits(survivor)
    taps = []
    for term in tree.identity_terms:
        coefficient = term.coefficient(survivor)
        if term.node is None:  # the source itself: a tap of 1
            taps.append(Tap(coefficient))
            continue
        affine = batchnorm_affine(term.node, survivor.channels, ir_version)
        taps.append(Tap(coefficient * affine.scale, coefficient * affine.shift))
    offsets = []
    for offset in tree.offsets:
        assert offset.constant is not None
        coefficient = offset.coefficient(survivor)
        offsets.append(coefficient * _channel_vector(offset.constant, survivor, "Add"))
    return merge_branches(survivor.weight_shape, branches, taps, offsets, after)


def _channel_vector(array: np.ndarray, survivor: LinearOp, op: str) -> np.ndarray:
    """A tree constant as ``(C,)`` float64 values on ``survivor``'s output channels.

    Raises:
        Refused: BAD_SHAPE, its channel axis is neither 1 nor the survivor's C.
    """
    vector = per_channel_vector(array, survivor)
    if vector is None:
        raise Refused(
            Code.BAD_SHAPE,
            f"a {op} constant of shape {list(array.shape)} in the tree is not per channel of "
            f"{label(survivor.node)}'s {survivor.channels}",
        )
    return vector


def why_not_tap(bn: ir.Node, ir_version: int, options: MatchOptions) -> Refusal | None:
    """The refusal of the tree an identity BN is a term of, or None.

    None when the BN is no identity term of a tree, or when the tree merges
    (then the BN goes with it when its top is planned).
    """
    top = _top_of(bn, ir_version)
    if top is None:
        return None
    try:
        tree = sum_tree(top, ir_version)
        if tree is not None and bn in tree.identities:
            plan_branch_merge(top, ir_version, options)
    except Refused as refused:
        return Refusal(f"{label(bn)} -> {label(top)}", refused.code, refused.detail)
    return None


@dataclass
class _Walk:
    """What :func:`_collect` gathers below a top."""

    ops: list[ir.Node] = field(default_factory=list)
    terms: list[Term] = field(default_factory=list)
    offsets: list[Term] = field(default_factory=list)
    shared: list[ir.Node] = field(default_factory=list)  # leaves also read elsewhere
    bare: list[ir.Value] = field(default_factory=list)  # the values of the bare terms


def sum_tree(top: ir.Node, ir_version: int, pending: bool = False) -> SumTree | None:
    """The tree topped by the Add or Sub ``top``, or None when its leaves do not all
    read one input.

    With ``pending``, a leaf may still be ``BN(Conv(x))`` whose BN the after rule
    folds later this round: that is how an inner node sees that a larger tree will
    merge it (graph order can visit it before a sibling branch's BN folds).

    Raises:
        Refused: BRANCHING, the leaves read one input but one is also read elsewhere.
    """
    if not _is_sum(top, ir_version):
        return None
    walk = _Walk()
    _collect(top, ir_version, walk, 1.0, ())
    leaves = [t.node for t in walk.terms if t.node is not None]
    convs = [n for n in leaves if n.op_type == "Conv"]
    if not leaves or (not convs and not pending):
        return None
    source = _source_of(leaves[0], pending)
    if source is None or any(_source_of(n, pending) is not source for n in leaves):
        return None
    if any(v is not source for v in walk.bare):
        return None
    rank = _tree_rank(leaves, source)
    constants = [c for t in (*walk.terms, *walk.offsets) for c in t.factors]
    constants += [t.constant for t in walk.offsets if t.constant is not None]
    if not all(_fits_channels(c, rank) for c in constants):
        return None  # a constant over other axes: not one affine per channel
    if walk.shared:
        raise Refused(
            Code.BRANCHING,
            f"{label(walk.shared[0])}'s output is also read outside the tree at {label(top)}",
        )
    return SumTree(tuple(walk.ops), tuple(walk.terms), tuple(walk.offsets), source)


def _collect(node: ir.Node, ir_version: int, walk: _Walk, sign: float, factors: tuple) -> None:
    """Walk the tree ops below ``node``, each operand with the coefficient of its path.

    Conv and BN leaves become terms (and go to ``shared`` too when their output
    is also read elsewhere), constants offsets, any other value a bare term
    (the source itself, or no tree). A tree op that another node reads too is a
    value of its own.
    """
    walk.ops.append(node)
    scaled = _scaled_operand(node, ir_version)
    if scaled is not None:
        operand, scale = scaled
        _visit(operand, node, ir_version, walk, sign, (*factors, scale))
        return
    for index, operand in enumerate(node.inputs):
        assert operand is not None
        operand_sign = -sign if node.op_type == "Sub" and index == 1 else sign
        constant = constant_array(operand, ir_version)
        if constant is not None:
            walk.offsets.append(Term(None, operand_sign, factors, constant=constant))
        else:
            _visit(operand, node, ir_version, walk, operand_sign, factors)


def _visit(
    value: ir.Value, reader: ir.Node, ir_version: int, walk: _Walk, sign: float, factors: tuple
) -> None:
    producer = value.producer()
    if producer is None or producer in walk.ops:  # a graph input, or tree ops in a cycle
        walk.terms.append(Term(None, sign, factors))
        walk.bare.append(value)
    elif _is_tree_op(producer, ir_version) and _only_reader_is(value, reader):
        _collect(producer, ir_version, walk, sign, factors)
    elif producer.op_type in ("Conv", "BatchNormalization"):
        if not _only_reader_is(value, reader):
            walk.shared.append(producer)
        walk.terms.append(Term(producer, sign, factors))
    else:  # the tree's input itself, or no tree
        walk.terms.append(Term(None, sign, factors))
        walk.bare.append(value)


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
    """An Add of two computed values (not a bias Add of a constant): a tree's top.

    A Sub only ever sits inside a tree: merged at the top, ``a - b`` of two large
    values would leave verification no operand to scale its bound by (it judges
    a difference against its operands' size), so an exact merge could fail.
    """
    return (
        node.op_type == "Add"
        and node.domain in ("", "ai.onnx")
        and len(node.inputs) == 2
        and all(v is not None and not is_constant(v, ir_version) for v in node.inputs)
    )


def _is_tree_op(node: ir.Node, ir_version: int) -> bool:
    """A node a tree may hold: a sum, an Add/Sub of a constant, or a Mul by a constant."""
    if node.op_type not in ("Add", "Sub", "Mul") or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return False
    constant = [is_constant(v, ir_version) for v in node.inputs]
    if node.op_type == "Mul":
        return constant.count(True) == 1
    return not all(constant)


def _scaled_operand(node: ir.Node, ir_version: int) -> tuple[ir.Value, np.ndarray] | None:
    """A Mul's computed operand and its constant factor; None for an Add or Sub."""
    if node.op_type != "Mul":
        return None
    a, b = node.inputs
    constant_a = constant_array(a, ir_version)
    if constant_a is not None:
        return b, constant_a  # type: ignore[return-value]
    return a, constant_array(b, ir_version)  # type: ignore[return-value]


def _tree_rank(leaves: list[ir.Node], source: ir.Value) -> int | None:
    """The rank of the tree's values: a conv's weight rank, else the source's; None if unknown."""
    for leaf in leaves:
        conv = leaf if leaf.op_type == "Conv" else leaf.inputs[0].producer()  # type: ignore[union-attr]
        weight = None if conv is None or conv.op_type != "Conv" else conv.inputs[1]
        if weight is None:
            continue
        if weight.const_value is not None:
            return len(weight.const_value.shape)
        if weight.shape is not None:
            return len(weight.shape)
    return rank_of(source)


def _fits_channels(array: np.ndarray | None, rank: int | None) -> bool:
    """A float constant that broadcasts onto the tree's values per channel (axis 1) without
    growing them: at most their rank, every axis 1 but the channel axis. Of unknown
    rank, only a single value of rank 0 or 1 surely does."""
    if array is None or not is_float(array):
        return False
    if rank is None:
        return array.size == 1 and array.ndim <= 1
    channel = array.ndim - (rank - 1)
    return array.ndim <= rank and all(
        size == 1 for axis, size in enumerate(array.shape) if axis != channel
    )


def _only_reader_is(value: ir.Value, node: ir.Node) -> bool:
    uses = [u for u in value.uses() if reads_data(u.node, u.idx)]
    return not value.is_graph_output() and len(uses) == 1 and uses[0].node is node


def _sole_tree_reader(node: ir.Node, ir_version: int) -> ir.Node | None:
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or readers(out) != 1:
        return None
    reader = uses[0].node
    return reader if _is_tree_op(reader, ir_version) else None


def _parent_top(node: ir.Node, ir_version: int) -> ir.Node | None:
    """The Add or Sub that ``node``'s output reaches as the one reader of each node on the
    way (Muls by constants, constant Adds), or None."""
    seen = {node}
    while (reader := _sole_tree_reader(node, ir_version)) is not None:
        if reader in seen:  # tree ops reading each other in a cycle: no tree has a top
            return None
        if _is_sum(reader, ir_version):
            return reader
        seen.add(reader)
        node = reader
    return None


def _defers_to_reader(top: ir.Node, ir_version: int) -> bool:
    """``top`` is an inner node of a larger tree, which merges it."""
    parent = _parent_top(top, ir_version)
    try:
        tree = None if parent is None else sum_tree(parent, ir_version, pending=True)
    except Refused:  # the larger tree does not merge: this one may
        return False
    return tree is not None and not _is_plain_residual(tree)


def _is_plain_residual(tree: SumTree) -> bool:
    """A bare source and no BN of it in or after the tree: merging would remove no BN, so
    the tree is left as built (``x + layer_scale * (conv_a(x) + conv_b(x))``: the
    sum below still merges on its own)."""
    if not tree.bare or any(bn.inputs[0] is tree.source for bn in tree.identities):
        return False
    uses = list(tree.top.outputs[0].uses())
    return not (len(uses) == 1 and uses[0].node.op_type == "BatchNormalization")


def _top_of(bn: ir.Node, ir_version: int) -> ir.Node | None:
    """The top Add or Sub of the tree a reader of the BN belongs to, or None.

    A BN with other readers too is still that tree's term: the tree then
    refuses it as BRANCHING, which says more than "standalone".
    """
    tree_readers = [u.node for u in bn.outputs[0].uses() if _is_tree_op(u.node, ir_version)]
    if not tree_readers:
        return None
    node = tree_readers[0]
    top = node if _is_sum(node, ir_version) else _parent_top(node, ir_version)
    seen = set()
    while top is not None and (parent := _parent_top(top, ir_version)) is not None:
        if parent in seen:
            return None
        seen.add(parent)
        top = parent
    return top


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
        Folded(f"{label(bn)} -> {conv}", f"BatchNormalization+{tree.top.op_type}", conv,
               label(bn), kind=FoldKind.IDENTITY_TAP)
        for bn in tree.identities
    ]  # fmt: skip
    if bn_after is not None:
        site = f"{conv} -> {label(tree.top)} -> {label(bn_after)}"
        pattern = f"Conv+{tree.top.op_type}+BatchNormalization"
        taps.append(Folded(site, pattern, conv, label(bn_after)))
    ops = [n.op_type for n in (*tree.convs, *tree.identities)]
    tree_ops = list(dict.fromkeys(n.op_type for n in tree.ops))  # each kind once, top first
    pattern = "+".join([*ops, *tree_ops])
    # The merged conv computes the tree (or the BN after it) under its name: the
    # site verification compares. An identity tap's own value is gone in the fold.
    value = (bn_after or tree.top).outputs[0].name or ""
    merge = Folded(tree.site(), pattern, conv, label(tree.top), kind=FoldKind.REPARAM, value=value)
    return [*taps, merge]
