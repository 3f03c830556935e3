"""Dataclasses for everything bnfold prints or saves.

Reason codes are stable strings: tests, pipelines and JSON consumers match on
them. The ``detail`` text beside a code is for people and may change.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

# LowerForm is re-exported: the fronts read the lowering vocabulary from the report types.
from bnfold.options import LowerForm as LowerForm
from bnfold.options import Rounding


class Code(str, enum.Enum):
    """Why a site was left unchanged."""

    TRAINING_MODE = "training_mode"
    """BatchNorm runs in training mode (attribute, extra outputs or module.train())."""
    NO_RUNNING_STATS = "no_running_stats"
    """BatchNorm has no running statistics (track_running_stats=False)."""
    NOT_CONSTANT = "not_constant"
    """A weight, bias or affine parameter is not a known constant."""
    BRANCHING = "branching"
    """The linear op's output is also read elsewhere or is a graph output."""
    SHARED_WEIGHT = "shared_weight"
    """The weight or bias is also read by another node."""
    REUSED_MODULE = "reused_module"
    """The linear module is called more than once in forward()."""
    NOT_PER_CHANNEL = "not_per_channel"
    """The affine does not act per output channel of the linear op."""
    ZERO_PADDING = "zero_padding"
    """Folding before a zero-padded op with a nonzero shift would change the borders."""
    NONLINEAR_INPUT = "nonlinear_input"
    """The BatchNorm's input comes from a nonlinearity, not a linear op."""
    STANDALONE = "standalone"
    """No linear op feeds the BatchNorm; nothing to fold it into."""
    BAD_VALUES = "bad_values"
    """NaN or inf in the parameters, or var + eps <= 0."""
    BAD_SHAPE = "bad_shape"
    """Parameter shapes do not match the channel count."""
    BAD_GROUPS = "bad_groups"
    """Channel count is not divisible by the op's group count."""
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    """Weights are not floating point."""
    PARAMETRIZED = "parametrized"
    """The weight is parametrized or tied to another module."""
    VERIFICATION_FAILED = "verification_failed"
    """The fold changed the outputs beyond tolerance and was rolled back."""
    OP_BETWEEN = "op_between"
    """Another op (not a nonlinearity) sits between the linear op and the BatchNorm."""
    UNTRACEABLE = "untraceable"
    """No finder could see what feeds the BatchNorm, or it did not run on the inputs."""
    HOOKED = "hooked"
    """The module has forward hooks that the fold would bypass or feed other values."""
    UNKNOWN_RANK = "unknown_rank"
    """Lowering: the BatchNorm's input rank is unknown, so no constant shape broadcasts safely."""
    MERGE_MOVES_CHANNEL = "merge_moves_channel"
    """A reshape merging the batch axis does not keep the linear op's channels last."""
    BRANCH_MISMATCH = "branch_mismatch"
    """Summed conv branches differ in strides, dilations, groups, channels or auto_pad."""
    UNCENTRED_TAP = "uncentred_tap"
    """A smaller kernel or identity tap cannot sit centred in the largest kernel of a sum."""
    POOL_PADDING = "pool_padding"
    """An AveragePool counts padded zeros, so a BN shift after it does not pass through."""
    NEGATIVE_SCALE = "negative_scale"
    """A BN after a MaxPool has a negative scale; max does not commute with it."""
    NOT_LINEAR_TERM = "not_linear_term"
    """An input of the Add/Concat before a BN is not a Conv/ConvTranspose/Gemm of its own."""


class FoldKind(str, enum.Enum):
    """What kind of rewrite removed an affine (``Folded.kind``)."""

    ADJACENT = "adjacent"
    """Into the linear op beside it (also through a shape-only op)."""
    IDENTITY_TAP = "identity_tap"
    """An identity BN branch of a sum, as a centred per-channel kernel tap."""
    REPARAM = "reparam"
    """Summed conv branches reading one input, merged into one Conv."""
    BATCH_MERGE = "batch_merge"
    """Through a reshape that merges the batch with other axes, channels last."""
    THROUGH_POOL = "through_pool"
    """Into the op before a pool that commutes with the BN."""
    OVER_ADD = "over_add"
    """After an Add of linear ops: the scale into each, the shift into one."""
    OVER_CONCAT = "over_concat"
    """After a channel Concat of linear ops: each takes its own channels."""


