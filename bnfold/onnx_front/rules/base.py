"""What every fold rule shares: the linear op, the plan, the refusal, the BN's affine.

A rule (one module of this package) looks at one node and returns a
:class:`FoldPlan` (or another rewrite), a :class:`~bnfold.report.Refusal`, or
None when the node is not its business. Checks raise
:class:`~bnfold.rules.family.Refused` at the first failed precondition; the rule
turns that into a Refusal for its :class:`~bnfold.sites.Site`. Nothing here
modifies the graph.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir

from bnfold.core import layouts
from bnfold.core.affine import (
    Affine,
    after_factor,
    before_factor,
    bn_to_affine,
    exact_after_bias,
    exact_before_bias,
)
from bnfold.core.cast import Unfoldable, balanced_over
from bnfold.core.layouts import LayoutError, WeightLayout
from bnfold.onnx_front.constants import constant_array, is_constant, reads_data
from bnfold.onnx_front.folded import DeferredWeight, ExactBias, earlier_bias, earlier_weight
from bnfold.onnx_front.io import evict_pages
from bnfold.onnx_front.shapes import Shapes
from bnfold.options import Rounding
from bnfold.report import Code, Folded
from bnfold.rules.adjacent import channel_vector, is_float
from bnfold.rules.family import Refused
from bnfold.sites import Site

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Add"})


DEFAULT_BN_EPSILON = float(np.float32(1e-5))


class Direction(str, enum.Enum):
    AFTER = "after"  # affine(linear(x))
    BEFORE = "before"  # linear(affine(x))


@dataclass(frozen=True)
class MatchOptions:
    """Choices a user can make about what folds.

    Attributes:
        clone_shared: a weight read by several nodes is copied for the folded
            node (other readers keep the original); False refuses such sites.
        rounding: how folded weights are cast to the model's dtype.
    """

    clone_shared: bool = True
    rounding: Rounding = Rounding.NEAREST


@dataclass(frozen=True, eq=False)
class LinearOp:
    """A linear op with constant weights, seen from the fold's point of view.

    Attributes:
        node: the Conv/ConvTranspose/Gemm/MatMul node.
        weight: its constant weight value (input 1).
        bias: its constant bias value, or None when it has none (or Gemm ignores it).
        weight_array: the weight's values; for a weight an earlier fold wrote, the
            original W that fold started from (same shape and dtype).
        bias_array: the bias's values, or None.
        layout: where output and input channels sit in the weight.
        out_rank: rank of the op's output, None when unknown (MatMul on an unknown input).
        channel_last: output channels are the last axis (MatMul) rather than axis 1.
        bias_gain: the op multiplies its bias by this (Gemm's beta); shifts are divided by it.
        resets_beta: Gemm with beta=0 ignores C, so the fold writes a new C and sets beta=1.
        input_gain: the op multiplies its input term by this (Gemm's alpha).
        shared: names of the weight/bias values other nodes also read (cloned on fold).
        earlier_weight: the folded weight an earlier fold wrote, if one did:
            folding again starts from its original W, so W is still rounded once.
        earlier_bias: the float64 value of the bias an earlier fold wrote, if one did.
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    weight_array: np.ndarray
    bias_array: np.ndarray | None
    layout: WeightLayout
    out_rank: int | None
    channel_last: bool = False
    bias_gain: float = 1.0
    resets_beta: bool = False
    input_gain: float = 1.0
    shared: tuple[str, ...] = ()
    earlier_weight: DeferredWeight | None = None
    earlier_bias: np.ndarray | None = None

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight_array.shape)

    @property
    def channels(self) -> int:
        return self.layout.out_channels(self.weight_shape)

    @property
    def in_channels(self) -> int:
        return self.layout.in_channels(self.weight_shape)

    def exact_weight(self) -> np.ndarray:
        """The weight's values in float64, before any rounding a fold did."""
        if self.earlier_weight is not None:
            return self.earlier_weight.exact()
        return self.weight_array.astype(np.float64)

    def exact_bias(self) -> np.ndarray | None:
        """The bias's values in float64, before any rounding a fold did; None without one."""
        if self.earlier_bias is not None:
            return self.earlier_bias
        return None if self.bias_array is None else self.bias_array.astype(np.float64)

    def channel_axis(self) -> int | None:
        """Output axis (counted from the front) holding channels, None if unknown."""
        if not self.channel_last:
            return 1
        return None if self.out_rank is None else self.out_rank - 1


@dataclass(frozen=True)
class FoldPlan:
    """A checked fold, ready to apply: the new bias is computed, the weight deferred."""

    site: Site
    pattern: str
    direction: Direction
    linear: LinearOp
    affine_node: ir.Node
    between: ir.Node | None  # a shape-only op between the two, left in place
    new_weight: DeferredWeight
    new_bias: ExactBias | None  # None: the op has no bias and the fold needs none
    bytes_added: int = 0  # weight bytes copied because another node shares them


class Rewrite(Protocol):
    """A checked rewrite other than one FoldPlan (a merge, a fold into several ops)."""

    @property
    def entries(self) -> list[Folded]:
        """What the report lists for it."""
        ...

    @property
    def plans(self) -> tuple[FoldPlan, ...]:
        """The fold plans it applies: their held weights count against the pass's budget."""
        ...

    def apply(self, model: ir.Model) -> None:
        """Make the rewrite in ``model``."""
        ...


def label(node: ir.Node | None) -> str:
    """A node's name, or its op type and output name when it has none."""
    if node is None:
        return "<input>"
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def name_of(node: ir.Node | None) -> str:
    """A node's label, "" for no node (a site's optional parts)."""
    return "" if node is None else label(node)


def names(*nodes: ir.Node | None) -> tuple[str, ...]:
    """The labels of the nodes given, the absent ones left out."""
    return tuple(label(n) for n in nodes if n is not None)


def pattern_of(*nodes: ir.Node | None) -> str:
    return "+".join(n.op_type for n in nodes if n is not None)


def producer_op(node: ir.Node) -> str | None:
    data = node.inputs[0] if node.inputs else None
    producer = data.producer() if data is not None else None
    return producer.op_type if producer is not None else None


def data_input(node: ir.Node, ir_version: int) -> ir.Value | None:
    """The non-constant input an affine node transforms, or None if it has none."""
    if node.op_type == "BatchNormalization":
        return node.inputs[0]
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    a, b = node.inputs
    a_const, b_const = (is_constant(v, ir_version) for v in (a, b))
    if a_const == b_const:
        return None
    return b if a_const else a


def require_single_consumer(node: ir.Node) -> None:
    """Refuse BRANCHING unless the fold's own next op is the only reader of the node's data.

    A Shape (or CastLike's type input) reads no values: a fold keeps the output's
    shape, so such a reader (``reshape_as(x)`` in LeViT) does not block it.
    """
    out = node.outputs[0]
    if out.is_graph_output():
        raise Refused(Code.BRANCHING, f"output {out.name!r} is also a graph output")
    if readers(out) > 1:
        readers_ = sorted({label(use.node) for use in out.uses() if reads_data(use.node, use.idx)})
        raise Refused(Code.BRANCHING, f"output {out.name!r} is read by {', '.join(readers_)}")


def rank_of(value: ir.Value | None, ir_version: int) -> int | None:
    """The rank of ``value``, from its shape or, unannotated, from what produced it
    (:class:`~bnfold.onnx_front.shapes.Shapes`, asked afresh: planning sees the graph
    as the folds so far left it)."""
    return Shapes(ir_version).rank(value)


def describe_linear(node: ir.Node, ir_version: int, options: MatchOptions) -> LinearOp:
    """Read a linear op's weight, bias and layout, refusing what cannot be folded into."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    earlier = None if weight is None else earlier_weight(weight)
    # A folded weight is refolded from its original, so its own values are not
    # needed: computing them here would hold a weight the save streams.
    w = (
        earlier.original()
        if earlier is not None
        else require_constant(weight, "weight", ir_version)
    )
    if not is_float(w):
        raise Refused(Code.UNSUPPORTED_DTYPE, f"weight dtype {w.dtype} is not floating point")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b = None if bias is None else require_constant(bias, "bias", ir_version)
    shared = tuple(v.name or "" for v in (weight, bias) if v is not None and readers(v) > 1)
    if shared and not options.clone_shared:
        raise Refused(Code.SHARED_WEIGHT, f"{shared[0]!r} is also read by another node")
    assert weight is not None
    linear = _linear_of_kind(node, weight, w, bias, b, ir_version)
    return replace(
        linear,
        shared=shared,
        earlier_weight=earlier,
        earlier_bias=earlier_bias(linear.bias),
    )


def _linear_of_kind(
    node: ir.Node,
    weight: ir.Value,
    w: np.ndarray,
    bias: ir.Value | None,
    b: np.ndarray | None,
    ir_version: int,
) -> LinearOp:
    op, w_shape = node.op_type, tuple(w.shape)
    groups = node.attributes.get_int("group", 1)
    if op in ("Conv", "ConvTranspose"):
        if groups < 1 or w_shape[0] % groups:
            raise Refused(Code.BAD_GROUPS, f"weight rows {w_shape[0]} with group={groups}")
        layout = layouts.conv(groups) if op == "Conv" else layouts.conv_transpose(groups)
        return LinearOp(node, weight, bias, w, b, layout, len(w_shape))
    if len(w_shape) != 2:
        raise Refused(Code.BAD_SHAPE, f"{op} weight has rank {len(w_shape)}, expected 2")
    if op == "Gemm":
        layout = layouts.gemm(bool(node.attributes.get_int("transB", 0)))
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        if beta == 0:  # C is ignored: the fold writes a new one and sets beta to 1
            return LinearOp(
                node, weight, None, w, None, layout, 2, resets_beta=True, input_gain=alpha
            )
        return LinearOp(node, weight, bias, w, b, layout, 2, bias_gain=beta, input_gain=alpha)
    # MatMul: the constant is the right operand, so output features are the last axis.
    left_rank = rank_of(node.inputs[0], ir_version)
    rank = None if left_rank is None else max(left_rank, 2)
    return LinearOp(node, weight, None, w, None, layouts.matmul(), rank, channel_last=True)


def readers(value: ir.Value) -> int:
    """How many inputs read the data of ``value`` (a Shape or CastLike of it does not)."""
    return sum(1 for use in value.uses() if reads_data(use.node, use.idx))


def bn_channels(bn: ir.Node, ir_version: int) -> int:
    """A BatchNorm's channel count, read off its scale (NOT_CONSTANT unless a constant vector)."""
    scale = constant_array(bn.inputs[1] if len(bn.inputs) > 1 else None, ir_version)
    if scale is None or scale.ndim != 1:
        raise Refused(Code.NOT_CONSTANT, "BatchNorm scale is not a constant vector")
    return int(scale.shape[0])


def batchnorm_affine(node: ir.Node, channels: int, ir_version: int) -> Affine:
    require_inference(node)
    if node.attributes.get_int("spatial", 1) == 0:
        raise Refused(Code.NOT_PER_CHANNEL, "spatial=0: statistics per activation, not channel")
    if len(node.inputs) < 5:
        raise Refused(Code.BAD_SHAPE, f"BatchNormalization has {len(node.inputs)} inputs, needs 5")
    params = []
    for name, value in zip(("scale", "B", "mean", "var"), node.inputs[1:5], strict=True):
        array = require_constant(value, f"BatchNorm {name}", ir_version)
        if array.shape != (channels,):
            raise Refused(
                Code.BAD_SHAPE,
                f"BatchNorm {name} has shape {list(array.shape)}, expected [{channels}]",
            )
        params.append(array)
    # The default is the float32 1e-5f of the ONNX spec; onnxruntime adds exactly that.
    eps = node.attributes.get_float("epsilon", DEFAULT_BN_EPSILON)
    gamma, beta, mean, var = params
    return checked(lambda: bn_to_affine(gamma, beta, mean, var, eps))


def require_inference(node: ir.Node) -> None:
    """Refuse (TRAINING_MODE) a BatchNorm that uses batch statistics or their outputs."""
    if node.attributes.get_int("training_mode", 0) == 1:
        raise Refused(Code.TRAINING_MODE, "training_mode=1: batch statistics, not running ones")
    if node.attributes.get_int("is_test", 1) == 0:
        raise Refused(Code.TRAINING_MODE, "is_test=0 (opset < 7 training mode)")
    for extra in node.outputs[1:]:
        if extra.name and (extra.uses() or extra.is_graph_output()):
            raise Refused(
                Code.TRAINING_MODE, f"training output {extra.name!r} of BatchNorm is used"
            )


def make_plan(
    site: Site,
    direction: Direction,
    linear: LinearOp,
    node: ir.Node,
    between: ir.Node | None,
    affine: Affine,
    rounding: Rounding,
    hold: Callable[[DeferredWeight], bool],
) -> FoldPlan:
    after = direction is Direction.AFTER
    if after:
        affine = Affine(affine.scale, affine.shift / linear.bias_gain)
    try:
        factor_of = after_factor if after else before_factor
        factor = factor_of(affine, linear.layout, linear.weight_shape)
        deferred, original = _folded_weight(linear, factor, balanced_over(linear.layout, rounding))
        try:
            if hold(deferred):
                deferred = deferred.computed(original)
            else:
                deferred.check(original)
            new_b = _folded_bias(linear, affine, after)
        finally:
            evict_pages(deferred.source)  # the pages W was read through
    except Unfoldable as err:
        raise Refused(Code.BAD_VALUES, str(err)) from None
    except LayoutError as err:
        raise Refused(Code.BAD_SHAPE, str(err)) from None
    needs_bias = linear.bias is not None or bool(np.any(new_b.values != 0))
    ordered = (linear.node, between, node) if after else (node, between, linear.node)
    added = sum(
        a.nbytes
        for v, a in ((linear.weight, deferred), (linear.bias, new_b))
        if v is not None and v.name in linear.shared
    )
    return FoldPlan(
        site, pattern_of(*ordered), direction, linear, node, between, deferred,
        new_b if needs_bias else None, bytes_added=added,
    )  # fmt: skip


def _folded_weight(
    linear: LinearOp, factor: np.ndarray, balance: WeightLayout | None
) -> tuple[DeferredWeight, np.ndarray]:
    """The folded weight, not yet computed, and the original W it is computed from.

    A weight an earlier fold wrote is that fold's original times one more
    factor. Otherwise the source tensor is kept, not its values: an external
    tensor stays mapped.
    """
    if linear.earlier_weight is not None:
        earlier = linear.earlier_weight
        return earlier.then(factor, balance), earlier.original()
    weight, source = linear.weight_array, linear.weight.const_value
    deferred = DeferredWeight(
        (factor,), weight.dtype, tuple(weight.shape), balance, source,
        source_values=weight if source is None else None,
    )  # fmt: skip
    return deferred, weight


def _folded_bias(linear: LinearOp, affine: Affine, after: bool) -> ExactBias:
    """The folded bias, from the exact values of the op's weight and bias.

    Raises:
        Unfoldable: it overflows the bias's dtype (the weight's, for a new bias).
    """
    bias = linear.exact_bias()
    if after:
        exact = exact_after_bias(bias, affine)
    else:
        exact = exact_before_bias(linear.exact_weight(), bias, affine, linear.layout)
    dtype = linear.weight_array.dtype if linear.bias_array is None else linear.bias_array.dtype
    return ExactBias.of(exact, dtype)


def checked(make: object) -> Affine:
    try:
        return make()  # type: ignore[operator]
    except Unfoldable as err:
        raise Refused(Code.BAD_VALUES, str(err)) from None


def per_channel_vector(array: np.ndarray | None, linear: LinearOp) -> np.ndarray | None:
    """The ``(C,)`` vector a Mul/Add constant applies per output channel of ``linear``, else
    None (:func:`bnfold.rules.adjacent.channel_vector`). Of a MatMul of unknown rank, the
    output is at least 2-D with its channels last."""
    if linear.out_rank is None:
        return channel_vector(array, linear.channels, 2, 1)
    channel_from_end = linear.out_rank - linear.channel_axis()  # type: ignore[operator]
    return channel_vector(array, linear.channels, linear.out_rank, channel_from_end)


def require_constant(value: ir.Value | None, what: str, ir_version: int) -> np.ndarray:
    array = constant_array(value, ir_version)
    if array is None:
        name = "<missing>" if value is None else repr(value.name)
        raise Refused(Code.NOT_CONSTANT, f"{what} {name} is not a constant")
    return array
