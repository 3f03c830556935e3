"""Load and save ONNX models safely, on top of onnx_ir.

Loading refuses, with one line, anything that is not a usable model and any
external-data reference that escapes the model's folder. External data stays
memory-mapped: only the tensors a fold rewrites are ever copied into memory.

Saving is atomic: the model and its external data are written into a temporary
folder beside the target, fsynced, then put in place by
:mod:`bnfold.onnx_front.publish`, so a crash leaves either the previous output
or the new one, never a partial one. The external data goes where torch's
exporter puts it, ``<model>.data`` beside the model (``out.onnx`` ->
``out.onnx.data``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from bnfold.errors import BnfoldError, first_line
from bnfold.onnx_front.publish import (
    SavedModel,
    data_file_name,
    data_locations,
    fsync_files,
    parse_model,
    publish,
    remove_stale_staging,
    require_writable_target,
    staging_dir,
)
from bnfold.paths import os_reason

# Tensors over 1 MB start at 64 KiB offsets, so onnxruntime can memory-map them
# instead of copying (onnx_ir >= 1.1 packs densely unless told otherwise).
_ALIGNED: dict[str, Any] = (
    {"alignment": 1 << 16} if "alignment" in inspect.signature(ir.save).parameters else {}
)


@contextlib.contextmanager
def quiet_ir_logs() -> Iterator[None]:
    """Hold back onnx_ir's warnings while it reads a model.

    It logs what it finds wrong in a damaged graph ("Input ... cannot be found in
    any scope"); with no logging configured Python prints that to stderr in front
    of bnfold's own one-line error, which says it better.
    """
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model, external data memory-mapped, after checking it is safe to read.

    Raises:
        BnfoldError: the file is missing, not an ONNX model, or its external
            data is missing, truncated or points outside the model's folder.
    """
    path = Path(path)
    _require_model_file(path)
    try:
        with quiet_ir_logs():
            model = ir.load(path)
    except RecursionError:
        raise BnfoldError(f"{path}: not a readable ONNX model (nested too deeply)") from None
    except Exception as err:  # onnx/protobuf/onnx_ir raise assorted types on corrupt input
        raise BnfoldError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    _require_graph(model, path)
    check_external_data(model, path.parent)
    return model


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike[str] = ".") -> ir.Model:
    """An in-memory ModelProto as an ir.Model, its external data checked like a file's.

    onnx_ir skips its own containment checks when a tensor has no base folder,
    so an external location like ``/etc/passwd`` in a proto would be read as is.
    Here locations resolve against ``base_dir`` (the current folder by default)
    and must stay inside it.

    Raises:
        BnfoldError: as :func:`check_external_data`.
    """
    with quiet_ir_logs():
        model = ir.serde.deserialize_model(proto)
    root = Path(base_dir)
    for tensor in external_tensors(model):
        tensor.base_dir = str(root)
    check_external_data(model, root)
    return model


def check_external_data(model: ir.Model, model_dir: Path) -> None:
    """Refuse external data that is missing, short, or outside ``model_dir``.

    A model file is untrusted input: a location like ``../../etc/passwd``, an
    absolute path or a symlink out of the folder would make us read (and copy
    into the output) a file the user never meant to share. Hard links are
    refused too (onnx_ir would refuse them later, mid-fold): a hard link is
    how a file from elsewhere gets "into" the folder without a symlink.

    Raises:
        BnfoldError: naming the tensor and the location.
    """
    try:
        root = model_dir.resolve()
        for tensor in external_tensors(model):
            _check_one_external(tensor, model_dir, root)
    except BnfoldError:
        raise
    except (OSError, ValueError) as err:  # NUL bytes, ELOOP, names too long...
        raise BnfoldError(f"bad external data reference ({first_line(err)})") from None