@dataclass(frozen=True)
class Folded:
    """One fold that was made."""

    site: str  # "conv1 -> bn1"
    pattern: str  # "Conv+BatchNormalization"
    linear: str  # name of the op that now carries the affine
    affine: str  # name of the op that was removed
    finder: str = ""  # torch front: which graph finder found the pair
    bytes_added: int = 0  # weight bytes added by cloning a shared weight
    kind: FoldKind = FoldKind.ADJACENT
    # ONNX: the value that carries the site's result in both models (the removed
    # affine's output, which the linear op now computes; folding before, the op's
    # own output). Verification compares it.
    value: str = ""


@dataclass(frozen=True)
class Lowered:
    """One BatchNormalization that could not fold, rewritten as plain ops."""

    site: str  # the BatchNorm's name
    form: LowerForm  # what it became (mul-add when conv was asked but cannot apply)
    code: Code  # why it could not fold
    detail: str  # the fold's refusal, for people
    note: str = ""  # why ``form`` is not the one asked for, if it is not


@dataclass
class BatchNormCount:
    """What became of the inference BatchNorms of one run: ``found = folded + lowered + left``.

    ``left_by_code`` counts the BNs still in the output by the code of their refusal;
    training-mode BNs (torch: also those without running statistics, which use
    batch statistics too) are never touched and are counted apart, not in ``found``.
    """

    found: int = 0
    folded: int = 0
    lowered: int = 0
    left: int = 0
    left_by_code: dict[str, int] = field(default_factory=dict)
    training: int = 0

    @classmethod
    def of(cls, found: int, training: int, lowered: int, left_codes: list[Code]) -> BatchNormCount:
        """Counts from the BNs found, the number lowered and each left BN's refusal code."""
        by_code = Counter(code.value for code in left_codes)
        left = len(left_codes)
        return cls(
            found, found - lowered - left, lowered, left, dict(sorted(by_code.items())), training
        )

    def table(self, dry_run: bool = False) -> str:
        """A short table: found, folded, lowered, left, then one row per code of those left."""
        rows = [
            ("BatchNorm (inference)", ""),
            ("found", str(self.found)),
            ("would fold" if dry_run else "folded", str(self.folded)),
            ("would lower" if dry_run else "lowered", str(self.lowered)),
            ("left", str(self.left)),
        ]
        rows += [(f"  {code}", str(n)) for code, n in self.left_by_code.items()]
        if self.training:
            rows.append(("training mode, untouched", str(self.training)))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"  {label:<{width}}  {n:>5}".rstrip() for label, n in rows)


@dataclass(frozen=True)
class Refusal:
    """One site left unchanged, and why."""

    site: str
    code: Code
    detail: str

    def not_lowered(self, code: Code, why: str) -> Refusal:
        """This refusal of a fold, for a BatchNorm that could not be lowered either."""
        return Refusal(self.site, code, f"{self.detail}; not lowered: {why}")


