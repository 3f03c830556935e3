"""Family ``branch_sum``: a linear tree of conv branches and identity BNs reading one input.

Matches:  Add(... Add(Conv_a(x), Conv_b(x)) ..., BN(x)), any tree of adds, subtractions
          and multiplications by a constant whose leaves are convs reading ``x``,
          BNs of ``x`` itself, or ``x`` itself: RepVGG, MobileOne and RepGhost
          train-time blocks, RepViT's ``BN(conv(x) + conv1(x) + x)`` and FastViT's
          RepMixer ``x + layer_scale * (mixer(x) - BN(x))``. Each leaf carries the
          per-output-channel coefficient of its path (:class:`Term`): a subtraction
          negates its subtrahend's leaves, a multiplication by a scalar or
          per-channel constant scales its operand's. A constant added inside the
          tree goes to the bias. Only an add of two computed values tops a tree.
          Every front walks its graph through a :class:`SumView`, so the trees
          are the same on every front.
Produces: one conv (the first of the largest kernel) whose kernel and bias are
          :func:`bnfold.core.reparam.merge_branches` of the terms (kind ``reparam``,
          and ``identity_tap`` per identity BN, ``adjacent`` for a BN after the
          tree, which folds into the merge).
Refuses (on each identity BN of the tree; a tree of convs alone is not a BN site):
  BRANCH_MISMATCH  the convs differ in strides, dilations, groups or channel counts
                   (:func:`same_geometry`), or an identity term needs stride 1 and
                   as many input as output channels (:func:`tap_misfit`)
  UNCENTRED_TAP    a smaller kernel or the identity tap would not sit centred in
                   the largest kernel with the padding it has (:func:`centred_in`)
  BRANCHING        a term is also read outside the tree
  BAD_SHAPE        a layer scale or an added constant is not per channel of the convs
  and the codes of reading a conv or BN.

A multiplication by a value computed at run time, or by a constant that is not
per channel (one varying over a spatial axis, one that would broadcast the tree
to a larger shape), is no node of a tree: its result is a value of its own, so
the tree above it does not match and the sums below it merge on their own. A
tree op whose output another node reads too is likewise a value of its own.

A node whose one reader leads, through multiplications and constant adds, to the
top of a larger tree leaves the merge to it (:func:`defers_to_reader`), so each
block merges once; a plain residual ``conv(x) + x`` with no BN in or after it is
left as built.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np

from bnfold.core.geometry import ConvGeometry, first_mismatch, off_centre_axis
from bnfold.report import Code, FoldKind
from bnfold.rules.adjacent import channel_vector, is_float
from bnfold.rules.family import Family, Found, Refused

N = TypeVar("N")  # a front's node
V = TypeVar("V")  # a front's value (what an op reads)

TreeOp = Literal["add", "sub", "mul"]
Leaf = Literal["conv", "bn"]


class SumView(Protocol[N, V]):
    """What the tree walk asks a front's graph. ``V`` is what an op reads (ONNX: a
    value; fx: a node, or a Python number), ``N`` an op."""

    def label(self, node: N) -> str:
        """How details name a node."""
        ...

    def producer(self, value: V) -> N | None:
        """The op computing ``value`` (a BN's for its normalized output); None for an input."""
        ...

    def output(self, node: N) -> V | None:
        """The value an op computes (a BN's normalized output)."""
        ...

    def operands(self, node: N) -> tuple[V, V]:
        """The two operands of a tree op, in order."""
        ...

    def op(self, node: N) -> TreeOp | None:
        """ "add", "sub" or "mul" for a plain two-operand one (no alpha), else None."""
        ...

    def is_constant(self, value: V) -> bool:
        """``value`` is a constant (cheaper than :meth:`constant`)."""
        ...

    def constant(self, value: V) -> np.ndarray | None:
        """The values of a constant ``value``, None if it is computed."""
        ...

    def leaf(self, node: N) -> Leaf | None:
        """Whether ``node`` is a conv or a BN a tree may hold as a leaf."""
        ...

    def data_input(self, node: N) -> V | None:
        """The input a conv or BN transforms."""
        ...

    def only_reader_is(self, value: V, node: N) -> bool:
        """``node`` alone reads ``value``, once, and it is no graph output."""
        ...

    def sole_reader(self, node: N) -> N | None:
        """The one op reading ``node``'s output, once, when it is no graph output."""
        ...

    def readers(self, node: N) -> list[N]:
        """Every op reading ``node``'s output."""
        ...

    def rank(self, leaves: Sequence[N], source: V) -> int | None:
        """The rank of the tree's values, None if unknown."""
        ...


@dataclass(frozen=True)
class Survivor:
    """The conv a tree merges into, as the coefficients of its terms need it."""

    label: str  # how details name it
    channels: int  # its output channels
    rank: int  # its output's rank


@dataclass(frozen=True, eq=False)
class Term(Generic[N]):
    """One leaf of a tree, times the coefficient of its path from the top.

    ``node`` is a conv of the source, a BN of it, or None for the source itself.
    ``constant`` is set instead for a constant the tree adds. The coefficient is
    ``sign`` (-1 under an odd number of subtrahends) times every multiplier on the
    path (``factors``, as stored: each becomes a per-channel vector once the merged
    conv's channels are known, :meth:`coefficient`).
    """

    node: N | None
    sign: float = 1.0
    factors: tuple[np.ndarray, ...] = ()
    constant: np.ndarray | None = None

    @property
    def is_bare(self) -> bool:
        return self.node is None and self.constant is None

    def coefficient(self, conv: Survivor) -> np.ndarray:
        """The ``(C,)`` float64 coefficient of this term on the merged conv's channels.

        Raises:
            Refused: BAD_SHAPE, a factor's channel count is not the conv's.
        """
        coefficient = np.full(conv.channels, self.sign)
        for factor in self.factors:
            coefficient = coefficient * tree_vector(factor, conv, "Mul")
        return coefficient

    def offset(self, conv: Survivor) -> np.ndarray:
        """What a constant term adds to the merged conv's bias: its ``(C,)`` values times
        its coefficient.

        Raises:
            Refused: BAD_SHAPE, the constant or a factor is not per channel of the conv.
        """
        assert self.constant is not None
        coefficient = self.coefficient(conv)
        added: np.ndarray = coefficient * tree_vector(self.constant, conv, "Add")
        return added


def tree_vector(array: np.ndarray, conv: Survivor, op: str) -> np.ndarray:
    """A tree constant as ``(C,)`` float64 values on the merged conv's output channels.

    Raises:
        Refused: BAD_SHAPE, its channel axis is neither 1 nor the conv's C.
    """
    vector = channel_vector(array, conv.channels, conv.rank, conv.rank - 1)
    if vector is None:
        raise Refused(
            Code.BAD_SHAPE,
            f"a {op} constant of shape {list(array.shape)} in the tree is not per channel of "
            f"{conv.label}'s {conv.channels}",
        )
    return vector


@dataclass(frozen=True, eq=False)
class SumTree(Generic[N, V]):
    """The tree ops of one tree and its terms, all reading ``source``."""

    ops: tuple[N, ...]  # top first
    terms: tuple[Term[N], ...]  # conv and BN leaves and bare sources, in walk order
    offsets: tuple[Term[N], ...]  # the constants the tree adds
    source: V
    leaf_kinds: tuple[Leaf | None, ...]  # per term, what its node is

    @property
    def top(self) -> N:
        return self.ops[0]

    @property
    def conv_terms(self) -> tuple[Term[N], ...]:
        return tuple(t for t, k in zip(self.terms, self.leaf_kinds, strict=True) if k == "conv")

    @property
    def identity_terms(self) -> tuple[Term[N], ...]:
        """The BN leaves and bare sources, BNs first: taps on the merged kernel."""
        bns = [t for t, k in zip(self.terms, self.leaf_kinds, strict=True) if k == "bn"]
        return (*bns, *(t for t in self.terms if t.is_bare))

    @property
    def convs(self) -> tuple[N, ...]:
        return tuple(t.node for t in self.conv_terms if t.node is not None)

    @property
    def identities(self) -> tuple[N, ...]:
        """The BN(source) leaves."""
        return tuple(t.node for t in self.identity_terms if t.node is not None)

    @property
    def bare(self) -> int:
        """How many terms are ``source`` itself."""
        return sum(1 for t in self.terms if t.is_bare)

    @property
    def has_identity(self) -> bool:
        return any(k != "conv" for k in self.leaf_kinds)

    def signed_terms(self, name: Callable[[N], str]) -> tuple[tuple[str, int], ...]:
        """Every term as ``(name, sign)``, convs then identities ("x" for a bare one),
        for a site label; ``name`` names a leaf."""
        ordered = [*self.conv_terms, *self.identity_terms]
        return tuple(
            ("x" if t.node is None else name(t.node), -1 if t.sign < 0 else 1) for t in ordered
        )


@dataclass
class _Walk(Generic[N, V]):
    """What :func:`_collect` gathers below a top."""

    ops: list[N] = field(default_factory=list)
    terms: list[Term[N]] = field(default_factory=list)
    offsets: list[Term[N]] = field(default_factory=list)
    shared: list[N] = field(default_factory=list)  # leaves also read elsewhere
    bare: list[V] = field(default_factory=list)  # the values of the bare terms


def is_sum(view: SumView[N, V], node: N) -> bool:
    """An add of two computed values (not a bias add of a constant): a tree's top.

    A subtraction only ever sits inside a tree: merged at the top, ``a - b`` of two
    large values would leave verification no operand to scale its bound by (it
    judges a difference against its operands' size), so an exact merge could fail.
    """
    return view.op(node) == "add" and not any(view.is_constant(v) for v in view.operands(node))


def is_tree_op(view: SumView[N, V], node: N) -> bool:
    """A node a tree may hold: a sum, an add or subtraction of a constant, or a
    multiplication by a constant."""
    op = view.op(node)
    if op is None:
        return False
    constant = [view.is_constant(v) for v in view.operands(node)]
    if op == "mul":
        return constant.count(True) == 1
    return not all(constant)


def sum_tree(
    view: SumView[N, V], top: N, pending: bool = False, leaf_may_be_input: bool = False
) -> SumTree[N, V] | None:
    """The tree topped by the add ``top``, or None when its leaves do not all read one input.

    With ``pending``, a leaf may still be ``BN(conv(x))`` whose BN the adjacent fold
    removes this round: that is how an inner node sees that a larger tree will merge
    it. With ``leaf_may_be_input``, a conv or BN leaf that the other leaves read is
    the tree's input ``x`` itself (RepViT's ``conv(x) + conv1(x) + x`` once the BN
    making ``x`` has folded into the conv before it), which may have other readers.

    Raises:
        Refused: BRANCHING, the leaves read one input but one is also read elsewhere.
    """
    if not is_sum(view, top):
        return None
    walk: _Walk[N, V] = _Walk()
    _collect(view, top, walk, 1.0, ())
    if leaf_may_be_input:
        _input_leaves_are_bare(view, walk, pending)
    leaves = [t.node for t in walk.terms if t.node is not None]
    convs = [n for n in leaves if view.leaf(n) == "conv"]
    if not leaves or (not convs and not pending):
        return None
    source = _source_of(view, leaves[0], pending)
    if source is None or any(_source_of(view, n, pending) is not source for n in leaves):
        return None
    if any(v is not source for v in walk.bare):
        return None
    rank = view.rank(leaves, source)
    constants = [c for t in (*walk.terms, *walk.offsets) for c in t.factors]
    constants += [t.constant for t in walk.offsets if t.constant is not None]
    if not all(fits_channels(c, rank) for c in constants):
        return None  # a constant over other axes: not one affine per channel
    if walk.shared:
        raise Refused(
            Code.BRANCHING,
            f"{view.label(walk.shared[0])}'s output is also read outside the tree at "
            f"{view.label(top)}",
        )
    kinds = tuple(None if t.node is None else view.leaf(t.node) for t in walk.terms)
    return SumTree(tuple(walk.ops), tuple(walk.terms), tuple(walk.offsets), source, kinds)


def _collect(
    view: SumView[N, V], node: N, walk: _Walk[N, V], sign: float, factors: tuple[np.ndarray, ...]
) -> None:
    """Walk the tree ops below ``node``, each operand with the coefficient of its path.

    Conv and BN leaves become terms (and go to ``shared`` too when their output is
    also read elsewhere), constants offsets, any other value a bare term (the
    source itself, or no tree). A tree op that another node reads too is a value of
    its own.
    """
    walk.ops.append(node)
    scaled = _scaled_operand(view, node)
    if scaled is not None:
        operand, scale = scaled
        _visit(view, operand, node, walk, sign, (*factors, scale))
        return
    for index, operand in enumerate(view.operands(node)):
        operand_sign = -sign if view.op(node) == "sub" and index == 1 else sign
        constant = view.constant(operand)
        if constant is not None:
            walk.offsets.append(Term(None, operand_sign, factors, constant=constant))
        else:
            _visit(view, operand, node, walk, operand_sign, factors)


def _visit(
    view: SumView[N, V],
    value: V,
    reader: N,
    walk: _Walk[N, V],
    sign: float,
    factors: tuple[np.ndarray, ...],
) -> None:
    producer = view.producer(value)
    if producer is None or producer in walk.ops:  # an input, or tree ops in a cycle
        walk.terms.append(Term(None, sign, factors))
        walk.bare.append(value)
    elif is_tree_op(view, producer) and view.only_reader_is(value, reader):
        _collect(view, producer, walk, sign, factors)
    elif view.leaf(producer) is not None:
        if not view.only_reader_is(value, reader):
            walk.shared.append(producer)
        walk.terms.append(Term(producer, sign, factors))
    else:  # the tree's input itself, or no tree
        walk.terms.append(Term(None, sign, factors))
        walk.bare.append(value)


def _input_leaves_are_bare(view: SumView[N, V], walk: _Walk[N, V], pending: bool) -> None:
    """Make a conv or BN leaf that the other leaves read a bare term: it is ``x``."""
    sources = [_source_of(view, t.node, pending) for t in walk.terms if t.node is not None]
    for index, term in enumerate(walk.terms):
        value = None if term.node is None else view.output(term.node)
        if value is None or not any(s is value for s in sources):
            continue
        walk.terms[index] = Term(None, term.sign, term.factors)
        walk.bare.append(value)
        if term.node in walk.shared:
            walk.shared.remove(term.node)


def _scaled_operand(view: SumView[N, V], node: N) -> tuple[V, np.ndarray] | None:
    """A multiplication's computed operand and its constant factor; None for an add."""
    if view.op(node) != "mul":
        return None
    a, b = view.operands(node)
    constant_a = view.constant(a)
    if constant_a is not None:
        return b, constant_a
    constant_b = view.constant(b)
    assert constant_b is not None  # a tree's mul has one constant operand
    return a, constant_b


def _source_of(view: SumView[N, V], leaf: N, pending: bool) -> V | None:
    """What a leaf reads; with ``pending``, what the conv under a foldable BN reads."""
    source = view.data_input(leaf)
    producer = None if source is None else view.producer(source)
    folds_later = (
        pending
        and view.leaf(leaf) == "bn"
        and producer is not None
        and view.leaf(producer) == "conv"
        and view.only_reader_is(source, leaf)  # type: ignore[arg-type]
    )
    return view.data_input(producer) if folds_later else source  # type: ignore[arg-type]


def fits_channels(array: np.ndarray | None, rank: int | None) -> bool:
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


def _sole_tree_reader(view: SumView[N, V], node: N) -> N | None:
    reader = view.sole_reader(node)
    return reader if reader is not None and is_tree_op(view, reader) else None


def parent_top(view: SumView[N, V], node: N) -> N | None:
    """The add that ``node``'s output reaches as the one reader of each node on the way
    (multiplications by constants, constant adds), or None."""
    seen = {id(node)}
    while (reader := _sole_tree_reader(view, node)) is not None:
        if id(reader) in seen:  # tree ops reading each other in a cycle: no tree has a top
            return None
        if is_sum(view, reader):
            return reader
        seen.add(id(reader))
        node = reader
    return None


def defers_to_reader(view: SumView[N, V], top: N, leaf_may_be_input: bool = False) -> bool:
    """``top`` is an inner node of a larger tree, which merges it."""
    parent = parent_top(view, top)
    try:
        tree = None if parent is None else sum_tree(view, parent, True, leaf_may_be_input)
    except Refused:  # the larger tree does not merge: this one may
        return False
    return tree is not None and not _is_plain_residual(view, tree)


def _is_plain_residual(view: SumView[N, V], tree: SumTree[N, V]) -> bool:
    """A bare source and no BN of it in or after the tree: merging would remove no BN, so
    the tree is left as built (``x + layer_scale * (conv_a(x) + conv_b(x))``: the
    sum below still merges on its own)."""
    if not tree.bare or any(view.data_input(bn) is tree.source for bn in tree.identities):
        return False
    readers = view.readers(tree.top)
    return not (len(readers) == 1 and view.leaf(readers[0]) == "bn")


def top_of(view: SumView[N, V], bn: N) -> N | None:
    """The top of the tree a reader of the BN belongs to, or None.

    A BN with other readers too is still that tree's term: the tree then refuses it
    as BRANCHING, which says more than "standalone".
    """
    tree_readers = [r for r in view.readers(bn) if is_tree_op(view, r)]
    if not tree_readers:
        return None
    node = tree_readers[0]
    top = node if is_sum(view, node) else parent_top(view, node)
    seen: set[int] = set()
    while top is not None and (parent := parent_top(view, top)) is not None:
        if id(parent) in seen:
            return None
        seen.add(id(parent))
        top = parent
    return top


# --- the geometry of the convs -----------------------------------------------------


def same_geometry(
    terms: Sequence[tuple[str, dict[str, object]]], survivor: tuple[str, dict[str, object]]
) -> Found:
    """Every conv of the tree has the survivor's strides, dilations, groups, channels, ...

    Each conv is ``(label, properties)``, the properties named as its front names
    them ("group", "groups", "weight dtype"); the first that differs is refused.
    """
    name, expected = survivor
    for label, properties in terms:
        if differs := first_mismatch(expected, properties):
            key, value, want = differs
            return Code.BRANCH_MISMATCH, f"{label} has {key} {value}, {name} {want}"
    return None


def centred_in(
    small: ConvGeometry, large: ConvGeometry, small_label: str, large_label: str
) -> Found:
    """Padding ``small``'s kernel to ``large``'s must grow its pads to ``large``'s."""
    if off_centre_axis(small.kernel, small.pads, large.kernel, large.pads, large.dilations) is None:
        return None
    return Code.UNCENTRED_TAP, (
        f"{small_label} (kernel {small.kernel}, pads {small.pads}) does not sit "
        f"centred in {large_label} (kernel {large.kernel}, pads {large.pads})"
    )


class TapMisfit(enum.Enum):
    """Why a conv cannot take an identity term as one centred tap per channel."""

    STRIDE_OR_CHANNELS = "stride_or_channels"  # BRANCH_MISMATCH
    NO_CENTRE = "no_centre"  # an even kernel: UNCENTRED_TAP
    OFF_CENTRE = "off_centre"  # its padding does not centre the tap: UNCENTRED_TAP

    @property
    def code(self) -> Code:
        return Code.BRANCH_MISMATCH if self is TapMisfit.STRIDE_OR_CHANNELS else Code.UNCENTRED_TAP


def tap_misfit(conv: ConvGeometry) -> tuple[TapMisfit, int] | None:
    """Why ``conv`` cannot compute ``x`` itself with one centred tap per channel, and on
    which axis for OFF_CENTRE (0 otherwise); None when it can.

    The tap ``y[c] = x[c]`` needs every output to read its own input position:
    stride 1, as many input as output channels, and on each axis an odd kernel
    whose centre sits at the padding, ``pad == dilation * (k - 1) / 2`` on both
    sides. The centre tap never reads padding, so the padding mode does not matter.
    """
    if any(s != 1 for s in conv.strides) or conv.in_channels != conv.out_channels:
        return TapMisfit.STRIDE_OR_CHANNELS, 0
    if any(k % 2 == 0 for k in conv.kernel):
        return TapMisfit.NO_CENTRE, 0
    axis = conv.identity_off_centre_axis()
    return None if axis is None else (TapMisfit.OFF_CENTRE, axis)


_NEEDS = "an identity term needs stride 1 and equal channel counts; {label} has "
_CHANNELS = ", {cin} -> {cout} channels"
# The details, in a graph's terms (strides, ONNX-ordered pads)...
_GRAPH_WORDS = {
    TapMisfit.STRIDE_OR_CHANNELS: _NEEDS + "strides {strides}" + _CHANNELS,
    TapMisfit.NO_CENTRE: "{label}'s kernel has no centre tap",
    TapMisfit.OFF_CENTRE: (
        "an identity tap needs pads {pad} on axis {axis}; {label} has pads {pads}"
    ),
}
# ...and in an eager module's (its stride, kernel and torch padding as written).
_MODULE_WORDS = {
    TapMisfit.STRIDE_OR_CHANNELS: _NEEDS + "stride {strides}" + _CHANNELS,
    TapMisfit.NO_CENTRE: "{label}'s kernel {kernel} has no centre tap",
    TapMisfit.OFF_CENTRE: (
        "an identity tap needs padding {centred} in {label}'s kernel {kernel}; it has {padding}"
    ),
}


def identity_tap_misfit(conv: ConvGeometry, label: str, padding: object = None) -> Found:
    """:func:`tap_misfit` as a refusal, worded in a graph's terms (strides, ONNX-ordered
    pads), or, given an eager module's torch ``padding`` (per axis, "same" or
    "valid"), in that module's."""
    misfit = tap_misfit(conv)
    if misfit is None:
        return None
    reason, axis = misfit
    words = _GRAPH_WORDS if padding is None else _MODULE_WORDS
    detail = words[reason].format(
        label=label, strides=conv.strides, cin=conv.in_channels, cout=conv.out_channels,
        kernel=conv.kernel, pads=conv.pads, axis=axis, pad=conv.centre_pad(axis),
        centred=tuple(conv.centre_pad(a) for a in range(conv.rank)), padding=padding,
    )  # fmt: skip
    return reason.code, detail


_CODES = frozenset({Code.BRANCH_MISMATCH, Code.UNCENTRED_TAP, Code.BRANCHING})

FAMILY = Family(
    "branch_sum",
    frozenset({FoldKind.REPARAM, FoldKind.IDENTITY_TAP}),
    {
        "onnx": _CODES | {Code.BAD_SHAPE},
        "eager": _CODES | {Code.SHARED_WEIGHT},
        "pt2": _CODES,  # a traced constant broadcasts: its channels are the convs'
    },
    __doc__ or "",
)
