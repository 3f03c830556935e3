"""Load and save ONNX models safely, on top of onnx_ir.

Loading refuses, with one line, anything that is not a usable model and any
external-data reference that escapes the model's folder. Saving is atomic: the
model (and its external data) is written into a temporary folder beside the
target, flushed to disk, then renamed into place, so a crash leaves either the
previous file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from bnfold.errors import BnfoldError


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model, external data memory-mapped, after checking it is safe to read.

    Raises:
        BnfoldError: the file is missing, not an ONNX model, or its external
            data is missing, truncated or points outside the model's folder.
    """
    path = Path(path)
    _require_model_file(path)
    try:
        model = ir.load(path)
    except (DecodeError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise BnfoldError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    except Exception as err:  # onnx raises assorted types on corrupt protobufs
        raise BnfoldError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    _require_graph(model, path)
    check_external_data(model, path.parent)
    return model


def check_external_data(model: ir.Model, model_dir: Path) -> None:
    """Refuse external data that is missing, short, or outside ``model_dir``.

    A model file is untrusted input: a location like ``../../etc/passwd``, an
    absolute path or a symlink out of the folder would make us read (and copy
    into the output) a file the user never meant to share.
    """
    root = model_dir.resolve()
    for tensor in external_tensors(model):
        location = str(tensor.location)
        target = (model_dir / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise BnfoldError(f"external data location {location!r} escapes the model's folder")
        if not target.is_relative_to(root):
            raise BnfoldError(
                f"external data location {location!r} resolves outside the model's folder"
            )
        if not target.is_file():
            raise BnfoldError(f"external data file {location!r} is missing")
        needed = (tensor.offset or 0) + (
            tensor.length if tensor.length is not None else tensor.nbytes
        )
        if target.stat().st_size < needed:
            raise BnfoldError(
                f"external data file {location!r} is shorter than tensor {tensor.name!r} needs"
            )


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every initializer (in any graph) whose data lives in an external file."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    accept: Callable[[Path], bool] | None = None,
) -> bool:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model to save.
        path: target file; its folder must exist and be writable.
        external_data: write initializers to ``<name>.data`` beside the model.
            None keeps them external only if the model already had external data
            (or is too big for one protobuf).
        accept: called with the fully written staged file before it replaces
            ``path``; returning False discards it (used to verify exactly the
            bytes that would be published).

    Returns:
        True if the file was written, False if ``accept`` rejected it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise BnfoldError(f"output folder {str(path.parent)!r} does not exist")
    if external_data is None:
        external_data = any(True for _ in external_tensors(model)) or _too_big_for_protobuf(model)
    data_name = f"{path.name}.data" if external_data else None
    try:
        with _staging_dir(path.parent) as stage:
            staged = stage / path.name
            ir.save(model, staged, external_data=data_name)
            _fsync_files(stage)
            if accept is not None and not accept(staged):
                return False
            if data_name:
                # Data first: a crash between the renames leaves the old model
                # with new data only if the old model pointed at the same name.
                os.replace(stage / data_name, path.parent / data_name)
            os.replace(staged, path)
            _fsync_dir(path.parent)
            return True
    except PermissionError:
        raise BnfoldError(f"cannot write to {str(path.parent)!r}: permission denied") from None
    except OSError as err:
        raise BnfoldError(f"cannot write {str(path)!r}: {_first_line(err)}") from None


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _require_model_file(path: Path) -> None:
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if not path.is_file():
        raise BnfoldError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BnfoldError(f"{path}: empty file, not an ONNX model")


def _require_graph(model: ir.Model, path: Path) -> None:
    # A valid protobuf of another kind often parses as a ModelProto with no graph.
    graph = model.graph
    if model.ir_version < 1 or (len(graph) == 0 and not graph.outputs):
        raise BnfoldError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_imports:
        raise BnfoldError(f"{path}: not an ONNX model (no opset imports)")


def _too_big_for_protobuf(model: ir.Model) -> bool:
    limit = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)  # headroom for the graph itself
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total > limit


def _fsync_files(folder: Path) -> None:
    for item in folder.iterdir():
        with open(item, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
