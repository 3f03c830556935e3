"""The Python API: fold, inspect and verify, for ONNX files/models and torch modules.

:func:`fold_path` is the one entry point that writes: it takes a path (an ONNX
file, a folder of them, a ``.pt2`` program, a module factory) or a model object
and a :class:`~bnfold.options.FoldOptions`, and routes them to the front that
folds that kind of model. :func:`fold` folds in memory, :func:`inspect` reports
without changing anything and :func:`verify` compares two models; each
dispatches on what it is given the same way. torch is imported only when a
torch object, file or factory is passed, so the ONNX path works without it.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import onnx_ir as ir

from bnfold import paths
from bnfold.affine import Rounding
from bnfold.compare import (
    MAX_INPUT_BYTES,
    SiteValue,
    VerifyOptions,
    require_well_formed,
    verify_onnx,
)
from bnfold.errors import BnfoldError
from bnfold.onnx_front import io
from bnfold.onnx_front.lower import lower_unfolded
from bnfold.onnx_front.match import MatchOptions
from bnfold.onnx_front.passes import FoldAffinePass, FoldPassResult
from bnfold.options import FoldOptions, lower_form_of, rounding_of
from bnfold.report import FoldReport, FoldResult, LowerForm, VerifyResult

if TYPE_CHECKING:
    from bnfold.batch import BatchReport
    from bnfold.bench import BenchReport

TORCH_SUFFIXES = (".pt2", ".pt", ".pth")


class SourceKind(str, enum.Enum):
    """What a fold starts from; :func:`kind_of` tells them apart, the router acts on it."""

    ONNX_FILE = "onnx_file"
    FOLDER = "folder"  # every *.onnx under it
    TORCH_FILE = "torch_file"  # a .pt2 program (a .pt/.pth state_dict is refused with the fix)
    FACTORY = "factory"  # a module factory with its weights: torch_front.files.ModuleSource
    ONNX_MODEL = "onnx_model"  # an onnx_ir.Model or onnx.ModelProto
    TORCH_MODULE = "torch_module"
    TORCH_PROGRAM = "torch_program"  # a torch.export.ExportedProgram

    @property
    def is_torch(self) -> bool:
        return self in _TORCH_KINDS


_TORCH_KINDS = frozenset(
    {SourceKind.TORCH_FILE, SourceKind.FACTORY, SourceKind.TORCH_MODULE, SourceKind.TORCH_PROGRAM}
)


class Progress(Protocol):
    """Told what a long run is doing: a step (``total`` 0) or ``done`` of ``total`` items."""

    def __call__(self, text: str, done: int = 0, total: int = 0) -> None: ...


@dataclass
class FoldOutcome:
    """What :func:`fold_path` did with one model: the fold, and whether it was written.

    ``written`` is False exactly when the library kept the output back: the
    verification failed, or could not be made and verified folds were required.
    """

    result: FoldResult
    output: str
    written: bool
    bench: BenchReport | None = None  # FoldOptions.bench_levels: the written output timed

    def exit_code(self) -> int:
        """0 when written, 1 when kept back: "exit 0" and "output written" mean the same."""
        return 0 if self.written else 1

    def to_dict(self) -> dict[str, Any]:
        payload = {**self.result.to_dict(), "output": self.output, "written": self.written}
        if self.bench is not None:
            payload["bench"] = self.bench.to_dict()
        return payload

    def summary(self) -> str:
        """The report, the verification, what was written (or why not) and the timing."""
        lines = [self.result.report.summary()]
        verification = self.result.verification
        if verification is not None:
            lines.append(verification.summary())
        lines.append(f"wrote {self.output}" if self.written else _nothing_written(verification))
        if self.bench is not None:
            lines.append(self.bench.summary())
        return "\n".join(lines)


def _nothing_written(verification: VerifyResult | None) -> str:
    """Why an output was kept back: a failed or (with --strict) a missing verification."""
    if verification is not None and verification.status == "not_verified":
        return f"not verified ({verification.reason}); --strict: nothing written"
    return "verification FAILED: nothing written"


def fold_path(
    source: Any,
    output: str | os.PathLike[str] | None,
    options: FoldOptions | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    progress: Progress | None = None,
) -> FoldOutcome | BatchReport:
    """Fold ``source`` and write the result to ``output``: the entry point the CLI calls.

    Every output is verified before it is published (unless ``options.verify`` is
    off) and written atomically; what is not written leaves ``output`` untouched.

    Args:
        source: an ONNX file; a folder (every ``*.onnx`` under it is folded into
            the same relative path under the folder ``output``); a ``.pt2``
            program; a module factory (:func:`module_source`); or an object: an
            ``onnx_ir.Model`` / ``onnx.ModelProto`` (written as ONNX), an
            ``nn.Module`` (``example_inputs`` required; ``.pt`` writes its
            state_dict, ``.pt2`` the exported program) or an ExportedProgram
            (written as ``.pt2``).
        output: the file (or folder) to write; None only with
            ``options.in_place``, which writes an ONNX source over itself.
        options: how to fold, verify and what else to write.
        example_inputs: a torch module's inputs, to trace and verify it.
        progress: told what a long run is doing.

    Returns:
        A :class:`FoldOutcome` for one model, a :class:`bnfold.batch.BatchReport`
        for a folder; either has ``exit_code()`` and ``to_dict()``.

    Raises:
        BnfoldError: bad input, an option the source's front cannot honour, an
            output that is an input or cannot be written, a folder without models.
    """
    options = options or FoldOptions()
    kind = kind_of(source)
    target = _target(kind, source, output, options)
    if kind is SourceKind.FOLDER:
        return _fold_folder(Path(source), Path(target), options, progress)
    if kind.is_torch:
        from bnfold.torch_front import require_torch

        require_torch()
        from bnfold import api_torch

        outcome = api_torch.fold_to(source, kind, target, options, example_inputs, progress)
    else:
        outcome = _fold_onnx_to(source, target, options, progress)
    write_report(options.report_path, outcome.to_dict())
    return outcome


def kind_of(source: Any) -> SourceKind:
    """Which front folds ``source``: a path by its suffix (or being a folder), an object by type."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            return SourceKind.FOLDER
        return SourceKind.TORCH_FILE if path.suffix in TORCH_SUFFIXES else SourceKind.ONNX_FILE
    if _is_torch_module(source):
        return SourceKind.TORCH_MODULE
    if _is_exported_program(source):
        return SourceKind.TORCH_PROGRAM
    files = sys.modules.get("bnfold.torch_front.files")
    if files is not None and isinstance(source, files.ModuleSource):
        return SourceKind.FACTORY
    if isinstance(source, ir.Model) or _is_model_proto(source):
        return SourceKind.ONNX_MODEL
    raise BnfoldError(f"cannot fold a {type(source).__name__}")


