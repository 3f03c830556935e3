"""``bnfold fold DIR -o OUTDIR [--jobs N]``: fold a folder, show progress and a summary.

Routed here by :func:`bnfold.cli.main.fold` when MODEL is a folder; the work is
done by :func:`bnfold.api.fold_path` (:func:`bnfold.batch.fold_directory`).
"""

from __future__ import annotations

import json
import sys

import click

from bnfold.batch import ERROR, NOT_VERIFIED, OK, VERIFY_FAILED, BatchReport, ModelOutcome
from bnfold.options import FoldOptions

_STYLE = {OK: "green", NOT_VERIFIED: "yellow", VERIFY_FAILED: "red", ERROR: "red"}


def fold_directory(model_dir: str, out_dir: str | None, options: FoldOptions, as_json: bool) -> int:
    """Fold every model under ``model_dir`` into ``out_dir``; return the exit code.

    Exit code: 0 if every model was folded and written (verified, or not
    verifiable without --strict), 1 if any failed verification (or was not
    verified with --strict: that model is not written, the others are), 2 if
    any model could not be folded at all.
    Progress goes to stderr; the table (or --json) to stdout.

    Raises:
        BnfoldError: unusable folders or no model found (the CLI prints one line).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from bnfold import api

    err_console = Console(file=sys.stderr)
    progress = Progress(
        TextColumn("folding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )
    task_id = progress.add_task("", total=None)

    def tell(text: str, done: int = 0, total: int = 0) -> None:
        progress.update(task_id, completed=done, total=total or None, description=text)

    with progress:
        report = api.fold_path(model_dir, out_dir, options, progress=tell)
    assert isinstance(report, BatchReport)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "exit_code": report.exit_code()}, indent=2))
    else:
        _print_table(report)
    return report.exit_code()


def _print_table(report: BatchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bnfold: {report.model_dir} -> {report.out_dir}", title_justify="left")
    for column, justify in (
        ("model", "left"),
        ("status", "left"),
        ("folded", "right"),
        ("refused", "right"),
        ("lowered", "right"),
        ("BN left", "right"),
        ("seconds", "right"),
        ("detail", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]  # fmt: skip
    for o in report.outcomes:
        table.add_row(
            o.source,
            f"[{_STYLE[o.status]}]{o.status}[/]",
            str(o.folded) if o.status != ERROR else "-",
            str(o.refused) if o.status != ERROR else "-",
            str(o.lowered) if o.status != ERROR else "-",
            str(o.bn_left) if o.status != ERROR else "-",
            f"{o.seconds:.2f}",
            _detail(o),
        )
    console = Console(file=sys.stdout, width=max(100, Console().width))
    console.print(table)
    counts = report.counts()
    console.print(
        f"{len(report.outcomes)} models in {report.seconds:.1f}s: {counts[OK]} ok, "
        f"{counts[NOT_VERIFIED]} not verified, {counts[VERIFY_FAILED]} failed verification, "
        f"{counts[ERROR]} errors",
        markup=False,
        highlight=False,
    )


def _detail(outcome: ModelOutcome) -> str:
    from rich.markup import escape

    if outcome.status == ERROR:
        return escape(outcome.error)
    verification = (outcome.result or {}).get("verification") or {}
    if outcome.status == NOT_VERIFIED:
        reason = verification.get("reason", "")[:120]
        # First, not after the reason: the table wraps long reasons.
        return escape(reason if outcome.written else f"nothing written (--strict): {reason}")
    if outcome.status == VERIFY_FAILED:
        return "verification failed: nothing written"
    return "written" if outcome.written else ""
