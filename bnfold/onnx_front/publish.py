"""Put a staged model (and its external data) in place of an output, atomically.

:func:`bnfold.onnx_front.io.save_model_files` writes the model into a staging
folder beside the target and fsyncs it; :func:`publish` renames it into place.
When the replaced output already reads ``<model>.data``, the new data is first
published under an interim name (``<model>.<token>.data``) with a model naming
it, then linked to ``<model>.data`` and the final model renamed in, so at every
instant the model in place reads data that belongs to it. Publishing happens
under a lock on the folder. It never replaces or deletes a data file that
another model in the folder names (the data then stays under the interim name,
and the save says so), and afterwards removes only files of those two forms
that no model in the folder names: bnfold never deletes a data file named
otherwise. As with any stable name, a reader that opens the model just before a
save replaces both and the data file just after can pair the old model with the
new data: a process that reads outputs while bnfold may be writing them can hold
a shared ``flock`` on the folder, which every save takes exclusively to publish.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.errors import BnfoldError
from bnfold.paths import os_reason

STAGING_PREFIX = ".bnfold-"
DATA_TOKEN_BYTES = 6  # <model>.<12 hex digits>.data: the interim data file name


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


def publish(
    stage: Path,
    path: Path,
    data_name: str | None,
    previous: Previous | None,
    reads: frozenset[Path],
) -> SavedModel:
    """Rename the staged model (and its data file) into place; drop the replaced output's data.

    Under a lock on the folder, so that concurrent saves to one target publish
    one after the other: each sees the model it actually replaces, the previous
    run's or a concurrent writer's, and removes that model's data files (and
    interim files a killed save left) once no model names them.
    """
    with _folder_lock(path.parent):
        now = Previous.of(path, seen=previous)  # a concurrent save may have replaced it
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


def require_writable_target(path: Path, reads: frozenset[Path]) -> Previous | None:
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
    for data in reads:  # the external data files the saved model reads
        with contextlib.suppress(OSError):
            if os.path.samefile(data, path):
                raise BnfoldError(f"output {str(path)!r} is the external data file the model reads")
    previous = Previous.of(path)
    if previous is None:
        # Only a previous model is ours to replace: anything else (an input's
        # external data file, a typo naming some other file) is left alone.
        raise BnfoldError(
            f"output {str(path)!r} exists and is not an ONNX model; refusing to overwrite it"
        )
    return previous


def data_locations(proto: onnx.ModelProto) -> Iterator[str]:
    """The external data locations the tensors of ``proto`` name (main graph and subgraphs)."""
    for tensor in _tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location:
                yield location


def parse_model(path: Path) -> onnx.ModelProto | None:
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
def staging_dir(parent: Path) -> Iterator[Path]:
    """A fresh folder in ``parent`` named for this host and process, removed on exit (a
    killed process's is found by :func:`remove_stale_staging`)."""
    prefix = f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-"
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_staging(parent: Path) -> None:
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
class Previous:
    """The model a save replaces: which file it was, and the data files it names."""

    identity: tuple[int, int, int, int]  # device, inode, size, mtime
    locations: frozenset[str]
    own_data: frozenset[str]

    @classmethod
    def of(cls, path: Path, seen: Previous | None = None) -> Previous | None:
        """The model now at ``path`` (None if none); ``seen`` is reused if it is still that file.

        Its own data files are those it names in the two forms
        :func:`bnfold.onnx_front.io.save_model` writes, ``<name>.data`` and
        ``<name>.<12 hex digits>.data``: a data file named otherwise
        (``weights.bin``, say) was not written for this output and is never deleted.
        """
        try:
            info = path.stat()
        except OSError:
            return None
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if seen is not None and seen.identity == identity:
            return seen
        proto = parse_model(path)
        if proto is None:
            return None
        names = frozenset(data_locations(proto))
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


def fsync_files(folder: Path) -> None:
    """Flush every file in ``folder`` to disk, before any of them is renamed into place."""
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
