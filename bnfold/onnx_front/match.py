"""Find affine nodes next to linear ops and decide, per site, the fold or the refusal.

A *site* is an affine node (BatchNormalization, or Mul/Add by a constant) whose
data input is produced by a linear op (Conv, ConvTranspose, Gemm, MatMul).
:func:`plan` turns a site into a :class:`FoldPlan` holding the new weight and
bias, computed by :mod:`bnfold.affine`, or into a :class:`~bnfold.report.Refusal`.
Planning never modifies the graph; :mod:`bnfold.onnx_front.passes` applies plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold import layouts
from bnfold.affine import Affine, Unfoldable, bn_to_affine, fold_after
from bnfold.layouts import LayoutError, WeightLayout
from bnfold.report import Code, Refusal

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Add"})
# Elementwise or otherwise non-affine ops that commonly sit between a linear op
# and a BatchNorm; named in the refusal so users see why nothing folded.
NONLINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Clip", "Softmax", "LogSoftmax",
        "Abs", "Exp", "Log", "Sqrt", "Pow", "Max", "Min", "ThresholdedRelu", "Swish",
    }
)  # fmt: skip
FLOAT_DTYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


@dataclass(frozen=True)
class LinearOp:
    """A linear op with constant weights, seen from the fold's point of view.

    Attributes:
        node: the Conv/ConvTranspose/Gemm/MatMul node.
        weight: its constant weight value (input 1).
        bias: its constant bias value, or None when it has none.
        layout: where output channels sit in the weight.
        channels: number of output channels.
        out_rank: rank of the op's output, None when unknown (MatMul on an unknown input).
        channel_last: output channels are the last axis (MatMul) rather than axis 1.
        bias_gain: the op multiplies its bias by this (Gemm's beta); shifts are divided by it.
        resets_beta: Gemm with beta=0 ignores C, so the fold writes a new C and sets beta=1.
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    layout: WeightLayout
    channels: int
    out_rank: int | None
    channel_last: bool = False
    bias_gain: float = 1.0
    resets_beta: bool = False

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    def channel_axis(self) -> int | None:
        """Output axis (counted from the front) holding channels, None if unknown."""
        if not self.channel_last:
            return 1
        return None if self.out_rank is None else self.out_rank - 1


@dataclass(frozen=True)
class FoldPlan:
    """A checked fold, ready to apply: the new weight and bias are already computed."""

    site: str
    pattern: str
    linear: LinearOp
    affine_node: ir.Node
    new_weight: np.ndarray
    new_bias: np.ndarray | None  # None: the op has no bias and the fold needs none


def site_name(linear: ir.Node | None, affine: ir.Node) -> str:
    """``"conv1 -> bn1"``, falling back to op type and output name for unnamed nodes."""
    return f"{label(linear)} -> {label(affine)}" if linear else label(affine)


def label(node: ir.Node | None) -> str:
    if node is None:
        return "<input>"
    return node.name or f"{node.op_type}({node.outputs[0].name})"


class _Refused(Exception):
    """Internal control flow: planning stopped at the first refusal."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def plan(node: ir.Node, ir_version: int) -> FoldPlan | Refusal | None:
    """Plan the fold of one affine node into the linear op feeding it.

    Matches:  BatchNormalization(Conv|ConvTranspose|Gemm|MatMul(x, W, B?))
              Mul|Add(Conv|ConvTranspose|Gemm|MatMul(x, W, B?), constant)
    Produces: a FoldPlan with W' and B' (see bnfold.affine.fold_after).
    Refuses:
      TRAINING_MODE    BN has training_mode=1 / is_test=0, or its extra outputs are used
      NOT_CONSTANT     W, B or a BN parameter is not a constant (initializer,
                       Constant node, or an IR < 4 initializer listed as input)
      BRANCHING        the linear op's output has other consumers or is a graph output
      SHARED_WEIGHT    W or B is also read by another node
      NOT_PER_CHANNEL  the affine is not per output channel (MatMul on a 3-D input
                       before BN, BN spatial=0, Mul/Add constant over other axes)
      NONLINEAR_INPUT  BN's input comes from a nonlinearity
      STANDALONE       BN's input comes from no linear op at all
      BAD_VALUES       NaN/inf, var + eps <= 0, or folded values overflow the dtype
      BAD_SHAPE        BN parameters do not have one value per channel
      BAD_GROUPS       ConvTranspose input channels not divisible by group
      UNSUPPORTED_DTYPE  the weight is not a floating-point tensor

    Returns None for a Mul/Add that is not an affine next to a linear op (say a
    residual Add): those are not sites and are not reported.
    """
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    producer_input = _data_input(node, ir_version)
    if producer_input is None:
        return None
    producer = producer_input.producer()
    name = site_name(producer if producer and producer.op_type in LINEAR_OPS else None, node)
    try:
        if producer is None or producer.op_type not in LINEAR_OPS:
            return _refuse_unpaired(node, producer)
        linear = _describe_linear_for(node, producer, ir_version)
        if linear is None:
            return None
        affine = describe_affine(node, linear, ir_version)
        if affine is None:
            return None
        return _make_plan(name, linear, node, affine)
    except _Refused as refused:
        return Refusal(name, refused.code, refused.detail)


def _data_input(node: ir.Node, ir_version: int) -> ir.Value | None:
    """The non-constant input an affine node transforms, or None if it has none."""
    if node.op_type == "BatchNormalization":
        return node.inputs[0]
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    a, b = node.inputs
    a_const, b_const = (constant(v, ir_version) is not None for v in (a, b))
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


def _describe_linear_for(
    affine_node: ir.Node, producer: ir.Node, ir_version: int
) -> LinearOp | None:
    try:
        return describe_linear(producer, ir_version)
    except _Refused as refused:
        # Mul/Add after a MatMul of two activations (attention scaling, say) is
        # not a fold candidate; reporting it would bury the real refusals.
        weightless = refused.code in (Code.NOT_CONSTANT, Code.UNSUPPORTED_DTYPE)
        if affine_node.op_type != "BatchNormalization" and weightless:
            return None
        raise


def describe_linear(node: ir.Node, ir_version: int) -> LinearOp:
    """Read a linear op's weight, bias and layout, refusing what cannot be folded into."""
    _require_single_consumer(node)
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    w = _require_constant(weight, "weight", ir_version)
    if weight is None or w.dtype not in FLOAT_DTYPES:
        raise _Refused(Code.UNSUPPORTED_DTYPE, f"weight dtype {w.dtype} is not floating point")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        _require_constant(bias, "bias", ir_version)
    for value in (weight, bias):
        if value is not None and len(value.uses()) > 1:
            raise _Refused(Code.SHARED_WEIGHT, f"{value.name!r} is also read by another node")
    return _linear_of_kind(node, weight, bias, tuple(w.shape.numpy()))


def _linear_of_kind(
    node: ir.Node, weight: ir.Value, bias: ir.Value | None, w_shape: tuple[int, ...]
) -> LinearOp:
    op = node.op_type
    if op == "Conv":
        return LinearOp(node, weight, bias, layouts.conv(), w_shape[0], len(w_shape))
    if op == "ConvTranspose":
        groups = node.attributes.get_int("group", 1)
        if groups < 1 or w_shape[0] % groups:
            raise _Refused(Code.BAD_GROUPS, f"{w_shape[0]} input channels, group={groups}")
        return LinearOp(
            node, weight, bias, layouts.conv_transpose(groups), w_shape[1] * groups, len(w_shape)
        )
    if len(w_shape) != 2:
        raise _Refused(Code.BAD_SHAPE, f"{op} weight has rank {len(w_shape)}, expected 2")
    if op == "Gemm":
        trans_b = bool(node.attributes.get_int("transB", 0))
        beta = node.attributes.get_float("beta", 1.0)
        layout = layouts.gemm(trans_b)
        channels = w_shape[layout.out_axis]
        if beta == 0:
            return LinearOp(node, weight, None, layout, channels, 2, resets_beta=True)
        return LinearOp(node, weight, bias, layout, channels, 2, bias_gain=beta)
    # MatMul: the constant is the right operand, so output features are the last axis.
    left_shape = node.inputs[0].shape if node.inputs[0] is not None else None
    rank = None if left_shape is None else max(len(left_shape), 2)
    return LinearOp(node, weight, None, layouts.matmul(), w_shape[1], rank, channel_last=True)


def _require_single_consumer(node: ir.Node) -> None:
    out = node.outputs[0]
    if out.is_graph_output():
        raise _Refused(Code.BRANCHING, f"output {out.name!r} is also a graph output")
    if len(out.uses()) > 1:
        readers = sorted({label(use.node) for use in out.uses()})
        raise _Refused(Code.BRANCHING, f"output {out.name!r} is read by {', '.join(readers)}")


def describe_affine(node: ir.Node, linear: LinearOp, ir_version: int) -> Affine | None:
    """The per-output-channel affine an affine node applies, or a refusal."""
    if node.op_type == "BatchNormalization":
        return _batchnorm_affine(node, linear, ir_version)
    operand = next(v for v in node.inputs if v is not linear.output)
    vector = per_channel_vector(constant_array(operand, ir_version), linear)
    if vector is None:
        shape = constant(operand, ir_version).shape  # type: ignore[union-attr]
        raise _Refused(
            Code.NOT_PER_CHANNEL,
            f"{node.op_type} constant of shape {list(shape)} is not per output channel",
        )
    if node.op_type == "Add" and linear.node.op_type == "MatMul" and linear.out_rank != 2:
        return None  # MatMul (N-d) + Add has nowhere better to put the bias: no gain
    if node.op_type == "Mul":
        return _checked(lambda: Affine.of(vector, 0.0, linear.channels))
    return _checked(lambda: Affine.of(1.0, vector, linear.channels))


def _batchnorm_affine(node: ir.Node, linear: LinearOp, ir_version: int) -> Affine:
    _require_inference(node)
    if node.attributes.get_int("spatial", 1) == 0:
        raise _Refused(
            Code.NOT_PER_CHANNEL, "spatial=0: statistics per activation, not per channel"
        )
    if linear.channel_axis() != 1:
        raise _Refused(
            Code.NOT_PER_CHANNEL,
            f"BatchNorm normalizes axis 1 but {linear.node.op_type}'s output features are axis "
            f"{linear.channel_axis() if linear.out_rank else 'unknown (input rank unknown)'}",
        )
    if len(node.inputs) < 5:
        raise _Refused(Code.BAD_SHAPE, f"BatchNormalization has {len(node.inputs)} inputs, needs 5")
    names = ("scale", "B", "mean", "var")
    params = []
    for name, value in zip(names, node.inputs[1:5], strict=True):
        _require_constant(value, f"BatchNorm {name}", ir_version)
        array = constant_array(value, ir_version)
        if array is None or array.shape != (linear.channels,):
            shape = None if array is None else list(array.shape)
            raise _Refused(
                Code.BAD_SHAPE, f"BatchNorm {name} has shape {shape}, expected [{linear.channels}]"
            )
        params.append(array)
    eps = node.attributes.get_float("epsilon", 1e-5)
    return _checked(lambda: bn_to_affine(*params, eps))


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


def _make_plan(site: str, linear: LinearOp, node: ir.Node, affine: Affine) -> FoldPlan:
    weight = _array(linear.weight)
    bias = None if linear.bias is None else _array(linear.bias)
    affine = Affine(affine.scale, affine.shift / linear.bias_gain)
    try:
        new_w, new_b = fold_after(weight, bias, affine, linear.layout)
    except Unfoldable as err:
        raise _Refused(Code.BAD_VALUES, str(err)) from None
    except LayoutError as err:
        raise _Refused(Code.BAD_SHAPE, str(err)) from None
    needs_bias = bias is not None or bool(np.any(new_b != 0))
    pattern = f"{linear.node.op_type}+{node.op_type}"
    return FoldPlan(site, pattern, linear, node, new_w, new_b if needs_bias else None)


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
    if array is None or array.dtype.kind != "f":
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


def constant(value: ir.Value | None, ir_version: int) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value``, or None if it can change at run time.

    Initializers and Constant-node outputs are constant. An initializer that is
    also a graph input can be overridden by the caller, so it is not constant,
    except in IR < 4 where every initializer must be listed as an input.
    """
    if value is None:
        return None
    if value.is_graph_input() and (ir_version >= 4 or value.const_value is None):
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _array(value: ir.Value) -> np.ndarray:
    """The values of a constant already checked by :func:`constant`."""
    tensor = ir.convenience.get_const_tensor(value)
    assert tensor is not None
    return tensor.numpy()


def constant_array(value: ir.Value | None, ir_version: int) -> np.ndarray | None:
    tensor = constant(value, ir_version)
    return None if tensor is None else tensor.numpy()


def _require_constant(value: ir.Value | None, what: str, ir_version: int) -> ir.TensorProtocol:
    tensor = constant(value, ir_version)
    if tensor is None:
        name = "<missing>" if value is None else repr(value.name)
        raise _Refused(Code.NOT_CONSTANT, f"{what} {name} is not a constant")
    return tensor
