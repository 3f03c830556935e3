"""The Python API: fold, inspect and verify, for ONNX files/models and torch modules.

Every entry point dispatches on what it is given; torch is imported only when a
torch object or file is passed, so the ONNX path works without it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bnfold import paths
from bnfold.affine import Rounding
from bnfold.errors import BnfoldError
from bnfold.onnx_front import io
from bnfold.onnx_front.lower import lower_unfolded
from bnfold.onnx_front.match import MatchOptions
from bnfold.onnx_front.passes import FoldAffinePass, FoldPassResult
from bnfold.options import MAX_INPUT_BYTES, VerifyOptions
from bnfold.report import FoldReport, FoldResult, LowerForm, VerifyResult
from bnfold.verification import require_well_formed, verify_fold, verify_onnx

TORCH_SUFFIXES = (".pt2", ".pt", ".pth")


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
    lower = _lower_form(lower_standalone)
    verify_options = with_inputs(verify_options, inputs)
    if _is_torch_module(model):
        if example_inputs is None:
            raise BnfoldError("folding a torch module needs example_inputs=(x,)")
        from bnfold.torch_front import run

        # Every verify option reaches the torch front, the user's input files too.
        return run.fold(
            model, example_inputs, inplace=inplace, verify=verify_options or VerifyOptions(),
            rounding=_rounding(rounding), lower=lower,
        )  # fmt: skip
    if _is_exported_program(model):
        from bnfold.torch_front.files import fold_program

        return fold_program(model, verify_options or VerifyOptions(), _rounding(rounding), lower)
    reference = None
    if verify:
        # The untouched input is the reference; with inplace=True it is about to
        # change, so snapshot it first.
        untouched = isinstance(model, str | os.PathLike) or (
            isinstance(model, ir.Model) and not inplace
        )
        reference = model if untouched else _onnx_model(model, copy=True)
    result = _fold_onnx(_onnx_model(model, copy=not inplace), clone_shared, rounding, lower)
    out = FoldResult(result.model, result.report)
    if reference is not None:
        # A path was loaded (and checked) by _onnx_model already.
        out.verification = verify_fold(reference, out.model, out.report, verify_options)
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
) -> FoldReport:
    """Report every fold bnfold would make and every refusal, without changing ``model``.

    ``lower_standalone`` (as for :func:`fold`) previews the lowering too: the
    report's ``lowered`` entries and BN counts are those ``fold`` would give.
    """
    lower = _lower_form(lower_standalone)
    if _is_torch_module(model):
        from bnfold.torch_front import inspect_module

        if example_inputs is None:
            raise BnfoldError("inspecting a torch module needs example_inputs=(x,)")
        return inspect_module(model, example_inputs, lower)
    if _is_exported_program(model):
        from bnfold.torch_front.files import inspect_program

        return inspect_program(model, lower)
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


def verify_models(original: Any, folded: Any, options: VerifyOptions | None) -> VerifyResult:
    """:func:`verify` for files a user named: each is checked like a loaded model first."""
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

    The staged output is compared with ``source``; if verification fails nothing
    is written. If the models cannot be compared (onnxruntime cannot run the
    original, the inputs would be too large), the verification result says
    "not_verified" with the reason, and the output is written unless
    ``require_verified``. Whatever is not written leaves ``output`` (and with
    ``in_place`` the input) untouched.

    Args:
        clone_shared, rounding, lower_standalone: as for :func:`fold`.
        require_verified: write only a verified fold (CLI ``--strict``); no
            effect with ``verify=False``, where nothing is compared.
        inputs: verify on this input file or folder instead of random inputs.

    Returns:
        (result, written): written is False when verification failed, or was
        not possible and ``require_verified`` is set (see FoldResult.publishable).

    Raises:
        BnfoldError: bad input, output equal to input without ``in_place``,
            unwritable output.
    """
    source, output = Path(source), Path(output)
    options = with_inputs(verify_options, inputs)
    paths.require_safe_outputs(
        [paths.Named("output", output)],
        [paths.Named("input", source)],
        in_place=(output, source) if in_place else None,
        offer_in_place=True,
    )
    model = io.load_model(source)
    keep_external = any(True for _ in io.external_tensors(model))  # before folds replace them
    lower = _lower_form(lower_standalone)
    folded = _fold_onnx(model, clone_shared, rounding, lower)
    result = FoldResult(folded.model, folded.report)

    def accept(staged: Path) -> bool:
        if verify:
            # source was loaded and checked above and staged is our own output:
            # hand both straight to the runtimes instead of parsing them again.
            result.verification = verify_fold(source, staged, result.report, options)
        return result.publishable(require_verified)

    written = io.save_model(result.model, output, external_data=keep_external, accept=accept)
    return result, written


def _fold_onnx(
    model: ir.Model, clone_shared: bool, rounding: Rounding | str, lower: LowerForm | None
) -> FoldPassResult:
    """Fold to the fixpoint, then lower what is left when ``lower`` asks for it.

    A graph that cannot be evaluated as written (no outputs, an undefined value, a
    cycle) is bad input, refused before any rule walks it.
    """
    require_well_formed(model.graph)
    result = FoldAffinePass(MatchOptions(clone_shared, _rounding(rounding)))(model)
    assert isinstance(result, FoldPassResult)
    if lower is not None:
        lower_unfolded(result, lower)
    return result


def _lower_form(value: bool | LowerForm | str | None) -> LowerForm | None:
    """``lower_standalone`` as a LowerForm: True is mul-add, False/None no lowering."""
    if value is None or value is False:
        return None
    if value is True:
        return LowerForm.MUL_ADD
    try:
        return LowerForm(value)
    except ValueError:
        choices = ", ".join(f.value for f in LowerForm)
        raise BnfoldError(f"unknown lower_standalone {value!r}; choose from {choices}") from None


def _rounding(value: Rounding | str) -> Rounding:
    try:
        return Rounding(value)
    except ValueError:
        choices = ", ".join(r.value for r in Rounding)
        raise BnfoldError(f"unknown rounding {value!r}; choose from {choices}") from None


def _onnx_model(model: Any, copy: bool) -> ir.Model:
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if path.suffix in TORCH_SUFFIXES:
            raise BnfoldError(f"{path}: a torch file; use the torch front (bnfold fold {path} ...)")
        return io.load_model(path)
    if isinstance(model, ir.Model):
        return model.clone() if copy else model
    import onnx

    if isinstance(model, onnx.ModelProto):
        # External data of an in-memory proto resolves against the current
        # folder and must stay inside it, like a file's.
        return io.model_from_proto(model)
    raise BnfoldError(f"cannot fold a {type(model).__name__}")


def _is_torch_module(obj: Any) -> bool:
    # Only an already-imported torch can have made obj: never import it here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_exported_program(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.export.ExportedProgram)
