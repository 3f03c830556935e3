"""Find affine nodes next to linear ops and decide, per site, the fold or the refusal.

A *site* is an affine node (BatchNormalization, or Mul/Add by a constant) beside
a linear op (Conv, ConvTranspose, Gemm, MatMul). It folds *after* the op when the
op feeds it (possibly through one shape-only op), or, for a BatchNormalization
that cannot fold after, *before* the op that reads it (possibly through a
Flatten/Reshape). :func:`plan` turns a site into a :class:`FoldPlan` holding the
new weight and bias, computed by :mod:`bnfold.affine`, or into a
:class:`~bnfold.report.Refusal`. Planning never modifies the graph;
:mod:`bnfold.onnx_front.passes` applies plans.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold import layouts
from bnfold.affine import (
    Affine,
    Rounding,
    Unfoldable,
    after_factor,
    balanced_over,
    before_factor,
    bn_to_affine,
    exact_after_bias,
    exact_before_bias,
)
from bnfold.layouts import LayoutError, WeightLayout
from bnfold.onnx_front.constants import constant_array, is_constant, reads_data
from bnfold.onnx_front.folded import DeferredWeight, ExactBias, earlier_bias, earlier_weight
from bnfold.onnx_front.io import evict_pages
from bnfold.report import Code, Refusal

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Add"})
# Ops that only move elements around; a per-channel affine can pass them when the
# channel axis provably stays a channel axis (see _channel_survives).
SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})
# Ops that commonly sit between a linear op and a BatchNorm and make a fold
# impossible; named in the refusal so users see why nothing folded.
NONLINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Clip", "Softmax", "LogSoftmax",
        "Abs", "Exp", "Log", "Sqrt", "Pow", "Max", "Min", "ThresholdedRelu", "Swish",
    }
)  # fmt: skip


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

    site: str
    pattern: str
    direction: Direction
    linear: LinearOp
    affine_node: ir.Node
    between: ir.Node | None  # a shape-only op between the two, left in place
    new_weight: DeferredWeight
    new_bias: ExactBias | None  # None: the op has no bias and the fold needs none
    bytes_added: int = 0  # weight bytes copied because another node shares them


def label(node: ir.Node | None) -> str:
    """A node's name, or its op type and output name when it has none."""
    if node is None:
        return "<input>"
    return node.name or f"{node.op_type}({node.outputs[0].name})"


def _site(*nodes: ir.Node | None) -> str:
    return " -> ".join(label(n) for n in nodes if n is not None)


def _pattern(*nodes: ir.Node | None) -> str:
    return "+".join(n.op_type for n in nodes if n is not None)


