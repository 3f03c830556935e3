"""The torch routes of :func:`bnfold.api.fold_path` and :func:`bnfold.api.verify`.

Imported only when a torch file, factory or object is folded or verified, since it
imports torch. The fold itself is :func:`bnfold.torch_front.files.fold_torch_files`'s;
this adapts what the API accepts to what it takes and checks the report path.

The proof for all inputs of a fold is made inside the fronts, before the sampled
check and before anything is written (:mod:`bnfold.verification.torch_proof`): a
fold it refutes is rolled back, never written. ``verify --prove`` proves two
``.pt2`` files here (:func:`verify_programs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from bnfold import paths
from bnfold.errors import BnfoldError, first_line
from bnfold.options import FoldOptions, VerifyOptions
from bnfold.outcomes import FoldOutcome, Progress
from bnfold.outputs import require_safe_report
from bnfold.report import VerifyResult
from bnfold.sources import SourceKind
from bnfold.torch_front.files import ModuleSource, fold_torch_files, verify_torch
from bnfold.torch_front.io import (
    example_args,
    factory_source_file,
    load_exported_program,
    user_code,
)
from bnfold.torch_front.run import as_args
from bnfold.verification import not_sampled, with_proof


@dataclass(frozen=True)
class GivenModule(ModuleSource):
    """A module the caller built, with its inputs: folded as a factory's module would be."""

    module: Any = None
    args: tuple[Any, ...] = ()

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        return self.module, self.args


@dataclass(frozen=True)
class _Remembered(ModuleSource):
    """A module source that keeps what it loaded, so ``verify_programs`` samples and
    proves against one original.

    A factory without weights builds other random parameters on every call: the
    sampled check loads the module once, and the proof exports that same module
    (or loads it, when sampling was not asked for).
    """

    source: ModuleSource | None = None
    loaded: list[tuple[Any, tuple[Any, ...]]] = field(default_factory=list)

    @classmethod
    def of(cls, source: ModuleSource) -> _Remembered:
        given = {f.name: getattr(source, f.name) for f in fields(ModuleSource)}
        return cls(**given, source=source)

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        assert self.source is not None
        module, args = self.source.load()
        self.loaded.append((module, args))
        return module, args


def fold_to(
    source: Any,
    kind: SourceKind,
    output: str | os.PathLike[str],
    options: FoldOptions,
    example_inputs: tuple[Any, ...] | None,
    progress: Progress | None,
) -> FoldOutcome:
    """Fold a torch source of ``kind`` and write it to ``output`` (and ``options.to_onnx``)."""
    torch_source = _file_source(source, kind, output, example_inputs)
    writes = [paths.Named.of("output", output), paths.Named.of("output", options.to_onnx)]
    require_safe_report(options.report_path, writes, _reads(torch_source))
    if progress is not None:
        progress("folding and verifying" if options.verify else "folding")
    result, written = fold_torch_files(torch_source, output, options)
    files = [os.fspath(path) for path in written]
    return FoldOutcome(result, os.fspath(output), bool(written), files)


def _program(original: Any, trust_pickle: bool) -> torch.export.ExportedProgram:
    """The original as a program: a ``.pt2`` read back, or a factory's module exported."""
    if isinstance(original, str):
        return load_exported_program(original, trust_pickle)
    module, args = original
    try:
        return torch.export.export(module, args, strict=False)
    except Exception as err:  # torch.export raises many types
        raise BnfoldError(f"exporting the original module failed: {first_line(err)}") from None


def verify_programs(
    original: ModuleSource | str,
    folded: str,
    options: VerifyOptions | None,
    trust_pickle: bool,
    *,
    prove: bool,
    sample: bool,
) -> VerifyResult:
    """``verify`` of a folded ``.pt2``: proven as programs, then compared eagerly.

    ``original`` is a ``.pt2`` path or a module factory (exported on its example
    inputs). A model the prover cannot read is bad input, as for ONNX.

    Raises:
        BnfoldError: a file cannot be loaded, a module cannot be exported, or the
            prover cannot read a program.
    """
    # One module for both checks: a factory without weights builds another on every call.
    remembered = _Remembered.of(original) if isinstance(original, ModuleSource) else None
    sampled = None
    if sample:
        options = options or VerifyOptions()
        sampled = verify_torch(remembered or original, folded, options, trust_pickle)
    certificate = None
    if prove:
        with user_code("the model's code"):
            if remembered is not None and not remembered.loaded:
                remembered.load()
            source = remembered.loaded[0] if remembered is not None else original
            certificate = _prove_files(source, folded, trust_pickle)
    if sampled is None:
        return not_sampled(options, certificate)
    return with_proof(sampled, certificate)


def _prove_files(original: Any, folded: str, trust_pickle: bool) -> Any:
    """Prove a folded ``.pt2`` against ``original`` (a ``.pt2`` path or (module, args))."""
    from bnfold.proof import ModelError, prove_program

    if Path(folded).suffix != ".pt2":
        raise BnfoldError(f"{folded}: torch verification compares .pt2 programs; export it first")
    folded_program = load_exported_program(folded, trust_pickle)
    try:
        return prove_program(_program(original, trust_pickle), folded_program)
    except ModelError as err:
        raise BnfoldError(str(err)) from None


def _file_source(
    source: Any,
    kind: SourceKind,
    output: str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | None,
) -> ModuleSource | str:
    """What ``fold_torch_files`` takes: a ``.pt2`` path or a ModuleSource (a built module is)."""
    if kind is SourceKind.TORCH_FILE:
        return os.fspath(source)
    if kind is SourceKind.FACTORY:
        return source  # type: ignore[no-any-return]
    if kind is SourceKind.TORCH_PROGRAM:
        if not os.fspath(output).endswith(".pt2"):
            raise BnfoldError(f"an exported program is written as .pt2, not {os.fspath(output)!r}")
        return GivenModule("", module=source.module(), args=example_args(source))
    if example_inputs is None:
        raise BnfoldError("folding a torch module needs example_inputs=(x,)")
    return GivenModule("", module=source, args=as_args(example_inputs))


def _reads(source: ModuleSource | str) -> list[paths.Named | None]:
    """The files a torch source is read from: a report must not replace any."""
    if isinstance(source, GivenModule):
        return []
    if isinstance(source, ModuleSource):
        return [
            paths.Named.of("input", source.weights),
            paths.Named.of("input", factory_source_file(source.factory)),
        ]
    return [paths.Named.of("input", source)]
