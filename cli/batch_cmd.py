"""The table ``bnfold fold DIR -o OUTDIR`` prints: one row per model, then the counts.

On a terminal a rich table; anywhere else (a CI log, a file) plain aligned text
with one line per model, never wrapped: a log viewer of ~100 columns must not
break a model's name in the middle.
"""

from __future__ import annotations

import sys

from bnfold.batch import ERROR, NOT_VERIFIED, OK, VERIFY_FAILED, BatchReport, ModelOutcome
from bnfold.cli.errors import one_line

_STYLE = {OK: "green", NOT_VERIFIED: "yellow", VERIFY_FAILED: "red", ERROR: "red"}
_COLUMNS = (
    ("model", "left"),
    ("status", "left"),
    ("folded", "right"),
    ("refused", "right"),
    ("lowered", "right"),
    ("BN left", "right"),
    ("seconds", "right"),
    ("detail", "left"),
)


def print_table(report: BatchReport) -> None:
    """Every model's outcome and the counts, on stdout."""
    from rich.console import Console

    console = Console(file=sys.stdout, highlight=False)
    if console.is_terminal:
        _print_rich(report, console)
    else:
        for line in plain_table(report):
            console.print(line, markup=False, soft_wrap=True)
    console.print(_counts_line(report), markup=False, soft_wrap=True)


def plain_table(report: BatchReport) -> list[str]:
    """The table as lines of aligned plain text, one per model after the title and header."""
    rows = [[name for name, _ in _COLUMNS]] + [_cells(o) for o in report.outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [f"bnfold: {one_line(report.model_dir)} -> {one_line(report.out_dir)}"]
    for row in rows:
        cells = [
            cell.rjust(width) if justify == "right" else cell.ljust(width)
            for cell, width, (_, justify) in zip(row, widths, _COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _cells(o: ModelOutcome) -> list[str]:
    counts = [o.folded, o.refused, o.lowered, o.bn_left]
    numbers = [str(n) if o.status != ERROR else "-" for n in counts]
    return [one_line(o.source), o.status, *numbers, f"{o.seconds:.2f}", _detail(o)]


def _print_rich(report: BatchReport, console: object) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"bnfold: {report.model_dir} -> {report.out_dir}", title_justify="left")
    for column, justify in _COLUMNS:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for o in report.outcomes:
        cells = _cells(o)
        cells[1] = f"[{_STYLE[o.status]}]{o.status}[/]"
        table.add_row(escape(cells[0]), cells[1], *cells[2:-1], escape(cells[-1]))
    console.print(table)  # type: ignore[attr-defined]


def _counts_line(report: BatchReport) -> str:
    counts = report.counts()
    return (
        f"{len(report.outcomes)} models in {report.seconds:.1f}s: {counts[OK]} ok, "
        f"{counts[NOT_VERIFIED]} not verified, {counts[VERIFY_FAILED]} failed verification, "
        f"{counts[ERROR]} errors"
    )


def _detail(outcome: ModelOutcome) -> str:
    if outcome.status == ERROR:
        return one_line(outcome.error)
    verification = (outcome.result or {}).get("verification") or {}
    if outcome.status == NOT_VERIFIED:
        reason = verification.get("reason", "")[:120]
        # First, not after the reason: the table wraps long reasons.
        return one_line(reason if outcome.written else f"nothing written (--strict): {reason}")
    if outcome.status == VERIFY_FAILED:
        return "verification failed: nothing written"
    return "written" if outcome.written else ""
