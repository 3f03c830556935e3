"""The fold math, shared by the ONNX and torch fronts. numpy only, no graph types.

Every fold reduces to one per-channel affine ``y = scale * x + shift`` placed
after a linear op ``x = W * input + b``. Then ``y = (W * scale) * input +
(b * scale + shift)``. All arithmetic runs in float64 and is cast once to the
model's dtype: a tiny variance makes ``scale`` huge, and rounding W, scale and
their product separately in fp16 loses several bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bnfold.layouts import LayoutError, WeightLayout


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
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, layout: WeightLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one linear op equal to ``affine(linear(x))``.

    Args:
        weight: the op's weight, in the model's dtype.
        bias: the op's ``(C_out,)`` bias, or None for an op without one.
        affine: the per-output-channel affine to absorb.
        layout: where output channels sit in ``weight``.

    Returns:
        ``(weight', bias')`` in the dtypes of ``weight`` and ``bias`` (bias' takes
        the weight's dtype when there was no bias).

    Raises:
        Unfoldable: the folded values overflow the model's dtype.
        LayoutError: the affine's length does not fit the weight.
    """
    new_w = scaled(weight, after_factor(affine, layout, tuple(weight.shape)))
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
    b64 = np.zeros_like(affine.shift) if bias is None else np.asarray(bias, dtype=np.float64)
    bias_dtype = weight_dtype if bias is None else bias.dtype
    return cast_checked(b64 * affine.scale + affine.shift, bias_dtype, "bias")


def fold_before(
    weight: np.ndarray, bias: np.ndarray | None, affine: Affine, layout: WeightLayout
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of one linear op equal to ``linear(affine(x))``, ``affine`` per input channel.

    ``W (s x + t) + b = (W s) x + (b + W t)``: the shift enters the bias through
    the weights. That holds only where every output reads every input tap; with
    zero padding the border taps read zeros, not ``t``, so the caller must refuse
    a padded op unless ``t`` is zero.

    Raises:
        Unfoldable: the folded values overflow the model's dtype.
        LayoutError: the affine's length does not fit the weight's input channels.
    """
    new_w = scaled(weight, before_factor(affine, layout, tuple(weight.shape)))
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
    shape = tuple(weight.shape)
    b64 = np.zeros(layout.out_channels(shape)) if bias is None else np.asarray(bias, np.float64)
    shift_w = layout.expand_in(affine.shift, shape)
    b64 = b64 + layout.sum_to_out(weight.astype(np.float64) * shift_w)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return cast_checked(b64, bias_dtype, "bias")


# The weight is scaled this many output bytes at a time: the finiteness check
# reads each block while it is still in cache, and a streamed fold
# (:func:`scaled_blocks`) holds no more than this.
CHUNK_BYTES = 1 << 20


def scaled(weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``weight * factor`` computed in float64 and cast once to ``weight.dtype``.

    ``factor`` broadcasts onto ``weight``. ``dtype=float64`` runs numpy's float64
    loop: it widens the weight into small internal buffers, multiplies in float64
    and rounds each product once into the output. That is the same arithmetic as
    a float64 copy of the weight cast back afterwards, bit for bit, without the
    float64 temporary (twice the weight's size for fp32, four times for fp16).

    Raises:
        Unfoldable: a product overflows the weight's dtype.
    """
    out = np.empty(weight.shape, dtype=weight.dtype)
    for rows in _row_blocks(out):
        _scale_rows(weight, factor, rows, out[rows])
    return out


def scaled_blocks(weight: np.ndarray, factor: np.ndarray, buffers: int = 1) -> Iterator[np.ndarray]:
    """:func:`scaled`, bit for bit, as consecutive blocks of rows, without the whole result.

    The blocks are written into ``buffers`` reused buffers in turn, so a block is
    valid only until ``buffers`` more have been produced: with one, write it out
    (or check it) before asking for the next; with two, it may still be written
    while the next is computed.

    Raises:
        Unfoldable: a product overflows the weight's dtype.
    """
    blocks = _row_blocks(weight)
    rows_at_most = max((rows.stop - rows.start for rows in blocks), default=0)
    pool = [np.empty(rows_at_most * _row_size(weight), dtype=weight.dtype) for _ in range(buffers)]
    for index, rows in enumerate(blocks):
        count = rows.stop - rows.start
        block = pool[index % buffers][: count * _row_size(weight)]
        block = block.reshape(count, *weight.shape[1:])
        _scale_rows(weight, factor, rows, block)
        yield block


def cannot_overflow(weight: np.ndarray, factor: np.ndarray) -> bool:
    """True when no product ``weight * factor`` can overflow ``weight.dtype``.

    The bound ``max|W| * max|factor| <= largest finite value`` is sufficient:
    float64 rounding and the final cast are both monotone, so no rounded product
    exceeds the rounded bound. It reads W once with two reductions per block,
    about a third of the cost of computing the products; planning uses it to
    check a multi-GB weight that the save computes anyway. False means "not
    proven" (a NaN or inf in W, a huge factor, a dtype numpy has no finfo for):
    then only computing the products can tell.
    """
    largest = _largest_finite(weight.dtype)
    if largest is None or not np.isfinite(factor).all():
        return False
    factor_max = float(np.max(np.abs(factor), initial=0.0))
    weight_max = 0.0
    for rows in _row_blocks(weight):
        block = weight[rows]
        if block.size == 0:
            continue
        high, low = float(block.max()), float(block.min())
        if not (np.isfinite(high) and np.isfinite(low)):
            return False
        weight_max = max(weight_max, high, -low)
    return weight_max * factor_max <= largest


def _largest_finite(dtype: np.dtype) -> float | None:
    try:
        return float(np.finfo(dtype).max)
    except (TypeError, ValueError):  # e.g. ml_dtypes' bfloat16: numpy has no finfo for it
        return None


def _scale_rows(weight: np.ndarray, factor: np.ndarray, rows: slice, out: np.ndarray) -> None:
    """Write ``weight[rows] * factor[rows]`` into ``out``, refusing a non-finite result."""
    block_factor = factor[rows] if factor.shape[0] > 1 else factor
    with np.errstate(over="ignore"):  # overflow is reported below, as a refusal
        np.multiply(weight[rows], block_factor, out=out, dtype=np.float64, casting="unsafe")
    # Checked while the block is still in cache: a second pass over the whole
    # weight would read it from memory again.
    if not np.isfinite(out).all():
        raise Unfoldable(f"folded weight overflows {np.dtype(weight.dtype).name}")


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
