"""Fold every ONNX model in a folder, in parallel processes, past individual failures.

Each model is folded by :func:`bnfold.api.fold_path` (atomic, verified save), so
two runs writing into the same output folder never leave a mixed or partial
file: the last rename wins, whole. A model that fails (bad file, verification
failure, even a crashed worker) is recorded and the others carry on; so is one
that could not be verified when verified folds are required (nothing written).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bnfold import quiet
from bnfold.errors import BnfoldError
from bnfold.json_report import envelope
from bnfold.options import FoldOptions

MODEL_SUFFIX = ".onnx"

# Per-model status; EXIT_CODES maps each to the CLI's exit code.
OK, NOT_VERIFIED, VERIFY_FAILED, ERROR = "ok", "not_verified", "verify_failed", "error"
EXIT_CODES = {OK: 0, NOT_VERIFIED: 0, VERIFY_FAILED: 1, ERROR: 2}


@dataclass
class ModelOutcome:
    """What happened to one model of the folder."""

    source: str  # relative to the model folder
    output: str  # relative to the output folder
    status: str  # ok | not_verified | verify_failed | error
    folded: int = 0
    refused: int = 0
    lowered: int = 0  # BNs that could not fold, lowered (lower_standalone)
    bn_left: int = 0  # inference BNs still in the output
    written: bool = False
    files: list[str] = field(default_factory=list)  # every file written for this model
    error: str = ""  # one line, for status "error"
    seconds: float = 0.0
    result: dict[str, Any] | None = None  # FoldResult.to_dict() when the fold ran

    def exit_code(self) -> int:
        if self.status == NOT_VERIFIED and not self.written:
            return 1  # discarded because verified folds were required (--strict)
        return EXIT_CODES[self.status]


@dataclass
class BatchReport:
    """Every model's outcome, in folder order."""

    model_dir: str
    out_dir: str
    jobs: int
    outcomes: list[ModelOutcome] = field(default_factory=list)
    seconds: float = 0.0
    report_path: str | None = None  # where the report itself is saved, if it is

    def files(self) -> list[str]:
        """Every file the run wrote: each model's, in folder order, then the report."""
        written = [path for outcome in self.outcomes for path in outcome.files]
        return written + ([self.report_path] if self.report_path else [])

    def exit_code(self) -> int:
        """0 if every model was written, 1 if any failed or lacked verification, 2 if any erred."""
        return max((o.exit_code() for o in self.outcomes), default=0)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((OK, NOT_VERIFIED, VERIFY_FAILED, ERROR), 0)
        for outcome in self.outcomes:
            counts[outcome.status] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (docs/json-report.md): what ``--json`` prints and ``--report`` saves."""
        body = {**asdict(self), "counts": self.counts(), "files": self.files()}
        return envelope("fold", self.exit_code(), body)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def find_models(model_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Every ``*.onnx`` file under ``model_dir``, sorted, as paths relative to it.

    Hidden files and folders (including bnfold's own staging folders) are
    skipped, and so is ``out_dir`` when it lies inside ``model_dir``.
    """
    found = []
    skip = out_dir.resolve() if out_dir is not None else None
    for root, dirs, files in os.walk(model_dir):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip)
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or not name.endswith(MODEL_SUFFIX) or not path.is_file():
                continue
            found.append(path.relative_to(model_dir))
    return found


def fold_one(
    source: str, output: str, rel_source: str, rel_output: str, options: FoldOptions
) -> ModelOutcome:
    """Fold one model file; never raises: failures become an outcome with one line."""
    from bnfold.api import FoldOutcome, fold_path

    start = time.perf_counter()
    outcome = ModelOutcome(rel_source, rel_output, ERROR)
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        folded = fold_path(source, output, options)
        assert isinstance(folded, FoldOutcome)  # a file, not a folder
    except PermissionError:
        outcome.error = f"cannot write to {str(Path(output).parent)!r}: permission denied"
    except BnfoldError as err:
        outcome.error = _one_line(str(err))
    except Exception as err:  # a bug or onnxruntime failure must not stop the batch
        outcome.error = _one_line(f"{type(err).__name__}: {err}")
    else:
        result = folded.result
        outcome.folded = len(result.report.folded)
        outcome.refused = len(result.report.refused)
        outcome.lowered = len(result.report.lowered)
        counts = result.report.batchnorm
        outcome.bn_left = counts.left if counts is not None else 0
        outcome.written = folded.written
        outcome.files = folded.files
        outcome.result = result.to_dict()
        status = result.verification.status if result.verification else "passed"
        outcome.status = {"passed": OK, "not_verified": NOT_VERIFIED}.get(status, VERIFY_FAILED)
    outcome.seconds = time.perf_counter() - start
    return outcome


