"""ONNX operator semantics over the prover's values (:mod:`bnfold.proof.values`).

Each function here implements one operator from its ONNX definition, on affine
values: what the operator does to every tap matrix and to the bias of its input. They
are written from the operator specification (onnx.ai/onnx/operators), not from
bnfold's fold code, and tests check each against onnxruntime on random inputs: a bug in
the fold math cannot hide behind the same bug here.

Supported in a changed region: Conv, ConvTranspose, Gemm, MatMul (constant 2-D right
operand), BatchNormalization (inference), Add, Sub, Mul, Div, Neg, Sum, Identity,
Dropout (inference), Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat (channel
axes), AveragePool, MaxPool, GlobalAveragePool, GlobalMaxPool and Shape. Anything else
in a changed region raises :class:`~bnfold.proof.values.Unsupported`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.dims import Dim
from bnfold.proof.stencil import AxisMap, SizeRule, Stencil
from bnfold.proof.values import (
    Affine,
    Axis,
    Const,
    Layout,
    Pooled,
    PoolSpec,
    Role,
    ShapeValue,
    Unsupported,
    Value,
    feature_count,
    feature_dims,
    layout_text,
    shape_of,
)


@dataclass(frozen=True)
class Opaque:
    """An output the prover cannot model; using it raises ``Unsupported(reason)``."""

    reason: str


Arg = Value | Opaque | None


@dataclass(frozen=True)
class OpContext:
    """What an operator needs beyond its inputs."""

    track_units: bool  # the folded side: stored values' ulps are the unit of comparison
    opset: int  # of the default domain


Transfer = Callable[[ir.Node, list[Arg], OpContext], list[Arg]]


# -- small helpers ----------------------------------------------------------------------


def _attr(node: ir.Node, name: str) -> object:
    attr = node.attributes.get(name)
    return None if attr is None else attr.value


def attr_int(node: ir.Node, name: str, default: int) -> int:
    value = _attr(node, name)
    return default if value is None else int(value)  # type: ignore[call-overload]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    value = _attr(node, name)
    return default if value is None else float(value)  # type: ignore[arg-type]


def attr_str(node: ir.Node, name: str, default: str) -> str:
    value = _attr(node, name)
    return default if value is None else str(value)


def attr_ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    value = _attr(node, name)
    return None if value is None else tuple(int(v) for v in value)  # type: ignore[attr-defined]


def ints(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = attr_ints(node, name)
    return default if value is None else value


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _used(arg: Arg, node: ir.Node) -> Value:
    if arg is None:
        raise Unsupported(f"{_label(node)}: a required input is missing")
    if isinstance(arg, Opaque):
        raise Unsupported(arg.reason)
    return arg


def _const(arg: Arg, node: ir.Node, what: str) -> np.ndarray:
    value = _used(arg, node)
    if not isinstance(value, Const):
        raise Unsupported(f"{_label(node)}: its {what} is not a constant")
    return value.array


def _affine(arg: Arg, node: ir.Node) -> Affine:
    value = _used(arg, node)
    if isinstance(value, Pooled):
        raise Unsupported(f"{_label(node)} reads a pool's output inside the changed region")
    if not isinstance(value, Affine):
        raise Unsupported(f"{_label(node)}: its data input is not an affine value")
    return value


def _stored(array: np.ndarray, ctx: OpContext) -> Coefs:
    if array.dtype.kind not in "fV":
        raise Unsupported(f"a {array.dtype} weight (the prover compares float weights)")
    return Coefs.stored(array, ctx.track_units)


def _is_zero(c: Coefs) -> bool:
    return not c.val.any() and (c.unit is None or not c.unit.any())


# -- per-feature constants --------------------------------------------------------------


def feature_index(layout: Layout, shape: tuple[int, ...], node: ir.Node) -> np.ndarray:
    """For each flattened feature, the flat index of the constant entry it gets.

    ``shape`` is the constant's shape, broadcast against ``layout`` (right-aligned).
    Raises Unsupported unless the constant varies along FEATURE axes only, and
    broadcasting does not grow the value.
    """
    rank = len(layout)
    if len(shape) > rank:
        if any(n != 1 for n in shape[: len(shape) - rank]):
            raise Unsupported(f"{_label(node)}: its constant has more axes than its input")
        shape = shape[len(shape) - rank :]
    full = (1,) * (rank - len(shape)) + tuple(shape)
    for axis, (n, ax) in enumerate(zip(full, layout, strict=True)):
        if n == 1:
            continue
        if ax.role is not Role.FEATURE:
            raise Unsupported(
                f"{_label(node)}: its constant varies along axis {axis} ({ax.role.value}), "
                "not per channel"
            )
        if ax.size != n:
            raise Unsupported(
                f"{_label(node)}: its constant {list(full)} does not broadcast to "
                f"{layout_text(layout)} without growing it"
            )
    fdims = feature_dims(layout)
    grid = np.indices(fdims) if fdims else np.zeros((0,), dtype=np.int64)
    coords: list[np.ndarray | int] = []
    j = 0
    for n, ax in zip(full, layout, strict=True):
        if ax.role is Role.FEATURE:
            coords.append(grid[j] if n > 1 else 0)
            j += 1
        else:
            coords.append(0)
    arrays = np.broadcast_arrays(*[np.asarray(c) for c in coords], np.zeros(fdims, dtype=int))
    flat = np.ravel_multi_index(tuple(arrays[:-1]), full)
    return np.asarray(flat).reshape(-1)


def feature_vector(layout: Layout, coefs: Coefs, node: ir.Node) -> Coefs:
    """A constant's value at each flattened feature of ``layout``."""
    index = feature_index(layout, coefs.shape, node)
    return coefs.map(lambda a: np.asarray(a).reshape(-1)[index])