def model_source(
    path: str | os.PathLike[str] | None,
    module: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[Sequence[int]] = (),
) -> Any:
    """The model a command names: a path (MODEL), or a module factory (``--module``).

    Raises:
        BnfoldError: neither or both given, or factory options without a factory.
    """
    if module is not None:
        if path is not None:
            raise BnfoldError("give MODEL or --module, not both")
        return module_source(module, weights, trust_pickle, input_shapes)
    torch_file = path is not None and os.fspath(path).endswith(TORCH_SUFFIXES)
    if weights is not None or input_shapes or (trust_pickle and not torch_file):
        raise BnfoldError("--weights/--trust-pickle/--input-shape need --module")
    if path is None:
        raise BnfoldError("missing MODEL (or --module for a torch factory)")
    return path


def module_source(
    factory: str,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[Sequence[int]] = (),
) -> Any:
    """A torch model built by calling ``factory`` (``"pkg.mod:make"``), for :func:`fold_path`.

    Returns a :class:`bnfold.torch_front.files.ModuleSource`; ``weights`` is a
    state_dict file loaded into the module, ``input_shapes`` one shape per
    positional input (random float32 example inputs).

    Raises:
        NotSupportedError: torch is not installed.
    """
    from bnfold.torch_front import require_torch

    require_torch()
    from bnfold.torch_front.files import ModuleSource

    shapes = tuple(tuple(int(d) for d in shape) for shape in input_shapes)
    return ModuleSource(
        factory, None if weights is None else os.fspath(weights), trust_pickle, shapes
    )


