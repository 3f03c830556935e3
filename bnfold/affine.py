"""The fold math, shared by the ONNX and torch fronts. numpy only, no graph types.

Every fold reduces to one per-channel affine ``y = scale * x + shift`` placed
after a linear op ``x = W * input + b``. Then ``y = (W * scale) * input +
(b * scale + shift)``. All arithmetic runs in float64 and is cast once to the
model's dtype: a tiny variance makes ``scale`` huge, and rounding W, scale and
their product separately in fp16 loses several bits. A weight folded several
times is its original times every factor (:data:`Factors`), still cast once.
That one cast rounds each
product to nearest, or, with :attr:`Rounding.BALANCED`, so that the rounding
errors of each output channel cancel (:func:`balanced_cast`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bnfold.layouts import LayoutError, WeightLayout
from bnfold.options import Rounding


class Unfoldable(ValueError):
    """The values make a fold impossible (NaN, inf, var + eps <= 0, overflow)."""


@dataclass(frozen=True)
class Affine:
    """``y = scale * x + shift``, per channel (shape ``(C,)``), in float64."""

    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def of(cls, scale: np.ndarray | float, shift: np.ndarray | float, channels: int) -> Affine:
        """Build from scalars or ``(C,)`` vectors, broadcast to ``channels``."""
        s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (channels,)).copy()
        t = np.broadcast_to(np.asarray(shift, dtype=np.float64), (channels,)).copy()
        _require_finite(s, "scale")
        _require_finite(t, "shift")
        return cls(s, t)

    def spread(self, channels: int) -> Affine:
        """The same affine over ``channels``: each of its channels covers a block of k.

        Across a reshape a BN channel can be a contiguous block of a linear op's
        channels (a flatten into a Linear, a Linear's features viewed as
        ``(C, H, W)``); channel ``j`` then takes the values of channel ``j // k``.

        Raises:
            LayoutError: ``channels`` is not a whole number of blocks.
        """
        count = self.scale.shape[0]
        if channels == count:  # no regrouping (also zero channels)
            return self
        if count == 0 or channels % count:
            raise LayoutError(f"{channels} channels are not whole blocks of {count}")
        block = channels // count
        return Affine(np.repeat(self.scale, block), np.repeat(self.shift, block))


def add_parts(affine: Affine, count: int) -> list[Affine]:
    """An affine after a sum of ``count`` linear terms, split over them.

    ``s * (a + b) + t == (s * a + t) + s * b``: every term takes the scale, the
    first also the shift.
    """
    zero = np.zeros_like(affine.shift)
    return [affine] + [Affine(affine.scale, zero) for _ in range(count - 1)]


def concat_parts(affine: Affine, channels: list[int]) -> list[Affine]:
    """An affine after a channel concat, split into each input's own channels, in order."""
    bounds = np.cumsum([0, *channels])
    return [Affine(affine.scale[a:b], affine.shift[a:b]) for a, b in itertools.pairwise(bounds)]


def bn_to_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> Affine:
    """The affine equal to inference BatchNorm ``gamma * (x - mean) / sqrt(var + eps) + beta``.

    Raises:
        Unfoldable: a parameter is NaN/inf, or ``var + eps <= 0`` for some channel.
    """
    g, b, m, v = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    for name, arr in (("scale", g), ("bias", b), ("mean", m), ("var", v)):
        _require_finite(arr, name)
    denom = v + float(eps)
    if np.any(denom <= 0):
        bad = int(np.flatnonzero(denom <= 0)[0])
        raise Unfoldable(f"var + eps <= 0 at channel {bad} ({v[bad]!r} + {eps!r})")
    scale = g / np.sqrt(denom)
    return Affine.of(scale, b - m * scale, channels=g.shape[0])


