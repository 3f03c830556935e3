"""Load and save ONNX models safely, on top of onnx_ir.

Loading refuses, with one line, anything that is not a usable model and any
external-data reference that escapes the model's folder. External data stays
memory-mapped: only the tensors a fold rewrites are ever copied into memory.

Saving is atomic: the model and its external data are written into a temporary
folder beside the target, fsynced, then renamed into place, so a crash leaves
either the previous output or the new one, never a partial one. The external
data goes where torch's exporter puts it, ``<model>.data`` beside the model
(``out.onnx`` -> ``out.onnx.data``). When the replaced output already reads
that file, the new data is first published under an interim name
(``<model>.<token>.data``) with a model naming it, then linked to
``<model>.data`` and the final model renamed in, so at every instant the model
in place reads data that belongs to it. Publishing happens under a lock on the
folder. It never replaces or deletes a data file that another model in the
folder names (the data then stays under the interim name, and the save says
so), and afterwards removes only files of those two forms that no model in the
folder names: bnfold never deletes a data file named otherwise. As with any
stable name, a reader that opens the model just before a save replaces both
and the data file just after can pair the old model with the new data: a
process that reads outputs while bnfold may be writing them can hold a shared
``flock`` on the folder, which every save takes exclusively to publish.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import mmap
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from bnfold.errors import BnfoldError, first_line
from bnfold.paths import os_reason

STAGING_PREFIX = ".bnfold-"
DATA_TOKEN_BYTES = 6  # <model>.<12 hex digits>.data: the interim data file name
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


@dataclass(frozen=True)
class SavedModel:
    """The files one save published: the model, then its external data file if any."""

    path: Path
    data: Path | None = None  # ``<model>.data``, or the interim name (see ``note``)
    note: str = ""  # why the data is not at ``<model>.data``, when it is not

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path,) if self.data is None else (self.path, self.data)


def data_file_name(model_name: str) -> str:
    """The external data file of a model named ``model_name``: torch's exporter's name."""
    return f"{model_name}.data"


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
    previous = _require_writable_target(model, path)
    if external_data is None:
        external_data = any(True for _ in external_tensors(model)) or _too_big_for_protobuf(model)
    # A model without tensors has no data to put anywhere: no empty data file beside it.
    has_tensors = any(True for _ in all_tensors(model))
    data_name = data_file_name(path.name) if external_data and has_tensors else None
    try:
        reads = _files_read(model)
        _remove_stale_staging(path.parent)
        with _staging_dir(path.parent) as stage:
            staged = stage / path.name
            ir.save(model, staged, external_data=data_name, **_ALIGNED)
            _fsync_files(stage)
            if accept is not None and not accept(staged):
                return None
            return _publish(stage, path, data_name, previous, reads)
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


def _publish(
    stage: Path,
    path: Path,
    data_name: str | None,
    previous: _Previous | None,
    reads: frozenset[Path],
) -> SavedModel:
    """Rename the staged model (and its data file) into place; drop the replaced output's data.

    Under a lock on the folder, so that concurrent saves to one target publish
    one after the other: each sees the model it actually replaces, the previous
    run's or a concurrent writer's, and removes that model's data files (and
    interim files a killed save left) once no model names them.
    """
    with _folder_lock(path.parent):
        now = _Previous.of(path, seen=previous)  # a concurrent save may have replaced it
        if data_name is None:
            os.replace(stage / path.name, path)
            saved = SavedModel(path)
        else:
            named_now = now.locations if now else frozenset()
            saved = _publish_with_data(stage, path, data_name, named_now, reads)
        _fsync_dir(path.parent)
        kept = {saved.data.name} if saved.data else set()
        replaced = (now.own_data if now else frozenset()) | _interim_files(path)
        _remove_unused_data(path, replaced - kept)
    return saved


def _publish_with_data(
    stage: Path, path: Path, data_name: str, named_now: frozenset[str], reads: frozenset[Path]
) -> SavedModel:
    """Publish the staged model and ``<model>.data``, never pairing a model with another's data.

    Free name (absent, or no model reads it): data, then model, renamed in.
    Otherwise an interim model naming ``<model>.<token>.data`` is published
    first; the data is then hard-linked over ``<model>.data`` and the final
    model renamed in. Unless some other model reads ``<model>.data``, or hard
    links are not available: the interim pair is then the output.
    """
    folder, staged = path.parent, stage / path.name
    data = folder / data_name
    blocked = _why_data_name_taken(path, data, named_now, reads)
    if blocked is None and data_name not in named_now:
        os.replace(stage / data_name, data)
        os.replace(staged, path)
        return SavedModel(path, data)
    interim = f"{path.name}.{secrets.token_hex(DATA_TOKEN_BYTES)}.data"
    interim_model = stage / f"{path.name}.interim"
    _write_with_location(staged, data_name, interim, interim_model)
    os.replace(stage / data_name, folder / interim)
    os.replace(interim_model, path)  # the output reads the interim name: whole at every instant
    if blocked is not None:
        return SavedModel(path, folder / interim, f"{data_name} {blocked}; data in {interim}")
    # From the link to the unlink the data has two names, and onnx_ir refuses to
    # read a file with two links: a save killed within these few calls leaves
    # an output onnxruntime reads and the next save tidies (_interim_files).
    try:
        os.link(folder / interim, stage / data_name)
    except OSError as err:  # EPERM, ENOTSUP, EMLINK: no hard links on this file system
        note = f"cannot hard-link {interim} to {data_name} ({os_reason(err)}); data in {interim}"
        return SavedModel(path, folder / interim, note)
    os.replace(stage / data_name, data)
    os.replace(staged, path)
    os.unlink(folder / interim)
    return SavedModel(path, data)


def _why_data_name_taken(
    path: Path, data: Path, named_now: frozenset[str], reads: frozenset[Path]
) -> str | None:
    """Why ``data`` must not be replaced: a folder, or data another model reads; else None.

    The replaced output itself may read it (that is what an in-place save
    replaces); any other model in the folder, or the file the model being
    saved was loaded from, must keep it.
    """
    if not os.path.lexists(data):
        return None
    if data.is_dir() and not data.is_symlink():
        return "is a folder"
    if data.name not in named_now and data.resolve() in reads:
        return "is the data the saved model was read from"
    readers = _models_naming(path, {data.name})
    if readers:
        return f"is read by {readers[0].name}"
    return None


def _write_with_location(model_file: Path, old: str, new: str, target: Path) -> None:
    """Write ``model_file`` to ``target`` with external data location ``old`` renamed ``new``."""
    proto = onnx.load(str(model_file), load_external_data=False)
    for tensor in _tensor_protos(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(target, "wb") as fh:
        fh.write(proto.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (no lock file is left behind)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: saves are still atomic, only not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _require_writable_target(model: ir.Model, path: Path) -> _Previous | None:
    """Refuse a target the save must not replace; return what it replaces.

    A previous output is parsed once (without its external data) to check it
    is a model and to find its data files, then dropped: an inline model is
    not held through the save.
    """
    if not path.parent.is_dir():
        raise BnfoldError(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise BnfoldError(f"output {str(path)!r} is a folder")
    if not path.name or path.name in (".", ".."):
        raise BnfoldError(f"output {str(path)!r} is not a file name")
    if not path.exists():
        return None
    for tensor in external_tensors(model):
        with contextlib.suppress(OSError):
            if os.path.samefile(tensor.path, path):
                raise BnfoldError(f"output {str(path)!r} is the external data file the model reads")
    previous = _Previous.of(path)
    if previous is None:
        # Only a previous model is ours to replace: anything else (an input's
        # external data file, a typo naming some other file) is left alone.
        raise BnfoldError(
            f"output {str(path)!r} exists and is not an ONNX model; refusing to overwrite it"
        )
    return previous


def external_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The external data files the model at ``path`` names (existing or not), in its folder.

    Empty for a file that is not a model. The model is parsed without its data.
    """
    path = Path(path)
    proto = _parse_model(path)
    if proto is None:
        return []
    return sorted({path.parent / loc for loc in _data_locations(proto)})