@dataclass
class FoldReport:
    """What one fold run did. Both fronts fill the same structure."""

    front: str
    dry_run: bool = False  # inspect: nothing was changed, "folded" means "would fold"
    folded: list[Folded] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    rounding: Rounding = Rounding.NEAREST  # how folded weights were cast to their dtype
    lowered: list[Lowered] = field(default_factory=list)  # BNs that could not fold, lowered
    batchnorm: BatchNormCount | None = None  # what became of each inference BN

    @property
    def codes(self) -> list[Code]:
        return [r.code for r in self.refused]

    def to_dict(self) -> dict[str, Any]:
        jsonable: dict[str, Any] = _jsonable(asdict(self))
        return jsonable

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        verb = "would fold" if self.dry_run else "folded"
        lower_verb = "would lower" if self.dry_run else "lowered"
        counts = f"{verb} {len(self.folded)}, refused {len(self.refused)}"
        if self.lowered:
            counts += f", {lower_verb} {len(self.lowered)}"
        head = f"{counts} ({self.front})"
        if self.rounding is not Rounding.NEAREST:
            head += f", {self.rounding.value} rounding"
        lines = [head]
        lines += [f"  {verb}  {f.site}  [{f.pattern}]" for f in self.folded]
        lines += [f"  refused {r.site}  {r.code.value}: {r.detail}" for r in self.refused]
        lines += [
            f"  {lower_verb} {lo.site}  [{lo.form.value}] {lo.code.value}: {lo.detail}"
            + (f" ({lo.note})" if lo.note else "")
            for lo in self.lowered
        ]
        if self.ops_before:
            lines.append(op_count_table(self.ops_before, self.ops_after))
        if self.batchnorm is not None:
            lines.append(self.batchnorm.table(self.dry_run))
        if not (self.dry_run or self.folded or self.lowered):
            lines.append("  nothing folded or lowered: the model is unchanged")
        return "\n".join(lines)


def op_count_table(before: dict[str, int], after: dict[str, int]) -> str:
    """A plain before/after table of op counts, changed rows first."""
    ops = sorted(set(before) | set(after), key=lambda op: (before.get(op) == after.get(op), op))
    width = max([len(op) for op in ops] + [2])
    rows = [f"  {'op':<{width}}  before  after"]
    for op in ops:
        b, a = before.get(op, 0), after.get(op, 0)
        rows.append(f"  {op:<{width}}  {b:>6}  {a:>5}" + ("" if a == b else "  *"))
    return "\n".join(rows)


def count_ops(op_types: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(op_types).items()))


class NotVerified(str, enum.Enum):
    """Why a comparison could not be made (``VerifyResult.status`` "not_verified")."""

    ORIGINAL_NOT_RUNNABLE = "original_not_runnable"
    """No runtime can load the original model (a custom op, an unknown opset)."""
    INPUTS_TOO_LARGE = "inputs_too_large"
    """One sample of random inputs would exceed the byte cap; nothing was allocated."""
    INPUTS_UNUSABLE = "inputs_unusable"
    """The original failed on every input bnfold made; ``--shape`` or ``--inputs`` can fix that."""
    NO_EVIDENCE = "no_evidence"
    """Every compared tensor was constant over the samples: their agreement proves nothing."""
    NOT_SAMPLED = "not_sampled"
    """The models were not run (``verify --prove --no-sample``): only the proof judges."""
    OUTPUT_NOT_COMPARED = "output_not_compared"
    """An output leaf is an object no tensor comparison reaches (an unregistered class)."""


# The relative error a sensitivity figure plants in one output channel of a fold site.
PLANTED_ERROR = 1e-3


@dataclass(frozen=True)
class FedInput:
    """One model input as verification fed it: name, dtype and each distinct shape."""

    name: str
    dtype: str
    shapes: list[list[int]]

    def line(self) -> str:
        dims = ", ".join("x".join(map(str, s)) or "scalar" for s in self.shapes)
        return f"{self.name} {dims} {self.dtype}"