class _Refused(Exception):
    """Internal control flow: planning stopped at the first refusal."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def plan(
    node: ir.Node,
    ir_version: int,
    options: MatchOptions | None = None,
    hold: Callable[[DeferredWeight], bool] = lambda weight: True,
) -> FoldPlan | Refusal | None:
    """Plan the fold of one affine node into a linear op beside it.

    Matches (after):  BatchNormalization | Mul(·, c) | Add(·, c)  of
                      Conv | ConvTranspose | Gemm | MatMul(x, W, B?),
                      for BN possibly through one Reshape/Flatten/Squeeze/Unsqueeze/
                      Transpose that keeps each of the op's channels whole inside one
                      BN channel (Gemm -> Reshape(-1, C, 4, 4) -> BN folds too).
    Matches (before): Conv | ConvTranspose | Gemm | MatMul(BatchNormalization(x), W, B?),
                      possibly through a Flatten/Reshape into Gemm/MatMul; only
                      tried when the BN cannot fold after.
    Produces: a FoldPlan with W' and B' (see bnfold.affine).
    Refuses:
      TRAINING_MODE    BN has training_mode=1 / is_test=0, or its extra outputs are used
      NOT_CONSTANT     W, B or a BN parameter is not a constant (initializer,
                       Constant node, small constant subexpression, or an IR < 4
                       initializer listed as input)
      BRANCHING        the linear op's (or BN's) output has other consumers or is a graph output
      SHARED_WEIGHT    W or B is also read elsewhere (only with clone_shared=False)
      NOT_PER_CHANNEL  the affine is not per channel of the op (MatMul on a 3-D input
                       before BN, BN spatial=0, Mul/Add constant over other axes, a
                       shape op that moves the channel)
      ZERO_PADDING     before-fold into a padded Conv (or a ConvTranspose) with a
                       nonzero shift: the border taps read zeros, not the shift
      NONLINEAR_INPUT  BN's input comes from a nonlinearity and no linear op reads it
      STANDALONE       no linear op beside the BN at all
      BAD_VALUES       NaN/inf, var + eps <= 0, or folded values overflow the dtype
      BAD_SHAPE        BN parameters do not have one value per channel
      BAD_GROUPS       channels not divisible by group
      UNSUPPORTED_DTYPE  the weight is not a floating-point tensor

    Returns None for a Mul/Add that is not an affine next to a linear op (say a
    residual Add): those are not sites and are not reported.

    ``hold(weight)`` says whether the plan may keep a folded weight's values in
    memory; if not, they are checked block by block and recomputed when read.
    """
    options = options or MatchOptions()
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    after = _plan_after(node, ir_version, options, hold)
    if after is None or isinstance(after, FoldPlan) or node.op_type != "BatchNormalization":
        return after
    consumer = _linear_reader(node)
    if consumer is None:
        return after
    before = _plan_before(node, consumer, ir_version, options, hold)
    if isinstance(before, FoldPlan):
        return before
    if after.code in (Code.STANDALONE, Code.NONLINEAR_INPUT):
        return replace(before, detail=f"{before.detail} (and {after.detail})")
    return replace(
        after, detail=f"{after.detail}; nor before {label(consumer[-1])}: {before.detail}"
    )


# --- after: affine(linear(x)) ---------------------------------------------------------


def _plan_after(
    node: ir.Node, ir_version: int, options: MatchOptions, hold: Callable[[DeferredWeight], bool]
) -> FoldPlan | Refusal | None:
    data = _data_input(node, ir_version)
    if data is None:
        return None
    producer = data.producer()
    between = None
    if (
        node.op_type == "BatchNormalization"
        and producer is not None
        and producer.op_type in SHAPE_OPS
        and _producer_op(producer) in LINEAR_OPS
    ):
        between, producer = producer, producer.inputs[0].producer()  # type: ignore[union-attr]
    linear_node = producer if producer is not None and producer.op_type in LINEAR_OPS else None
    site = _site(linear_node, between, node)
    try:
        if linear_node is None:
            return _refuse_unpaired(node, producer)
        linear = _linear_for_after(node, linear_node, ir_version, options)
        if linear is None:
            return None
        if between is not None:
            _require_single_consumer(between)
        block = 1 if between is None else _channel_block_through(between, linear, ir_version)
        affine = _affine_after(node, linear, ir_version, between, block)
        if affine is None:
            return None
        return _make_plan(
            site, Direction.AFTER, linear, node, between, affine, options.rounding, hold
        )
    except _Refused as refused:
        return Refusal(site, refused.code, refused.detail)


def _producer_op(node: ir.Node) -> str | None:
    data = node.inputs[0] if node.inputs else None
    producer = data.producer() if data is not None else None
    return producer.op_type if producer is not None else None


def _data_input(node: ir.Node, ir_version: int) -> ir.Value | None:
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


def _refuse_unpaired(node: ir.Node, producer: ir.Node | None) -> Refusal | None:
    if node.op_type != "BatchNormalization":
        return None  # a Mul/Add by a constant elsewhere is simply not our business
    if producer is not None and producer.op_type in NONLINEAR_OPS:
        raise _Refused(
            Code.NONLINEAR_INPUT,
            f"input comes from {producer.op_type} {label(producer)!r}; "
            "a BatchNorm cannot be folded across a nonlinearity",
        )
    source = "a graph input" if producer is None else f"{producer.op_type} {label(producer)!r}"
    raise _Refused(Code.STANDALONE, f"input comes from {source}, not a linear op; left as is")


def _linear_for_after(
    affine_node: ir.Node, producer: ir.Node, ir_version: int, options: MatchOptions
) -> LinearOp | None:
    try:
        linear = describe_linear(producer, ir_version, options)
        _require_single_consumer(producer)
        return linear
    except _Refused as refused:
        # Mul/Add after a MatMul of two activations (attention scaling, say) is
        # not a fold candidate; reporting it would bury the real refusals.
        weightless = refused.code in (Code.NOT_CONSTANT, Code.UNSUPPORTED_DTYPE)
        if affine_node.op_type != "BatchNormalization" and weightless:
            return None
        raise


def _require_single_consumer(node: ir.Node) -> None:
    out = node.outputs[0]
    if out.is_graph_output():
        raise _Refused(Code.BRANCHING, f"output {out.name!r} is also a graph output")
    if len(out.uses()) > 1:
        readers = sorted({label(use.node) for use in out.uses()})
        raise _Refused(Code.BRANCHING, f"output {out.name!r} is read by {', '.join(readers)}")


def _channel_block_through(shape_op: ir.Node, linear: LinearOp, ir_version: int) -> int:
    """How many of the linear op's channels make up one BN channel past ``shape_op``.

    1 when every element keeps its channel (a Transpose moving the channel axis
    to 1, a Reshape with the same channels and inner size); ``k`` when the op
    regroups each sample's elements so that BN channel ``c`` is linear channels
    ``c*k .. c*k+k-1`` (Gemm -> Reshape(N, C, 4, 4) -> BN, as in DCGAN
    generators; see :func:`bnfold.layouts.channel_block`).

    Raises:
        _Refused: NOT_PER_CHANNEL, when neither can be shown from the shapes.
    """
    axis = linear.channel_axis()
    source, result = shape_op.inputs[0], shape_op.outputs[0]
    if shape_op.op_type == "Transpose":
        perm = shape_op.attributes.get_ints("perm")
        if axis is not None and perm is not None and list(perm).index(axis) == 1:
            return 1
    elif _same_channel_index(source.shape, result.shape, axis, linear.channels):  # type: ignore[union-attr]
        return 1
    elif axis == 1 and (block := _regrouped_block(shape_op, linear, ir_version)) is not None:
        return block
    raise _Refused(
        Code.NOT_PER_CHANNEL,
        f"{shape_op.op_type} {label(shape_op)!r} does not keep {linear.node.op_type}'s output "
        "channels whole within the BatchNorm's channels (or its shapes are unknown)",
    )


def _regrouped_block(shape_op: ir.Node, linear: LinearOp, ir_version: int) -> int | None:
    """:func:`layouts.channel_block` across a batch-preserving Reshape/Flatten, if shown."""
    sample = _per_sample_dims(shape_op.inputs[0], linear)
    if sample is None:
        return None
    regrouped = _regrouped_sample(shape_op, sample, ir_version) or _annotated_sample(shape_op)
    if regrouped is None:
        return None
    return layouts.channel_block((1, *regrouped), (1, *sample))


def _annotated_sample(shape_op: ir.Node) -> tuple[int, ...] | None:
    """The output's per-sample dims from its shape, when it provably keeps the batch:
    the same known batch dim on both sides (a static export's ``Reshape(x, [2, C, H, W])``
    of a ``[2, F]`` input, say)."""
    before, after = shape_op.inputs[0].shape, shape_op.outputs[0].shape  # type: ignore[union-attr]
    if before is None or after is None or len(before) < 1 or len(after) < 2:
        return None
    batch_before, batch_after = before.dims[0], after.dims[0]
    same_batch = batch_before == batch_after and (
        isinstance(batch_before, int) or getattr(batch_before, "value", None) is not None
    )
    rest = list(after.dims[1:])
    if not same_batch or not all(isinstance(d, int) for d in rest):
        return None
    return tuple(rest)  # type: ignore[arg-type]


def _per_sample_dims(value: ir.Value | None, linear: LinearOp) -> tuple[int, ...] | None:
    """The linear op's output without its batch axis: ``(C, *spatial)``, static, or None."""
    shape = None if value is None else value.shape
    if shape is not None and len(shape) >= 2:
        dims = list(shape.dims[1:])
        if all(isinstance(d, int) for d in dims) and dims[0] == linear.channels:
            return tuple(dims)  # type: ignore[arg-type]
    if linear.out_rank == 2:  # Gemm, 2-D MatMul: (N, C) whatever the annotations say
        return (linear.channels,)
    return None