def _data_locations(proto: onnx.ModelProto) -> Iterator[str]:
    for tensor in _tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location:
                yield location


def _parse_model(path: Path) -> onnx.ModelProto | None:
    """The model in ``path`` without its external data, or None if it is not one."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure: not a model
        return None
    if proto.ir_version >= 1 and proto.HasField("graph") and len(proto.opset_import) > 0:
        return proto
    return None


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    prefix = f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-"
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_stale_staging(parent: Path) -> None:
    """Delete staging folders left by killed bnfold processes of this host.

    Only folders whose process is gone: another run saving into the same
    folder right now must keep its own.
    """
    pattern = re.compile(re.escape(STAGING_PREFIX + _host_tag()) + r"-(\d+)-")
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            found = pattern.match(entry.name)
            if found and entry.is_dir(follow_symlinks=False) and not _alive(int(found[1])):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


@dataclass(frozen=True)
class _Previous:
    """The model a save replaces: which file it was, and the data files it names."""

    identity: tuple[int, int, int, int]  # device, inode, size, mtime
    locations: frozenset[str]
    own_data: frozenset[str]

    @classmethod
    def of(cls, path: Path, seen: _Previous | None = None) -> _Previous | None:
        """The model now at ``path`` (None if none); ``seen`` is reused if it is still that file.

        Its own data files are those it names in the two forms :func:`save_model`
        writes, ``<name>.data`` and ``<name>.<12 hex digits>.data``: a data file
        named otherwise (``weights.bin``, say) was not written for this output
        and is never deleted.
        """
        try:
            info = path.stat()
        except OSError:
            return None
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if seen is not None and seen.identity == identity:
            return seen
        proto = _parse_model(path)
        if proto is None:
            return None
        names = frozenset(_data_locations(proto))
        own = frozenset(n for n in names if n == data_file_name(path.name) or _is_interim(path, n))
        return cls(identity, names, own)


def _is_interim(path: Path, name: str) -> bool:
    """Whether ``name`` has the form of the interim data file of a save to ``path``."""
    token = rf"\.[0-9a-f]{{{2 * DATA_TOKEN_BYTES}}}\.data"
    return re.fullmatch(re.escape(path.name) + token, name) is not None


def _interim_files(path: Path) -> frozenset[str]:
    """Interim data files of ``path`` in its folder: a save killed mid-publish leaves them.

    Called under the folder lock, where no save is between its renames.
    """
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        return frozenset(
            e.name
            for e in entries
            if _is_interim(path, e.name) and e.is_file(follow_symlinks=False)
        )
    return frozenset()


def _tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from _tensor_protos(sub)


def _remove_unused_data(path: Path, names: Iterable[str]) -> None:
    """Delete the data files ``names`` beside ``path`` unless another model in the folder names one.

    A copy of the output (``cp folded.onnx b.onnx``) still points at the same
    data file: any ``*.onnx`` beside it that names the file keeps it.
    """
    names = set(names)
    if not names:
        return
    names -= {n for other in _other_models(path) for n in _names_in(other, names)}
    for name in names:
        with contextlib.suppress(OSError):
            os.remove(path.parent / name)


def _models_naming(path: Path, names: set[str]) -> list[Path]:
    """The ``*.onnx`` files beside ``path`` (not ``path``) that name one of ``names`` as data."""
    return [other for other in _other_models(path) if _names_in(other, names)]


def _other_models(path: Path) -> list[Path]:
    return sorted(other for other in path.parent.glob("*.onnx") if other.name != path.name)


def _names_in(model_file: Path, names: set[str]) -> set[str]:
    """Which of ``names`` the model file names as an external data location.

    Searched for as the serialized location value (the field tag, the length,
    the name), so ``b.onnx.data`` is not mistaken for a mention of
    ``a.onnx.data`` inside ``ba.onnx.data``; a false match only keeps a file.
    """
    try:
        with open(model_file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return {name for name in names if m.find(_location_bytes(name)) != -1}
    except (OSError, ValueError):  # unreadable or empty: it cannot name anything we can see
        return set()


def _location_bytes(name: str) -> bytes:
    """``name`` as the value of a StringStringEntryProto (field 2, length-delimited)."""
    raw = name.encode()
    length, varint = len(raw), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([0x12]) + bytes(varint) + raw


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


def _fsync_files(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
