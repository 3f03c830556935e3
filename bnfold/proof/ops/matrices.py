"""Matrix operators: Gemm and MatMul with a constant matrix, over the last feature axis."""

from __future__ import annotations

import onnx_ir as ir

from bnfold.proof.coefs import Coefs
from bnfold.proof.ops.base import (
    Arg,
    OpContext,
    affine_input,
    attr_float,
    attr_int,
    constant,
    feature_vector,
    label,
    stored,
)
from bnfold.proof.stencil import Stencil
from bnfold.proof.values import Affine, Axis, Layout, Role, Unsupported, layout_text


def _matrix_applied(x: Affine, matrix: Coefs, node: ir.Node) -> tuple[dict[str, Stencil], Coefs]:
    """``matrix @ x`` over the last feature axis: terms and the bias carried through."""
    terms = {}
    for key, stencil in x.terms.items():
        if not stencil.is_pointwise():
            raise Unsupported(f"{label(node)} reads a windowed value of collapsed size")
        window = Stencil.pointwise(matrix.reshape((1, *matrix.shape)), len(stencil.geometry))
        terms[key] = stencil.after(window)
    carried = matrix.matmul(x.bias.reshape((x.features, 1))).reshape((matrix.shape[0],))
    return terms, carried


def op_gemm(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``alpha * A' @ B' + beta * C`` with A the affine operand and B, C constants."""
    if attr_int(node, "transA", 0):
        raise Unsupported(f"{label(node)} has transA=1")
    x = affine_input(args[0], node)
    layout = x.layout
    if len(layout) != 2 or layout[0].role is not Role.BATCH or layout[1].role is not Role.FEATURE:
        raise Unsupported(
            f"{label(node)}: its input {layout_text(layout)} is not [batch, features]"
        )
    b = stored(constant(args[1], node, "B"), ctx)
    if len(b.shape) != 2:
        raise Unsupported(f"{label(node)}: B of rank {len(b.shape)}")
    matrix = b if attr_int(node, "transB", 0) else b.map(lambda a: a.T)
    n, k = matrix.shape
    if layout[1].size != k:
        raise Unsupported(f"{label(node)}: input has {layout[1].size} features, B {k}")
    alpha = Coefs.exact(attr_float(node, "alpha", 1.0))
    beta = Coefs.exact(attr_float(node, "beta", 1.0))
    matrix = matrix * alpha
    out_layout: Layout = (layout[0], Axis(Role.FEATURE, n))
    terms, carried = _matrix_applied(x, matrix, node)
    bias = carried
    if len(args) > 2 and args[2] is not None:
        c = stored(constant(args[2], node, "C"), ctx)
        bias = bias + feature_vector(out_layout, c, node) * beta
    return [Affine(out_layout, terms, bias)]


def op_matmul(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    """``A @ B`` with A affine ``[..., K]`` and B a constant ``[K, N]``."""
    x = affine_input(args[0], node)
    b = stored(constant(args[1], node, "right operand"), ctx)
    if len(b.shape) != 2:
        raise Unsupported(f"{label(node)}: a constant right operand of rank {len(b.shape)}")
    layout = x.layout
    if layout[-1].role is not Role.FEATURE or any(a.role is Role.FEATURE for a in layout[:-1]):
        raise Unsupported(f"{label(node)}: its input {layout_text(layout)} is not [..., features]")
    k, n = b.shape
    if layout[-1].size != k:
        raise Unsupported(f"{label(node)}: input has {layout[-1].size} features, weight {k}")
    terms, carried = _matrix_applied(x, b.map(lambda a: a.T), node)
    return [Affine((*layout[:-1], Axis(Role.FEATURE, n)), terms, carried)]
