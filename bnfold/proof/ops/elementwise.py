"""Elementwise operators on affine values: Add, Sub, Mul, Div, Neg, Sum, Identity,
Dropout and inference BatchNormalization, each per feature with a constant operand."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.proof.coefs import Coefs
from bnfold.proof.ops.base import (
    Arg,
    Opaque,
    OpContext,
    added,
    affine_input,
    attr_float,
    attr_int,
    constant,
    feature_vector,
    label,
    negated,
    scaled,
    shifted,
    stored,
    used,
)
from bnfold.proof.values import Affine, Const, Pooled, Unsupported, Value

DEFAULT_EPSILON = float(np.float32(1e-5))
"""BatchNormalization's default ``epsilon``: 1e-5 as the float32 the attribute is."""


def _elementwise_const(
    node: ir.Node, value: Affine | Pooled, const: np.ndarray, ctx: OpContext
) -> Coefs:
    return feature_vector(value.layout, stored(const, ctx), node)


def _affine_or_pooled(arg: Value) -> Affine | Pooled | None:
    return arg if isinstance(arg, Affine | Pooled) else None


def op_add(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = used(args[0], node), used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [shifted(va, _elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [shifted(vb, _elementwise_const(node, vb, a.array, ctx))]
    return [added(affine_input(a, node), affine_input(b, node), node)]


def op_sub(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = used(args[0], node), used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [shifted(va, -_elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [shifted(negated(vb), _elementwise_const(node, vb, a.array, ctx))]
    negative = negated(affine_input(b, node))
    assert isinstance(negative, Affine)
    return [added(affine_input(a, node), negative, node)]


def op_mul(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = used(args[0], node), used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [scaled(va, _elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [scaled(vb, _elementwise_const(node, vb, a.array, ctx))]
    raise Unsupported(f"{label(node)} multiplies two computed values (not affine)")


def op_div(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = used(args[0], node), used(args[1], node)
    va = _affine_or_pooled(a)
    if va is None or not isinstance(b, Const):
        raise Unsupported(f"{label(node)} divides by a computed value (not affine)")
    divisor = _elementwise_const(node, va, b.array, ctx)
    if not divisor.val.all():
        raise Unsupported(f"{label(node)} divides by zero")
    return [scaled(va, divisor.recip())]


def op_neg(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its input is not affine")
    return [negated(value)]


def op_sum(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    total: Arg = args[0]
    for arg in args[1:]:
        total = op_add(node, [total, arg], ctx)[0]
    return [total]


def op_identity(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    return [args[0]]


def op_dropout(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """Inference Dropout is the identity; its mask output is not modelled."""
    if len(args) > 2 and args[2] is not None:
        mode = constant(args[2], node, "training_mode")
        if mode.any():
            raise Unsupported(f"{label(node)} runs in training mode")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        raise Unsupported(f"{label(node)} runs in training mode (is_test=0)")
    return [args[0], Opaque(f"{label(node)}: its mask output is read")]


def op_batchnorm(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``(x - mean) / sqrt(var + epsilon) * scale + B`` per channel (axis 1)."""
    if attr_int(node, "training_mode", 0):
        raise Unsupported(f"{label(node)} runs in training mode")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        raise Unsupported(f"{label(node)} runs in training mode (is_test=0)")
    if not attr_int(node, "spatial", 1):
        raise Unsupported(f"{label(node)} has spatial=0 (statistics per element)")
    x = used(args[0], node)
    if not isinstance(x, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its input is not affine")
    gamma, beta, mean, var = (
        stored(constant(args[i], node, what), ctx)
        for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var"))
    )
    # An ONNX float attribute is a float32: the default is 1e-5f, which a float64 model
    # sees as 9.99999974737875e-06, as every runtime adds it.
    eps = Coefs.exact(attr_float(node, "epsilon", DEFAULT_EPSILON))
    denom = var + eps
    if (denom.val <= 0).any():
        raise Unsupported(f"{label(node)}: var + epsilon <= 0")
    scale = gamma / denom.sqrt()
    shift = beta - mean * scale
    rank = len(x.layout)
    channel_shape = (scale.shape[0],) + (1,) * (rank - 2)
    s = feature_vector(x.layout, scale.reshape(channel_shape), node)
    t = feature_vector(x.layout, shift.reshape(channel_shape), node)
    extra = [Opaque(f"{label(node)}: its running statistics are read")] * (len(node.outputs) - 1)
    return [shifted(scaled(x, s), t), *extra]
