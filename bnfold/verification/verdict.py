"""The verdict: each compared tensor against its bound, discontinuous outputs by the evidence.

A tensor passes when ``max|folded - original| <= atol + rtol * scale``, with
``scale`` its ``max|original|`` (or its largest operand's, for a sum) and rtol
derived per tensor (:mod:`bnfold.verification.tolerance`), widened by
calibration where rounding noise needs it (:mod:`bnfold.verification.calibrate`),
unless given. Differences are measured a chunk at a time in float64
(:func:`measure`).

Agreement is not evidence by itself: a tensor whose original values are one
constant (the all-zero output of a detector fed a 1x1 image), or the same for
every sample, would agree with any fold that leaves that constant alone. Such a
row is marked, and when no compared tensor carries evidence the result is
"not_verified" (``no_evidence``), never passed.
Each fold site also says how many of its output channels would have shown a
planted relative error of :data:`~bnfold.report.PLANTED_ERROR`: the sensitivity
of the check on the inputs used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ml_dtypes
import numpy as np

from bnfold.options import VerifyOptions
from bnfold.report import PLANTED_ERROR, NotVerified, OutputDiff, Proof, VerifyResult
from bnfold.verification.cones import Cones
from bnfold.verification.tolerance import derived_rtol, describe_basis, dtype_name

# A tensor beyond its derived bound passes when it lies within this multiple of
# the rounding noise calibration measured (see bnfold.verification.calibrate).
CALIBRATED_MARGIN = 4.0
# With a certificate that proves every fold, a tensor beyond its bound can only
# show rounding; past this multiple of its bound it shows a wrong proof instead.
PROOF_ENVELOPE = 100.0


Certificate = Proof
"""What the verdict needs of a proof (:func:`bnfold.proof.prove_onnx`'s result).

``holds`` is True only when every fold site is proven and the rest of the graph is
unchanged; ``refuted`` when the proof found a difference.
"""


@dataclass(frozen=True)
class SiteValue:
    """One fold site to compare: the value that carries its result in both models."""

    value: str  # in the original the removed affine's output, in the fold the op's
    site: str  # "conv1 -> bn1"
    channel_axis: int | None = None  # where the fold's output channels lie, if known


@dataclass
class TensorDiff:
    """The worst difference of one compared tensor over every sample, and what it rests on."""

    max_abs: float = 0.0
    scale: float = 0.0  # max |original| over finite values (of the operands: see Plan.rescale)
    dtype: str = ""
    elements: int = 0
    scaled_by: list[str] = field(default_factory=list)
    # The range of the original's values over every sample: one value, no evidence.
    lowest: float = math.inf
    highest: float = -math.inf
    # Whether the original's values differed from the first sample's in a later
    # one (None: one sample). Values the inputs do not move prove little either.
    changes: bool | None = None
    # Sites: max |original| per output channel, for the sensitivity figure.
    channel_axis: int | None = None
    peaks: np.ndarray | None = None

    def add(self, ref: Any, new: Any) -> None:
        """One sample's original ``ref`` and fold ``new`` (numpy arrays or array-likes)."""
        ref, new = np.asarray(ref), np.asarray(new)
        axis = self.channel_axis
        peaks = channel_peaks(ref, axis) if axis is not None else None
        self.include(measure(ref, new), dtype_name(ref.dtype), ref.size, peaks)

    def include(
        self, m: Measure, dtype: str, elements: int, peaks: np.ndarray | None = None
    ) -> None:
        """One sample's measure of this tensor (``peaks``: max |original| per channel)."""
        self.max_abs, self.scale = max(self.max_abs, m.max_abs), max(self.scale, m.scale)
        self.lowest, self.highest = min(self.lowest, m.lowest), max(self.highest, m.highest)
        self.dtype = dtype
        self.elements = max(self.elements, elements)
        if peaks is None:
            return
        if self.peaks is None or self.peaks.shape != peaks.shape:
            self.peaks = peaks
        else:
            self.peaks = np.maximum(self.peaks, peaks)

    def note_sample(self, changed: bool) -> None:
        """Whether a later sample's original values differed from the first sample's."""
        self.changes = bool(self.changes) or changed

    @property
    def evidence(self) -> bool:
        """The original took more than one value, and the inputs moved it (given several
        samples): agreeing with it means something."""
        return self.highest > self.lowest and self.changes is not False


@dataclass(frozen=True)
class Compared:
    """The tensors one comparison measured, each with its difference from the original.

    Attributes:
        outputs: the models' outputs, by name.
        sites: the fold sites' values.
        frontier: the continuous values feeding discontinuous ops (the scores and
            boxes going into NonMaxSuppression).
        every_site: every fold site was compared (a site inside a subgraph cannot
            be); only then can sites vouch for a discontinuous output.
    """

    outputs: Sequence[tuple[str, TensorDiff]]
    sites: Sequence[tuple[SiteValue, TensorDiff]] = ()
    frontier: Sequence[tuple[str, TensorDiff]] = ()
    every_site: bool = True


def judge(
    compared: Compared,
    cones: Cones,
    options: VerifyOptions,
    *,
    samples: int,
    level: str,
    inputs: str,
    noise: Mapping[str, float] | None = None,
    certificate: Certificate | None = None,
) -> VerifyResult:
    """The verdict: each output and site against its bound; discontinuous outputs by the evidence.

    A discontinuous output that differs beyond its bound passes only when every
    fold site and every frontier value (each continuous tensor that feeds a
    discontinuous op) lies within its own bound: then nothing before the jump
    moved more than a correct fold's rounding. Frontier values judge nothing
    else: a difference there fails only the outputs it would have vouched for.

    Args:
        samples, level, inputs: how the values were obtained (the result says so).
        noise: per compared tensor, how far (absolute) rounding-level nudges of
            the original moved it (:mod:`~bnfold.verification.calibrate`); a
            tensor's bound is then at least :data:`CALIBRATED_MARGIN` times that,
            relative to its scale.
        certificate: a proof of the folds; when it holds, a tensor beyond its
            bound but within :data:`PROOF_ENVELOPE` times it passes (``judged_by``
            "proof"): only rounding can have moved it.
    """
    bounds = _Bounds(cones, options, noise or {})
    site_rows = [bounds.row(s.value, d, site=s.site) for s, d in compared.sites]
    edge_rows = [bounds.row(n, d, site="feeds a discontinuous op") for n, d in compared.frontier]
    proven = certificate is not None and certificate.holds
    if proven:
        site_rows, edge_rows = _by_proof(site_rows), _by_proof(edge_rows)
    sites_hold = bool(site_rows) and compared.every_site and all(r.passed for r in site_rows)
    sites_hold = sites_hold and all(r.passed for r in edge_rows)
    rows = []
    for name, diff in compared.outputs:
        jumps = name in cones.discontinuous
        row = bounds.row(name, diff, calibrate=not jumps)
        if not row.passed and sites_hold and jumps:
            row = replace(row, passed=True, judged_by="sites")
        rows.append(row)
    if proven:
        rows = _by_proof(rows)
    passed = all(r.passed for r in rows) and all(r.passed for r in site_rows)
    used = options.rtol if options.rtol is not None else max((r.rtol for r in rows), default=0.0)
    result = VerifyResult(
        "passed" if passed else "failed", options.atol, used, samples, rows,
        optimization_level=level, inputs=inputs, sites=site_rows,
        derived=options.rtol is None, frontier=edge_rows, proven=proven,
    )  # fmt: skip
    return without_evidence(result)


def with_proof(result: VerifyResult, certificate: Certificate | None) -> VerifyResult:
    """``result`` judged proof first, sampling second; the certificate attached to it.

    A proof that found a difference (a site whose maps differ, a change outside the
    sites) fails the result, whatever sampling saw. A proof that holds verifies a
    fold sampling could not check (no runtime loads the original, no evidence, not
    sampled). Otherwise (a region the prover cannot model) sampling decides alone.
    Sampled differences within rounding of a holding proof were already judged by
    :func:`judge`.
    """
    if certificate is None:
        return result
    result.proof, result.proven = certificate, certificate.holds
    if certificate.refuted:
        result.status = "failed"
        result.reason = _joined(f"the proof found a difference {certificate.refutation()}", result)
    elif certificate.holds and result.status == "not_verified":
        result.status = "passed"
        result.reason = _joined("proven for all inputs; sampling did not verify", result)
    return result


def _joined(verdict: str, result: VerifyResult) -> str:
    return f"{verdict}: {result.reason}" if result.reason else verdict


def without_evidence(result: VerifyResult) -> VerifyResult:
    """``result``, "not_verified" (no_evidence) if it passed on constant tensors alone."""
    compared = [*result.outputs, *result.sites, *result.frontier]
    if result.status != "passed" or any(r.evidence for r in compared):
        return result
    result.status, result.reason_code = "not_verified", NotVerified.NO_EVIDENCE
    result.reason = (
        "every compared tensor was constant over the samples, so agreeing with the "
        "original proves nothing; pass --shape NAME:DIMS or --inputs FILES with inputs "
        "that make the model compute"
    )
    return result


def needs_calibration(result: VerifyResult) -> bool:
    """Whether a tensor went past a derived bound, where calibration could widen it."""
    if not result.derived or result.status != "failed":
        return False
    rows = [*result.outputs, *result.sites, *result.frontier]
    return any(not r.passed and math.isfinite(r.max_abs) for r in rows)


@dataclass(frozen=True)
class _Bounds:
    """Each compared tensor's bound: given, derived, or derived and calibrated."""

    cones: Cones
    options: VerifyOptions
    noise: Mapping[str, float]

    def row(
        self, name: str, diff: TensorDiff, site: str = "", calibrate: bool = True
    ) -> OutputDiff:
        rtol, basis = self._bound(name, diff, calibrate)
        if diff.scaled_by:
            basis += f"; scale max|{', '.join(diff.scaled_by)}|"
        row = measured(name, diff.max_abs, diff.scale, self.options.atol, rtol, basis, site)
        row = replace(row, evidence=diff.evidence)
        if site and diff.peaks is not None:
            channels, catches = _sensitivity(diff, self.options.atol, rtol)
            row = replace(row, channels=channels, catches=catches)
        return row

    def _bound(self, name: str, diff: TensorDiff, calibrate: bool) -> tuple[float, str]:
        if self.options.rtol is not None:
            return self.options.rtol, "--rtol"
        reductions = self.cones.of(name)
        rtol = derived_rtol(diff.dtype, reductions, diff.elements)
        basis = describe_basis(diff.dtype, reductions, diff.elements)
        moved = _relative(self.noise.get(name), diff.scale)
        if calibrate and moved is not None and CALIBRATED_MARGIN * moved > rtol:
            basis += (
                f"; calibrated: {CALIBRATED_MARGIN:g} x {moved:.3g}, the largest move of the "
                f"original rounded another way (derived {rtol:.3g})"
            )
            rtol = CALIBRATED_MARGIN * moved
        return rtol, basis


def _relative(moved: float | None, scale: float) -> float | None:
    """An absolute move as a fraction of the tensor's scale (None: not measured)."""
    if moved is None or scale <= 0:
        return None
    return moved / scale


def _sensitivity(diff: TensorDiff, atol: float, rtol: float) -> tuple[int, int]:
    """(channels of a site, those where a planted relative error would pass its bound).

    The planted error moves channel ``c`` by ``PLANTED_ERROR * peak_c``; it shows
    for certain when that exceeds the bound plus the difference already measured
    (which it might cancel).
    """
    assert diff.peaks is not None
    slack = atol + rtol * diff.scale + diff.max_abs
    return int(diff.peaks.size), int((PLANTED_ERROR * diff.peaks > slack).sum())


def _by_proof(rows: list[OutputDiff]) -> list[OutputDiff]:
    """Rows beyond their bound but within the proof's rounding envelope pass as proven."""
    return [
        replace(r, passed=True, judged_by="proof")
        if not r.passed and r.needed_rtol <= PROOF_ENVELOPE * r.rtol
        else r
        for r in rows
    ]


def measured(
    name: str, max_abs: float, scale: float, atol: float, rtol: float, basis: str, site: str = ""
) -> OutputDiff:
    """One compared tensor's row: passes when ``max_abs <= atol + rtol * scale``."""
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    needed = max(0.0, (max_abs - atol) / scale) if scale > 0 else rel
    passed = bool(max_abs <= atol + rtol * scale)
    return OutputDiff(name, max_abs, rel, needed, passed, rtol=rtol, basis=basis, site=site)


# Elements compared at a time: the float64 views of one chunk, never of a whole output.
_COMPARE_CHUNK = 1 << 18


@dataclass(frozen=True)
class Measure:
    """One sample's comparison of a tensor: worst difference, scale and the original's range."""

    max_abs: float
    scale: float
    lowest: float
    highest: float


def abs_error(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(max |new - ref|, max |ref| over finite values): see :func:`measure`."""
    m = measure(ref, new)
    return m.max_abs, m.scale


def measure(ref: np.ndarray, new: np.ndarray) -> Measure:
    """Compare ``new`` with ``ref``; NaN where ref is not NaN counts as an infinite difference.

    Compared a chunk at a time, in float64: a 1 GB output costs a few MB more,
    not five float64 copies of itself. The range is over ``ref``'s finite values
    (integers and bools too: an index output that never changes is no evidence).
    """
    floating = ref.dtype.kind in "fc" or ref.dtype == ml_dtypes.bfloat16
    if not floating:
        lowest, highest = _range(ref)
        differs = ref.shape != new.shape or bool(np.any(ref != new))
        return Measure(
            float("inf") if ref.shape != new.shape else float(differs), 1.0, lowest, highest
        )
    if ref.shape != new.shape:
        lowest, highest = _range(ref)
        return Measure(float("inf"), _max_finite(ref), lowest, highest)
    r_flat, n_flat = ref.reshape(-1), new.reshape(-1)
    max_abs = scale = 0.0
    lowest, highest = math.inf, -math.inf
    for start in range(0, r_flat.size, _COMPARE_CHUNK):
        r = r_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        n = n_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        agree = (r == n) | (np.isnan(r) & np.isnan(n))  # also equal infinities
        with np.errstate(invalid="ignore"):  # inf - inf: handled by `agree`
            diff = np.where(agree, 0.0, np.abs(r - n))
        diff[np.isnan(diff)] = np.inf
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        finite = r[np.isfinite(r)]
        if finite.size:
            scale = max(scale, float(np.abs(finite).max()))
            lowest, highest = min(lowest, float(finite.min())), max(highest, float(finite.max()))
    return Measure(max_abs, scale, lowest, highest)


def _range(a: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) finite value of ``a``, chunk by chunk; (inf, -inf) when it has none."""
    flat = a.reshape(-1)
    lowest, highest = math.inf, -math.inf
    for start in range(0, flat.size, _COMPARE_CHUNK):
        r = flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        finite = r[np.isfinite(r)]
        if finite.size:
            lowest, highest = min(lowest, float(finite.min())), max(highest, float(finite.max()))
    return lowest, highest


def _max_finite(a: np.ndarray) -> float:
    flat = a.reshape(-1)
    best = 0.0
    for start in range(0, flat.size, _COMPARE_CHUNK):
        r = flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        best = max(best, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    return best


def same_values(a: Any, b: Any) -> bool:
    """Whether two samples' values of one tensor are identical (NaNs alike)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_ok = a.dtype.kind in "fc"
    return bool(np.array_equal(a, b, equal_nan=nan_ok))


def channel_peaks(ref: np.ndarray, axis: int) -> np.ndarray | None:
    """max |ref| per index of ``axis`` over finite values; None when ``axis`` does not fit.

    One channel at a time, so the float64 copy is a channel's, not the tensor's.
    """
    if not -ref.ndim <= axis < ref.ndim or ref.size == 0:
        return None
    peaks = np.zeros(ref.shape[axis])
    for c in range(ref.shape[axis]):
        values = np.take(ref, c, axis=axis).astype(np.float64)
        finite = values[np.isfinite(values)]
        peaks[c] = float(np.abs(finite).max(initial=0.0))
    return peaks
