"""Pools a BatchNorm after them commutes with, in the aten graph of an exported program.

Every window of a pool reads one channel, so ``pool(s*y + t) == s*pool(y) + t``
holds per channel when the pool is an average whose windows divide by their
real elements (the scale always passes; the shift passes as a constant averages
to itself), or a max and ``s >= 0`` (a max of ``s*y + t`` is ``s*max(y) + t``
for a non-negative scale, whatever the padding, dilation or ceil_mode: torch
pads a max with -inf, which no window picks, and every window holds an element
of the input). The same rules as the ONNX front's
:mod:`bnfold.onnx_front.rules.pooling`, with the same refusal codes.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import fx

from bnfold.core.affine import Affine
from bnfold.report import Code
from bnfold.torch_front.aten_graph import Found

aten = torch.ops.aten

# A constant's average is that constant unless padded zeros count.
AVERAGE_POOLS: dict[Any, str] = {
    aten.avg_pool1d.default: "avg_pool1d",
    aten.avg_pool2d.default: "avg_pool2d",
    aten.avg_pool3d.default: "avg_pool3d",
    aten.adaptive_avg_pool1d.default: "adaptive_avg_pool1d",
    aten.adaptive_avg_pool2d.default: "adaptive_avg_pool2d",
    aten.adaptive_avg_pool3d.default: "adaptive_avg_pool3d",
    aten._adaptive_avg_pool2d.default: "adaptive_avg_pool2d",
    aten._adaptive_avg_pool3d.default: "adaptive_avg_pool3d",
}

# A max commutes with a per-channel affine of non-negative scale.
MAX_POOLS: dict[Any, str] = {
    aten.max_pool1d.default: "max_pool1d",
    aten.max_pool2d.default: "max_pool2d",
    aten.max_pool3d.default: "max_pool3d",
}
# Max pools returning (values, indices); a BN reads item 0.
MAX_POOLS_WITH_INDICES: dict[Any, str] = {
    aten.max_pool1d_with_indices.default: "max_pool1d",
    aten.max_pool2d_with_indices.default: "max_pool2d",
    aten.max_pool3d_with_indices.default: "max_pool3d",
    aten.adaptive_max_pool1d.default: "adaptive_max_pool1d",
    aten.adaptive_max_pool2d.default: "adaptive_max_pool2d",
    aten.adaptive_max_pool3d.default: "adaptive_max_pool3d",
}

_POOLS = {**AVERAGE_POOLS, **MAX_POOLS, **MAX_POOLS_WITH_INDICES}


def is_pool(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _POOLS


def pool_name(pool: fx.Node) -> str:
    """ "avg_pool2d", "adaptive_max_pool2d", ...: the pool's name in a site label."""
    return _POOLS[pool.target]


def pool_of(value: fx.Node) -> fx.Node | None:
    """The pool whose pooled values ``value`` is: a pool node itself, or item 0 of
    a max pool returning (values, indices); None for anything else."""
    if value.op == "call_function" and value.target in {**AVERAGE_POOLS, **MAX_POOLS}:
        return value
    if value.target is operator.getitem and value.args[1] == 0:
        source = value.args[0]
        if isinstance(source, fx.Node) and source.target in MAX_POOLS_WITH_INDICES:
            return source
    return None


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes reading ``node``'s values: for a max pool returning (values,
    indices), those reading item 0."""
    if node.target not in MAX_POOLS_WITH_INDICES:
        return list(node.users)
    return [reader for item in _items(node, 0) for reader in item.users]


def check_pool(pool: fx.Node, affine: Affine) -> Found:
    """``pool(affine(y)) == affine(pool(y))``, or why not.

    Refuses:
      POOL_PADDING    an average pool that divides by more than a window's real
                      elements (count_include_pad=True with padding, or a
                      divisor_override), and a nonzero shift
      NEGATIVE_SCALE  a max pool and a negative scale: max(s*y) is s*min(y) there
      TRAINING_MODE   a max pool's indices are read (as the ONNX rule: they would
                      not change for s > 0, but bnfold does not reason about them)
    """
    if pool.target in AVERAGE_POOLS:
        return _check_average(pool, affine)
    if np.any(affine.scale < 0):
        channel = int(np.flatnonzero(affine.scale < 0)[0])
        return Code.NEGATIVE_SCALE, (
            f"{pool.name}: BN scale is negative at channel {channel}, and the max of a "
            "negated window is its negated min"
        )
    if any(item.users for item in _items(pool, 1)):
        return Code.TRAINING_MODE, f"{pool.name}'s indices output is read"
    return None


def _items(pool: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in pool.users if u.target is operator.getitem and u.args[1] == index]


def _check_average(pool: fx.Node, affine: Affine) -> Found:
    """The scale always passes; the shift too unless a window divides by more than
    its real elements (padded zeros counted, or a ``divisor_override``)."""
    if AVERAGE_POOLS[pool.target].startswith("adaptive") or not np.any(affine.shift != 0):
        return None
    padding = _pool_arg(pool, 3, "padding", 0)
    counts_pad = bool(_pool_arg(pool, 5, "count_include_pad", True))
    divisor = _pool_arg(pool, 6, "divisor_override", None)
    padded = any(int(p) for p in (padding if isinstance(padding, list | tuple) else [padding]))  # type: ignore[arg-type]
    if divisor is not None:
        return (
            Code.POOL_PADDING,
            f"{pool.name} divides by divisor_override={divisor}: the shift would scale",
        )
    # ceil_mode alone is harmless here: torch clips a window that overruns the
    # padded input and divides by what is left (a constant averages to itself).
    if counts_pad and padded:
        return Code.POOL_PADDING, (
            f"{pool.name} counts padded zeros in its average (count_include_pad=True "
            "with padding): the shift would not pass"
        )
    return None


def _pool_arg(pool: fx.Node, index: int, name: str, default: Any) -> Any:
    """An argument of ``avg_pool{1,2,3}d(x, kernel, stride=[], padding=0,
    ceil_mode=False, count_include_pad=True, divisor_override=None)``."""
    if len(pool.args) > index:
        return pool.args[index]
    return pool.kwargs.get(name, default)