@dataclass(frozen=True)
class OutputDiff:
    """How far one compared tensor of the fold (an output, a site's value) is from the original."""

    name: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|: the error relative to the output's scale
    needed_rtol: float  # the smallest rtol (with the given atol) that would pass
    passed: bool
    rtol: float = 0.0  # the bound it was held to (relative to max|reference|)
    basis: str = ""  # how that bound came about: "float32, K=... over D reductions, M elements"
    site: str = ""  # for a site: the fold, "conv1 -> bn1"
    # "bound": within its own bound (or not); "sites": a discontinuous output
    # (after NonMaxSuppression, TopK, ...) that differs, vouched for by every fold
    # site lying within its bound; "proof": beyond its bound but within the
    # rounding envelope of folds a certificate proves.
    judged_by: str = "bound"
    # False when the original's values were one constant over every sample (all
    # zeros, say): agreement there proves nothing about the fold.
    evidence: bool = True
    # Sites: output channels, and in how many of them a planted relative error of
    # PLANTED_ERROR would have gone past the bound on these inputs.
    channels: int = 0
    catches: int = 0

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        if self.judged_by == "sites":
            verdict = "ok: differs after a discontinuous op, every fold site within its bound"
        elif self.judged_by == "proof":
            verdict = "ok: within the rounding envelope of proven folds"
        if not self.evidence:
            verdict += " (no evidence: constant over the samples)"
        label = f"{self.name} ({self.site})" if self.site else self.name
        return (
            f"{label}: max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g}"
            f" needed_rtol={self.needed_rtol:.3g} bound={self.rtol:.3g} [{self.basis}] {verdict}"
        )


class Proof(Protocol):
    """What a report needs of a proof for all inputs (:class:`bnfold.proof.Certificate`)."""

    @property
    def holds(self) -> bool: ...

    @property
    def refuted(self) -> bool: ...

    def headline(self) -> str: ...

    def refutation(self) -> str: ...

    def summary(self, proven_rows: bool = True) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class VerifyResult:
    """Outcome of comparing an original and a folded model: the proof, then sampling.

    ``status`` is "passed", "failed" or "not_verified" (nothing established: the
    models could not be compared and no proof holds; ``reason_code`` says why,
    ``reason`` in words). ``outputs`` holds every model output, ``sites`` every
    fold site compared (the value the folded op now computes against the value the
    removed BatchNorm computed). ``proof``, when one was made, decides first
    (:func:`bnfold.verification.verdict.with_proof`): a difference it found fails
    the result, and a proof that holds passes a fold sampling could not check.
    """

    status: str
    atol: float
    rtol: float
    samples: int
    outputs: list[OutputDiff] = field(default_factory=list)
    reason: str = ""
    optimization_level: str = "ORT_DISABLE_ALL"
    reason_code: NotVerified | None = None  # set with status "not_verified"
    inputs: str = ""  # what was fed: "random (3 samples, seed 0)", "file x.npz (1 sample)"
    sites: list[OutputDiff] = field(default_factory=list)
    derived: bool = False  # each tensor's rtol derived from its dtype and reductions
    # ONNX: the continuous values feeding a discontinuous op (NonMaxSuppression,
    # TopK...): with the sites, the evidence for an output that jumps.
    frontier: list[OutputDiff] = field(default_factory=list)
    fed: list[FedInput] = field(default_factory=list)  # each input's shapes, as fed
    shapes_note: str = ""  # how dynamic dimensions were sized, for random inputs
    proven: bool = False  # a certificate proved every fold site (see judged_by "proof")
    proof: Proof | None = None  # the proof for all inputs this result was judged with

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def worst_site(self) -> OutputDiff | None:
        """The site closest to (or furthest past) its bound."""
        return max(self.sites, key=lambda r: (_margin(r), r.max_rel), default=None)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _jsonable(asdict(replace(self, proof=None)))
        data["proof"] = self.proof.to_dict() if self.proof is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self, proven_rows: bool = True) -> str:
        """The proof's summary (if one was made), then the sampled comparison.

        ``proven_rows`` False lists only the sites the proof did not prove (a fold's
        report already lists every site).
        """
        sampled = self._sampled_summary()
        if self.proof is None:
            return sampled
        return f"{self.proof.summary(proven_rows)}\n{sampled}"

    def _sampled_summary(self) -> str:
        compared = [*self.outputs, *self.sites, *self.frontier]
        if not compared:
            if self.status == "not_verified":
                return "\n".join([f"NOT VERIFIED: {self.reason}", *self._fed_lines()])
            # Decided by the proof alone: the reason says what sampling could not do.
            status = self.status.upper()
            return "\n".join([f"verification {status}: {self.reason}", *self._fed_lines()])
        rtol = "rtol derived per tensor" if self.derived else f"rtol={self.rtol:g}"
        fed = self.inputs or f"{self.samples} samples"
        status = "NOT VERIFIED" if self.status == "not_verified" else self.status.upper()
        head = (
            f"verification {status} ({fed}, {self.optimization_level}, atol={self.atol:g}, {rtol})"
        )
        rows = self._fed_lines() + [f"  {o.line()}" for o in self.outputs]
        rows += self._site_lines()
        rows += _frontier_lines(self.frontier)
        rows += self._sensitivity_lines()
        return "\n".join([head, *rows] + ([f"  {self.reason}"] if self.reason else []))

    def _fed_lines(self) -> list[str]:
        if not self.fed:
            return []
        note = f" ({self.shapes_note})" if self.shapes_note else ""
        return [f"  fed: {'; '.join(i.line() for i in self.fed)}{note}"]

    @property
    def sensitivity(self) -> tuple[int, int]:
        """(sites where a PLANTED_ERROR in any one channel goes past the bound, sites measured)."""
        measured = [s for s in self.sites if s.channels]
        return sum(s.catches == s.channels for s in measured), len(measured)

    def _sensitivity_lines(self) -> list[str]:
        every, measured = self.sensitivity
        if not measured:
            return []
        line = (
            f"  sensitivity: a {PLANTED_ERROR:g} relative error in any one output channel "
            f"would be caught at {every} of {measured} sites"
        )
        partial = [s for s in self.sites if s.channels and s.catches < s.channels]
        if partial:
            worst = min(partial, key=lambda s: s.catches / s.channels)
            line += f"; worst {worst.site or worst.name}: in {worst.catches} of {worst.channels}"
        return [line]

    def _site_lines(self) -> list[str]:
        if not self.sites:
            return []
        failed = [s for s in self.sites if not s.passed]
        if not failed:
            worst = self.worst_site
            assert worst is not None
            n = len(self.sites)
            return [f"  sites: {n} compared, all within their bounds; worst {worst.line()}"]
        lines = [f"  sites: {len(failed)} of {len(self.sites)} beyond their bounds:"]
        return lines + [f"    {s.line()}" for s in failed]


