"""Errors a user can cause. The CLI turns each into one line and exit code 2."""

from __future__ import annotations


class BnfoldError(Exception):
    """Bad input or usage: a corrupt model, a bad path, an unsupported request.

    The message is one line meant for the person running the tool.
    """

    exit_code = 2


class NotSupportedError(BnfoldError):
    """A feature bnfold does not have (yet); the message names it."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), cut to ``limit``.

    Library and runtime errors (protobuf, onnxruntime, torch) carry multi-line
    dumps; a user sees one line.
    """
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def quoted(path: object) -> str:
    """``path`` for a one-line message: quoted, control characters escaped (``'a\\nb'``)."""
    import os

    text = os.fspath(path) if isinstance(path, str | os.PathLike) else str(path)
    return repr(text)
