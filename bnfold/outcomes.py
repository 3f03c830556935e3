"""What the API's entry points return to the CLI: outcomes with an exit code and a JSON report.

Each top-level outcome knows its exit code (0 ok, 1 kept back or over a gate,
2 bad input) and its JSON object (:mod:`bnfold.json_report`), so the CLI only
prints and exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bnfold.json_report import envelope
from bnfold.report import FoldReport, FoldResult, VerifyResult

if TYPE_CHECKING:
    from bnfold.bench_report import BenchReport


class Progress(Protocol):
    """Told what a long run is doing: a step (``total`` 0) or ``done`` of ``total`` items."""

    def __call__(self, text: str, done: int = 0, total: int = 0) -> None: ...


@dataclass
class FoldOutcome:
    """What :func:`bnfold.api.fold_path` did with one model: the fold, and every file it wrote.

    ``written`` is False when the library kept the output back: the verification
    (the proof for all inputs, then the sampled check) failed, or could not be made
    and verified folds were required.
    """

    result: FoldResult
    output: str
    written: bool
    # Every file written, as the caller spelled the output: the model, its external
    # data, --to-onnx (and its data), then the report. Nothing of the model's when
    # it was kept back; the report is written either way.
    files: list[str] = field(default_factory=list)
    bench: BenchReport | None = None  # FoldOptions.bench_levels: the written output timed
    # Why a file is not where users expect it (external data kept at an interim name).
    notes: list[str] = field(default_factory=list)

    def exit_code(self) -> int:
        """0 when written and verified (or not verifiable), 1 when kept back or failed."""
        failed = self.result.verification is not None and self.result.verification.failed
        return 0 if self.written and not failed else 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (docs/json-report.md): what ``--json`` prints and ``--report`` saves."""
        body = {**self.result.to_dict(), "output": self.output, "written": self.written}
        body["files"] = list(self.files)
        body["notes"] = list(self.notes)
        if self.bench is not None:
            body["bench"] = self.bench.to_dict()
        return envelope("fold", self.exit_code(), body)

    def summary(self) -> str:
        """The report, the verification, what was written (or why not) and the timing."""
        lines = [self.result.report.summary()]
        verification = self.result.verification
        if verification is not None:
            lines.append(verification.summary(proven_rows=False))
        if not self.written:
            lines.append(_nothing_written(verification))
        lines += [f"wrote {path}" for path in self.files]
        lines += [f"note: {note}" for note in self.notes]
        if self.bench is not None:
            lines.append(self.bench.summary())
        return "\n".join(lines)


def _nothing_written(verification: VerifyResult | None) -> str:
    """Why an output was kept back: a failed or (with --strict) a missing verification."""
    if verification is not None and verification.status == "not_verified":
        return f"not verified ({verification.reason}); --strict: nothing written"
    proof = verification.proof if verification is not None else None
    if proof is not None and proof.refuted:
        return f"the proof found a difference {proof.refutation()}: nothing written"
    return "verification FAILED: nothing written"


@dataclass
class Inspection:
    """:func:`bnfold.api.inspect` of one model named on the command line, held to ``max_left``.

    ``max_left`` is a gate for pipelines: at most that many inference
    BatchNorms may be left unfolded (after lowering, when it is previewed).
    """

    model: str
    report: FoldReport | None = None
    error: str = ""  # one line, when the model could not be inspected
    max_left: int | None = None

    @property
    def left(self) -> int:
        """Inference BatchNorms the fold would leave in the model."""
        counts = self.report.batchnorm if self.report is not None else None
        return counts.left if counts is not None else 0

    @property
    def within_gate(self) -> bool:
        return self.max_left is None or self.left <= self.max_left

    def exit_code(self) -> int:
        """2 when the model could not be inspected, 1 when it leaves more than ``max_left``."""
        if self.error:
            return 2
        return 0 if self.within_gate else 1

    def gate(self) -> dict[str, Any] | None:
        """The ``--max-left`` verdict, or None without a gate."""
        if self.max_left is None:
            return None
        return {"max_left": self.max_left, "left": self.left, "passed": self.within_gate}

    def to_dict(self) -> dict[str, Any]:
        """The JSON report of one inspected model: the fold report at the top (with ``gate``)."""
        if self.report is None:
            raise ValueError(f"{self.model} was not inspected: {self.error}")
        body = {"model": self.model, **self.report.to_dict()}
        if (gate := self.gate()) is not None:
            body["gate"] = gate
        return envelope("inspect", self.exit_code(), body)

    def item(self) -> dict[str, Any]:
        """This model as one of several: the fold report nested, or the error."""
        item = {"model": self.model, "exit_code": self.exit_code()}
        item["report"] = self.report.to_dict() if self.report is not None else None
        if (gate := self.gate()) is not None and self.report is not None:
            item["gate"] = gate
        if self.error:
            item["error"] = self.error
        return item

    def summary(self) -> str:
        if self.report is None:
            return f"{self.model}: {self.error}"
        lines = [self.report.summary()]
        if self.max_left is not None:
            verdict = "within" if self.within_gate else "more than"
            noun = "BatchNorm" if self.left == 1 else "BatchNorms"
            lines.append(
                f"{self.left} inference {noun} would be left: {verdict} --max-left {self.max_left}"
            )
        return "\n".join(lines)


@dataclass
class InspectRun:
    """Every model ``bnfold inspect`` was given, in order."""

    inspections: list[Inspection]

    def exit_code(self) -> int:
        """The worst model's: 2 if any could not be inspected, 1 if any is over the gate."""
        return max((i.exit_code() for i in self.inspections), default=0)

    def to_dict(self) -> dict[str, Any]:
        """One model: its report at the top; several: ``models``, one item each."""
        if len(self.inspections) == 1:
            return self.inspections[0].to_dict()
        models = [inspection.item() for inspection in self.inspections]
        return envelope("inspect", self.exit_code(), {"models": models})


def tell(progress: Progress | None, text: str, done: int = 0, total: int = 0) -> None:
    """Tell ``progress`` (if any) what is being done."""
    if progress is not None:
        progress(text, done, total)
