"""Fold, inspect and verify torch models named by files: what the CLI runs.

Two kinds of input:
  * a ``.pt2`` file (``torch.export.save``): folded at the aten graph level and
    written back as ``.pt2``;
  * a module factory ``pkg.mod:factory`` with optional ``--weights`` (a
    state_dict loaded with ``weights_only=True`` unless the user trusts the
    pickle). ``-o x.pt`` folds it eagerly and writes the folded state_dict (keys
    of unfolded modules unchanged, folded BNs gone) with the record of the fold
    that :func:`bnfold.load_folded` applies to a freshly built model before
    loading it (see :mod:`bnfold.torch_front.folded_state`). ``-o x.pt2``
    exports it and folds the program like a ``.pt2`` input: it loads without
    the model's code (``torch.export.load(path).module()``), and at graph level
    a module that runs in several roles gets a folded copy for the call beside
    the BN, which an eager module cannot. Prefer ``.pt2`` unless the folded
    weights go back into the model's own class (fine-tuning, a training codebase).
``to_onnx`` also exports the folded model to ONNX (torch's exporter would fold
BatchNorm itself; after bnfold there is nothing left for it to fold).
Both kinds are written only when :meth:`FoldResult.publishable` allows it, the
rule the ONNX front's ``fold_file`` applies too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold import paths
from bnfold.affine import Rounding
from bnfold.errors import BnfoldError, first_line
from bnfold.options import DEFAULT_VERIFY, FoldOptions, VerifyOptions
from bnfold.report import FoldReport, FoldResult, LowerForm, VerifyResult
from bnfold.torch_front import inspect_module, run
from bnfold.torch_front import verify as checking
from bnfold.torch_front.folded_state import folded_state_dict
from bnfold.torch_front.io import (
    atomic_target,
    example_args,
    example_inputs_from_shapes,
    export_onnx,
    factory_source_file,
    load_exported_program,
    load_module_factory,
    user_code,
)
from bnfold.torch_front.program.run import fold_graph_module

STATE_DICT_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True)
class ModuleSource:
    """A module built by a factory, its weights, and the shapes of its inputs."""

    factory: str
    weights: str | None = None
    trust_pickle: bool = False
    input_shapes: tuple[tuple[int, ...], ...] = ()

    def load(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        if not self.input_shapes:
            raise BnfoldError("a module factory needs --input-shape (e.g. 1x3x224x224)")
        module = load_module_factory(self.factory, self.weights, self.trust_pickle)
        return module, example_inputs_from_shapes(self.input_shapes)


DEFAULT_FOLD = FoldOptions()


def fold_torch_files(
    source: ModuleSource | str,
    output: str | os.PathLike[str],
    options: FoldOptions = DEFAULT_FOLD,
) -> tuple[FoldResult, tuple[Path, ...]]:
    """Fold a ``.pt2`` path or a factory-built module and write the result atomically.

    A ``.pt2`` source, or a factory module written to a ``.pt2``, is folded as
    an exported program at graph level; a factory module written to ``.pt``
    is folded eagerly and saved as its state_dict with the fold's record
    (:func:`bnfold.torch_front.folded_state.save_folded`).

    The fields of ``options`` read here: ``verify`` and ``verify_options``
    (tolerances and draws; ``--shape`` and the input caps are ONNX-only),
    ``prove`` (with ``verify``, prove the folds before the sampled check,
    :mod:`bnfold.verification.torch_proof`: a refuted fold is never written),
    ``require_verified`` (``--strict``: a "not_verified" result is kept back like a
    failed one), ``rounding``, ``lower`` (the BNs left after folding: a program's
    by :func:`bnfold.torch_front.program.lower.lower_left`, an eager module's by
    :func:`bnfold.torch_front.lower_modules.lower_left`), ``to_onnx`` and
    ``trust_pickle`` (load a ``.pt2`` source as torch would, running any code it
    carries; without it such a file is refused, :mod:`bnfold.torch_front.archive`).

    Returns:
        (result, files): ``result.model`` is the folded module; ``files`` every
        file written, ``output`` first, then ``to_onnx`` and its external data
        if any. Empty, and neither ``output`` nor ``to_onnx`` touched, when
        verification failed after rollback, or was not possible and
        ``require_verified`` is set.

    Raises:
        BnfoldError: bad input or output path, a state_dict without --module,
            the folded module cannot be exported.
    """
    _require_safe_outputs(source, output, options.to_onnx)
    with user_code("the model's code"):
        return _fold_torch(source, Path(output), options)


def _fold_torch(
    source: ModuleSource | str, output: Path, options: FoldOptions
) -> tuple[FoldResult, tuple[Path, ...]]:
    verify = (options.verify_options or DEFAULT_VERIFY) if options.verify else None

    def fold_program(make: Callable[[], torch.fx.GraphModule], args: Any) -> FoldResult:
        return fold_graph_module(
            make, args, verify=verify, rounding=options.rounding, lower=options.lower,
            prove=options.prove,
        )  # fmt: skip

    as_program = output.suffix == ".pt2"
    if isinstance(source, ModuleSource):
        module, args = source.load()
        if as_program:
            result = fold_program(_export(module, args, "the module").module, args)
        else:
            result = run.fold(
                module, args, inplace=False, verify=verify, rounding=options.rounding,
                lower=options.lower, prove=options.prove,
            )  # fmt: skip
    else:
        ep = _load_program_file(Path(source), options.trust_pickle)
        args = example_args(ep)
        result = fold_program(ep.module, args)
        as_program = True  # a program is written back as a program, whatever the suffix
    if not result.publishable(options.require_verified):
        return result, ()
    return result, _save(result, args, output, as_program, options.to_onnx)


def _require_safe_outputs(
    source: ModuleSource | str,
    output: str | os.PathLike[str],
    to_onnx: str | os.PathLike[str] | None,
) -> None:
    """Refuse outputs that are an input (any spelling) or unwritable, before folding."""
    if isinstance(source, ModuleSource):
        inputs = [
            paths.Named.of("--weights file", source.weights),
            paths.Named.of("--module source", factory_source_file(source.factory)),
        ]
    else:
        inputs = [paths.Named.of("input", source)]
    outputs = [paths.Named.of("output", output), paths.Named.of("--to-onnx output", to_onnx)]
    paths.require_safe_outputs(outputs, inputs)


def fold_program(
    ep: torch.export.ExportedProgram,
    verify: VerifyOptions | None = DEFAULT_VERIFY,
    rounding: Rounding = Rounding.NEAREST,
    lower: LowerForm | None = None,
    prove: bool = True,
) -> FoldResult:
    """Fold an ExportedProgram at graph level; ``model`` is the folded program, re-exported.

    Each call of a module is its own node there, so a conv that also runs apart
    from its BN is folded with a copy of its weight for the BN's call
    (``Folded.bytes_added``), which an eager module cannot offer.

    Raises:
        BnfoldError / NotSupportedError: no usable example inputs, or the folded
            module cannot be exported again.
    """
    args = example_args(ep)
    result = fold_graph_module(
        ep.module, args, verify=verify, rounding=rounding, lower=lower, prove=prove
    )
    result.model = _export(result.model, args, "the folded program")
    return result


def _load_program_file(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram:
    """A ``.pt2`` file's program; a state_dict file is a user error naming the fix."""
    if path.suffix in STATE_DICT_SUFFIXES:
        raise BnfoldError(
            f"{path}: a state_dict has no architecture; pass --module pkg.mod:factory "
            f"--weights {path} --input-shape ..."
        )
    return load_exported_program(path, trust_pickle)