def _regrouped_sample(
    shape_op: ir.Node, sample: tuple[int, ...], ir_version: int
) -> tuple[int, ...] | None:
    """A sample's dims after a Flatten(axis=1) or a batch-preserving Reshape; else None.

    A Reshape keeps the batch axis when its constant target starts with 0 (copy
    the batch) or with -1 while the rest is exactly one sample. Anything else
    could split or merge samples, and then channels mean nothing per sample.
    """
    count = math.prod(sample)
    if shape_op.op_type == "Flatten":
        return (count,) if shape_op.attributes.get_int("axis", 1) == 1 else None
    if shape_op.op_type != "Reshape" or shape_op.attributes.get_int("allowzero", 0) != 0:
        return None
    target = constant_array(shape_op.inputs[1] if len(shape_op.inputs) > 1 else None, ir_version)
    if target is None or target.ndim != 1 or len(target) < 2 or int(target[0]) not in (0, -1):
        return None
    # With allowzero=0 a 0 copies the input's dim at the same position.
    rest = [sample[i] if d == 0 and i < len(sample) else int(d) for i, d in enumerate(target[1:])]
    inferred = rest.count(-1)
    if any(d == 0 or d < -1 for d in rest) or inferred > (1 if target[0] == 0 else 0):
        return None
    if inferred:
        known = math.prod(d for d in rest if d != -1)
        rest[rest.index(-1)] = count // known if count % known == 0 else -1
    return tuple(rest) if math.prod(rest) == count and -1 not in rest else None