def fold_after(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
    rounding: Rounding = Rounding.NEAREST,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one linear op equal to ``affine(linear(x))``.

    Args:
        weight: the op's weight, in the model's dtype.
        bias: the op's ``(C_out,)`` bias, or None for an op without one.
        affine: the per-output-channel affine to absorb.
        layout: where output channels sit in ``weight``.
        rounding: how the folded weight is cast to its dtype.

    Returns:
        ``(weight', bias')`` in the dtypes of ``weight`` and ``bias`` (bias' takes
        the weight's dtype when there was no bias).

    Raises:
        Unfoldable: the folded values overflow the model's dtype.
        LayoutError: the affine's length does not fit the weight.
    """
    factor = after_factor(affine, layout, tuple(weight.shape))
    new_w = scaled(weight, factor, balanced_over(layout, rounding))
    return new_w, after_bias(bias, affine, weight.dtype)


def after_factor(affine: Affine, layout: WeightLayout, shape: tuple[int, ...]) -> np.ndarray:
    """What :func:`fold_after` multiplies the weight by: float64, broadcastable onto ``shape``.

    Raises:
        LayoutError: the affine's length does not fit the weight.
    """
    return layout.expand(affine.scale, shape)


def after_bias(bias: np.ndarray | None, affine: Affine, weight_dtype: np.dtype) -> np.ndarray:
    """The bias :func:`fold_after` gives, in the bias's dtype (the weight's if there was none).

    Raises:
        Unfoldable: the folded bias overflows its dtype.
    """
    b64 = None if bias is None else np.asarray(bias, dtype=np.float64)
    bias_dtype = weight_dtype if bias is None else bias.dtype
    return cast_checked(exact_after_bias(b64, affine), bias_dtype, "bias")


def exact_after_bias(bias: np.ndarray | None, affine: Affine) -> np.ndarray:
    """:func:`after_bias` before the cast: ``b * scale + shift`` in float64 (b float64 or None)."""
    b64 = np.zeros_like(affine.shift) if bias is None else bias
    return b64 * affine.scale + affine.shift


def fold_before(
    weight: np.ndarray,
    bias: np.ndarray | None,
    affine: Affine,
    layout: WeightLayout,
    rounding: Rounding = Rounding.NEAREST,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one linear op equal to ``linear(affine(x))``, ``affine`` per input channel.

    ``W (s x + t) + b = (W s) x + (b + W t)``: the shift enters the bias through
    the weights. That holds only where every output reads every input tap; with
    zero padding the border taps read zeros, not ``t``, so the caller must refuse
    a padded op unless ``t`` is zero. ``rounding`` is as for :func:`fold_after`.

    Raises:
        Unfoldable: the folded values overflow the model's dtype.
        LayoutError: the affine's length does not fit the weight's input channels.
    """
    factor = before_factor(affine, layout, tuple(weight.shape))
    new_w = scaled(weight, factor, balanced_over(layout, rounding))
    return new_w, before_bias(weight, bias, affine, layout)


def before_factor(affine: Affine, layout: WeightLayout, shape: tuple[int, ...]) -> np.ndarray:
    """What :func:`fold_before` multiplies the weight by: float64, broadcastable onto ``shape``.

    Raises:
        LayoutError: the affine's length does not fit the weight's input channels.
    """
    return layout.expand_in(affine.scale, shape)


def before_bias(
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, layout: WeightLayout
) -> np.ndarray:
    """The bias :func:`fold_before` gives: ``b + W t``, in the bias's dtype (else the weight's).

    Raises:
        Unfoldable: the folded bias overflows its dtype.
    """
    b64 = None if bias is None else np.asarray(bias, np.float64)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    exact = exact_before_bias(weight.astype(np.float64), b64, affine, layout)
    return cast_checked(exact, bias_dtype, "bias")


def exact_before_bias(
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, layout: WeightLayout
) -> np.ndarray:
    """:func:`before_bias` before the cast: ``b + W t`` in float64 (W and b float64, b or None)."""
    shape = tuple(weight.shape)
    b64 = np.zeros(layout.out_channels(shape)) if bias is None else bias
    return b64 + layout.sum_to_out(weight * layout.expand_in(affine.shift, shape))


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
    out = np.multiply(weight, first, dtype=np.float64)
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

        return float(ml_dtypes.finfo(dtype).max)
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
    out = nearest.copy()
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
        return np.where(away_from_zero, bits + one, bits - one).view(nearest.dtype)


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


def _require_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise Unfoldable(f"{name} is not finite at channel {bad} ({arr[bad]!r})")


# --- structural re-parameterisation: a sum of convs reading one input as one conv -----
# Conv weights here are (C_out, C_in/g, *kernel). A smaller kernel padded with zeros
# to a larger one, with its padding grown by dilation * (difference / 2) on each side,
# reads the same input taps: the sum of such convs is one conv with the summed kernels.


def centred_kernel(weight: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """``weight`` zero-padded symmetrically in its spatial axes to ``kernel``, in float64.

    Raises:
        LayoutError: a spatial size is larger than ``kernel``'s or differs from it by
            an odd number (the small kernel would not sit centred).
    """
    spatial = tuple(weight.shape[2:])
    if len(spatial) != len(kernel):
        raise LayoutError(f"kernel rank {len(spatial)} is not {len(kernel)}")
    widths = []
    for small, large in zip(spatial, kernel, strict=True):
        if small > large or (large - small) % 2:
            raise LayoutError(f"a {spatial} kernel cannot be centred in {kernel}")
        widths.append(((large - small) // 2,) * 2)
    return np.pad(np.asarray(weight, dtype=np.float64), [(0, 0), (0, 0), *widths])


def identity_kernel(scale: np.ndarray, in_per_group: int, kernel: tuple[int, ...]) -> np.ndarray:
    """The conv weight of ``y[c] = scale[c] * x[c]``: one centred tap per channel.

    With groups, input channel ``c`` is column ``c % in_per_group`` of output row
    ``c`` (output and input channel counts are equal, so ``c`` is in the same group
    on both sides).

    Raises:
        LayoutError: a kernel size is even (no centre tap), or the channels are not
            whole groups of ``in_per_group``.
    """
    channels = scale.shape[0]
    if any(k % 2 == 0 for k in kernel):
        raise LayoutError(f"a {kernel} kernel has no centre tap")
    if in_per_group < 1 or channels % in_per_group:
        raise LayoutError(f"{channels} channels are not groups of {in_per_group}")
    weight = np.zeros((channels, in_per_group, *kernel))
    rows = np.arange(channels)
    index: list[np.ndarray | int] = [rows, rows % in_per_group]
    index += [k // 2 for k in kernel]  # the centre tap
    weight[tuple(index)] = np.asarray(scale, dtype=np.float64)
    return weight


def absorb_identity(
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, sign: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias (float64) equal to ``conv(x) + sign * (affine(x) - x)``.

    An identity BN term of a branch sum, ``conv(x) + bn(x)``, can become a bare
    ``x`` when a conv reading the same ``x`` takes the rest: ``(scale - 1) * x``
    as one centred tap per channel (:func:`identity_kernel`) and ``shift`` in
    its bias; ``sign`` -1 for ``conv(x) - bn(x)``. The conv must compute ``x``
    itself with a centred tap (stride 1, centred padding; the caller checks),
    so this is exact.

    Raises:
        LayoutError: the conv does not map the affine's channels onto themselves
            (other output channels, no centre tap, channels not whole groups).
    """
    channels = affine.scale.shape[0]
    if weight.ndim < 3 or weight.shape[0] != channels:
        raise LayoutError(f"conv weight {weight.shape} cannot take a tap over {channels} channels")
    rest = sign * (affine.scale - 1.0)
    tap = identity_kernel(rest, weight.shape[1], tuple(weight.shape[2:]))
    b64 = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    return np.asarray(weight, dtype=np.float64) + tap, b64 + sign * affine.shift