def _target(
    kind: SourceKind, source: Any, output: str | os.PathLike[str] | None, options: FoldOptions
) -> str | os.PathLike[str]:
    """The path to write, after refusing the options this kind of source cannot honour."""
    one_onnx_file = kind is SourceKind.ONNX_FILE
    if options.bench_levels and not (one_onnx_file or kind is SourceKind.ONNX_MODEL):
        raise BnfoldError("--bench times one ONNX model; for torch or folders use `bnfold bench`")
    if options.in_place:
        if not one_onnx_file:
            raise BnfoldError("--in-place folds one ONNX file; torch models and folders take -o")
        if output is not None and not paths.same_file(output, source):
            raise BnfoldError("-o and --in-place are exclusive: --in-place writes MODEL itself")
        if options.bench_levels:
            # The output would be timed against itself: the original is gone.
            raise BnfoldError(
                "--bench times the output against MODEL, which --in-place replaces; use -o"
            )
        return source  # type: ignore[no-any-return]
    if output is None:
        if kind is SourceKind.FOLDER:
            raise BnfoldError("folder mode needs -o/--output OUTDIR")
        if one_onnx_file:
            raise BnfoldError("missing -o/--output (or --in-place to overwrite MODEL)")
        raise BnfoldError("missing -o/--output")
    if options.to_onnx is not None and not kind.is_torch:
        raise BnfoldError("--to-onnx is for torch models; the ONNX output is -o")
    return output


def _fold_onnx_to(
    source: Any, output: str | os.PathLike[str], options: FoldOptions, progress: Progress | None
) -> FoldOutcome:
    """An ONNX file or model object, folded and written to ``output`` (verified first)."""
    from_file = isinstance(source, str | os.PathLike)
    writes = [paths.Named("output", Path(output))]
    reads = [paths.Named("input", Path(source))] if from_file else []
    in_place = (output, source) if options.in_place else None
    require_safe_report(options.report_path, writes, reads, in_place)
    paths.require_safe_outputs(writes, reads, in_place=in_place, offer_in_place=True)
    _tell(progress, "loading")
    model = io.load_model(source) if from_file else _onnx_model(source, copy=True)
    # The untouched original, for verification: the file, or the object given.
    reference = source if from_file or isinstance(source, ir.Model) else model.clone()
    _tell(progress, "folding")
    result, written = _fold_and_save(model, reference, output, options, progress)
    outcome = FoldOutcome(result, os.fspath(output), written)
    if options.bench_levels and written:
        _tell(progress, "timing")
        outcome.bench = _bench_against(reference, output, options)
    return outcome


def _fold_and_save(
    model: ir.Model,
    reference: Any,
    output: str | os.PathLike[str],
    options: FoldOptions,
    progress: Progress | None,
) -> tuple[FoldResult, bool]:
    """Fold ``model`` and save it atomically, publishing only what ``options`` accepts."""
    keep_external = any(True for _ in io.external_tensors(model))  # before folds replace them
    folded = _fold_onnx(model, options)
    result = FoldResult(folded.model, folded.report)
    verify_options = options.verify_options

    def accept(staged: Path) -> bool:
        if options.verify:
            _tell(progress, "verifying")
            # reference was checked when it was loaded and staged is our own
            # output: hand both straight to the runtimes instead of parsing them again.
            result.verification = verify_onnx(
                reference, staged, verify_options, sites=site_values(result.report)
            )
        return result.publishable(options.require_verified)

    _tell(progress, "writing")
    written = io.save_model(result.model, output, external_data=keep_external, accept=accept)
    return result, written


def _bench_against(
    original: Any, folded: str | os.PathLike[str], options: FoldOptions
) -> BenchReport:
    """Time the written output against the original on the inputs verification used."""
    from bnfold import bench as harness

    verify_options = options.verify_options or VerifyOptions()
    return harness.bench_onnx(
        original,
        os.fspath(folded),
        options.bench_levels,
        shapes=verify_options.shapes,
        max_input_bytes=verify_options.max_input_bytes,
        inputs=verify_options.inputs,
    )


def _fold_folder(
    model_dir: Path, out_dir: Path, options: FoldOptions, progress: Progress | None
) -> BatchReport:
    from bnfold import batch

    _require_safe_folder_report(options.report_path, model_dir, out_dir)
    total = 0

    def started(count: int) -> None:
        nonlocal total
        total = count
        _tell(progress, "", 0, count)

    done = 0

    def finished(outcome: batch.ModelOutcome) -> None:
        nonlocal done
        done += 1
        _tell(progress, outcome.source, done, total)

    report = batch.fold_directory(model_dir, out_dir, options, on_start=started, on_done=finished)
    if options.report_path is not None:
        batch.write_report(report, options.report_path)
    return report


