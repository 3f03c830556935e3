"""Exit codes and one-line errors shared by every command."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


class InputError(click.ClickException):
    """A one-line error with exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"bnfold: error: {self.format_message()}", err=True)


def one_line_errors(func: F) -> F:
    """Turn library errors into one line and exit 2; BNFOLD_DEBUG=1 keeps tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from bnfold.errors import BnfoldError, first_line

        try:
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