def _same_channel_index(
    before: ir.Shape | None, after: ir.Shape | None, axis: int | None, channels: int
) -> bool:
    """Every element keeps its channel index when ``before[axis]`` becomes ``after[1]``.

    Reshape-like ops keep element order, so the channel of flat index f is
    ``f // inner % C`` on both sides; equal inner sizes and equal C make them agree.
    """
    if before is None or after is None or axis is None or len(after) < 2:
        return False
    inner_before = _static_product(before.dims[axis + 1 :])
    inner_after = _static_product(after.dims[2:])
    return (
        before.dims[axis] == channels
        and after.dims[1] == channels
        and inner_before is not None
        and inner_before == inner_after
    )


def _static_product(dims: object) -> int | None:
    values = list(dims)  # type: ignore[call-overload]
    if not all(isinstance(d, int) for d in values):
        return None
    return math.prod(values)


def _affine_after(
    node: ir.Node, linear: LinearOp, ir_version: int, between: ir.Node | None, block: int = 1
) -> Affine | None:
    """The per-output-channel affine an affine node applies, or a refusal.

    ``block``: linear channels per BN channel past a regrouping shape op.
    """
    if node.op_type == "BatchNormalization":
        if between is None and linear.channel_axis() != 1:
            raise _Refused(
                Code.NOT_PER_CHANNEL,
                f"BatchNorm normalizes axis 1 but {linear.node.op_type}'s output features are "
                f"axis {linear.channel_axis() if linear.out_rank else '? (input rank unknown)'}",
            )
        return _batchnorm_affine(node, linear.channels // block, ir_version).spread(linear.channels)
    operand = next(v for v in node.inputs if v is not linear.output)
    array = constant_array(operand, ir_version)
    vector = per_channel_vector(array, linear)
    if vector is None:
        shape = None if array is None else list(array.shape)
        raise _Refused(
            Code.NOT_PER_CHANNEL,
            f"{node.op_type} constant of shape {shape} is not per output channel",
        )
    if node.op_type == "Add" and linear.node.op_type == "MatMul" and linear.out_rank != 2:
        return None  # MatMul (N-d) + Add has nowhere better to put the bias: no gain
    if node.op_type == "Mul":
        return _checked(lambda: Affine.of(vector, 0.0, linear.channels))
    return _checked(lambda: Affine.of(1.0, vector, linear.channels))


# --- before: linear(affine(x)) --------------------------------------------------------


def _linear_reader(bn: ir.Node) -> tuple[ir.Node, ...] | None:
    """(linear,) or (flatten, linear) when the BN's only reader feeds a linear op's input 0."""
    out = bn.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    reader = uses[0].node
    if reader.op_type in LINEAR_OPS:
        return (reader,)
    if reader.op_type not in ("Flatten", "Reshape") or reader.outputs[0].is_graph_output():
        return None
    next_uses = list(reader.outputs[0].uses())
    if len(next_uses) != 1 or next_uses[0].idx != 0:
        return None
    follower = next_uses[0].node
    return (reader, follower) if follower.op_type in ("Gemm", "MatMul") else None


def _plan_before(
    bn: ir.Node,
    chain: tuple[ir.Node, ...],
    ir_version: int,
    options: MatchOptions,
    hold: Callable[[DeferredWeight], bool],
) -> FoldPlan | Refusal:
    linear_node, between = chain[-1], (chain[0] if len(chain) == 2 else None)
    site = _site(bn, between, linear_node)
    try:
        linear = describe_linear(linear_node, ir_version, options)
        per_channel = _batchnorm_affine(bn, _bn_channels(bn, ir_version), ir_version)
        affine = _spread_to_input_features(per_channel, linear, between)
        _require_exact_before(linear, affine)
        gain = linear.input_gain / linear.bias_gain
        affine = Affine(affine.scale, affine.shift * gain)
        return _make_plan(
            site, Direction.BEFORE, linear, bn, between, affine, options.rounding, hold
        )
    except _Refused as refused:
        return Refusal(site, refused.code, refused.detail)


def _bn_channels(bn: ir.Node, ir_version: int) -> int:
    scale = constant_array(bn.inputs[1] if len(bn.inputs) > 1 else None, ir_version)
    if scale is None or scale.ndim != 1:
        raise _Refused(Code.NOT_CONSTANT, "BatchNorm scale is not a constant vector")
    return int(scale.shape[0])


def _spread_to_input_features(affine: Affine, linear: LinearOp, between: ir.Node | None) -> Affine:
    """Map the BN's per-channel affine onto the linear op's input features.

    Directly, channel c is input channel c. Through a Flatten of ``(N, C, *rest)``
    into ``(N, C * R)``, channel c is the contiguous block of features
    ``c*R .. c*R + R - 1``.
    """
    op = linear.node.op_type
    if op == "Gemm" and linear.node.attributes.get_int("transA", 0) != 0:
        raise _Refused(Code.NOT_PER_CHANNEL, "Gemm transA=1 reads the BN's channels as rows")
    features = linear.in_channels
    channels = affine.scale.shape[0]
    if between is None:
        data_rank = _rank(linear.node.inputs[0])
        if op == "MatMul" and data_rank != 2:
            raise _Refused(
                Code.NOT_PER_CHANNEL,
                f"MatMul reads features on the last axis of a rank-{data_rank or '?'} input, "
                "the BatchNorm normalizes axis 1",
            )
        if features != channels:
            raise _Refused(
                Code.BAD_SHAPE, f"BatchNorm has {channels} channels, op reads {features}"
            )
        return affine
    _require_flattens_batch(between)
    if channels == 0 or features % channels:
        raise _Refused(Code.BAD_SHAPE, f"{features} features are not a multiple of {channels}")
    return affine.spread(features)


def _require_flattens_batch(node: ir.Node) -> None:
    out_shape = node.outputs[0].shape
    if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) == 1:
        return
    if node.op_type == "Reshape" and out_shape is not None and len(out_shape) == 2:
        in_shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if in_shape is not None and len(in_shape) >= 1 and out_shape.dims[0] == in_shape.dims[0]:
            return
    raise _Refused(
        Code.NOT_PER_CHANNEL,
        f"{node.op_type} {label(node)!r} does not flatten (N, C, ...) to (N, -1)",
    )


