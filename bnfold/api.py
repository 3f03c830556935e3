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

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from bnfold import paths
from bnfold.affine import Rounding
from bnfold.api_verify import verify, verify_models
from bnfold.errors import BnfoldError
from bnfold.onnx_front import io
from bnfold.onnx_front.lower import lower_unfolded
from bnfold.onnx_front.match import MatchOptions
from bnfold.onnx_front.passes import FoldAffinePass, FoldPassResult
from bnfold.options import FoldOptions, VerifyOptions, lower_form_of, rounding_of
from bnfold.outcomes import FoldOutcome, Inspection, InspectRun, Progress, tell
from bnfold.outputs import (
    require_safe_folder_report,
    require_safe_report,
    write_report,
)
from bnfold.report import FoldReport, FoldResult, LowerForm, VerifyResult
from bnfold.sources import (
    TORCH_SUFFIXES,
    SourceKind,
    checked_target,
    importable_factory,
    is_onnx_model,
    kind_of,
)
from bnfold.verification import require_well_formed, verify_fold

if TYPE_CHECKING:
    from bnfold.batch import BatchReport
    from bnfold.bench_report import BenchReport

__all__ = [
    "TORCH_SUFFIXES",
    "FoldOptions",
    "FoldOutcome",
    "InspectRun",
    "Inspection",
    "Progress",
    "SourceKind",
    "VerifyOptions",
    "fold",
    "fold_file",
    "fold_path",
    "inspect",
    "inspect_each",
    "kind_of",
    "model_source",
    "module_source",
    "verify",
    "verify_models",
]


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
    off): an ONNX fold is proven for all inputs first (unless ``options.prove`` is
    off; torch folds are proven in memory before their sampled check),
    then compared on samples. It is written atomically; what is not written leaves
    ``output`` untouched.

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
    target = checked_target(kind, source, output, options)
    if kind is SourceKind.FOLDER:
        return _fold_folder(Path(source), Path(target), options, progress)
    if kind.is_torch:
        from bnfold.torch_front import require_torch

        require_torch()
        from bnfold import api_torch

        outcome = api_torch.fold_to(source, kind, target, options, example_inputs, progress)
    else:
        outcome = _fold_onnx_to(source, target, options, progress)
    if options.report_path is not None:
        outcome.files.append(os.fspath(options.report_path))
        write_report(options.report_path, outcome.to_dict())
    return outcome


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
    spec = importable_factory(factory)
    return ModuleSource(spec, None if weights is None else os.fspath(weights), trust_pickle, shapes)


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
    tell(progress, "loading")
    model = io.load_model(source) if from_file else _onnx_model(source, copy=True)
    # The untouched original, for verification: the file, or the object given.
    reference = source if from_file or isinstance(source, ir.Model) else model.clone()
    tell(progress, "folding")
    result, saved = _fold_and_save(model, reference, output, options, progress)
    files = [] if saved is None else [os.fspath(path) for path in saved.files]
    notes = [saved.note] if saved is not None and saved.note else []
    outcome = FoldOutcome(result, os.fspath(output), saved is not None, files, notes=notes)
    if options.bench_levels and outcome.written:
        tell(progress, "timing")
        outcome.bench = _bench_against(reference, output, options)
    return outcome


def _fold_and_save(
    model: ir.Model,
    reference: Any,
    output: str | os.PathLike[str],
    options: FoldOptions,
    progress: Progress | None,
) -> tuple[FoldResult, io.SavedModel | None]:
    """Fold ``model`` and save it atomically, publishing only what ``options`` accepts.

    Returns the result and the files saved (the model and its external data),
    or None when the output was kept back.
    """
    keep_external = any(True for _ in io.external_tensors(model))  # before folds replace them
    folded = _fold_onnx(model, options)
    result = FoldResult(folded.model, folded.report)

    def accept(staged: Path) -> bool:
        if options.verify:
            # reference was checked when it was loaded and staged is our own
            # output: hand both straight to the prover and the runtimes.
            result.verification = _verified(reference, staged, result, options, progress)
        return result.publishable(options.require_verified)

    tell(progress, "writing")
    saved = io.save_model_files(result.model, output, external_data=keep_external, accept=accept)
    return result, saved


def _verified(
    original: Any,
    folded: Any,
    result: FoldResult,
    options: FoldOptions,
    progress: Progress | None = None,
) -> VerifyResult | None:
    """Proof first, sampling second: ``folded`` against the untouched ``original``.

    The proof (unless ``options.prove`` is off, or nothing changed) reads both as
    they are: paths are memory-mapped, never loaded twice. None when the run
    changed nothing (see :func:`~bnfold.verification.verify_fold`).
    """
    certificate = None
    if options.prove and result.modified:
        from bnfold.verification.proving import prove_fold

        tell(progress, "proving")
        certificate = prove_fold(original, folded, result.report)
    tell(progress, "verifying")
    return verify_fold(original, folded, result.report, options.verify_options, certificate)


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

    require_safe_folder_report(options.report_path, model_dir, out_dir)
    total = 0

    def started(count: int) -> None:
        nonlocal total
        total = count
        tell(progress, "", 0, count)

    done = 0

    def finished(outcome: batch.ModelOutcome) -> None:
        nonlocal done
        done += 1
        tell(progress, outcome.source, done, total)

    report = batch.fold_directory(model_dir, out_dir, options, on_start=started, on_done=finished)
    if options.report_path is not None:
        report.report_path = os.fspath(options.report_path)
        batch.write_report(report, options.report_path)
    return report


