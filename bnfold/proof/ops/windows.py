"""Window operators: Conv and ConvTranspose as stencils, and the pools.

A window's taps are one (grouped) matrix per spatial offset
(:class:`~bnfold.proof.stencil.Stencil`); a bias before a zero-padded window becomes a
term of the all-ones field (:func:`ones_key`). A pool is kept as a
:class:`~bnfold.proof.values.Pooled` value: it is not affine, only commutes with one.
"""

from __future__ import annotations

import itertools
import math

import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.dims import Dim
from bnfold.proof.ops.base import (
    Arg,
    Opaque,
    OpContext,
    add_term,
    affine_input,
    attr_int,
    attr_str,
    constant,
    ints,
    is_zero,
    label,
    stored,
)
from bnfold.proof.stencil import AxisMap, SizeRule, Stencil
from bnfold.proof.values import (
    Affine,
    Axis,
    Layout,
    Pooled,
    PoolSpec,
    Role,
    Unsupported,
    feature_count,
    layout_text,
)


def window_input(x: Affine, node: ir.Node, rank: int, channels: int) -> list[Dim]:
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
            f"{label(node)}: its input {layout_text(layout)} is not [batch, channels, space...]"
        )
    if layout[1].size != channels:
        raise Unsupported(f"{label(node)}: input has {layout[1].size} channels, weight {channels}")
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
                f"{label(node)}: auto_pad {auto_pad} with stride {s} on a dynamic size"
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
        raise Unsupported(f"{label(node)}: kernel_shape {declared} but weight {kernel}")
    strides = ints(node, "strides", (1,) * r)
    dilations = ints(node, "dilations", (1,) * r)
    pads = ints(node, "pads", (0,) * (2 * r))
    return strides, dilations, pads


def _applied(x: Affine, window: Stencil, node: ir.Node) -> dict[str, Stencil]:
    """The window applied to every term of ``x`` (and to its bias, as an all-ones field)."""
    terms: dict[str, Stencil] = {}
    for key, stencil in x.terms.items():
        if not stencil.is_pointwise():
            raise Unsupported(f"{label(node)} reads a value already windowed inside the same piece")
        add_term(terms, key, stencil.after(window), node)
    if not is_zero(x.bias):
        ones = Stencil.pointwise(x.bias.reshape((1, x.features, 1)), len(window.geometry))
        add_term(terms, ones_key(x.layout), ones.after(window), node)
    return terms


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
    bias = stored(constant(arg, node, "bias"), ctx)
    if bias.shape != (count,):
        raise Unsupported(f"{label(node)}: bias of shape {list(bias.shape)}, {count} outputs")
    return bias


def op_conv(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``y[o, p] = b[o] + sum_{c, k} W[o, c, k] x[g(o) * C/g + c, p * s + k * d - pad]``."""
    x = affine_input(args[0], node)
    w = constant(args[1], node, "weight")
    groups = attr_int(node, "group", 1)
    c_out, c_in_group = w.shape[0], w.shape[1]
    kernel = tuple(int(k) for k in w.shape[2:])
    r = len(kernel)
    if c_out % groups:
        raise Unsupported(f"{label(node)}: {c_out} outputs in {groups} groups")
    sizes = window_input(x, node, r, c_in_group * groups)
    strides, dilations, pads = _window_params(node, kernel)
    axes = [
        _conv_axis(node, sizes[i], kernel[i], strides[i], dilations[i], (pads[i], pads[i + r]))
        for i in range(r)
    ]
    k_total = math.prod(kernel)
    taps = stored(w, ctx).map(
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
            raise Unsupported(f"{label(node)}: output_shape with a dynamic input size")
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
    x = affine_input(args[0], node)
    w = constant(args[1], node, "weight")
    groups = attr_int(node, "group", 1)
    c_in, c_out_group = w.shape[0], w.shape[1]
    kernel = tuple(int(k) for k in w.shape[2:])
    r = len(kernel)
    if c_in % groups:
        raise Unsupported(f"{label(node)}: {c_in} inputs in {groups} groups")
    sizes = window_input(x, node, r, c_in)
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
    taps = stored(w, ctx).map(
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
    x = affine_input(args[0], node)
    rank = len(x.layout) - 2
    if rank < 1:
        raise Unsupported(f"{label(node)}: its input {layout_text(x.layout)} has no spatial axis")
    sizes = window_input(x, node, rank, feature_count(x.layout[1:2]))
    spec = _pool_spec(node, rank)
    layout: Layout = (
        x.layout[0],
        x.layout[1],
        *[Axis(Role.SPACE, _pool_size(spec, sizes[i], i, rank), i) for i in range(rank)],
    )
    extra = [Opaque(f"{label(node)}: its indices output is read")] * (len(node.outputs) - 1)
    return [Pooled(spec, x, layout), *extra]