# Ops whose output has the rank of their first input (no broadcasting binary ops:
# a wrong rank here could let a BN fold over the wrong axis).
RANK_PRESERVING_OPS = (NONLINEAR_OPS - {"Max", "Min", "Pow"}) | {
    "BatchNormalization", "Dropout", "Identity", "Neg", "Reciprocal", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Cast", "CastLike", "Softmax", "LRN", "InstanceNormalization",
    "LayerNormalization", "Conv", "ConvTranspose", "MaxPool", "AveragePool",
}  # fmt: skip


def _rank(value: ir.Value | None, depth: int = 0) -> int | None:
    """The rank of ``value``, from its shape or, unannotated, from what produced it.

    Models without shape inference leave intermediate values bare; the rank of
    a Relu's output is still the rank of its input, and a Gemm's is 2.
    """
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is None or depth > 64:
        return None
    if producer.op_type in ("Gemm", "Flatten"):
        return 2
    if producer.op_type in RANK_PRESERVING_OPS and producer.inputs:
        return _rank(producer.inputs[0], depth + 1)
    if producer.op_type == "MatMul" and len(producer.inputs) == 2:
        ranks = [_rank(v, depth + 1) for v in producer.inputs]
        return None if None in ranks else max(2, *ranks)  # type: ignore[type-var]
    return None