def _tell(progress: Progress | None, text: str, done: int = 0, total: int = 0) -> None:
    if progress is not None:
        progress(text, done, total)


def write_report(path: str | os.PathLike[str] | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    import json

    paths.write_text_atomic(path, json.dumps(payload, indent=2), "report")


def require_safe_report(
    report_path: str | os.PathLike[str] | None,
    writes: Sequence[paths.Named | None],
    reads: Sequence[paths.Named | None],
    in_place: tuple[paths.PathArg, paths.PathArg] | None = None,
) -> None:
    """Before folding: the report must be writable and none of the other files (any spelling).

    The fronts check their model outputs against their inputs themselves; this
    adds the report, and the ONNX inputs' external data, which it must not replace.
    """
    if report_path is None:
        return
    data = [
        paths.Named("input's external data", path)
        for named in reads
        if named is not None and named.path.suffix == ".onnx"
        for path in io.external_data_files(named.path)
    ]
    report = paths.Named("--report", Path(report_path))
    paths.require_safe_outputs([*writes, report], [*reads, *data], in_place=in_place)


def _require_safe_folder_report(
    report_path: str | os.PathLike[str] | None, model_dir: Path, out_dir: Path
) -> None:
    """Folder mode: the report must not be one of the models found, their data or outputs.

    Its folder may be OUTDIR, created by the run: then only the names are compared.
    """
    if report_path is None:
        return
    from bnfold.batch import find_models

    report = paths.Named("--report", Path(report_path))
    models = find_models(model_dir, out_dir)
    reads = [paths.Named("input", model_dir / rel) for rel in models]
    reads += [
        paths.Named("input's external data", data)
        for rel in models
        for data in io.external_data_files(model_dir / rel)
    ]
    writes = [paths.Named("output", out_dir / rel) for rel in models]
    for other in (*reads, *writes):
        if paths.same_file(report.path, other.path):
            raise BnfoldError(
                f"--report {os.fspath(report_path)!r} is the {other.role} {str(other.path)!r}"
            )
    if not paths.same_file(report.path.parent, out_dir):  # OUTDIR may not exist yet
        paths.require_safe_outputs([report], [])


def fold(
    model: Any,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    verify: bool = False,
    verify_options: VerifyOptions | None = None,
    clone_shared: bool = True,
    rounding: Rounding | str = Rounding.NEAREST,
    lower_standalone: bool | LowerForm | str | None = False,
    inputs: str | os.PathLike[str] | None = None,
) -> FoldResult:
    """Fold every foldable BatchNorm / constant affine into its neighbouring linear op.

    Args:
        model: an ONNX path, ``onnx_ir.Model`` or ``onnx.ModelProto``; a torch
            ``nn.Module`` (then ``example_inputs`` is required); or a
            ``torch.export.ExportedProgram`` (its own example inputs are used),
            folded at graph level where each module call is its own node.
        example_inputs: torch only: inputs used to trace the module and to verify.
        inplace: modify ``model`` itself instead of a copy (ir.Model / nn.Module).
        verify: ONNX: compare the folded model with the original at ORT_DISABLE_ALL
            and attach the result. torch modules and programs are always verified,
            fold by fold, with rollback of any fold that changes the outputs.
        verify_options: tolerances, samples, seed and (ONNX) input shapes.
        clone_shared: ONNX: copy a weight that other nodes also read so the fold
            can proceed (reported as bytes_added); False refuses such sites.
        rounding: how folded weights are cast to the model's dtype: "nearest"
            (the exact float64 fold) or "balanced" (see :class:`bnfold.affine.Rounding`).
        lower_standalone: ONNX: after folding, rewrite every inference BatchNorm
            that could not fold as plain ops: True or "mul-add" for Mul + Add,
            "conv" for a 1x1 depthwise Conv (see :mod:`bnfold.onnx_front.lower`);
            an ExportedProgram gets aten mul/add or a conv (see
            :func:`bnfold.torch_front.exported.lower_left`), an eager nn.Module
            a LoweredBatchNorm or 1x1 depthwise Conv module at each BN's path
            (see :mod:`bnfold.torch_front.lower_modules`). False/None: no
            lowering. Reported in ``report.lowered``.
        inputs: verify on this input file or folder (see :mod:`bnfold.feeds`)
            instead of random inputs.

    Returns:
        FoldResult with ``.model`` (same kind as given; a path gives an onnx_ir.Model)
        and ``.report``.
    """
    options = FoldOptions(
        verify=verify,
        verify_options=with_inputs(verify_options, inputs),
        clone_shared=clone_shared,
        rounding=rounding_of(rounding),
        lower=lower_form_of(lower_standalone),
    )
    kind = kind_of(model)
    if kind is SourceKind.TORCH_MODULE:
        if example_inputs is None:
            raise BnfoldError("folding a torch module needs example_inputs=(x,)")
        from bnfold.torch_front import run

        # Every verify option reaches the torch front, the user's input files too.
        return run.fold(
            model, example_inputs, inplace=inplace,
            verify=options.verify_options or VerifyOptions(),
            rounding=options.rounding, lower=options.lower,
        )  # fmt: skip
    if kind is SourceKind.TORCH_PROGRAM:
        from bnfold.torch_front.files import fold_program

        return fold_program(
            model, options.verify_options or VerifyOptions(), options.rounding, options.lower
        )
    reference = None
    if verify:
        # The untouched input is the reference; with inplace=True it is about to
        # change, so snapshot it first.
        untouched = isinstance(model, str | os.PathLike) or (
            isinstance(model, ir.Model) and not inplace
        )
        reference = model if untouched else _onnx_model(model, copy=True)
    result = _fold_onnx(_onnx_model(model, copy=not inplace), options)
    out = FoldResult(result.model, result.report)
    if reference is not None:
        # A path was loaded (and checked) by _onnx_model already.
        out.verification = verify_onnx(
            reference, out.model, options.verify_options, sites=site_values(out.report)
        )
    return out


def site_values(report: FoldReport) -> list[SiteValue]:
    """The fold sites verification compares, from what the pass folded."""
    return [SiteValue(f.value, f.site) for f in report.folded if f.value]


def with_inputs(
    options: VerifyOptions | None, inputs: str | os.PathLike[str] | None
) -> VerifyOptions | None:
    """``options`` that feed the user's input files ``inputs`` (None: as they are)."""
    if inputs is None:
        return options
    return replace(options or VerifyOptions(), inputs=inputs)


def inspect(
    model: Any,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    lower_standalone: bool | LowerForm | str | None = False,
    trust_pickle: bool = False,
) -> FoldReport:
    """Report every fold bnfold would make and every refusal, without changing ``model``.

    ``model`` is anything :func:`fold` takes, or a ``.pt2`` path or module
    factory (:func:`module_source`) as :func:`fold_path` takes them;
    ``trust_pickle`` as in :class:`~bnfold.options.FoldOptions`.
    ``lower_standalone`` (as for :func:`fold`) previews the lowering too: the
    report's ``lowered`` entries and BN counts are those ``fold`` would give.
    """
    lower = lower_form_of(lower_standalone)
    kind = kind_of(model)
    if kind is SourceKind.TORCH_MODULE:
        from bnfold.torch_front import inspect_module

        if example_inputs is None:
            raise BnfoldError("inspecting a torch module needs example_inputs=(x,)")
        return inspect_module(model, example_inputs, lower)
    if kind is SourceKind.TORCH_PROGRAM:
        from bnfold.torch_front.files import inspect_program

        return inspect_program(model, lower)
    if kind in (SourceKind.TORCH_FILE, SourceKind.FACTORY):
        from bnfold.torch_front import require_torch

        require_torch()
        from bnfold.torch_front.files import inspect_torch

        return inspect_torch(model, trust_pickle=trust_pickle, lower=lower)
    report = fold(model, inplace=False, lower_standalone=lower).report
    report.dry_run = True
    return report


def verify(
    original: Any,
    folded: Any,
    *,
    atol: float = 0.0,
    rtol: float | None = None,
    samples: int = 3,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    max_input_bytes: int = MAX_INPUT_BYTES,
    inputs: str | os.PathLike[str] | None = None,
) -> VerifyResult:
    """Compare two ONNX models (paths or onnx_ir.Model) at ORT_DISABLE_ALL.

    ``inputs`` is an input file or folder (see :mod:`bnfold.feeds`); without it
    ``samples`` random draws are fed. rtol None derives each tensor's bound
    (:mod:`bnfold.tolerance`). Not verified (status "not_verified") when the
    original cannot run or one sample of random inputs would need more than
    ``max_input_bytes``.
    """
    options = VerifyOptions(atol, rtol, samples, seed, shapes, max_input_bytes, inputs)
    return verify_models(original, folded, options)


def verify_models(
    original: Any, folded: Any, options: VerifyOptions | None, trust_pickle: bool = False
) -> VerifyResult:
    """:func:`verify` for files a user named: each is checked like a loaded model first.

    A ``.pt2`` original or a module factory (:func:`module_source`) is compared
    with a folded ``.pt2`` by the torch front, eagerly; ``trust_pickle`` as in
    :class:`~bnfold.options.FoldOptions`.
    """
    if kind_of(original) in (SourceKind.TORCH_FILE, SourceKind.FACTORY):
        from bnfold.torch_front import require_torch

        require_torch()
        from bnfold.torch_front.files import verify_torch

        return verify_torch(original, folded, options or VerifyOptions(), trust_pickle)
    for source in (original, folded):
        if isinstance(source, str | os.PathLike):
            io.load_model(source)  # one-line errors for bad files, before onnxruntime sees them
    return verify_onnx(original, folded, options)


def fold_file(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    verify: bool = True,
    verify_options: VerifyOptions | None = None,
    in_place: bool = False,
    clone_shared: bool = True,
    rounding: Rounding | str = Rounding.NEAREST,
    require_verified: bool = False,
    lower_standalone: bool | LowerForm | str | None = False,
    inputs: str | os.PathLike[str] | None = None,
) -> tuple[FoldResult, bool]:
    """Fold an ONNX file and write the result atomically, verified before it is published.

    :func:`fold_path` with these keywords as its :class:`FoldOptions`, for one
    ONNX file. The staged output is compared with ``source``; if verification
    fails nothing is written. If the models cannot be compared (onnxruntime
    cannot run the original, the inputs would be too large), the verification
    result says "not_verified" with the reason, and the output is written unless
    ``require_verified``. Whatever is not written leaves ``output`` (and with
    ``in_place`` the input) untouched.

    Returns:
        (result, written): written is False when verification failed, or was
        not possible and ``require_verified`` is set (see FoldResult.publishable).

    Raises:
        BnfoldError: bad input, output equal to input without ``in_place``,
            unwritable output.
    """
    options = FoldOptions(
        verify=verify,
        verify_options=with_inputs(verify_options, inputs),
        require_verified=require_verified,
        clone_shared=clone_shared,
        rounding=rounding_of(rounding),
        lower=lower_form_of(lower_standalone),
        in_place=in_place,
    )
    outcome = _fold_onnx_to(source, output, options, progress=None)
    return outcome.result, outcome.written


def _fold_onnx(model: ir.Model, options: FoldOptions) -> FoldPassResult:
    """Fold to the fixpoint, then lower what is left when ``options.lower`` asks for it.

    A graph that cannot be evaluated as written (no outputs, an undefined value, a
    cycle) is bad input, refused before any rule walks it.
    """
    require_well_formed(model.graph)
    result = FoldAffinePass(MatchOptions(options.clone_shared, options.rounding))(model)
    assert isinstance(result, FoldPassResult)
    if options.lower is not None:
        lower_unfolded(result, options.lower)
    return result


def _onnx_model(model: Any, copy: bool) -> ir.Model:
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.suffix in TORCH_SUFFIXES:
            raise BnfoldError(f"{path}: a torch file; use the torch front (bnfold fold {path} ...)")
        return io.load_model(path)
    if isinstance(model, ir.Model):
        return model.clone() if copy else model
    if _is_model_proto(model):
        # External data of an in-memory proto resolves against the current
        # folder and must stay inside it, like a file's.
        return io.model_from_proto(model)
    raise BnfoldError(f"cannot fold a {type(model).__name__}")


def _is_model_proto(obj: Any) -> bool:
    import onnx

    return isinstance(obj, onnx.ModelProto)


def _is_torch_module(obj: Any) -> bool:
    # Only an already-imported torch can have made obj: never import it here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_exported_program(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.export.ExportedProgram)