def fold(  # noqa: PLR0913 -- public API: keyword options, one per CLI flag
    model: Any,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    inplace: bool = False,
    verify: bool = False,
    prove: bool = True,
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
        prove: with verification, prove the fold for all inputs first
            (:mod:`bnfold.proof`); the certificate is ``verification.proof``. ONNX:
            a difference it finds fails the verification; torch: a fold it refutes
            is rolled back (:mod:`bnfold.verification.torch_proof`).
        verify_options: tolerances, samples, seed and (ONNX) input shapes.
        clone_shared: ONNX: copy a weight that other nodes also read so the fold
            can proceed (reported as bytes_added); False refuses such sites.
        rounding: how folded weights are cast to the model's dtype: "nearest"
            (the exact float64 fold) or "balanced" (see :class:`bnfold.affine.Rounding`).
        lower_standalone: ONNX: after folding, rewrite every inference BatchNorm
            that could not fold as plain ops: True or "mul-add" for Mul + Add,
            "conv" for a 1x1 depthwise Conv (see :mod:`bnfold.onnx_front.lower`);
            an ExportedProgram gets aten mul/add or a conv (see
            :func:`bnfold.torch_front.program.lower.lower_left`), an eager nn.Module
            a LoweredBatchNorm or 1x1 depthwise Conv module at each BN's path
            (see :mod:`bnfold.torch_front.lower_modules`). False/None: no
            lowering. Reported in ``report.lowered``.
        inputs: verify on this input file or folder (see :mod:`bnfold.verification.files`)
            instead of random inputs.

    Returns:
        FoldResult with ``.model`` (same kind as given; a path gives an onnx_ir.Model)
        and ``.report``.
    """
    options = FoldOptions(
        verify=verify,
        prove=prove,
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
            rounding=options.rounding, lower=options.lower, prove=options.prove,
        )  # fmt: skip
    if kind is SourceKind.TORCH_PROGRAM:
        from bnfold.torch_front.files import fold_program

        return fold_program(
            model, options.verify_options or VerifyOptions(), options.rounding, options.lower,
            options.prove,
        )  # fmt: skip
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
        out.verification = _verified(reference, out.model, out, options)
    return out


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


def inspect_each(
    sources: Sequence[Any],
    *,
    lower_standalone: bool | LowerForm | str | None = False,
    trust_pickle: bool = False,
    max_left: int | None = None,
    progress: Progress | None = None,
) -> InspectRun:
    """:func:`inspect` each source (paths, a module factory), past models that fail.

    A model that cannot be inspected (bad input) is recorded with its one-line
    error and the others are still inspected; ``max_left`` gates each model.
    """
    run = InspectRun([])
    for done, source in enumerate(sources):
        path = isinstance(source, str | os.PathLike)
        name = os.fspath(source) if path else getattr(source, "factory", type(source).__name__)
        if len(sources) > 1:
            tell(progress, name, done, len(sources))
        inspection = Inspection(name, max_left=max_left)
        try:
            inspection.report = inspect(
                source, lower_standalone=lower_standalone, trust_pickle=trust_pickle
            )
        except BnfoldError as err:
            inspection.error = str(err)
        run.inspections.append(inspection)
    return run


def fold_file(  # noqa: PLR0913 -- public API: keyword options, one per CLI flag
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    verify: bool = True,
    prove: bool = True,
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
    ONNX file. The staged output is proven for all inputs against ``source``
    (unless ``prove`` is off), then compared on samples; if the proof finds a
    difference or the comparison fails, nothing is written. If the models cannot
    be compared (onnxruntime cannot run the original, the inputs would be too
    large) and no proof holds, the verification result says "not_verified" with
    the reason, and the output is written unless ``require_verified``. Whatever
    is not written leaves ``output`` (and with ``in_place`` the input) untouched.

    Returns:
        (result, written): written is False when verification failed, or was
        not possible and ``require_verified`` is set (see FoldResult.publishable).

    Raises:
        BnfoldError: bad input, output equal to input without ``in_place``,
            unwritable output.
    """
    options = FoldOptions(
        verify=verify,
        prove=prove,
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
    if is_onnx_model(model):
        # External data of an in-memory proto resolves against the current
        # folder and must stay inside it, like a file's.
        return io.model_from_proto(model)
    raise BnfoldError(f"cannot fold a {type(model).__name__}")
