"""The torch routes of :func:`bnfold.api.fold_path`: a torch source folded and written.

Imported only when a torch file, factory or object is folded, since it imports
torch. The fold itself is :func:`bnfold.torch_front.files.fold_torch_files`'s; this
adapts what the API accepts to what it takes and checks the report path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bnfold import paths
from bnfold.errors import BnfoldError
from bnfold.options import FoldOptions, VerifyOptions
from bnfold.outcomes import FoldOutcome, Progress
from bnfold.outputs import require_safe_report
from bnfold.sources import SourceKind
from bnfold.torch_front.files import ModuleSource, fold_torch_files
from bnfold.torch_front.io import example_args, factory_source_file
from bnfold.torch_front.run import as_args


@dataclass(frozen=True)
class GivenModule(ModuleSource):
    """A module the caller built, with its inputs: folded as a factory's module would be."""

    module: Any = None
    args: tuple[Any, ...] = ()

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        return self.module, self.args


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
    verify = (options.verify_options or VerifyOptions()) if options.verify else None
    if progress is not None:
        progress("folding and verifying" if verify is not None else "folding")
    result, written = fold_torch_files(
        torch_source, output, verify, options.to_onnx,
        require_verified=options.require_verified, rounding=options.rounding,
        lower=options.lower, trust_pickle=options.trust_pickle,
    )  # fmt: skip
    files = [os.fspath(path) for path in written]
    return FoldOutcome(result, os.fspath(output), bool(written), files)


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