# -- affine arithmetic ------------------------------------------------------------------


def scaled(value: Affine | Pooled, vector: Coefs) -> Affine | Pooled:
    """``vector * value``, one factor per flattened feature."""
    if isinstance(value, Pooled):
        scale, shift = value.post or (Coefs.exact(np.ones(vector.shape)), Coefs.zeros(vector.shape))
        return Pooled(value.spec, value.inner, value.layout, (scale * vector, shift * vector))
    terms = {k: s.scale_rows(vector) for k, s in value.terms.items()}
    return Affine(value.layout, terms, value.bias * vector)


def shifted(value: Affine | Pooled, vector: Coefs) -> Affine | Pooled:
    """``value + vector``, one term per flattened feature."""
    if isinstance(value, Pooled):
        scale, shift = value.post or (Coefs.exact(np.ones(vector.shape)), Coefs.zeros(vector.shape))
        return Pooled(value.spec, value.inner, value.layout, (scale, shift + vector))
    return Affine(value.layout, dict(value.terms), value.bias + vector)


def same_layout(a: Layout, b: Layout) -> bool:
    return len(a) == len(b) and all(
        x.role is y.role and x.frame == y.frame and dims.same(x.size, y.size)
        for x, y in zip(a, b, strict=True)
    )


def added(a: Affine, b: Affine, node: ir.Node) -> Affine:
    """``a + b`` of two affine values of one layout."""
    if not same_layout(a.layout, b.layout):
        raise Unsupported(
            f"{_label(node)} adds {layout_text(a.layout)} and {layout_text(b.layout)}, "
            "which the prover cannot show to have one shape"
        )
    terms = dict(a.terms)
    for key, stencil in b.terms.items():
        if key not in terms:
            terms[key] = stencil
        elif terms[key].geometry != stencil.geometry:
            raise Unsupported(f"{_label(node)} adds windows of different strides or sizes")
        else:
            terms[key] = terms[key].plus(stencil)
    return Affine(a.layout, terms, a.bias + b.bias)


def negated(value: Affine | Pooled) -> Affine | Pooled:
    n = feature_count(value.layout)
    return scaled(value, Coefs.exact(-np.ones(n)))


# -- elementwise operators --------------------------------------------------------------


def _elementwise_const(
    node: ir.Node, value: Affine | Pooled, const: np.ndarray, ctx: OpContext
) -> Coefs:
    return feature_vector(value.layout, _stored(const, ctx), node)


def _affine_or_pooled(arg: Value) -> Affine | Pooled | None:
    return arg if isinstance(arg, Affine | Pooled) else None


