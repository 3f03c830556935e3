"""The fold math, shared by the ONNX and torch fronts. numpy only, no graph types.

Every fold reduces to one per-channel affine ``y = scale * x + shift`` placed
after a linear op ``x = W * input + b``. Then ``y = (W * scale) * input +
(b * scale + shift)``. All arithmetic runs in float64 and is cast once to the
model's dtype (:mod:`bnfold.core.cast`): a tiny variance makes ``scale`` huge,
and rounding W, scale and their product separately in fp16 loses several bits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from bnfold.core.cast import Unfoldable, balanced_over, cast_checked, scaled
from bnfold.core.layouts import LayoutError, WeightLayout
from bnfold.options import Rounding

__all__ = [
    "Affine",
    "add_parts",
    "after_bias",
    "after_factor",
    "before_bias",
    "before_factor",
    "bn_to_affine",
    "concat_parts",
    "exact_after_bias",
    "exact_before_bias",
    "fold_after",
    "fold_before",
]


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
    exact: np.ndarray = b64 * affine.scale + affine.shift
    return exact


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
    exact: np.ndarray = b64 + layout.sum_to_out(weight * layout.expand_in(affine.shift, shape))
    return exact


def _require_finite(arr: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise Unfoldable(f"{name} is not finite at channel {bad} ({arr[bad]!r})")
