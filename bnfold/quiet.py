"""Third-party noise held back while a command runs: Python warnings and library log lines.

A command's output is its own: the report on stdout and, for an error, one line
on stderr. torch, onnxscript and numpy warn and log by themselves (a UserWarning
on export, "torchvision is not installed" on every ONNX export), and those
lines would come first. ``BNFOLD_DEBUG=1`` lets them through. Worker processes
of a quiet caller are quiet too (:func:`for_worker`): spawned interpreters do
not inherit warning filters or logging state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator

_active = False


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Ignore warnings and log records below ERROR inside the block (not with BNFOLD_DEBUG)."""
    global _active
    if _active or os.environ.get("BNFOLD_DEBUG"):
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        _silence()
        try:
            yield
        finally:
            _active = False
            logging.disable(previous)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the block, then restore their levels.

    For library calls whose warnings never concern the user, with or without the
    CLI around them (a failed export attempt, the exporter's torchvision notice).
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def for_worker() -> Callable[[], None] | None:
    """The initializer that makes a worker process as quiet as this one is (None: not quiet)."""
    return _silence if _active else None


def _silence() -> None:
    global _active
    warnings.simplefilter("ignore")
    # Errors still pass: bnfold's .pt2 loader reads torch's error records to explain a failure.
    logging.disable(logging.WARNING)
    _active = True
