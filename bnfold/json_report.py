"""The JSON objects bnfold prints (``--json``) and saves (``--report``), versioned.

Every top-level object carries ``schema`` (the version of its layout, bumped
when a field changes meaning or goes away; new fields do not bump it),
``command`` and ``exit_code``, then the command's own fields. An error is such
an object too, with ``error``: with ``--json`` a pipeline always gets exactly
one object on stdout. ``docs/json-report.md`` documents every field; a test
checks it against what the code writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 1


def envelope(command: str, exit_code: int, body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` as a top-level object: schema, command and exit code first."""
    head = {"schema": SCHEMA_VERSION, "command": command, "exit_code": exit_code}
    clash = head.keys() & body.keys()
    if clash:
        raise ValueError(f"a report body may not set {sorted(clash)}")
    return {**head, **body}


def error_object(command: str, exit_code: int, message: str) -> dict[str, Any]:
    """What ``--json`` prints when a command fails: the exit code and the one-line message."""
    return envelope(command, exit_code, {"error": message})
