"""Apply a prover value to concrete inputs with plain numpy, to check it against a runtime.

The prover never runs a model; its operator semantics (bnfold.proof.ops) are checked
here instead: the map it derives for a graph, applied to random inputs, must equal what
onnxruntime computes for that graph.
"""

from __future__ import annotations

import math

import numpy as np

from bnfold.proof.ops import ONES_PREFIX
from bnfold.proof.stencil import Stencil
from bnfold.proof.values import Affine, Layout, Role


def _canonical(x: np.ndarray, layout: Layout) -> np.ndarray:
    """``x`` as ``[batch, features, space (by frame)...]``."""
    batch = [i for i, a in enumerate(layout) if a.role is Role.BATCH]
    features = [i for i, a in enumerate(layout) if a.role is Role.FEATURE]
    space = sorted(
        (i for i, a in enumerate(layout) if a.role is Role.SPACE), key=lambda i: layout[i].frame
    )
    y = x.transpose(batch + features + space)
    n_batch = math.prod(x.shape[i] for i in batch)
    n_features = math.prod(x.shape[i] for i in features)
    return y.reshape(n_batch, n_features, *[x.shape[i] for i in space])


def _apply(stencil: Stencil, x: np.ndarray) -> np.ndarray:
    """``sum_k T_k @ x[(p * down + offset_k) / up]`` with zero padding."""
    n, _, *sizes = x.shape
    lengths = [g.size.length(s) for g, s in zip(stencil.geometry, sizes, strict=True)]
    _, groups, ro, ci = stencil.taps.shape
    out = np.zeros((n, groups * ro, *lengths))
    for k, offset in enumerate(stencil.offsets):
        index, mask = [], np.ones(lengths, dtype=bool)
        for axis, (g, o) in enumerate(zip(stencil.geometry, offset, strict=True)):
            pos = np.arange(lengths[axis]) * g.down + o
            valid = (pos % g.up == 0) & (pos // g.up >= 0) & (pos // g.up < sizes[axis])
            index.append(np.where(valid, pos // g.up, 0))
            shape = [1] * len(lengths)
            shape[axis] = -1
            mask = mask & valid.reshape(shape)
        gathered = x[np.ix_(range(n), range(x.shape[1]), *index)] * mask
        grouped = gathered.reshape(n, groups, ci, *lengths)
        tap = stencil.taps.val[k]
        out += np.einsum("gri,bgi...->bgr...", tap, grouped).reshape(n, groups * ro, *lengths)
    return out


def materialize(
    value: Affine, feeds: dict[str, np.ndarray], layouts: dict[str, Layout]
) -> np.ndarray:
    """The tensor ``value`` denotes for these inputs (static shapes only)."""
    total: np.ndarray | None = None
    for key, stencil in value.terms.items():
        if key.startswith(ONES_PREFIX):
            name, layout = next(iter(layouts.items()))
            canonical = np.ones_like(_canonical(feeds[name], layout)[:, :1])
        else:
            canonical = _canonical(feeds[key].astype(np.float64), layouts[key])
        part = _apply(stencil, canonical)
        total = part if total is None else total + part
    assert total is not None
    total = total + value.bias.val.reshape(1, -1, *[1] * (total.ndim - 2))
    layout = value.layout
    frames = sorted(a.frame for a in layout if a.role is Role.SPACE)
    space_axes = list(range(2, total.ndim))
    collapsed = [
        ax
        for ax, frame in zip(space_axes, range(total.ndim - 2), strict=True)
        if frame not in frames
    ]
    total = total.squeeze(axis=tuple(collapsed)) if collapsed else total
    batch = [int(a.size) for a in layout if a.role is Role.BATCH]  # type: ignore[call-overload]
    features = [int(a.size) for a in layout if a.role is Role.FEATURE]  # type: ignore[call-overload]
    space = sorted((a for a in layout if a.role is Role.SPACE), key=lambda a: a.frame)
    total = total.reshape(*batch, *features, *total.shape[2:])
    order_now = (
        [("b", i) for i in range(len(batch))]
        + [("f", i) for i in range(len(features))]
        + [("s", a.frame) for a in space]
    )
    wanted = []
    counters = {"b": 0, "f": 0}
    for a in layout:
        if a.role is Role.SPACE:
            wanted.append(("s", a.frame))
        else:
            key = "b" if a.role is Role.BATCH else "f"
            wanted.append((key, counters[key]))
            counters[key] += 1
    return total.transpose([order_now.index(w) for w in wanted])
