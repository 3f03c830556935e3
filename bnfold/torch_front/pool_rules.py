"""Pooling ops a BatchNorm after them may fold through, and when it may (torch front).

``BN(pool(y)) == pool(BN(y))`` whenever every window of the pool reads one
channel and the pool commutes with the BN's per-channel affine ``s * y + t``:

* an average (``avg_pool*d``, ``adaptive_avg_pool*d``) is linear, so the scale
  passes; the shift passes when a window's average of a constant is that
  constant, which fails only when the divisor counts more than the window's
  real elements (``count_include_pad=True`` with padding, or a
  ``divisor_override``). torch clips a ``ceil_mode`` window that overruns the
  padded input and divides by what is left, so ceil_mode alone is harmless;
* a max commutes with the affine for every ``s >= 0`` (padding is -inf and
  never wins), and a negative scale turns it into a min.

The same rules as the ONNX front (:mod:`bnfold.onnx_front.rules.pooling`), with
torch's ceil_mode semantics. :class:`Pool` is what both torch finders reduce a
pool call or module to; :func:`commute_refusal` decides on the BN's values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from bnfold.core.affine import Affine
from bnfold.report import Code

AVERAGE = "average"
MAX = "max"


@dataclass(frozen=True)
class Pool:
    """One pooling call, reduced to what decides whether a BN commutes with it.

    Attributes:
        label: the op's name for reports ("avg_pool2d", "adaptive_avg_pool2d").
        kind: :data:`AVERAGE` or :data:`MAX`.
        adaptive: an adaptive average (its windows never hold padding).
        padded: an average's padding is nonzero somewhere.
        counts_pad: an average divides by padded positions too (count_include_pad).
        divisor_override: the divisor an average uses instead, if any.
    """

    label: str
    kind: str
    adaptive: bool = False
    padded: bool = False
    counts_pad: bool = True
    divisor_override: int | None = None


_CALL = re.compile(r"^_?(adaptive_)?(avg|max)_pool([123])d$")


def pool_of_call(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pool | None:
    """A pool from an aten op or ``torch.nn.functional`` call; None if ``target`` is none.

    ``target`` is the op's name ("aten.avg_pool2d.default" or "avg_pool2d");
    ``args`` and ``kwargs`` follow ``avg_pool{1,2,3}d(x, kernel, stride=[],
    padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None)``
    and ``max_pool{1,2,3}d(x, kernel, stride, padding, dilation, ceil_mode,
    return_indices=False)``, the signatures aten and functional share. A max
    pool that returns its indices, an adaptive max (the same) and a
    ``max_pool*d_with_indices`` give None: their indices output is no value a
    BN commutes with.
    """
    name = target.removeprefix("aten.").split(".")[0]
    match = _CALL.match(name)
    if match is None:
        return None
    adaptive, op = bool(match.group(1)), match.group(2)
    label = f"{'adaptive_' if adaptive else ''}{op}_pool{match.group(3)}d"
    if op == "max":
        if adaptive or _arg(args, kwargs, 6, "return_indices", False):
            return None
        return Pool(label, MAX)  # padding is -inf for a max: it never wins
    if adaptive:
        return Pool(label, AVERAGE, adaptive=True, counts_pad=False)
    return Pool(
        label,
        AVERAGE,
        padded=_nonzero(_arg(args, kwargs, 3, "padding", 0)),
        counts_pad=bool(_arg(args, kwargs, 5, "count_include_pad", True)),
        divisor_override=_arg(args, kwargs, 6, "divisor_override", None),
    )


_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.AvgPool1d, "avg_pool1d"),
    (nn.AvgPool2d, "avg_pool2d"),
    (nn.AvgPool3d, "avg_pool3d"),
    (nn.AdaptiveAvgPool1d, "adaptive_avg_pool1d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
    (nn.AdaptiveAvgPool3d, "adaptive_avg_pool3d"),
    (nn.MaxPool1d, "max_pool1d"),
    (nn.MaxPool2d, "max_pool2d"),
    (nn.MaxPool3d, "max_pool3d"),
)


def pool_of_module(m: nn.Module) -> Pool | None:
    """A pool from a torch pooling module whose forward is torch's; None otherwise."""
    for cls, label in _MODULES:
        if type(m) is cls:
            params = {
                name: getattr(m, name)
                for name in ("padding", "count_include_pad", "divisor_override", "return_indices")
                if hasattr(m, name)
            }
            return pool_of_call(label, (), params)
    return None


def commute_refusal(pool: Pool, affine: Affine) -> tuple[Code, str] | None:
    """Why ``pool(affine(y)) != affine(pool(y))``, or None when they are equal.

    Returns:
        NEGATIVE_SCALE for a max pool and a negative scale in some channel;
        POOL_PADDING for an average whose divisor counts padding or is
        overridden, and a nonzero shift.
    """
    if pool.kind == MAX:
        if np.any(affine.scale < 0):
            channel = int(np.flatnonzero(affine.scale < 0)[0])
            return Code.NEGATIVE_SCALE, (
                f"{pool.label}: BN scale is negative at channel {channel}, "
                "and the max of a negated window is its negated min"
            )
        return None
    if pool.adaptive or not np.any(affine.shift != 0):
        return None
    if pool.divisor_override is not None:
        return Code.POOL_PADDING, (
            f"{pool.label} divides by divisor_override={pool.divisor_override}: "
            "the shift would scale"
        )
    if pool.counts_pad and pool.padded:
        return Code.POOL_PADDING, (
            f"{pool.label} counts padded zeros in its average (count_include_pad=True "
            "with padding): the shift would not pass"
        )
    return None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _nonzero(padding: Any) -> bool:
    values = padding if isinstance(padding, list | tuple) else [padding]
    return any(int(p) != 0 for p in values)
