"""Shape operators: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat and Shape.

They move a value's axes without touching its coefficients: a reshape regroups axes
(refusing one that merges batch or spatial axes with features), a transpose permutes the
flattened features, a concat places each input's rows on its own channels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.dims import Dim
from bnfold.proof.ops.base import (
    Arg,
    OpContext,
    add_term,
    affine_input,
    attr_int,
    attr_ints,
    constant,
    feature_vector,
    ints,
    label,
    stored,
    used,
)
from bnfold.proof.stencil import Stencil
from bnfold.proof.values import (
    Affine,
    Axis,
    Const,
    Layout,
    Pooled,
    Role,
    ShapeValue,
    Unsupported,
    feature_dims,
    layout_text,
    shape_of,
)


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
                    f"{label(node)}: cannot match {dims.text(src)} to {dims.text(dst)}"
                )
            groups.append(([i], []))
            i += 1
            continue
        if d_one or i >= len(src):
            if not d_one:
                raise Unsupported(
                    f"{label(node)}: cannot match {dims.text(src)} to {dims.text(dst)}"
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
                    f"{label(node)}: cannot show how {dims.text(src)} becomes {dims.text(dst)}"
                )
        groups.append((gi, gj))
    return groups


def reshaped(value: Affine | Pooled, target: tuple[Dim, ...], node: ir.Node) -> Affine:
    """``value`` with its axes regrouped; the flattened features keep their order."""
    if isinstance(value, Pooled):
        raise Unsupported(f"{label(node)} reshapes a pool's output inside the changed region")
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
                f"{label(node)}: {layout_text(layout)} -> {dims.text(target)} merges {names} axes"
            )
    new = tuple(out)
    _check_batch_leading(new, node)
    return Affine(new, dict(value.terms), value.bias)


def _check_batch_leading(layout: Layout, node: ir.Node) -> None:
    roles = [a.role for a in layout]
    n = sum(r is Role.BATCH for r in roles)
    if any(r is not Role.BATCH for r in roles[:n]):
        raise Unsupported(f"{label(node)}: the batch axes no longer lead ({layout_text(layout)})")


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
        raise Unsupported(f"{label(node)}: more than one -1")
    if None in out:
        known = dims.product([d for d in out if d is not None])
        rest = dims.div(dims.product(src), known)
        if rest is None:
            raise Unsupported(f"{label(node)}: cannot infer its -1 symbolically")
        out[out.index(None)] = rest
    return tuple(d for d in out if d is not None)


def op_reshape(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its data is not affine")
    shape_arg = used(args[1], node)
    if isinstance(shape_arg, ShapeValue):
        shape: list[Dim] = list(shape_arg.dims)
    elif isinstance(shape_arg, Const):
        shape = [int(v) for v in shape_arg.array.reshape(-1)]
    else:
        raise Unsupported(f"{label(node)}: its shape is computed at run time")
    return [reshaped(value, _target(node, value.layout, shape), node)]


def op_flatten(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its data is not affine")
    shape = shape_of(value.layout)
    axis = attr_int(node, "axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    target = (dims.product(shape[:axis]), dims.product(shape[axis:]))
    return [reshaped(value, target, node)]


def _raw_axes(node: ir.Node, args: list[Arg]) -> list[int] | None:
    """Squeeze/Unsqueeze axes, from the input (opset >= 13) or the attribute."""
    if len(args) > 1 and args[1] is not None:
        return [int(v) for v in constant(args[1], node, "axes").reshape(-1)]
    declared = attr_ints(node, "axes")
    return None if declared is None else list(declared)


def _normalized(axes: list[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


def op_squeeze(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its data is not affine")
    shape = shape_of(value.layout)
    raw = _raw_axes(node, args)
    axes = None if raw is None else _normalized(raw, len(shape))
    if axes is None:
        if any(not isinstance(d, int) for d in shape):
            raise Unsupported(f"{label(node)}: squeezes every size-1 axis of a dynamic shape")
        axes = [i for i, d in enumerate(shape) if d == 1]
    if any(shape[a] != 1 for a in axes):
        raise Unsupported(f"{label(node)}: an axis it squeezes is not provably 1")
    return [reshaped(value, tuple(d for i, d in enumerate(shape) if i not in axes), node)]


def op_unsqueeze(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: its data is not affine")
    shape = list(shape_of(value.layout))
    raw = _raw_axes(node, args)
    if raw is None:
        raise Unsupported(f"{label(node)}: no axes")
    for a in _normalized(raw, len(shape) + len(raw)):
        shape.insert(a, 1)
    return [reshaped(value, tuple(shape), node)]


def op_transpose(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = affine_input(args[0], node)
    layout = value.layout
    perm = ints(node, "perm", tuple(reversed(range(len(layout)))))
    new = tuple(layout[p] for p in perm)
    _check_batch_leading(new, node)
    batch_old = [p for p in perm if layout[p].role is Role.BATCH]
    if batch_old != sorted(batch_old):
        raise Unsupported(f"{label(node)} reorders the batch axes")
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
    values = [used(a, node) for a in args]
    affines = [v for v in values if isinstance(v, Affine)]
    if not affines or any(not isinstance(v, Affine | Const) for v in values):
        raise Unsupported(f"{label(node)}: an input is neither affine nor constant")
    template = affines[0].layout
    axis = attr_int(node, "axis", 0)
    axis = axis + len(template) if axis < 0 else axis
    if template[axis].role is not Role.FEATURE:
        raise Unsupported(f"{label(node)} joins along a {template[axis].role.value} axis")
    parts: list[Affine] = []
    for v in values:
        if isinstance(v, Const):
            own = tuple(
                Axis(a.role, int(v.array.shape[i]) if i == axis else a.size, a.frame)
                for i, a in enumerate(template)
            )
            parts.append(Affine(own, {}, feature_vector(own, stored(v.array, ctx), node)))
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
            raise Unsupported(f"{label(node)}: inputs differ in shape off the join axis")
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
            add_term(terms, key, stencil.with_rows(index, grid.size), node)
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


def op_shape(node: ir.Node, args: list[Arg], ctx: OpContext) -> list[Arg]:
    value = used(args[0], node)
    if isinstance(value, Const):
        return [Const(np.asarray(value.array.shape, dtype=np.int64))]
    if not isinstance(value, Affine | Pooled):
        raise Unsupported(f"{label(node)}: the shape of a value the prover cannot model")
    shape = shape_of(value.layout)
    rank = len(shape)
    start = attr_int(node, "start", 0)
    end = attr_ints(node, "end")
    stop = rank if end is None else attr_int(node, "end", rank)
    start = max(0, start + rank if start < 0 else start)
    stop = min(rank, stop + rank if stop < 0 else stop)
    return [ShapeValue(tuple(shape[start:stop]))]