def _frontier_lines(rows: list[OutputDiff]) -> list[str]:
    if not rows:
        return []
    failed = [r for r in rows if not r.passed]
    if not failed:
        worst = max(rows, key=lambda r: (_margin(r), r.max_rel))
        n = len(rows)
        return [f"  before discontinuous ops: {n} values within their bounds; worst {worst.line()}"]
    lines = [f"  before discontinuous ops: {len(failed)} of {len(rows)} beyond their bounds:"]
    return lines + [f"    {r.line()}" for r in failed]


def _margin(row: OutputDiff) -> float:
    """How much of its bound a tensor used (over 1: past it)."""
    if row.rtol > 0:
        return row.needed_rtol / row.rtol
    return float("inf") if row.needed_rtol > 0 else 0.0


@dataclass
class FoldResult:
    """A folded model and the report of what was done.

    ``model`` is an ``onnx_ir.Model`` on the ONNX front and an ``nn.Module`` on
    the torch front. ``verification`` is filled when verification ran.
    """

    model: Any
    report: FoldReport
    verification: VerifyResult | None = None

    @property
    def modified(self) -> bool:
        return bool(self.report.folded or self.report.lowered)

    def publishable(self, require_verified: bool = False) -> bool:
        """Whether the folded model may be written.

        Never after a failed verification; not after one that could not be made
        ("not_verified") when ``require_verified``. A result that was not asked
        to be verified (``verification`` None) is publishable.
        """
        if self.verification is None:
            return True
        if self.verification.status == "not_verified":
            return not require_verified
        return self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"report": self.report.to_dict()}
        out["verification"] = self.verification.to_dict() if self.verification else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _jsonable(obj: Any) -> Any:
    """Enums to their values, floats that JSON can't hold to strings."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    return obj