def _require_exact_before(linear: LinearOp, affine: Affine) -> None:
    """Zero padding reads zeros at the borders, never the shift: exact only if shift is 0."""
    if not np.any(affine.shift != 0):
        return
    node = linear.node
    if node.op_type == "ConvTranspose":
        raise _Refused(
            Code.ZERO_PADDING,
            "ConvTranspose: border outputs receive fewer taps, so a nonzero shift changes them",
        )
    if node.op_type == "Conv":
        pads = node.attributes.get_ints("pads", ())
        auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            raise _Refused(
                Code.ZERO_PADDING,
                "Conv pads with zeros: the borders would see the BatchNorm's shift, not zeros",
            )


# --- shared by both directions --------------------------------------------------------


def describe_linear(node: ir.Node, ir_version: int, options: MatchOptions) -> LinearOp:
    """Read a linear op's weight, bias and layout, refusing what cannot be folded into."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    earlier = None if weight is None else earlier_weight(weight)
    # A folded weight is refolded from its original, so its own values are not
    # needed: computing them here would hold a weight the save streams.
    w = (
        earlier.original()
        if earlier is not None
        else _require_constant(weight, "weight", ir_version)
    )
    if not _is_float(w):
        raise _Refused(Code.UNSUPPORTED_DTYPE, f"weight dtype {w.dtype} is not floating point")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b = None if bias is None else _require_constant(bias, "bias", ir_version)
    shared = tuple(v.name or "" for v in (weight, bias) if v is not None and readers(v) > 1)
    if shared and not options.clone_shared:
        raise _Refused(Code.SHARED_WEIGHT, f"{shared[0]!r} is also read by another node")
    assert weight is not None
    linear = _linear_of_kind(node, weight, w, bias, b)
    return replace(
        linear,
        shared=shared,
        earlier_weight=earlier,
        earlier_bias=earlier_bias(linear.bias),
    )


def _linear_of_kind(
    node: ir.Node, weight: ir.Value, w: np.ndarray, bias: ir.Value | None, b: np.ndarray | None
) -> LinearOp:
    op, w_shape = node.op_type, tuple(w.shape)
    groups = node.attributes.get_int("group", 1)
    if op in ("Conv", "ConvTranspose"):
        if groups < 1 or w_shape[0] % groups:
            raise _Refused(Code.BAD_GROUPS, f"weight rows {w_shape[0]} with group={groups}")
        layout = layouts.conv(groups) if op == "Conv" else layouts.conv_transpose(groups)
        return LinearOp(node, weight, bias, w, b, layout, len(w_shape))
    if len(w_shape) != 2:
        raise _Refused(Code.BAD_SHAPE, f"{op} weight has rank {len(w_shape)}, expected 2")
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
    left_rank = _rank(node.inputs[0])
    rank = None if left_rank is None else max(left_rank, 2)
    return LinearOp(node, weight, None, w, None, layouts.matmul(), rank, channel_last=True)


def readers(value: ir.Value) -> int:
    """How many inputs read the data of ``value`` (a Shape or CastLike of it does not)."""
    return sum(1 for use in value.uses() if reads_data(use.node, use.idx))


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16


def _batchnorm_affine(node: ir.Node, channels: int, ir_version: int) -> Affine:
    _require_inference(node)
    if node.attributes.get_int("spatial", 1) == 0:
        raise _Refused(Code.NOT_PER_CHANNEL, "spatial=0: statistics per activation, not channel")
    if len(node.inputs) < 5:
        raise _Refused(Code.BAD_SHAPE, f"BatchNormalization has {len(node.inputs)} inputs, needs 5")
    params = []
    for name, value in zip(("scale", "B", "mean", "var"), node.inputs[1:5], strict=True):
        array = _require_constant(value, f"BatchNorm {name}", ir_version)
        if array.shape != (channels,):
            raise _Refused(
                Code.BAD_SHAPE,
                f"BatchNorm {name} has shape {list(array.shape)}, expected [{channels}]",
            )
        params.append(array)
    # The default is the float32 1e-5f of the ONNX spec; onnxruntime adds exactly that.
    eps = node.attributes.get_float("epsilon", DEFAULT_BN_EPSILON)
    gamma, beta, mean, var = params
    return _checked(lambda: bn_to_affine(gamma, beta, mean, var, eps))


def is_inference_batchnorm(node: ir.Node) -> bool:
    """A default-domain BatchNormalization in inference mode: one a fold or lowering may remove."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    try:
        _require_inference(node)
    except _Refused:
        return False
    return True