def fold_directory(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: FoldOptions | None = None,
    *,
    on_start: Callable[[int], None] | None = None,
    on_done: Callable[[ModelOutcome], None] | None = None,
) -> BatchReport:
    """Fold every model under ``model_dir`` into the same relative path under ``out_dir``.

    Args:
        model_dir: folder searched (recursively) for ``*.onnx``.
        out_dir: where folded models go; created if its parent exists.
        options: how every model is folded, verified and written
            (:func:`bnfold.api.fold_path`); ``jobs`` worker processes (1 folds
            in this process). With ``require_verified`` a model that could not
            be verified is reported "not_verified" with ``written`` False, the
            others are still written. The report is not written here:
            :func:`write_report`.
        on_start: called once with the number of models found.
        on_done: called after each model, in completion order (progress bars).

    Returns:
        The report, outcomes in folder order.

    Raises:
        BnfoldError: the folders are unusable or no model was found.
    """
    options = options or FoldOptions()
    src, dst = Path(model_dir), Path(out_dir)
    _require_folders(src, dst)
    models = find_models(src, dst)
    if not models:
        raise BnfoldError(f"no *{MODEL_SUFFIX} models in {str(src)!r}")
    _create_out_dir(dst)
    report = BatchReport(str(src), str(dst), options.jobs)
    if on_start is not None:
        on_start(len(models))
    each = replace(options, report_path=None)  # one report, for the folder
    tasks = [
        (str(src / rel), str(dst / rel), rel.as_posix(), rel.as_posix(), each) for rel in models
    ]
    start = time.perf_counter()
    if options.jobs <= 1:
        done = _run_serial(tasks, on_done)
    else:
        done = _run_pool(tasks, options.jobs, on_done)
    report.outcomes = [done[task[2]] for task in tasks]
    report.seconds = time.perf_counter() - start
    return report


def write_report(report: BatchReport, path: str | os.PathLike[str]) -> None:
    """Write the JSON report atomically (concurrent runs may share a report path too)."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bnfold-report-", dir=target.parent or ".")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(report.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        with contextlib.suppress(Exception):
            os.unlink(tmp)
        raise BnfoldError(f"cannot write report {str(target)!r}: {err.strerror or err}") from None


Task = tuple[str, str, str, str, FoldOptions]  # source, output, both relative, options


def _run_serial(
    tasks: Iterable[Task], on_done: Callable[[ModelOutcome], None] | None
) -> dict[str, ModelOutcome]:
    done = {}
    for task in tasks:
        outcome = fold_one(*task)
        done[task[2]] = outcome
        if on_done is not None:
            on_done(outcome)
    return done


def _run_pool(
    tasks: list[Task], jobs: int, on_done: Callable[[ModelOutcome], None] | None
) -> dict[str, ModelOutcome]:
    """Fold in ``jobs`` processes; models whose worker died are retried one per pool.

    A crashed worker (segfault, OOM kill) breaks a whole ProcessPoolExecutor, so
    the models still pending are rerun each in a fresh single-worker pool: the
    one that crashes again is reported as such, the others fold.
    """
    done: dict[str, ModelOutcome] = {}
    broken = _pool_pass(tasks, min(jobs, len(tasks)), done, on_done)
    for task in broken:
        if _pool_pass([task], 1, done, on_done):
            outcome = ModelOutcome(task[2], task[3], ERROR, error="the worker process died")
            done[task[2]] = outcome
            if on_done is not None:
                on_done(outcome)
    return done


def _pool_pass(
    tasks: list[Task],
    workers: int,
    done: dict[str, ModelOutcome],
    on_done: Callable[[ModelOutcome], None] | None,
) -> list[Task]:
    """Run ``tasks``; return those lost to a dead worker."""
    # spawn, not fork: a forked child inherits whatever threads (onnxruntime,
    # BLAS) the parent started, and may deadlock on their locks.
    context = multiprocessing.get_context("spawn")
    lost = []
    pool = ProcessPoolExecutor(workers, context, initializer=quiet.for_worker())
    with pool:
        futures: dict[Future[ModelOutcome], Task] = {
            pool.submit(fold_one, *task): task for task in tasks
        }
        for future in as_completed(futures):
            task = futures[future]
            try:
                outcome = future.result()
            except BrokenProcessPool:
                lost.append(task)
                continue
            except Exception as err:  # unpicklable result or the like: record, go on
                outcome = ModelOutcome(task[2], task[3], ERROR, error=_one_line(repr(err)))
            done[task[2]] = outcome
            if on_done is not None:
                on_done(outcome)
    return lost


def _require_folders(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise BnfoldError(f"{str(src)!r} is not a folder")
    if dst.exists() and not dst.is_dir():
        raise BnfoldError(f"output {str(dst)!r} exists and is not a folder")
    if dst.exists() and dst.resolve() == src.resolve():
        raise BnfoldError("the output folder is the model folder; folding in place is per file")
    if not dst.exists() and not dst.parent.is_dir():
        raise BnfoldError(f"output folder's parent {str(dst.parent)!r} does not exist")


def _create_out_dir(dst: Path) -> None:
    if not dst.exists():
        try:
            dst.mkdir(exist_ok=True)
        except OSError as err:
            raise BnfoldError(f"cannot create {str(dst)!r}: {err.strerror or err}") from None


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else "unknown error"
