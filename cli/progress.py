"""Progress on stderr while a command works: what it is doing, and a bar when the count is known.

Only for a person watching: nothing unless stderr is a terminal, and nothing with
``--json`` or ``--quiet``, where stdout is parsed and stderr is kept for errors.
The line is transient: it is gone when the work ends, before the report prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import click

from bnfold.cli.errors import F

Tell = Callable[..., None]
"""``tell(text, done=0, total=0)``: a step (``total`` 0) or ``done`` of ``total`` items."""


def quiet_option(func: F) -> F:
    """``-q/--quiet``: no progress on stderr (``--json`` implies it)."""
    return click.option(
        "-q", "--quiet", is_flag=True, help="No progress on stderr (--json implies it)."
    )(func)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def progress(title: str, *, quiet: bool) -> Iterator[Tell | None]:
    """A transient status line on stderr titled ``title``; yields its ``tell``, or None.

    None when ``quiet`` or stderr is not a terminal: callers pass it on as the
    API's optional progress callback.
    """
    if quiet:
        yield None
        return
    console = _stderr_console()
    if not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    display = Progress(
        SpinnerColumn(),
        TextColumn("{task.fields[title]}", markup=False),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = display.add_task("", total=None, title=title)

    def tell(text: str, done: int = 0, total: int = 0) -> None:
        counted = f"{done}/{total} {text}".rstrip() if total else text
        display.update(task, description=counted, completed=done, total=total or None)

    with display:
        yield tell
