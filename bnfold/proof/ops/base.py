"""What every operator of :mod:`bnfold.proof.ops` shares: inputs, attributes, affine arithmetic.

An operator's inputs arrive as prover values (:mod:`bnfold.proof.values`) or
:class:`Opaque`; the helpers here unwrap them, or raise
:class:`~bnfold.proof.values.Unsupported` naming the node and what it cannot model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.stencil import Stencil
from bnfold.proof.values import (
    Affine,
    Const,
    Layout,
    Pooled,
    Role,
    Unsupported,
    Value,
    feature_count,
    feature_dims,
    layout_text,
    roles_text,
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


def attr(node: ir.Node, name: str) -> object:
    found = node.attributes.get(name)
    return None if found is None else found.value


def attr_int(node: ir.Node, name: str, default: int) -> int:
    value = attr(node, name)
    return default if value is None else int(value)  # type: ignore[call-overload]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    value = attr(node, name)
    return default if value is None else float(value)  # type: ignore[arg-type]


def attr_str(node: ir.Node, name: str, default: str) -> str:
    value = attr(node, name)
    return default if value is None else str(value)


def attr_ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    value = attr(node, name)
    return None if value is None else tuple(int(v) for v in value)  # type: ignore[attr-defined]


def ints(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = attr_ints(node, name)
    return default if value is None else value


def label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def used(arg: Arg, node: ir.Node) -> Value:
    if arg is None:
        raise Unsupported(f"{label(node)}: a required input is missing")
    if isinstance(arg, Opaque):
        raise Unsupported(arg.reason)
    return arg


def constant(arg: Arg, node: ir.Node, what: str) -> np.ndarray:
    value = used(arg, node)
    if not isinstance(value, Const):
        raise Unsupported(f"{label(node)}: its {what} is not a constant")
    return value.array


def affine_input(arg: Arg, node: ir.Node) -> Affine:
    value = used(arg, node)
    if isinstance(value, Pooled):
        raise Unsupported(f"{label(node)} reads a pool's output inside the changed region")
    if not isinstance(value, Affine):
        raise Unsupported(f"{label(node)}: its data input is not an affine value")
    return value


def stored(array: np.ndarray, ctx: OpContext) -> Coefs:
    if array.dtype.kind not in "fV":
        raise Unsupported(f"a {array.dtype} weight (the prover compares float weights)")
    return Coefs.stored(array, ctx.track_units)


def is_zero(c: Coefs) -> bool:
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
            raise Unsupported(f"{label(node)}: its constant has more axes than its input")
        shape = shape[len(shape) - rank :]
    full = (1,) * (rank - len(shape)) + tuple(shape)
    for axis, (n, ax) in enumerate(zip(full, layout, strict=True)):
        if n == 1:
            continue
        if ax.role is not Role.FEATURE:
            raise Unsupported(
                f"{label(node)}: its constant varies along axis {axis} ({ax.role.value}), "
                "not per channel"
            )
        if ax.size != n:
            raise Unsupported(
                f"{label(node)}: its constant {list(full)} does not broadcast to "
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
            f"{label(node)} adds {roles_text(a.layout)} and {roles_text(b.layout)}, "
            "which the prover cannot show to line up axis for axis"
        )
    terms = dict(a.terms)
    for key, stencil in b.terms.items():
        if key not in terms:
            terms[key] = stencil
        elif terms[key].geometry != stencil.geometry:
            raise Unsupported(f"{label(node)} adds windows of different strides or sizes")
        else:
            terms[key] = terms[key].plus(stencil)
    return Affine(a.layout, terms, a.bias + b.bias)


def negated(value: Affine | Pooled) -> Affine | Pooled:
    n = feature_count(value.layout)
    return scaled(value, Coefs.exact(-np.ones(n)))


def add_term(terms: dict[str, Stencil], key: str, stencil: Stencil, node: ir.Node) -> None:
    if key not in terms:
        terms[key] = stencil
    elif terms[key].geometry != stencil.geometry:
        raise Unsupported(f"{label(node)}: one source reaches it through two geometries")
    else:
        terms[key] = terms[key].plus(stencil)
