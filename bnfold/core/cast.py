"""The one cast of a fold: exact float64 products to the model's dtype, checked.

A weight folded several times is its original times every factor
(:data:`Factors`), still cast once. That one cast rounds each product to
nearest, or, with :attr:`~bnfold.options.Rounding.BALANCED`, so that the
rounding errors of each output channel cancel (:func:`balanced_cast`). numpy
only, no graph types; weights are read and scaled a block of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bnfold.core.layouts import WeightLayout
from bnfold.options import Rounding

# The block sizes (CHUNK_BYTES, ...) are tunables of this module, not exported:
# patch them here.
__all__ = [
    "Factors",
    "Unfoldable",
    "balanced_cast",
    "balanced_over",
    "cannot_overflow",
    "cast_checked",
    "cast_weight",
    "product64",
    "scaled",
    "scaled_blocks",
]


class Unfoldable(ValueError):
    """The values make a fold impossible (NaN, inf, var + eps <= 0, overflow)."""


# A weight folded several times (Conv -> BN -> Mul, BN -> Conv -> BN) is its
# original times one factor per fold, each a float64 array broadcastable onto it,
# multiplied in float64 in that order and cast once: rounding after every fold
# would round the weight again each time.
Factors = tuple[np.ndarray, ...]


def _as_factors(factor: np.ndarray | Factors) -> Factors:
    return factor if isinstance(factor, tuple) else (factor,)


def product64(weight: np.ndarray, factor: np.ndarray | Factors) -> np.ndarray:
    """``weight`` times each factor, in float64 and not cast: the exact folded values."""
    first, *rest = _as_factors(factor)
    out: np.ndarray = np.multiply(weight, first, dtype=np.float64)
    for more in rest:
        out *= more
    return out


# The weight is scaled this many output bytes at a time: the finiteness check
# reads each block while it is still in cache, and a streamed fold
# (:func:`scaled_blocks`) holds no more than this.
CHUNK_BYTES = 1 << 20


def balanced_over(layout: WeightLayout, rounding: Rounding) -> WeightLayout | None:
    """The ``balance`` argument of :func:`scaled` that applies ``rounding`` to ``layout``."""
    return layout if rounding is Rounding.BALANCED else None


def scaled(
    weight: np.ndarray, factor: np.ndarray | Factors, balance: WeightLayout | None = None
) -> np.ndarray:
    """``weight * factor`` computed in float64 and cast once to ``weight.dtype``.

    ``factor`` broadcasts onto ``weight`` (or is several, see :data:`Factors`).
    With one factor, ``dtype=float64`` runs numpy's float64
    loop: it widens the weight into small internal buffers, multiplies in float64
    and rounds each product once into the output. That is the same arithmetic as
    a float64 copy of the weight cast back afterwards, bit for bit, without the
    float64 temporary (twice the weight's size for fp32, four times for fp16).

    With ``balance``, the cast is :func:`balanced_cast` over the output channels
    of that layout. Where its rows are output channels that still runs a block
    of rows at a time; otherwise (MatMul, Gemm with transB=0, ConvTranspose) a
    channel spans every row, so the products are computed whole, in a float64
    temporary.

    Raises:
        Unfoldable: a product overflows the weight's dtype.
    """
    if balance is not None and not balance.rows_are_out_channels:
        return cast_weight(product64(weight, factor), weight.dtype, balance)
    out = np.empty(weight.shape, dtype=weight.dtype)
    for rows in _row_blocks(out):
        _scale_rows(weight, _as_factors(factor), rows, out[rows], balanced=balance is not None)
    return out


def scaled_blocks(
    weight: np.ndarray,
    factor: np.ndarray | Factors,
    buffers: int = 1,
    balance: WeightLayout | None = None,
) -> Iterator[np.ndarray]:
    """:func:`scaled`, bit for bit, as consecutive blocks of rows, without the whole result.

    The blocks are written into ``buffers`` reused buffers in turn, so a block is
    valid only until ``buffers`` more have been produced: with one, write it out
    (or check it) before asking for the next; with two, it may still be written
    while the next is computed.

    Raises:
        Unfoldable: a product overflows the weight's dtype.
        ValueError: ``balance`` is a layout whose rows are not output channels:
            no block of rows holds a whole channel (use :func:`scaled`).
    """
    if balance is not None and not balance.rows_are_out_channels:
        raise ValueError(f"{balance.op}: balanced rounding needs whole weights, not row blocks")
    blocks = _row_blocks(weight)
    rows_at_most = max((rows.stop - rows.start for rows in blocks), default=0)
    pool = [np.empty(rows_at_most * _row_size(weight), dtype=weight.dtype) for _ in range(buffers)]
    for index, rows in enumerate(blocks):
        count = rows.stop - rows.start
        block = pool[index % buffers][: count * _row_size(weight)]
        block = block.reshape(count, *weight.shape[1:])
        _scale_rows(weight, _as_factors(factor), rows, block, balanced=balance is not None)
        yield block


def cannot_overflow(weight: np.ndarray, factor: np.ndarray | Factors) -> bool:
    """True when no product ``weight * factor`` can overflow ``weight.dtype``.

    The bound ``max|W| * max|factor| <= largest finite value`` (the product of
    every factor's max for several) is sufficient:
    float64 rounding and the final cast are both monotone, so no rounded product
    exceeds the rounded bound. It reads W once with two reductions per block,
    about a third of the cost of computing the products; planning uses it to
    check a multi-GB weight that the save computes anyway. False means "not
    proven" (a NaN or inf in W, a huge factor, a dtype no finfo describes):
    then only computing the products can tell.
    """
    largest = _largest_finite(weight.dtype)
    factors = _as_factors(factor)
    if largest is None or not all(np.isfinite(f).all() for f in factors):
        return False
    factor_max = math.prod(float(np.max(np.abs(f), initial=0.0)) for f in factors)
    weight_max = _largest_magnitude(weight)
    return weight_max is not None and weight_max * factor_max <= largest


# A weight bigger than this is bounded by two threads, one per half of its rows:
# numpy's reductions release the GIL, and reading a memory-mapped weight is
# mostly page faults, which also proceed side by side (the 2.42 GB benchmark
# model's 9 weights: 0.32 s against 0.47 s, page cache warm).
PARALLEL_BOUND_BYTES = 64 << 20


def _largest_magnitude(weight: np.ndarray) -> float | None:
    """max|W|, read a block of rows at a time; None if W holds a NaN or inf."""
    blocks = _row_blocks(weight)
    if weight.nbytes <= PARALLEL_BOUND_BYTES:
        return _blocks_largest_magnitude(weight, blocks)
    half = len(blocks) // 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(
            pool.map(_blocks_largest_magnitude, [weight] * 2, [blocks[:half], blocks[half:]])
        )
    return None if None in parts else max(p for p in parts if p is not None)


def _blocks_largest_magnitude(weight: np.ndarray, blocks: list[slice]) -> float | None:
    largest = 0.0
    for rows in blocks:
        block = weight[rows]
        if block.size == 0:
            continue
        high, low = float(block.max()), float(block.min())
        if not (np.isfinite(high) and np.isfinite(low)):
            return None
        largest = max(largest, high, -low)
    return largest


def _largest_finite(dtype: np.dtype) -> float | None:
    """The dtype's largest finite value, or None for a dtype no finfo describes.

    ml_dtypes' own ``finfo`` is asked when numpy's fails: numpy learned bfloat16
    only with ml_dtypes 0.7, and the bound must not depend on which version a
    fresh install resolves.
    """
    try:
        return float(np.finfo(dtype).max)
    except (TypeError, ValueError):
        pass
    try:
        import ml_dtypes

        return float(ml_dtypes.finfo(dtype).max)  # type: ignore[no-untyped-call]
    except (TypeError, ValueError):
        return None


def _scale_rows(
    weight: np.ndarray, factors: Factors, rows: slice, out: np.ndarray, balanced: bool = False
) -> None:
    """Write ``weight[rows]`` times the factors' rows into ``out``, refusing a non-finite result.

    ``balanced``: each row is one output channel, cast by :func:`balanced_cast`.
    """
    block_factors = tuple(f[rows] if f.shape[0] > 1 else f for f in factors)
    if balanced or len(block_factors) > 1:
        exact = product64(weight[rows], block_factors)
        if balanced:
            rounded = balanced_cast(exact.reshape(exact.shape[0], -1), weight.dtype)
        else:
            rounded = cast_checked(exact, weight.dtype, "weight")
        out[...] = rounded.reshape(out.shape)
        return
    with np.errstate(over="ignore"):  # overflow is reported below, as a refusal
        np.multiply(weight[rows], block_factors[0], out=out, dtype=np.float64, casting="unsafe")
    # Checked while the block is still in cache: a second pass over the whole
    # weight would read it from memory again.
    if not np.isfinite(out).all():
        raise Unfoldable(f"folded weight overflows {np.dtype(weight.dtype).name}")


def cast_weight(exact: np.ndarray, dtype: np.dtype, balance: WeightLayout | None) -> np.ndarray:
    """Float64 weight values cast once to ``dtype``: each to nearest, or, with ``balance``,
    by :func:`balanced_cast` over that layout's output channels.

    For a front that computes the whole folded weight in float64 first (torch).

    Raises:
        Unfoldable: a value overflows ``dtype``.
    """
    if balance is None:
        return cast_checked(exact, dtype, "weight")
    channels = balanced_cast(balance.out_channel_rows(exact), dtype)
    return np.ascontiguousarray(balance.from_out_channel_rows(channels, tuple(exact.shape)))


# balanced_cast works on this many elements at a time (whole rows, one at least):
# its dozen float64 temporaries then stay in cache, about 1.5x faster than 1 MB
# blocks.
BALANCE_CHUNK_ELEMENTS = 1 << 15


def balanced_cast(exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round ``(C, K)`` float64 values to ``dtype`` so that each row's rounding errors cancel.

    Row ``c`` holds every weight of output channel ``c``. Rounding each weight
    to nearest errs by at most half a unit in the last place (ulp), but a
    channel's errors add up: an input with a common offset (post-ReLU
    activations are all positive) moves the output by that offset times the
    row's error sum, about ``sqrt(K / 12)`` ulps. Each row here starts from
    nearest and rounds the other way the fewest weights that bring its error
    sum closest to zero, taking first those nearest a tie (exactly halfway
    between two values), where the other way costs least.

    Guarantees, per element and per row: every value is one of the two
    neighbours of its exact value (within one ulp of it), and a row's error sum
    is never larger in magnitude than round-to-nearest's.

    Raises:
        Unfoldable: a value overflows ``dtype``.
    """
    if exact.shape[0] == 0 or exact.shape[1] == 0:
        return cast_checked(exact, dtype, "weight")
    per_chunk = max(1, BALANCE_CHUNK_ELEMENTS // exact.shape[1])
    chunks = [
        _balanced_rows(exact[start : start + per_chunk], dtype)
        for start in range(0, exact.shape[0], per_chunk)
    ]
    return np.concatenate(chunks)


def _balanced_rows(exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """:func:`balanced_cast` of a few rows."""
    nearest = cast_checked(exact, dtype, "weight")
    nearest64 = nearest.astype(np.float64)
    error = nearest64 - exact
    total = error.sum(axis=1)
    # The exact value lies between nearest and this neighbour: away from zero
    # when nearest is the smaller in magnitude (error and value of opposite sign).
    other = _other_neighbour(nearest, away_from_zero=error * nearest64 < 0)
    step = other.astype(np.float64)
    step -= nearest64
    # A flip moves the sum toward zero where the error has the sum's sign. Never
    # onto an infinity, and never from zero, whose neighbours differ in sign.
    flippable = (error * total[:, None] > 0) & np.isfinite(step) & (nearest64 != 0)
    # The share of the step a flip adds to that weight's error: 0 at a tie, where
    # both neighbours are equally far.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cost = np.abs(error)
        cost /= np.abs(step)
    cost *= -2.0
    cost += 1.0
    cost[~flippable] = np.inf
    step[~flippable] = 0.0
    rows, cols = _flips(cost, step, total)
    out: np.ndarray = nearest.copy()
    out[rows, cols] = other[rows, cols]
    return out


def _other_neighbour(nearest: np.ndarray, away_from_zero: np.ndarray) -> np.ndarray:
    """The representable value next to each (non-zero, finite) one, on the side given.

    Adjacent floats of one sign have adjacent bit patterns, so this is one
    integer step on the bits (fp16, bf16, fp32 alike).
    """
    bits = nearest.view(np.dtype(f"u{nearest.dtype.itemsize}"))
    one = bits.dtype.type(1)
    with np.errstate(over="ignore"):  # +0 - 1 wraps; zeros are never flipped
        stepped: np.ndarray = np.where(away_from_zero, bits + one, bits - one)
    return stepped.view(nearest.dtype)


def _flips(cost: np.ndarray, step: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the weights to round the other way.

    Per row: the cheapest prefix, in order of cost, whose steps bring the sum
    closest to zero. The search first looks at the ``4 sqrt(K) + 16`` cheapest
    candidates of each row; nearest's errors sum to about ``sqrt(K / 12)`` ulps,
    so that is almost always enough, and a row that uses them all is searched
    again over all of them.
    """
    fan_in = cost.shape[1]
    picked_rows, picked_cols = [], []
    rows = np.arange(cost.shape[0])
    count = min(fan_in, 4 * math.isqrt(fan_in) + 16)
    while rows.size:
        order = _cheapest(cost[rows], count)
        steps = np.take_along_axis(step[rows], order, axis=1)
        sums = np.concatenate([np.zeros((rows.size, 1)), np.cumsum(steps, axis=1)], axis=1)
        sums += total[rows, None]
        flips = np.argmin(np.abs(sums), axis=1)  # the first best: no flip that does not help
        settled = (flips < count) | (count == fan_in)
        taken = np.arange(count) < flips[settled, None]
        picked_rows.append(np.broadcast_to(rows[settled, None], taken.shape)[taken])
        picked_cols.append(order[settled][taken])
        rows, count = rows[~settled], fan_in
    return np.concatenate(picked_rows), np.concatenate(picked_cols)


def _cheapest(cost: np.ndarray, count: int) -> np.ndarray:
    """Column indices of each row's ``count`` smallest costs, in increasing order."""
    if count < cost.shape[1]:
        part = np.argpartition(cost, count - 1, axis=1)[:, :count]
    else:
        part = np.broadcast_to(np.arange(cost.shape[1]), cost.shape)
    order = np.argsort(np.take_along_axis(cost, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _row_blocks(array: np.ndarray) -> list[slice]:
    """Slices of axis 0 of at most CHUNK_BYTES each (one row at least)."""
    rows = array.shape[0]
    step = max(1, CHUNK_BYTES // max(1, array.itemsize * _row_size(array)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _row_size(array: np.ndarray) -> int:
    """Elements in one row (axis 0 index) of ``array``; 0 for a zero-size row."""
    return int(np.prod(array.shape[1:], dtype=np.int64))


def cast_checked(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast float64 results to the model dtype, refusing values it can't hold."""
    with np.errstate(over="ignore"):  # overflow is reported below, as a refusal
        out = values.astype(dtype)
    if not np.all(np.isfinite(out)):
        raise Unfoldable(f"folded {what} overflows {np.dtype(dtype).name}")
    return out
