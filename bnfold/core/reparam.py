"""Structural re-parameterisation: a sum of convs reading one input as one conv.

Conv weights here are ``(C_out, C_in/g, *kernel)``. A smaller kernel padded with
zeros to a larger one, with its padding grown by ``dilation * (difference / 2)``
on each side, reads the same input taps: the sum of such convs is one conv with
the summed kernels. An identity term ``s * x + t`` is one centred tap per
channel. numpy only, no graph types: each front walks its own graph for the
terms of a sum (:mod:`bnfold.rules.branch_sum` decides whether they may merge),
and the merged kernel and bias are computed here (:func:`merge_branches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnfold.core.affine import Affine
from bnfold.core.layouts import LayoutError

__all__ = [
    "Branch",
    "Tap",
    "absorb_identity",
    "centred_kernel",
    "identity_kernel",
    "merge_branches",
]


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


@dataclass(frozen=True, eq=False)  # holds arrays: never compared
class Branch:
    """A conv term of a sum: its float64 weight and bias, times a per-output-channel
    coefficient (a sign, the layer scales on its path)."""

    weight: np.ndarray
    bias: np.ndarray | None
    coefficient: np.ndarray


@dataclass(frozen=True, eq=False)
class Tap:
    """An identity term ``scale * x + shift`` of a sum (its coefficient applied):
    a BN of the input, or the input itself (``shift`` None)."""

    scale: np.ndarray
    shift: np.ndarray | None = None


def merge_branches(
    shape: tuple[int, ...],
    convs: Sequence[Branch],
    taps: Sequence[Tap] = (),
    offsets: Sequence[np.ndarray] = (),
    after: Affine | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The float64 weight (of ``shape``) and bias of one conv equal to a sum of terms.

    Every conv's kernel is zero-padded, centred, to ``shape``'s and added times its
    coefficient; every tap adds one centred tap per channel (:func:`identity_kernel`);
    the biases, the taps' shifts and the ``offsets`` (constants the sum adds, per
    channel) make the bias. ``after`` is an affine applied to the sum (a BN reading
    it): folded here, the merged kernel is still rounded once. The terms are added
    in the order given: rounding depends on it, and each front keeps the order its
    merges have always had.

    Raises:
        LayoutError: a kernel cannot be centred in ``shape``'s, or the taps do not
            fit its channels and groups.
    """
    kernel, in_per_group = shape[2:], shape[1]
    weight = np.zeros(shape)
    bias = np.zeros(shape[0])
    per_row = (-1,) + (1,) * (len(shape) - 1)  # a (C,) vector over the output rows
    for conv in convs:
        weight += conv.coefficient.reshape(per_row) * centred_kernel(conv.weight, kernel)
        if conv.bias is not None:
            bias += conv.coefficient * conv.bias
    for tap in taps:
        weight += identity_kernel(tap.scale, in_per_group, kernel)
        if tap.shift is not None:
            bias += tap.shift
    for offset in offsets:
        bias += offset
    if after is not None:
        weight *= after.scale.reshape(per_row)
        bias = bias * after.scale + after.shift
    return weight, bias
