"""Family ``pool``: a BatchNorm after a pool that commutes with its per-channel affine.

Matches:  a linear op (channels on axis 1) -> an average or max pool -> BN;
          every front reads its pool into a :class:`PoolSpec` (ONNX from the
          node's attributes, torch from a call, a module or an aten node).
Produces: the BN folds into the linear op before the pool, which stays:
          ``pool(BN(y))`` replaces ``BN(pool(y))`` (kind ``through_pool``).
Refuses:
  NEGATIVE_SCALE  a max pool and a negative scale in some channel: the max of a
                  negated window is its negated min
  TRAINING_MODE   a max pool whose indices output is read (they would not change
                  for a positive scale, but bnfold does not reason about them)
  POOL_PADDING    an average whose divisor counts padded zeros, or is overridden,
                  and a nonzero shift
  NOT_PER_CHANNEL (front) the linear op's channels are not the axis the pool keeps

Why it is exact: every window of a pool reads one channel. An average is linear,
so the scale passes; the shift passes when a window's average of a constant is
that constant, which fails only when the divisor counts more than the window's
real elements. A max commutes with ``s * y + t`` for every ``s >= 0``, whatever
the padding (-inf) or dilation: every window holds an element of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from bnfold.core.affine import Affine
from bnfold.report import Code, FoldKind
from bnfold.rules.family import Family, Found

AVERAGE: Literal["average"] = "average"
MAX: Literal["max"] = "max"


@dataclass(frozen=True)
class PoolSpec:
    """One pooling op, reduced to what decides whether a BN commutes with it.

    Attributes:
        label: how details name the pool ("AveragePool 'p'", "avg_pool2d").
        kind: :data:`AVERAGE` or :data:`MAX`.
        divides_by_padding: an average divides some window by padded positions too.
            ONNX: count_include_pad=1 with padding or ceil_mode; torch: with padding
            (torch clips a ceil_mode window to the padded input, so ceil_mode alone
            does not count).
        padding_cause: the front's words for what makes it so.
        divisor_override: the divisor an average uses instead of its window's size.
        indices_read: "" when nobody reads a max pool's indices, else the front's
            words for the read (its detail when refused).
    """

    label: str
    kind: Literal["average", "max"]
    divides_by_padding: bool = False
    padding_cause: str = "count_include_pad=True with padding"
    divisor_override: int | None = None
    indices_read: str = ""


def commute_refusal(pool: PoolSpec, affine: Affine) -> Found:
    """None when ``pool(affine(y)) == affine(pool(y))`` for every y, else why not."""
    if pool.kind == MAX:
        if np.any(affine.scale < 0):
            channel = int(np.flatnonzero(affine.scale < 0)[0])
            return Code.NEGATIVE_SCALE, (
                f"{pool.label}: BN scale is negative at channel {channel}, "
                "and the max of a negated window is its negated min"
            )
        if pool.indices_read:
            return Code.TRAINING_MODE, pool.indices_read
        return None
    if not np.any(affine.shift != 0):
        return None
    if pool.divisor_override is not None:
        return Code.POOL_PADDING, (
            f"{pool.label} divides by divisor_override={pool.divisor_override}: "
            "the shift would scale"
        )
    if pool.divides_by_padding:
        return Code.POOL_PADDING, (
            f"{pool.label} counts padded zeros in its average ({pool.padding_cause}): "
            "the shift would not pass"
        )
    return None


_CODES = frozenset({Code.NEGATIVE_SCALE, Code.POOL_PADDING, Code.TRAINING_MODE})

FAMILY = Family(
    "pool",
    frozenset({FoldKind.THROUGH_POOL}),
    {
        "onnx": _CODES | {Code.NOT_PER_CHANNEL},
        "eager": (_CODES - {Code.TRAINING_MODE}) | {Code.NOT_PER_CHANNEL},
        "pt2": _CODES,
    },
    __doc__ or "",
)
