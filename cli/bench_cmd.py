"""`bnfold bench`: time an original and a folded model side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from bnfold.cli.errors import InputError, one_line_errors
from bnfold.cli.progress import progress, quiet_option
from bnfold.json_report import envelope
from bnfold.options import BENCH_LEVEL_NAMES, DEFAULT_BENCH_LEVELS, MAX_INPUT_BYTES

if TYPE_CHECKING:
    from bnfold.bench_report import BenchReport


@click.command()
@click.argument("original", type=click.Path(exists=True, dir_okay=False))
@click.argument("folded", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--level",
    "levels",
    multiple=True,
    type=click.Choice(BENCH_LEVEL_NAMES),
    help=(
        f"ORT optimisation level; repeat for several. [default: {', '.join(DEFAULT_BENCH_LEVELS)}]"
    ),
)
@click.option("--threads", default=1, show_default=True, help="Intra- and inter-op threads.")
@click.option("--warmup", default=10, show_default=True, help="Untimed runs of each model.")
@click.option("--runs", default=100, show_default=True, help="Timed runs of each model.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    help=(
        "ONNX: NAME:DIMS like input:8x3x224x224 for an input with dynamic dimensions "
        "(else 1). PyTorch: one shape like 1,3,224,224 per forward() argument. Repeatable."
    ),
)
@click.option(
    "--max-input-mib",
    type=click.IntRange(1),
    default=None,
    help=(
        f"ONNX: cap on the random inputs, all together, in MiB.  [default: {MAX_INPUT_BYTES >> 20}]"
    ),
)
@click.option(
    "--inputs",
    "inputs",
    type=click.Path(),
    metavar="FEEDS",
    help="ONNX: time on the first sample of this .npz, .npy or folder of .npz files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart (PNG, SVG...).")
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="PyTorch: allow whole pickled modules (.pt/.pth); unpickling can run their code.",
)
@one_line_errors
def bench(
    original: str,
    folded: str | None,
    levels: tuple[str, ...],
    threads: int,
    warmup: int,
    runs: int,
    seed: int,
    shapes: tuple[str, ...],
    max_input_mib: int | None,
    inputs: str | None,
    as_json: bool,
    quiet: bool,
    plot: str | None,
    trust_pickle: bool,
) -> None:
    """Time ORIGINAL against FOLDED (folded in memory when omitted), runs interleaved.

    ONNX models run in onnxruntime at each --level; `all-minus-fusions` is ORT's
    default level with its own Conv/BN fusions disabled, so the gain from folding
    shows. PyTorch programs (.pt2; whole pickled modules .pt/.pth only with
    --trust-pickle) are timed in eager mode.
    """
    from bnfold import bench as harness  # lazy: --help must not import onnxruntime
    from bnfold.bench_report import plot_report
    from bnfold.errors import BnfoldError

    try:
        counts = {"threads": threads, "warmup": warmup, "runs": runs, "seed": seed}
        with progress("timing", quiet=quiet or as_json) as tell:
            runs_done = None if tell is None else lambda done, total: tell("runs", done, total)
            report = _run(
                harness, original, folded, levels, shapes, max_input_mib, trust_pickle, counts,
                inputs, runs_done,
            )  # fmt: skip
        if plot:
            plot_report(report, plot)
    except BnfoldError as err:
        raise InputError(str(err)) from None
    if as_json:
        click.echo(json.dumps(envelope("bench", 0, report.to_dict()), indent=2))
    else:
        print_report(report)
        if plot:
            click.echo(f"plot written to {plot}")


def _run(
    harness: Any,
    original: str,
    folded: str | None,
    levels: tuple[str, ...],
    shapes: tuple[str, ...],
    max_input_mib: int | None,
    trust_pickle: bool,
    counts: dict[str, int],
    inputs: str | None,
    progress: Callable[[int, int], None] | None,
) -> BenchReport:
    from bnfold.errors import BnfoldError
    from bnfold.verification.inputs import parse_shapes

    if original.endswith(harness.TORCH_SUFFIXES):
        if not shapes:
            raise BnfoldError("a PyTorch model needs --shape per input, e.g. --shape 1,3,224,224")
        if max_input_mib is not None or inputs is not None:
            raise BnfoldError("--max-input-mib/--inputs are for ONNX models")
        dims = [_parse_shape(s) for s in shapes]
        return harness.bench_torch_files(
            original, folded, dims, trust_pickle, progress=progress, **counts
        )
    return harness.bench_onnx(
        original,
        folded,
        levels or DEFAULT_BENCH_LEVELS,
        shapes=parse_shapes(shapes),
        max_input_bytes=None if max_input_mib is None else max_input_mib << 20,
        progress=progress,
        inputs=inputs,
        **counts,
    )


def _parse_shape(text: str) -> list[int]:
    from bnfold.errors import BnfoldError

    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise BnfoldError(f"bad --shape {text!r}: want positive integers like 1,3,224,224")
    return dims


def _cell(stats: Any) -> str:
    return f"{stats.median_ms:.3f} ± {stats.iqr_ms:.3f}"


def print_report(report: BenchReport) -> None:
    """Print a bench report as a rich table, with threads and run counts."""
    from rich.console import Console
    from rich.table import Table

    from bnfold.bench_report import format_inputs, format_paired

    env = report.environment
    table = Table(
        title=f"{env.runtime}: {env.threads} thread(s), {env.warmup} warm-up + {env.runs} "
        "runs each, interleaved",
        title_justify="left",
    )
    table.add_column("level")
    table.add_column("original ms", justify="right")
    table.add_column("folded ms", justify="right")
    table.add_column("folded/orig", justify="right")
    for t in report.levels:
        table.add_row(t.level, _cell(t.original), _cell(t.folded), f"{t.ratio:.3f}")
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"original: {report.original}")
    folds = f" ({report.folds} folds)" if report.folds is not None else ""
    console.print(f"folded:   {report.folded}{folds}")
    console.print(f"inputs:   {format_inputs(report.inputs)}")
    console.print(table)
    console.print("median ± inter-quartile range; folded/orig < 1 means the fold is faster")
    for t in report.levels:
        console.print(f"{t.level}: folded/orig per back-to-back pair {format_paired(t.paired)}")
    versions = ", ".join(f"{k} {v}" for k, v in env.versions.items())
    console.print(f"{env.cpu} x{env.cpu_count}, {versions}")
