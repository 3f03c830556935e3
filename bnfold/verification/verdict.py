"""The verdict: each compared tensor against its bound, discontinuous outputs by the evidence.

A tensor passes when ``max|folded - original| <= atol + rtol * scale``, with
``scale`` its ``max|original|`` (or its largest operand's, for a sum) and rtol
derived per tensor (:mod:`bnfold.verification.tolerance`) unless given. Differences
are measured a chunk at a time in float64 (:func:`abs_error`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ml_dtypes
import numpy as np

from bnfold.options import VerifyOptions
from bnfold.report import OutputDiff, VerifyResult
from bnfold.verification.cones import Cones
from bnfold.verification.tolerance import derived_rtol, describe_basis, dtype_name

# Default rtol per output dtype, applied to the output's scale (max |reference|).
# fp32 folds typically land near 1e-7; 1e-5 leaves room for deep nets while a
# 1e-3 planted error still fails.
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class SiteValue:
    """One fold site to compare: the value that carries its result in both models."""

    value: str  # in the original the removed affine's output, in the fold the op's
    site: str  # "conv1 -> bn1"


@dataclass
class TensorDiff:
    """The worst difference of one compared tensor over every sample."""

    max_abs: float = 0.0
    scale: float = 0.0  # max |original| over finite values (of the operands: see _Plan.rescale)
    dtype: str = ""
    elements: int = 0
    scaled_by: list[str] = field(default_factory=list)

    def add(self, ref: Any, new: Any) -> None:
        ref, new = np.asarray(ref), np.asarray(new)
        max_abs, scale = abs_error(ref, new)
        self.max_abs, self.scale = max(self.max_abs, max_abs), max(self.scale, scale)
        self.dtype = dtype_name(ref.dtype)
        self.elements = max(self.elements, ref.size)


def judge(
    outputs: Sequence[tuple[str, TensorDiff]],
    sites: Sequence[tuple[SiteValue, TensorDiff]],
    cones: Cones,
    options: VerifyOptions,
    samples: int,
    level: str,
    inputs: str,
    every_site: bool = True,
    frontier: Sequence[tuple[str, TensorDiff]] = (),
) -> VerifyResult:
    """The verdict: each output and site against its bound; discontinuous outputs by the evidence.

    A discontinuous output that differs beyond its bound passes only when every
    fold site and every frontier value (each continuous tensor that feeds a
    discontinuous op: the scores and boxes going into NonMaxSuppression) lies
    within its own bound: then nothing before the jump moved more than a
    correct fold's rounding. Frontier values judge nothing else: a difference
    there fails only the outputs it would have vouched for.

    Args:
        every_site: every fold site was compared (a site inside a subgraph
            cannot be); only then can sites vouch for a discontinuous output.
        frontier: the continuous values feeding discontinuous ops.
    """
    site_rows = [_row(s.value, d, cones, options, site=s.site) for s, d in sites]
    edge_rows = [_row(n, d, cones, options, site="feeds a discontinuous op") for n, d in frontier]
    sites_hold = bool(site_rows) and every_site and all(r.passed for r in site_rows)
    sites_hold = sites_hold and all(r.passed for r in edge_rows)
    rows = []
    for name, diff in outputs:
        row = _row(name, diff, cones, options)
        if not row.passed and sites_hold and name in cones.discontinuous:
            row = replace(row, passed=True, judged_by="sites")
        rows.append(row)
    passed = all(r.passed for r in rows) and all(r.passed for r in site_rows)
    used = options.rtol if options.rtol is not None else max((r.rtol for r in rows), default=0.0)
    return VerifyResult(
        "passed" if passed else "failed", options.atol, used, samples, rows,
        optimization_level=level, inputs=inputs, sites=site_rows,
        derived=options.rtol is None, frontier=edge_rows,
    )  # fmt: skip


def _row(
    name: str, diff: TensorDiff, cones: Cones, options: VerifyOptions, site: str = ""
) -> OutputDiff:
    reductions = cones.of(name)
    if options.rtol is None:
        rtol = derived_rtol(diff.dtype, reductions, diff.elements)
        basis = describe_basis(diff.dtype, reductions, diff.elements)
    else:
        rtol, basis = options.rtol, "--rtol"
    if diff.scaled_by:
        basis += f"; scale max|{', '.join(diff.scaled_by)}|"
    return measured(name, diff.max_abs, diff.scale, options.atol, rtol, basis, site)


def measured(
    name: str, max_abs: float, scale: float, atol: float, rtol: float, basis: str, site: str = ""
) -> OutputDiff:
    """One compared tensor's row: passes when ``max_abs <= atol + rtol * scale``."""
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    needed = max(0.0, (max_abs - atol) / scale) if scale > 0 else rel
    passed = bool(max_abs <= atol + rtol * scale)
    return OutputDiff(name, max_abs, rel, needed, passed, rtol=rtol, basis=basis, site=site)


def summarize(
    worst: dict[str, tuple[float, float, str]],
    atol: float,
    rtol: float | None,
    samples: int,
    level: str,
) -> VerifyResult:
    """The verdict from each output's (max abs error, max |reference|, dtype name).

    An output passes when ``max_abs <= atol + rtol * scale``; rtol None takes
    :data:`DEFAULT_RTOL` of the output's dtype. Used by the torch front, which
    does not know the reductions behind an output.
    """
    outputs = []
    for name, (max_abs, scale, dtype) in worst.items():
        tol = DEFAULT_RTOL.get(dtype, 0.0) if rtol is None else rtol
        basis = f"{dtype} default" if rtol is None else "--rtol"
        outputs.append(measured(name, max_abs, scale, atol, tol, basis))
    status = "passed" if all(o.passed for o in outputs) else "failed"
    used_rtol = rtol if rtol is not None else max((o.rtol for o in outputs), default=0.0)
    return VerifyResult(status, atol, used_rtol, samples, outputs, optimization_level=level)


# Elements compared at a time: the float64 views of one chunk, never of a whole output.
_COMPARE_CHUNK = 1 << 18


def abs_error(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(max |new - ref|, max |ref| over finite values); NaN where ref is not NaN counts as inf.

    Compared a chunk at a time, in float64: a 1 GB output costs a few MB more,
    not five float64 copies of itself.
    """
    floating = ref.dtype.kind in "fc" or ref.dtype == ml_dtypes.bfloat16
    if ref.shape != new.shape:
        return float("inf"), (_max_finite(ref) if floating else 1.0)
    if not floating:
        return float(np.any(ref != new)), 1.0
    r_flat, n_flat = ref.reshape(-1), new.reshape(-1)
    max_abs = scale = 0.0
    for start in range(0, r_flat.size, _COMPARE_CHUNK):
        r = r_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        n = n_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        agree = (r == n) | (np.isnan(r) & np.isnan(n))  # also equal infinities
        with np.errstate(invalid="ignore"):  # inf - inf: handled by `agree`
            diff = np.where(agree, 0.0, np.abs(r - n))
        diff[np.isnan(diff)] = np.inf
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        scale = max(scale, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    return max_abs, scale


def _max_finite(a: np.ndarray) -> float:
    flat = a.reshape(-1)
    best = 0.0
    for start in range(0, flat.size, _COMPARE_CHUNK):
        r = flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        best = max(best, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    return best