def op_add(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = _used(args[0], node), _used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [shifted(va, _elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [shifted(vb, _elementwise_const(node, vb, a.array, ctx))]
    return [added(_affine(a, node), _affine(b, node), node)]


def op_sub(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = _used(args[0], node), _used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [shifted(va, -_elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [shifted(negated(vb), _elementwise_const(node, vb, a.array, ctx))]
    negative = negated(_affine(b, node))
    assert isinstance(negative, Affine)
    return [added(_affine(a, node), negative, node)]


def op_mul(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = _used(args[0], node), _used(args[1], node)
    va, vb = _affine_or_pooled(a), _affine_or_pooled(b)
    if va is not None and isinstance(b, Const):
        return [scaled(va, _elementwise_const(node, va, b.array, ctx))]
    if vb is not None and isinstance(a, Const):
        return [scaled(vb, _elementwise_const(node, vb, a.array, ctx))]
    raise Unsupported(f"{_label(node)} multiplies two computed values (not affine)")


def op_div(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    a, b = _used(args[0], node), _used(args[1], node)
    va = _affine_or_pooled(a)
    if va is None or not isinstance(b, Const):
        raise Unsupported(f"{_label(node)} divides by a computed value (not affine)")
    divisor = _elementwise_const(node, va, b.array, ctx)
    if not divisor.val.all():
        raise Unsupported(f"{_label(node)} divides by zero")
    return [scaled(va, divisor.recip())]


def op_neg(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its input is not affine")
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
        mode = _const(args[2], node, "training_mode")
        if mode.any():
            raise Unsupported(f"{_label(node)} runs in training mode")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        raise Unsupported(f"{_label(node)} runs in training mode (is_test=0)")
    return [args[0], Opaque(f"{_label(node)}: its mask output is read")]


def op_batchnorm(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``(x - mean) / sqrt(var + epsilon) * scale + B`` per channel (axis 1)."""
    if attr_int(node, "training_mode", 0):
        raise Unsupported(f"{_label(node)} runs in training mode")
    if ctx.opset < 7 and not attr_int(node, "is_test", 0):
        raise Unsupported(f"{_label(node)} runs in training mode (is_test=0)")
    if not attr_int(node, "spatial", 1):
        raise Unsupported(f"{_label(node)} has spatial=0 (statistics per element)")
    x = _used(args[0], node)
    if not isinstance(x, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its input is not affine")
    gamma, beta, mean, var = (
        _stored(_const(args[i], node, what), ctx)
        for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var"))
    )
    eps = Coefs.exact(attr_float(node, "epsilon", 1e-5))
    denom = var + eps
    if (denom.val <= 0).any():
        raise Unsupported(f"{_label(node)}: var + epsilon <= 0")
    scale = gamma / denom.sqrt()
    shift = beta - mean * scale
    rank = len(x.layout)
    channel_shape = (scale.shape[0],) + (1,) * (rank - 2)
    s = feature_vector(x.layout, scale.reshape(channel_shape), node)
    t = feature_vector(x.layout, shift.reshape(channel_shape), node)
    extra = [Opaque(f"{_label(node)}: its running statistics are read")] * (len(node.outputs) - 1)
    return [shifted(scaled(x, s), t), *extra]


# -- windows: Conv, ConvTranspose -------------------------------------------------------


def _window_input(x: Affine, node: ir.Node, rank: int, channels: int) -> list[Dim]:
    """Check ``x`` is ``[batch, channels, space...]``; return its spatial sizes."""
    layout = x.layout
    roles_ok = (
        len(layout) == rank + 2
        and layout[0].role is Role.BATCH
        and layout[1].role is Role.FEATURE
        and all(a.role is Role.SPACE and a.frame == i for i, a in enumerate(layout[2:]))
    )
    if not roles_ok:
        raise Unsupported(
            f"{_label(node)}: its input {layout_text(layout)} is not [batch, channels, space...]"
        )
    if layout[1].size != channels:
        raise Unsupported(f"{_label(node)}: input has {layout[1].size} channels, weight {channels}")
    return [a.size for a in layout[2:]]


def _same_pads(auto_pad: str, total: int) -> tuple[int, int]:
    small = total // 2
    return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)


def _conv_axis(
    node: ir.Node, size: Dim, k: int, s: int, d: int, pads: tuple[int, int]
) -> tuple[AxisMap, list[int]]:
    span = (k - 1) * d + 1
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if s == 1:
            begin, end = _same_pads(auto_pad, span - 1)
        elif isinstance(size, int):
            out = -(-size // s)
            begin, end = _same_pads(auto_pad, max(0, (out - 1) * s + span - size))
        else:
            raise Unsupported(
                f"{_label(node)}: auto_pad {auto_pad} with stride {s} on a dynamic size"
            )
    elif auto_pad == "VALID":
        begin, end = 0, 0
    else:
        begin, end = pads
    rule = SizeRule.of(1, begin + end - span + s, s)
    return AxisMap(s, 1, rule), [i * d - begin for i in range(k)]


def _window_params(node: ir.Node, kernel: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    r = len(kernel)
    declared = ints(node, "kernel_shape", kernel)
    if declared != kernel:
        raise Unsupported(f"{_label(node)}: kernel_shape {declared} but weight {kernel}")
    strides = ints(node, "strides", (1,) * r)
    dilations = ints(node, "dilations", (1,) * r)
    pads = ints(node, "pads", (0,) * (2 * r))
    return strides, dilations, pads


def _applied(x: Affine, window: Stencil, node: ir.Node) -> dict[str, Stencil]:
    """The window applied to every term of ``x`` (and to its bias, as an all-ones field)."""
    terms: dict[str, Stencil] = {}
    for key, stencil in x.terms.items():
        if not stencil.is_pointwise():
            raise Unsupported(
                f"{_label(node)} reads a value already windowed inside the same piece"
            )
        _add_term(terms, key, stencil.after(window), node)
    if not _is_zero(x.bias):
        ones = Stencil.pointwise(x.bias.reshape((1, x.features, 1)), len(window.geometry))
        _add_term(terms, ones_key(x.layout), ones.after(window), node)
    return terms


def _add_term(terms: dict[str, Stencil], key: str, stencil: Stencil, node: ir.Node) -> None:
    if key not in terms:
        terms[key] = stencil
    elif terms[key].geometry != stencil.geometry:
        raise Unsupported(f"{_label(node)}: one source reaches it through two geometries")
    else:
        terms[key] = terms[key].plus(stencil)


ONES_PREFIX = "1@"


def ones_key(layout: Layout) -> str:
    """The source name of the all-ones field on the spatial grid of ``layout``.

    A shift added before a zero-padded window is not added in the padding: the window
    reads ``x + t`` inside the input and 0 outside. So the shift becomes a term of the
    map from a field that is 1 inside the input and 0 in the padding.
    """
    sizes = [a.size for a in layout if a.role is Role.SPACE]
    return ONES_PREFIX + dims.text(sizes)


def _bias(arg: Arg, node: ir.Node, count: int, ctx: OpContext) -> Coefs:
    if arg is None:
        return Coefs.zeros((count,))
    bias = _stored(_const(arg, node, "bias"), ctx)
    if bias.shape != (count,):
        raise Unsupported(f"{_label(node)}: bias of shape {list(bias.shape)}, {count} outputs")
    return bias


def op_conv(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``y[o, p] = b[o] + sum_{c, k} W[o, c, k] x[g(o) * C/g + c, p * s + k * d - pad]``."""
    x = _affine(args[0], node)
    w = _const(args[1], node, "weight")
    groups = attr_int(node, "group", 1)
    c_out, c_in_group = w.shape[0], w.shape[1]
    kernel = tuple(int(k) for k in w.shape[2:])
    r = len(kernel)
    if c_out % groups:
        raise Unsupported(f"{_label(node)}: {c_out} outputs in {groups} groups")
    sizes = _window_input(x, node, r, c_in_group * groups)
    strides, dilations, pads = _window_params(node, kernel)
    axes = [
        _conv_axis(node, sizes[i], kernel[i], strides[i], dilations[i], (pads[i], pads[i + r]))
        for i in range(r)
    ]
    k_total = math.prod(kernel)
    taps = _stored(w, ctx).map(
        lambda a: a.reshape(groups, c_out // groups, c_in_group, k_total).transpose(3, 0, 1, 2)
    )
    offsets = tuple(itertools.product(*[offs for _, offs in axes]))
    window = Stencil(tuple(g for g, _ in axes), offsets, taps)
    out_layout: Layout = (
        x.layout[0],
        Axis(Role.FEATURE, c_out),
        *[Axis(Role.SPACE, g.size.dim(sizes[i]), i) for i, (g, _) in enumerate(axes)],
    )
    bias = _bias(args[2] if len(args) > 2 else None, node, c_out, ctx)
    return [Affine(out_layout, _applied(x, window, node), bias)]


def _convtranspose_axis(
    node: ir.Node, size: Dim, k: int, s: int, d: int, op: int, pads: tuple[int, int], out: int
) -> tuple[AxisMap, list[int], Dim]:
    span = (k - 1) * d + 1
    auto_pad = attr_str(node, "auto_pad", "NOTSET")
    if out >= 0:
        if not isinstance(size, int):
            raise Unsupported(f"{_label(node)}: output_shape with a dynamic input size")
        begin, end = _same_pads(
            "SAME_UPPER" if auto_pad == "SAME_UPPER" else "SAME_LOWER",
            s * (size - 1) + op + span - out,
        )
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = _same_pads(auto_pad, op + span - s)
    elif auto_pad == "VALID":
        begin, end = 0, 0
    else:
        begin, end = pads
    rule = SizeRule.of(s, op + span - begin - end - s, 1)
    return AxisMap(1, s, rule), [begin - i * d for i in range(k)], rule.dim(size)


def op_convtranspose(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``y[g * C'/g + o, q * s + k * d - pad] += W[c, o, k] x[c, q]`` for c in group g."""
    x = _affine(args[0], node)
    w = _const(args[1], node, "weight")
    groups = attr_int(node, "group", 1)
    c_in, c_out_group = w.shape[0], w.shape[1]
    kernel = tuple(int(k) for k in w.shape[2:])
    r = len(kernel)
    if c_in % groups:
        raise Unsupported(f"{_label(node)}: {c_in} inputs in {groups} groups")
    sizes = _window_input(x, node, r, c_in)
    strides, dilations, pads = _window_params(node, kernel)
    out_pad = ints(node, "output_padding", (0,) * r)
    out_shape = ints(node, "output_shape", ())
    out_shape = out_shape[-r:] if out_shape else (-1,) * r
    axes = [
        _convtranspose_axis(
            node, sizes[i], kernel[i], strides[i], dilations[i], out_pad[i],
            (pads[i], pads[i + r]), out_shape[i],
        )
        for i in range(r)
    ]  # fmt: skip
    k_total = math.prod(kernel)
    taps = _stored(w, ctx).map(
        lambda a: a.reshape(groups, c_in // groups, c_out_group, k_total).transpose(3, 0, 2, 1)
    )
    offsets = tuple(itertools.product(*[offs for _, offs, _ in axes]))
    window = Stencil(tuple(g for g, _, _ in axes), offsets, taps)
    c_out = c_out_group * groups
    out_layout: Layout = (
        x.layout[0],
        Axis(Role.FEATURE, c_out),
        *[Axis(Role.SPACE, size, i) for i, (_, _, size) in enumerate(axes)],
    )
    bias = _bias(args[2] if len(args) > 2 else None, node, c_out, ctx)
    return [Affine(out_layout, _applied(x, window, node), bias)]


# -- matrices: Gemm, MatMul -------------------------------------------------------------


def _matrix_applied(x: Affine, matrix: Coefs, node: ir.Node) -> tuple[dict[str, Stencil], Coefs]:
    """``matrix @ x`` over the last feature axis: terms and the bias carried through."""
    terms = {}
    for key, stencil in x.terms.items():
        if not stencil.is_pointwise():
            raise Unsupported(f"{_label(node)} reads a windowed value of collapsed size")
        window = Stencil.pointwise(matrix.reshape((1, *matrix.shape)), len(stencil.geometry))
        terms[key] = stencil.after(window)
    carried = matrix.matmul(x.bias.reshape((x.features, 1))).reshape((matrix.shape[0],))
    return terms, carried


def op_gemm(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``alpha * A' @ B' + beta * C`` with A the affine operand and B, C constants."""
    if attr_int(node, "transA", 0):
        raise Unsupported(f"{_label(node)} has transA=1")
    x = _affine(args[0], node)
    layout = x.layout
    if len(layout) != 2 or layout[0].role is not Role.BATCH or layout[1].role is not Role.FEATURE:
        raise Unsupported(
            f"{_label(node)}: its input {layout_text(layout)} is not [batch, features]"
        )
    b = _stored(_const(args[1], node, "B"), ctx)
    if len(b.shape) != 2:
        raise Unsupported(f"{_label(node)}: B of rank {len(b.shape)}")
    matrix = b if attr_int(node, "transB", 0) else b.map(lambda a: a.T)
    n, k = matrix.shape
    if layout[1].size != k:
        raise Unsupported(f"{_label(node)}: input has {layout[1].size} features, B {k}")
    alpha = Coefs.exact(attr_float(node, "alpha", 1.0))
    beta = Coefs.exact(attr_float(node, "beta", 1.0))
    matrix = matrix * alpha
    out_layout: Layout = (layout[0], Axis(Role.FEATURE, n))
    terms, carried = _matrix_applied(x, matrix, node)
    bias = carried
    if len(args) > 2 and args[2] is not None:
        c = _stored(_const(args[2], node, "C"), ctx)
        bias = bias + feature_vector(out_layout, c, node) * beta
    return [Affine(out_layout, terms, bias)]


def op_matmul(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``A @ B`` with A affine ``[..., K]`` and B a constant ``[K, N]``."""
    x = _affine(args[0], node)
    b = _stored(_const(args[1], node, "right operand"), ctx)
    if len(b.shape) != 2:
        raise Unsupported(f"{_label(node)}: a constant right operand of rank {len(b.shape)}")
    layout = x.layout
    if layout[-1].role is not Role.FEATURE or any(a.role is Role.FEATURE for a in layout[:-1]):
        raise Unsupported(f"{_label(node)}: its input {layout_text(layout)} is not [..., features]")
    k, n = b.shape
    if layout[-1].size != k:
        raise Unsupported(f"{_label(node)}: input has {layout[-1].size} features, weight {k}")
    terms, carried = _matrix_applied(x, b.map(lambda a: a.T), node)
    return [Affine((*layout[:-1], Axis(Role.FEATURE, n)), terms, carried)]


# -- shape ops ----------------------------------------------------------------------------


def _align(
    src: tuple[Dim, ...], dst: tuple[Dim, ...], node: ir.Node
) -> list[tuple[list[int], list[int]]]:
    """Groups of consecutive source and target axes holding the same elements.

    A row-major reshape keeps element order, so it maps each group's elements in order
    onto the matching target group. Size-1 axes stand alone where they can.
    """
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        s_one = i < len(src) and src[i] == 1
        d_one = j < len(dst) and dst[j] == 1
        if s_one and d_one:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if s_one or j >= len(dst):
            if not s_one:
                raise Unsupported(
                    f"{_label(node)}: cannot match {dims.text(src)} to {dims.text(dst)}"
                )
            groups.append(([i], []))
            i += 1
            continue
        if d_one or i >= len(src):
            if not d_one:
                raise Unsupported(
                    f"{_label(node)}: cannot match {dims.text(src)} to {dims.text(dst)}"
                )
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        ps, pd = src[i], dst[j]
        i, j = i + 1, j + 1
        while not dims.same(ps, pd):
            if dims.div(ps, pd) is not None and j < len(dst):
                pd = dims.mul(pd, dst[j])
                gj.append(j)
                j += 1
            elif dims.div(pd, ps) is not None and i < len(src):
                ps = dims.mul(ps, src[i])
                gi.append(i)
                i += 1
            else:
                raise Unsupported(
                    f"{_label(node)}: cannot show how {dims.text(src)} becomes {dims.text(dst)}"
                )
        groups.append((gi, gj))
    return groups


def reshaped(value: Affine | Pooled, target: tuple[Dim, ...], node: ir.Node) -> Affine:
    """``value`` with its axes regrouped; the flattened features keep their order."""
    if isinstance(value, Pooled):
        raise Unsupported(f"{_label(node)} reshapes a pool's output inside the changed region")
    layout = value.layout
    out: list[Axis] = []
    for gi, gj in _align(shape_of(layout), target, node):
        roles = {layout[i].role for i in gi}
        if not gj:  # a dropped size-1 axis: nothing to carry
            continue
        if not gi:  # an inserted size-1 axis
            leading = all(a.role is Role.BATCH for a in out)
            out.append(Axis(Role.BATCH if leading else Role.FEATURE, 1))
            continue
        if roles == {Role.SPACE} and len(gi) == 1 and len(gj) == 1:
            out.append(Axis(Role.SPACE, target[gj[0]], layout[gi[0]].frame))
        elif roles == {Role.BATCH} or roles == {Role.FEATURE}:
            role = roles.pop()
            out.extend(Axis(role, target[j]) for j in gj)
        else:
            names = "+".join(sorted(r.value for r in roles))
            raise Unsupported(
                f"{_label(node)}: {layout_text(layout)} -> {dims.text(target)} merges {names} axes"
            )
    new = tuple(out)
    _check_batch_leading(new, node)
    return Affine(new, dict(value.terms), value.bias)


def _check_batch_leading(layout: Layout, node: ir.Node) -> None:
    roles = [a.role for a in layout]
    n = sum(r is Role.BATCH for r in roles)
    if any(r is not Role.BATCH for r in roles[:n]):
        raise Unsupported(f"{_label(node)}: the batch axes no longer lead ({layout_text(layout)})")


def _target(node: ir.Node, layout: Layout, shape: list[Dim]) -> tuple[Dim, ...]:
    """Resolve Reshape's 0 (copy) and -1 (infer) entries."""
    allowzero = bool(attr_int(node, "allowzero", 0))
    src = shape_of(layout)
    out: list[Dim | None] = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            out.append(src[i])
        elif d == -1:
            out.append(None)
        else:
            out.append(d)
    if out.count(None) > 1:
        raise Unsupported(f"{_label(node)}: more than one -1")
    if None in out:
        known = dims.product([d for d in out if d is not None])
        rest = dims.div(dims.product(src), known)
        if rest is None:
            raise Unsupported(f"{_label(node)}: cannot infer its -1 symbolically")
        out[out.index(None)] = rest
    return tuple(d for d in out if d is not None)


def op_reshape(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its data is not affine")
    shape_arg = _used(args[1], node)
    if isinstance(shape_arg, ShapeValue):
        shape: list[Dim] = list(shape_arg.dims)
    elif isinstance(shape_arg, Const):
        shape = [int(v) for v in shape_arg.array.reshape(-1)]
    else:
        raise Unsupported(f"{_label(node)}: its shape is computed at run time")
    return [reshaped(value, _target(node, value.layout, shape), node)]


def op_flatten(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its data is not affine")
    shape = shape_of(value.layout)
    axis = attr_int(node, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    target = (dims.product(shape[:axis]), dims.product(shape[axis:]))
    return [reshaped(value, target, node)]


def _raw_axes(node: ir.Node, args: list[Arg]) -> list[int] | None:
    """Squeeze/Unsqueeze axes, from the input (opset >= 13) or the attribute."""
    if len(args) > 1 and args[1] is not None:
        return [int(v) for v in _const(args[1], node, "axes").reshape(-1)]
    declared = attr_ints(node, "axes")
    return None if declared is None else list(declared)


def _normalized(axes: list[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


def op_squeeze(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its data is not affine")
    shape = shape_of(value.layout)
    raw = _raw_axes(node, args)
    axes = None if raw is None else _normalized(raw, len(shape))
    if axes is None:
        if any(not isinstance(d, int) for d in shape):
            raise Unsupported(f"{_label(node)}: squeezes every size-1 axis of a dynamic shape")
        axes = [i for i, d in enumerate(shape) if d == 1]
    if any(shape[a] != 1 for a in axes):
        raise Unsupported(f"{_label(node)}: an axis it squeezes is not provably 1")
    return [reshaped(value, tuple(d for i, d in enumerate(shape) if i not in axes), node)]


def op_unsqueeze(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: its data is not affine")
    shape = list(shape_of(value.layout))
    raw = _raw_axes(node, args)
    if raw is None:
        raise Unsupported(f"{_label(node)}: no axes")
    for a in _normalized(raw, len(shape) + len(raw)):
        shape.insert(a, 1)
    return [reshaped(value, tuple(shape), node)]


def op_transpose(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _affine(args[0], node)
    layout = value.layout
    perm = ints(node, "perm", tuple(reversed(range(len(layout)))))
    new = tuple(layout[p] for p in perm)
    _check_batch_leading(new, node)
    batch_old = [p for p in perm if layout[p].role is Role.BATCH]
    if batch_old != sorted(batch_old):
        raise Unsupported(f"{_label(node)} reorders the batch axes")
    feature_order = [p for p in perm if layout[p].role is Role.FEATURE]
    if feature_order == sorted(feature_order):
        return [Affine(new, dict(value.terms), value.bias)]
    old_features = [p for p in range(len(layout)) if layout[p].role is Role.FEATURE]
    fdims = feature_dims(layout)
    order = [old_features.index(p) for p in feature_order]
    new_of_old = np.empty(math.prod(fdims), dtype=np.int64)
    new_of_old[np.arange(math.prod(fdims)).reshape(fdims).transpose(order).reshape(-1)] = np.arange(
        math.prod(fdims)
    )
    terms = {k: s.with_rows(new_of_old, s.rows) for k, s in value.terms.items()}
    inverse = np.argsort(new_of_old)
    bias = value.bias.map(lambda a: a[inverse])
    return [Affine(new, terms, bias)]


def op_concat(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """Inputs stacked along a channel axis: each input's rows land on its own channels."""
    values = [_used(a, node) for a in args]
    affines = [v for v in values if isinstance(v, Affine)]
    if not affines or any(not isinstance(v, Affine | Const) for v in values):
        raise Unsupported(f"{_label(node)}: an input is neither affine nor constant")
    template = affines[0].layout
    axis = attr_int(node, "axis", 0)
    axis = axis + len(template) if axis < 0 else axis
    if template[axis].role is not Role.FEATURE:
        raise Unsupported(f"{_label(node)} joins along a {template[axis].role.value} axis")
    parts: list[Affine] = []
    for v in values:
        if isinstance(v, Const):
            own = tuple(
                Axis(a.role, int(v.array.shape[i]) if i == axis else a.size, a.frame)
                for i, a in enumerate(template)
            )
            parts.append(Affine(own, {}, feature_vector(own, _stored(v.array, ctx), node)))
        elif isinstance(v, Affine):
            parts.append(v)
    sizes = []
    for p in parts:
        rest_same = all(
            i == axis or (a.role is b.role and dims.same(a.size, b.size))
            for i, (a, b) in enumerate(zip(p.layout, template, strict=True))
        )
        if (
            len(p.layout) != len(template)
            or not rest_same
            or not isinstance(p.layout[axis].size, int)
        ):
            raise Unsupported(f"{_label(node)}: inputs differ in shape off the join axis")
        sizes.append(int(p.layout[axis].size))  # type: ignore[arg-type]
    out_layout = tuple(
        Axis(a.role, sum(sizes) if i == axis else a.size, a.frame) for i, a in enumerate(template)
    )
    out_fdims = feature_dims(out_layout)
    f_axis = [i for i, a in enumerate(template) if a.role is Role.FEATURE].index(axis)
    grid = np.arange(math.prod(out_fdims)).reshape(out_fdims)
    terms: dict[str, Stencil] = {}
    biases: list[tuple[np.ndarray, Coefs]] = []
    start = 0
    for p, n in zip(parts, sizes, strict=True):
        index = np.take(grid, np.arange(start, start + n), axis=f_axis).reshape(-1)
        start += n
        for key, stencil in p.terms.items():
            _add_term(terms, key, stencil.with_rows(index, grid.size), node)
        biases.append((index, p.bias))
    bias = _scatter_vectors(biases, grid.size)
    return [Affine(out_layout, terms, bias)]


def _scatter_vectors(parts: list[tuple[np.ndarray, Coefs]], size: int) -> Coefs:
    def gather(pick: Callable[[Coefs], np.ndarray | None]) -> np.ndarray | None:
        if all(pick(c) is None for _, c in parts):
            return None
        out = np.zeros(size)
        for index, c in parts:
            got = pick(c)
            if got is not None:
                out[index] = got
        return out

    val = gather(lambda c: c.val)
    assert val is not None
    magnitude = gather(lambda c: c.mag) if any(c.magnitude is not None for _, c in parts) else None
    return Coefs(val, magnitude, gather(lambda c: c.unit), max(c.depth for _, c in parts))


# -- pools --------------------------------------------------------------------------------


def _pool_spec(node: ir.Node, rank: int) -> PoolSpec:
    if node.op_type.startswith("Global"):
        return PoolSpec(node.op_type)
    return PoolSpec(
        node.op_type,
        kernel_shape=ints(node, "kernel_shape", ()),
        strides=ints(node, "strides", (1,) * rank),
        pads=ints(node, "pads", (0,) * (2 * rank)),
        dilations=ints(node, "dilations", (1,) * rank),
        auto_pad=attr_str(node, "auto_pad", "NOTSET"),
        ceil_mode=attr_int(node, "ceil_mode", 0),
        count_include_pad=attr_int(node, "count_include_pad", 0),
    )


def _pool_size(spec: PoolSpec, size: Dim, i: int, rank: int) -> Dim:
    """The output length of a pool on one axis (ONNX's formula, floor or ceil)."""
    if spec.op_type.startswith("Global"):
        return 1
    k, s, d = spec.kernel_shape[i], spec.strides[i], spec.dilations[i]
    span = (k - 1) * d + 1
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return dims.window(size, 1, s - 1, s)
    begin, end = (spec.pads[i], spec.pads[i + rank]) if spec.auto_pad != "VALID" else (0, 0)
    if not spec.ceil_mode:
        return dims.window(size, 1, begin + end - span + s, s)
    if not isinstance(size, int):
        return dims.Sym(1, (("ceilpool", str(size), begin + end - span, s),))
    out = -(-(size + begin + end - span) // s) + 1
    return out - 1 if (out - 1) * s >= size + begin else out


def op_pool(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    x = _affine(args[0], node)
    rank = len(x.layout) - 2
    if rank < 1:
        raise Unsupported(f"{_label(node)}: its input {layout_text(x.layout)} has no spatial axis")
    sizes = _window_input(x, node, rank, feature_count(x.layout[1:2]))
    spec = _pool_spec(node, rank)
    layout: Layout = (
        x.layout[0],
        x.layout[1],
        *[Axis(Role.SPACE, _pool_size(spec, sizes[i], i, rank), i) for i in range(rank)],
    )
    extra = [Opaque(f"{_label(node)}: its indices output is read")] * (len(node.outputs) - 1)
    return [Pooled(spec, x, layout), *extra]


def op_shape(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = _used(args[0], node)
    if isinstance(value, Const):
        return [Const(np.asarray(value.array.shape, dtype=np.int64))]
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{_label(node)}: the shape of a value the prover cannot model")
    shape = shape_of(value.layout)
    rank = len(shape)
    start = attr_int(node, "start", 0)
    end = attr_ints(node, "end")
    stop = rank if end is None else attr_int(node, "end", rank)
    start = max(0, start + rank if start < 0 else start)
    stop = min(rank, stop + rank if stop < 0 else stop)
    return [ShapeValue(tuple(shape[start:stop]))]


OPS: dict[str, Transfer] = {
    "Add": op_add,
    "Sub": op_sub,
    "Mul": op_mul,
    "Div": op_div,
    "Neg": op_neg,
    "Sum": op_sum,
    "Identity": op_identity,
    "Dropout": op_dropout,
    "BatchNormalization": op_batchnorm,
    "Conv": op_conv,
    "ConvTranspose": op_convtranspose,
    "Gemm": op_gemm,
    "MatMul": op_matmul,
    "Reshape": op_reshape,
    "Flatten": op_flatten,
    "Squeeze": op_squeeze,
    "Unsqueeze": op_unsqueeze,
    "Transpose": op_transpose,
    "Concat": op_concat,
    "AveragePool": op_pool,
    "MaxPool": op_pool,
    "GlobalAveragePool": op_pool,
    "GlobalMaxPool": op_pool,
    "Shape": op_shape,
}
"""The operators a changed region may contain, by op_type (default domain)."""