def _check_one_external(tensor: ir.ExternalTensor, model_dir: Path, root: Path) -> None:
    location = str(tensor.location)
    what = f"tensor {tensor.name!r}: external data location {location!r}"
    if not location:
        raise BnfoldError(f"{what} is empty")
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise BnfoldError(f"{what} escapes the model's folder")
    target = (model_dir / location).resolve()
    if not target.is_relative_to(root):
        raise BnfoldError(f"{what} resolves outside the model's folder (a symlink?)")
    if not target.exists():
        raise BnfoldError(f"{what}: file is missing")
    if not target.is_file():
        raise BnfoldError(f"{what} is not a regular file")
    info = target.stat()
    if info.st_nlink > 1:
        raise BnfoldError(f"{what} has {info.st_nlink} hard links; refusing to read it")
    offset = tensor.offset or 0
    if offset < 0 or (tensor.length is not None and tensor.length < 0):
        raise BnfoldError(f"{what} has a negative offset or length")
    if tensor.length is not None and tensor.length != tensor.nbytes:
        raise BnfoldError(
            f"{what} declares length {tensor.length} but its shape and dtype need "
            f"{tensor.nbytes} bytes"
        )
    if info.st_size < offset + tensor.nbytes:
        raise BnfoldError(
            f"{what} is shorter than declared ({info.st_size} bytes, "
            f"needs {offset + tensor.nbytes})"
        )


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every tensor whose data lives in an external file.

    Initializers and tensor attributes (say a Constant's ``value``), in the main
    graph and every subgraph: a tensor attribute may point outside the folder
    just as well as an initializer.
    """
    for tensor in all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            yield tensor


def all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every initializer and tensor attribute of the model, subgraphs included."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                yield attr.value
            elif attr.type == ir.AttributeType.TENSORS and attr.value:
                yield from attr.value


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    accept: Callable[[Path], bool] | None = None,
) -> bool:
    """:func:`save_model_files`, answering only whether the model was written."""
    return save_model_files(model, path, external_data=external_data, accept=accept) is not None


def save_model_files(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    accept: Callable[[Path], bool] | None = None,
) -> SavedModel | None:
    """Write ``model`` to ``path`` atomically; return the files written.

    Args:
        model: the model to save.
        path: target file; its folder must exist and be writable.
        external_data: write initializers to ``<name>.data`` beside the model,
            referenced by a relative location. None keeps them external
            only if the model already had external data (or is too big for one
            protobuf).
        accept: called with the fully written staged file before it replaces
            ``path``; returning False discards it (used to verify exactly the
            bytes that would be published).

    Returns:
        The model and data file published (``SavedModel.files`` lists them),
        or None if ``accept`` rejected the model and nothing was written.

    Raises:
        BnfoldError: the folder is missing or not writable, the disk is full, or
            ``path`` is a folder or a file the model itself reads its data from.
    """
    path = Path(path)
    reads = _files_read(model)
    previous = require_writable_target(path, reads)
    if external_data is None:
        external_data = any(True for _ in external_tensors(model)) or _too_big_for_protobuf(model)
    # A model without tensors has no data to put anywhere: no empty data file beside it.
    has_tensors = any(True for _ in all_tensors(model))
    data_name = data_file_name(path.name) if external_data and has_tensors else None
    try:
        remove_stale_staging(path.parent)
        with staging_dir(path.parent) as stage:
            staged = stage / path.name
            ir.save(model, staged, external_data=data_name, **_ALIGNED)
            fsync_files(stage)
            if accept is not None and not accept(staged):
                return None
            return publish(stage, path, data_name, previous, reads)
    except BnfoldError:
        raise
    except PermissionError:
        raise BnfoldError(f"cannot write to {str(path.parent)!r}: permission denied") from None
    except OSError as err:
        raise BnfoldError(f"cannot write {str(path)!r}: {os_reason(err)}") from None


def _files_read(model: ir.Model) -> frozenset[Path]:
    """The external data files ``model`` reads, resolved (an in-place save reads its output's)."""
    paths = {tensor.path for tensor in external_tensors(model)}  # thousands of tensors, few files
    return frozenset(Path(path).resolve() for path in paths)


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files the model at ``path`` names (existing or not), in its folder.

    Empty for a file that is not a model. The model is parsed without its data.
    """
    path = Path(path)
    proto = parse_model(path)
    if proto is None:
        return []
    return sorted({path.parent / loc for loc in data_locations(proto)})


def _require_model_file(path: Path) -> None:
    try:
        if not path.exists():
            raise BnfoldError(f"{path}: no such file")
        if not path.is_file():
            raise BnfoldError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise BnfoldError(f"{path}: empty file, not an ONNX model")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise BnfoldError(f"{path}: permission denied") from None
    except OSError as err:
        raise BnfoldError(f"{path}: {os_reason(err)}") from None
    except ValueError as err:  # embedded NUL byte in the name
        raise BnfoldError(f"bad model path ({first_line(err)})") from None


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
    for tensor in all_tensors(model):
        total += tensor.nbytes
    return total > limit


def evict_pages(tensor: ir.TensorProtocol | None) -> None:
    """Drop the pages of a memory-mapped external tensor that reading it made resident.

    They are file-backed, so the kernel re-reads them if needed; without this every
    folded weight of a multi-GB model would stay resident until the process ends.
    """
    raw = getattr(tensor, "raw", None)
    if isinstance(tensor, ir.ExternalTensor) and isinstance(raw, mmap.mmap):
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(mmap.MADV_DONTNEED)


def start_writeback(file: Any, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``file`` at ``offset`` to disk now.

    Linux starts background writeback only once a tenth of RAM is dirty, so a
    multi-GB save would leave nearly all of its disk writing to the final fsync;
    started early, the disk works while the fold computes the next blocks (the
    2.42 GB benchmark model, 6 alternating runs: final fsync 0.9 s -> ~0, fold
    and save median 5.2 s -> 3.4 s, fastest 3.4 s -> 2.9 s).
    ``posix_fadvise(DONTNEED)`` starts writeback of the dirty range and drops
    only pages already clean, so the output mostly stays cached for verification.
    A no-op where the call or the file descriptor is missing.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation: no fileno
        file.flush()
        advise(file.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
