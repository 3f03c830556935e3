"""Checks on the files a command will write, made before it writes any.

A command names its inputs (the model, its external data, ``--weights``) and
its outputs (the model, ``--to-onnx``, ``--report``). Before anything is
written every output must name a file in an existing, writable folder that is
not a folder itself, no two outputs may be the same file, and no output may be
an input, whatever the spelling: ``./m.pt2``, a symlink or a hard link of the
input all count (resolved paths are compared, and device/inode where the file
exists). The one exception is the model written over its own input with
``--in-place``.

Every file is then written by :func:`staged_file`: to a temp file beside it,
fsynced, renamed into place, with the mode the umask gives a new file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import BnfoldError, first_line, quoted

PathArg = str | os.PathLike[str]
# What open(..., "w") asks for: the umask (and a default ACL) then decide.
NEW_FILE_MODE = 0o666


@dataclass(frozen=True)
class Named:
    """A path and what it is to the command ("output", "--report", ...)."""

    role: str
    path: Path

    @classmethod
    def of(cls, role: str, path: PathArg | None) -> Named | None:
        return None if path is None else cls(role, Path(path))


def same_file(a: PathArg, b: PathArg) -> bool:
    """True if ``a`` and ``b`` name one file: same resolved path, or same inode."""
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError):  # a loop of symlinks, a NUL byte: not provably the same
        return False


def require_safe_outputs(
    outputs: Iterable[Named | None],
    inputs: Iterable[Named | None],
    *,
    in_place: tuple[PathArg, PathArg] | None = None,
    offer_in_place: bool = False,
) -> None:
    """Refuse, before anything is written, outputs that would destroy a file or fail late.

    Args:
        outputs: every file the command will write.
        inputs: every file it reads.
        in_place: the one (output, input) pair allowed to be the same file.
        offer_in_place: name ``--in-place`` when the output is the input.

    Raises:
        BnfoldError: naming the two roles that collide, or the unwritable output.
    """
    outs = [o for o in outputs if o is not None]
    ins = [i for i in inputs if i is not None]
    for n, out in enumerate(outs):
        _require_writable(out)
        for other in outs[:n]:
            if same_file(out.path, other.path):
                raise BnfoldError(
                    f"{out.role} and {other.role} are the same file {quoted(out.path)}"
                )
        for source in ins:
            if same_file(out.path, source.path) and not _allowed(out, source, in_place):
                offer = offer_in_place and out.role == "output" and source.role == "input"
                hint = "; pass --in-place to overwrite it" if offer else ""
                what = f"{out.role} {quoted(out.path)}"
                raise BnfoldError(f"{what} is the {source.role} {quoted(source.path)}{hint}")


def _allowed(out: Named, source: Named, in_place: tuple[PathArg, PathArg] | None) -> bool:
    return in_place is not None and (
        same_file(out.path, in_place[0]) and same_file(source.path, in_place[1])
    )


def _require_writable(out: Named) -> None:
    folder = out.path.parent
    if not folder.is_dir():
        raise BnfoldError(f"{out.role} folder {quoted(folder)} does not exist")
    if out.path.is_dir():
        raise BnfoldError(f"{out.role} {quoted(out.path)} is a folder")
    # Outputs are renamed into place: the folder must be writable, not the file.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BnfoldError(f"cannot write {out.role} {quoted(out.path)}: permission denied")


def write_text_atomic(path: PathArg, text: str, role: str = "report") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`staged_file`).

    Raises:
        BnfoldError: the file cannot be written (nothing is left behind).
    """
    with staged_file(path, role) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def staged_file(path: PathArg, role: str = "output") -> Iterator[Path]:
    """A new temp file beside ``path`` to write; on success it is fsynced and renamed over it.

    The temp file is created as any new file is (mode 0666 less the umask, and
    a folder's default ACL), so the published file is as readable as one the
    user's own tools would write; ``tempfile.mkstemp`` would make it 0600,
    which another user or container picking the artefact up cannot read.
    The name is hidden (``.<name>.<token>.tmp<suffix>``, the suffix kept for
    writers that go by it) and removed if the body raises.

    Raises:
        BnfoldError: the temp file cannot be created, written, or renamed
            (nothing is left behind).
    """
    target = Path(path)
    tmp: Path | None = None
    try:
        tmp = _create_beside(target)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        tmp = None
    except OSError as err:
        raise BnfoldError(f"cannot write {role} {quoted(target)}: {os_reason(err)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _create_beside(target: Path) -> Path:
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def os_reason(err: OSError) -> str:
    """A short reason for a failed write: the disk-full family by name, else strerror."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if err.errno == errno.EFBIG:
        return "file too large (file size limit reached)"
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return err.strerror or first_line(err)
