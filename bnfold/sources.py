"""What a fold starts from, and which options and outputs each kind of source takes.

:func:`kind_of` sorts a source (a path by its suffix, an object by its type) into
a :class:`SourceKind`; the API routes on it. A ``--module`` spec is resolved
here too (:func:`importable_factory`). Only the standard library is imported:
an object can only have been made by a library already imported, so its type
is looked up in ``sys.modules``.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from bnfold import paths
from bnfold.errors import BnfoldError
from bnfold.options import FoldOptions

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


def kind_of(source: Any) -> SourceKind:
    """Which front folds ``source``: a path by its suffix (or being a folder), an object by type."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            return SourceKind.FOLDER
        return SourceKind.TORCH_FILE if path.suffix in TORCH_SUFFIXES else SourceKind.ONNX_FILE
    if is_torch_module(source):
        return SourceKind.TORCH_MODULE
    if is_exported_program(source):
        return SourceKind.TORCH_PROGRAM
    files = sys.modules.get("bnfold.torch_front.files")
    if files is not None and isinstance(source, files.ModuleSource):
        return SourceKind.FACTORY
    if is_onnx_model(source):
        return SourceKind.ONNX_MODEL
    raise BnfoldError(f"cannot fold a {type(source).__name__}")


def checked_target(
    kind: SourceKind, source: Any, output: str | os.PathLike[str] | None, options: FoldOptions
) -> str | os.PathLike[str]:
    """The path to write ``source`` to, after refusing options its front cannot honour.

    Raises:
        BnfoldError: --bench, --in-place or --to-onnx for a source that cannot
            take it, or no output where one is needed.
    """
    one_onnx_file = kind is SourceKind.ONNX_FILE
    if options.to_onnx is not None and not kind.is_torch:
        raise BnfoldError("--to-onnx is for torch models; the ONNX output is -o")
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
    return output


_BAD_FACTORY = "--module {!r} must look like 'package.module:factory' or 'path/to/file.py:factory'"


def importable_factory(spec: str) -> str:
    """``spec`` as ``module:callable`` that imports here, read the way a user means it.

    ``pkg.mod:make`` imports as usual, and also from the working folder: the
    ``bnfold`` script, unlike ``python -m``, does not put that folder on
    ``sys.path``, so ``mynets:make`` beside ``mynets.py`` failed. The folder is
    appended, so an installed module of the same name still wins.
    ``path/to/file.py:make`` imports that file by its name, its folder appended
    to ``sys.path`` (for its own imports) the same way.

    Raises:
        BnfoldError: a malformed spec, a missing file, a file name that is no
            module name, or one that another module on the path already has.
    """
    target, colon, attr = spec.rpartition(":")
    if not colon or not _dotted(attr):
        raise BnfoldError(_BAD_FACTORY.format(spec))
    if target.endswith(".py"):
        return f"{_file_module(Path(target))}:{attr}"
    if not _dotted(target):
        raise BnfoldError(_BAD_FACTORY.format(spec))
    _append_to_path(Path.cwd())
    return spec


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _file_module(path: Path) -> str:
    """The module name ``path`` imports under, once its folder is on ``sys.path``."""
    if not path.is_file():
        raise BnfoldError(f"--module file {str(path)!r} does not exist")
    name = path.stem
    if not name.isidentifier():
        raise BnfoldError(f"--module file {path.name!r}: {name!r} is no module name; rename it")
    _append_to_path(path.resolve().parent)
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    origin = found.origin if found is not None else None
    if origin is None or not paths.same_file(origin, path):
        where = f" ({origin})" if origin else ""
        raise BnfoldError(
            f"--module {str(path)!r}: another module is called {name!r}{where}; rename the file"
        )
    return name


def _append_to_path(folder: Path) -> None:
    if not any(paths.same_file(entry or ".", folder) for entry in sys.path):
        sys.path.append(str(folder))


def is_onnx_model(obj: Any) -> bool:
    """An ``onnx_ir.Model`` or ``onnx.ModelProto`` (only imported libraries can have made one)."""
    ir, onnx = sys.modules.get("onnx_ir"), sys.modules.get("onnx")
    return (ir is not None and isinstance(obj, ir.Model)) or (
        onnx is not None and isinstance(obj, onnx.ModelProto)
    )


def is_torch_module(obj: Any) -> bool:
    # Only an already-imported torch can have made obj: never import it here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def is_exported_program(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.export.ExportedProgram)
