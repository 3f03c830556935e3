"""Exit codes and one-line errors shared by every command."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar

import click

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """A one-line error with exit code 2; under ``--json`` also a JSON object on stdout.

    Whether ``--json`` was asked for is read when the error is raised, from the
    command being run (its parameters, or, for a usage error, its arguments).
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.json_command = _json_command(click.get_current_context(silent=True))

    def show(self, file: Any = None) -> None:
        line = one_line(self.format_message())
        if self.json_command is not None:
            from bnfold.json_report import error_object

            click.echo(json.dumps(error_object(self.json_command, self.exit_code, line), indent=2))
        click.echo(f"bnfold: error: {line}", err=True)


_ARGV = "bnfold.argv"  # ctx.meta key: the group's arguments, for errors raised while parsing


def _json_command(ctx: click.Context | None) -> str | None:
    """The command whose error must be printed as JSON, or None without ``--json``."""
    if ctx is None:
        return None
    if ctx.params.get("as_json"):
        return ctx.info_name
    argv = ctx.find_root().meta.get(_ARGV, [])
    group = ctx.find_root().command
    if not argv or not isinstance(group, click.Group) or argv[0] not in group.commands:
        return None
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    return str(argv[0]) if "--json" in options else None


def one_line(message: str) -> str:
    """``message`` with control characters escaped: a newline in a path must not split it."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class OneLineUsageGroup(click.Group):
    """A group whose usage errors (unknown option, bad value) are one line, exit 2.

    click would print the usage and a hint over three lines; the one line names
    ``--help`` instead. A bare ``bnfold`` still shows the help.
    """

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _usage_as_one_line():
            return super().make_context(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_as_one_line():
            return super().invoke(ctx)


# click >= 8.2 shows the help for a bare command by raising this UsageError; 8.1 exits.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _usage_as_one_line() -> Iterator[None]:
    try:
        yield
    except _NO_ARGS_IS_HELP:  # a bare `bnfold`: the help, as click shows it
        raise
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "bnfold"
        raise InputError(f"{err.format_message().rstrip('.')} (see '{where} --help')") from None


def one_line_errors(func: F) -> F:
    """Turn library errors into one line and exit 2; BNFOLD_DEBUG=1 keeps tracebacks.

    The command runs with third-party warnings and log lines held back
    (:func:`bnfold.quiet.quiet_libraries`), so its own output is all it prints.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from bnfold.errors import BnfoldError, first_line
        from bnfold.quiet import quiet_libraries

        try:
            with quiet_libraries():
                return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BnfoldError as err:
            raise InputError(str(err)) from None
        except Exception as err:
            if os.environ.get("BNFOLD_DEBUG"):
                raise
            raise InputError(
                f"{type(err).__name__}: {first_line(err)} (BNFOLD_DEBUG=1 for a traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]
