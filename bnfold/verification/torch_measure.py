"""What one compared torch tensor says, measured in its own precision.

The original's side (range, scale, per-channel peaks, whether the inputs moved it)
is worked out once per reference (:class:`Known`); each check then needs one pass
over the fold's tensor (:func:`difference`). fp16 and bf16 are widened to float32
so a difference cannot overflow; float32 and float64 stay as they are: the
difference of two nearly equal floats is exact, and a float64 copy of every
activation cost more than the forwards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnfold.verification.calibrate import SEED
from bnfold.verification.torch_flow import nudged_tensor


def nudged_copy(module: nn.Module, seed: int = SEED) -> nn.Module:
    """A copy of ``module`` with every floating parameter and buffer nudged by one ulp."""
    shadow = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*shadow.parameters(), *shadow.buffers()]:
            if t.is_floating_point() and t.numel():
                t.copy_(nudged_tensor(t, gen))
    return shadow


@dataclass(frozen=True)
class Known:
    """What one sample's original tensor says by itself, whatever the fold."""

    finite: bool
    scale: float
    lowest: float
    highest: float
    changed: bool | None  # differs from the first sample's (None: it is the first)
    peaks: np.ndarray | None  # max |value| per channel, for a site


def known_of(
    want: torch.Tensor, first: torch.Tensor | None, sample: int, channel_axis: int | None
) -> Known:
    r = _widened(want)
    finite = True
    if r.numel() == 0:
        lowest, highest, scale = float("inf"), float("-inf"), 0.0
    else:
        # One pass: a NaN makes aminmax NaN, an infinity shows at an end, so finite
        # ends mean every value is finite (no separate isfinite pass over the tensor).
        lo, hi = torch.aminmax(r)
        lowest, highest = float(lo), float(hi)
        finite = math.isfinite(lowest) and math.isfinite(highest)
        if finite:
            scale = max(abs(lowest), abs(highest))
        else:
            lowest, highest, scale = _finite_range(r)
    changed = None
    if sample:
        changed = first is None or first.shape != want.shape or not torch.equal(first, want)
    peaks = _channel_peaks(want, channel_axis, finite) if channel_axis is not None else None
    return Known(finite, scale, lowest, highest, changed, peaks)


def difference(want: torch.Tensor, got: torch.Tensor | None, known: Known) -> float:
    """max |got - want| in the tensors' own precision (fp16/bf16 widened to float32).

    The difference of two nearly equal floats is exact; a NaN where the original
    has none, a missing tensor or another shape count as infinite.
    """
    if got is None or got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    r, n = _widened(want), _widened(got)
    if known.finite:
        worst = float((r - n).abs().max())
        return worst if worst == worst else float("inf")
    agree = (r == n) | (torch.isnan(r) & torch.isnan(n))  # also equal infinities
    return float(torch.where(agree, 0, (r - n).abs()).nan_to_num(nan=float("inf")).max())


def _finite_range(r: torch.Tensor) -> tuple[float, float, float]:
    """(lowest, highest, max |value|) over the finite values of ``r``."""
    finite = torch.isfinite(r)
    if not bool(finite.any()):
        return float("inf"), float("-inf"), 0.0
    lowest = float(torch.where(finite, r, float("inf")).min())
    highest = float(torch.where(finite, r, float("-inf")).max())
    return lowest, highest, max(abs(lowest), abs(highest))


def _widened(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _channel_peaks(want: torch.Tensor, axis: int, finite: bool) -> np.ndarray | None:
    """max |want| per index of ``axis`` over finite values (None: no such axis);
    ``finite``: every value is (then no masked copy is made)."""
    if want.dim() <= axis or want.numel() == 0:
        return None
    r = _widened(want)
    if not finite:
        r = torch.where(torch.isfinite(r), r, 0)
    others = [d for d in range(r.dim()) if d != axis]
    if not others:
        return None
    # max |x| as max(max x, -min x): two reductions instead of an |x| copy of the tensor
    peaks = torch.maximum(r.amax(dim=others), -r.amin(dim=others))
    return peaks.double().cpu().numpy()