def _export(module: torch.nn.Module, args: tuple[Any, ...], what: str) -> Any:
    """``torch.export`` (non-strict) with a one-line error naming ``what`` failed."""
    try:
        return torch.export.export(module, args, strict=False)
    except Exception as e:  # torch.export raises many types
        raise BnfoldError(f"exporting {what} failed: {first_line(e)}") from None


def _save(
    result: FoldResult,
    args: tuple[Any, ...],
    output: Path,
    as_program: bool,
    to_onnx: str | os.PathLike[str] | None,
) -> tuple[Path, ...]:
    """Write the folded module to ``output`` (exported with ``args``, or its state_dict and
    fold record) and to ``to_onnx``; return the files written.

    Both are staged first: the ONNX export runs while ``output`` is still a
    temp file, so a failed export leaves neither written.
    """
    module = result.model
    program = _export(module, args, "the folded module") if as_program else None
    exported: tuple[Path, ...] = ()
    with atomic_target(output) as tmp:
        if program is None:
            torch.save(folded_state_dict(result), tmp)
        else:
            torch.export.save(program, tmp)
        if to_onnx is not None:
            exported = export_onnx(module, args, to_onnx).files
    return (output, *exported)


def inspect_torch(
    source: ModuleSource | str, trust_pickle: bool = False, lower: LowerForm | None = None
) -> FoldReport:
    """What :func:`fold_torch_files` would fold, lower and refuse, without writing anything.

    A factory module is inspected as the eager module ``fold`` writes by default.
    """
    with user_code("the model's code"):
        if isinstance(source, ModuleSource):
            module, args = source.load()
            return inspect_module(module, args, lower)
        return inspect_program(load_exported_program(source, trust_pickle), lower)


def inspect_program(ep: torch.export.ExportedProgram, lower: LowerForm | None = None) -> FoldReport:
    """What :func:`fold_program` would fold, lower and refuse; ``ep`` is untouched."""
    report = fold_graph_module(ep.module, example_args(ep), verify=None, lower=lower).report
    report.dry_run = True
    return report


def verify_torch(
    original: ModuleSource | str,
    folded: str,
    options: VerifyOptions = DEFAULT_VERIFY,
    trust_pickle: bool = False,
) -> VerifyResult:
    """Compare a folded ``.pt2`` with the original (a ``.pt2`` or a factory module), eagerly.

    ``trust_pickle`` applies to both ``.pt2`` files, as in :func:`fold_torch_files`.
    """
    if Path(folded).suffix != ".pt2":
        raise BnfoldError(f"{folded}: torch verification compares .pt2 programs; export it first")
    with user_code("the model's code"):
        if isinstance(original, ModuleSource):
            reference_module, args = original.load()
        else:
            ep = load_exported_program(original, trust_pickle)
            reference_module, args = ep.module(), example_args(ep)
        check = checking.Check.of(reference_module, args, options)
        return check(load_exported_program(folded, trust_pickle).module())