def batchnorm_affine(node: ir.Node, ir_version: int) -> Affine | Refusal:
    """The per-channel affine an inference BatchNormalization computes, or why it has none.

    Refuses with the BN's own codes: TRAINING_MODE, NOT_PER_CHANNEL (spatial=0),
    NOT_CONSTANT, BAD_SHAPE, BAD_VALUES.
    """
    try:
        return _batchnorm_affine(node, _bn_channels(node, ir_version), ir_version)
    except _Refused as refused:
        return Refusal(label(node), refused.code, refused.detail)


def rank(value: ir.Value | None) -> int | None:
    """The rank of ``value``, from its shape or what produced it (see :func:`_rank`)."""
    return _rank(value)


def _require_inference(node: ir.Node) -> None:
    if node.attributes.get_int("training_mode", 0) == 1:
        raise _Refused(Code.TRAINING_MODE, "training_mode=1: batch statistics, not running ones")
    if node.attributes.get_int("is_test", 1) == 0:
        raise _Refused(Code.TRAINING_MODE, "is_test=0 (opset < 7 training mode)")
    for extra in node.outputs[1:]:
        if extra.name and (extra.uses() or extra.is_graph_output()):
            raise _Refused(
                Code.TRAINING_MODE, f"training output {extra.name!r} of BatchNorm is used"
            )


def _make_plan(
    site: str,
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
        raise _Refused(Code.BAD_VALUES, str(err)) from None
    except LayoutError as err:
        raise _Refused(Code.BAD_SHAPE, str(err)) from None
    needs_bias = linear.bias is not None or bool(np.any(new_b.values != 0))
    ordered = (linear.node, between, node) if after else (node, between, linear.node)
    added = sum(
        a.nbytes
        for v, a in ((linear.weight, deferred), (linear.bias, new_b))
        if v is not None and v.name in linear.shared
    )
    return FoldPlan(
        site, _pattern(*ordered), direction, linear, node, between, deferred,
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


def _checked(make: object) -> Affine:
    try:
        return make()  # type: ignore[operator]
    except Unfoldable as err:
        raise _Refused(Code.BAD_VALUES, str(err)) from None


def per_channel_vector(array: np.ndarray | None, linear: LinearOp) -> np.ndarray | None:
    """The ``(C,)`` vector a Mul/Add constant applies per output channel, else None.

    The constant must broadcast onto the linear op's output without growing it:
    rank at most the output's, every axis 1 except the channel axis, which is 1
    or C. A scalar (or all-ones shape) applies the same value to every channel.
    """
    if array is None or not _is_float(array):
        return None
    if linear.out_rank is None:
        max_rank = 2  # any MatMul output has rank >= 2
        channel_from_end = 1
    else:
        max_rank = linear.out_rank
        channel_from_end = linear.out_rank - linear.channel_axis()  # type: ignore[operator]
    if array.ndim > max_rank:
        return None
    channel_pos = array.ndim - channel_from_end
    for axis, size in enumerate(array.shape):
        if axis != channel_pos and size != 1:
            return None
    if channel_pos < 0 or array.shape[channel_pos] == 1:
        return np.full(linear.channels, float(array.reshape(-1)[0]))
    if array.shape[channel_pos] != linear.channels:
        return None
    return array.reshape(linear.channels).astype(np.float64)


def _require_constant(value: ir.Value | None, what: str, ir_version: int) -> np.ndarray:
    array = constant_array(value, ir_version)
    if array is None:
        name = "<missing>" if value is None else repr(value.name)
        raise _Refused(Code.NOT_CONSTANT, f"{what} {name} is not a constant")
    return array
