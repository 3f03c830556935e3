"""The ``bnfold`` command line: thin click commands over the Python API.

Each command maps its flags to the API's options, calls one API function,
prints the outcome (text, or with ``--json`` one JSON object: docs/json-report.md)
and exits with its code: 0 ok; 1 verification failed, or not verified with
--strict, or (``inspect``) a model over --max-left; 2 bad input or usage, one
line on stderr and no traceback. ``fold`` writes its output exactly when it
exits 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bnfold.cli.batch_cmd import print_table
from bnfold.cli.bench_cmd import bench
from bnfold.cli.errors import (
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    InputError,
    OneLineUsageGroup,
    one_line,
    one_line_errors,
)
from bnfold.cli.flags import (
    LowerSpellingCommand,
    lower_options,
    lowering,
    model_source,
    torch_options,
    verify_options,
    verify_options_for,
)
from bnfold.cli.progress import progress, quiet_option
from bnfold.json_report import envelope
from bnfold.options import DEFAULT_BENCH_LEVELS, FoldOptions, LowerForm, Rounding


@click.group(cls=OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold inference BatchNorm into Conv/ConvTranspose/Gemm/MatMul/Linear, verify, measure."""


main.add_command(bench)


@main.command(cls=LowerSpellingCommand)
@click.argument("model", type=click.Path(), required=False)
@click.option("-o", "--output", type=click.Path(), help="Folded model (or folder) to write.")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL (still atomic and verified).")
@click.option(
    "--no-verify", is_flag=True, help="Skip the proof and the comparison with the original."
)
@click.option(
    "--no-prove",
    is_flag=True,
    help="Skip the proof for all inputs that verification makes first (sampling only).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Write nothing and exit 1 when the result could not be verified.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    help="Also write the JSON report here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@quiet_option
@click.option(
    "--no-clone-shared",
    is_flag=True,
    help="Refuse (shared_weight) instead of copying a weight other nodes also read.",
)
@click.option(
    "--rounding",
    type=click.Choice([r.value for r in Rounding]),
    default=Rounding.NEAREST.value,
    show_default=True,
    callback=lambda _ctx, _param, value: Rounding(value),
    help=(
        "How folded weights are cast to the model's dtype: nearest (the exact float64 "
        "fold), or balanced (each output channel's rounding errors cancel; for fp16/bf16)."
    ),
)
@lower_options
@click.option("--jobs", type=click.IntRange(1), default=1, help="Folder mode: parallel processes.")
@click.option(
    "--to-onnx",
    type=click.Path(dir_okay=False),
    help="torch: also export the folded model to this ONNX file.",
)
@click.option(
    "--bench",
    "run_bench",
    is_flag=True,
    help=(
        "ONNX, with -o: then time original vs folded at disable_all, all, "
        "all-minus-fusions, on the inputs verification used (--shape, --inputs)."
    ),
)
@torch_options
@verify_options
@one_line_errors
def fold(
    model: str | None,
    output: str | None,
    in_place: bool,
    no_verify: bool,
    no_prove: bool,
    strict: bool,
    report_path: str | None,
    as_json: bool,
    quiet: bool,
    no_clone_shared: bool,
    rounding: Rounding,
    lower_standalone: bool,
    lower_form: LowerForm | None,
    jobs: int,
    to_onnx: str | None,
    run_bench: bool,
    module_spec: str | None,
    weights: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
    **verify_kw: Any,
) -> None:
    """Fold BatchNorm and constant affines in MODEL into their linear ops and save.

    MODEL is an .onnx file, a folder (every *.onnx in it is folded into the
    folder -o), a torch .pt2 file, or omitted with --module for a torch factory.
    """
    from bnfold import api

    source = model_source(model, module_spec, weights, trust_pickle, input_shapes)
    options = FoldOptions(
        verify=not no_verify,
        prove=not no_prove,
        verify_options=verify_options_for(source, verify_kw),
        require_verified=strict,
        clone_shared=not no_clone_shared,
        rounding=rounding,
        lower=lowering(lower_standalone, lower_form),
        in_place=in_place,
        to_onnx=to_onnx,
        trust_pickle=trust_pickle,
        jobs=jobs,
        report_path=report_path,
        bench_levels=DEFAULT_BENCH_LEVELS if run_bench else (),
    )
    with progress(module_spec or Path(model or "").name, quiet=quiet or as_json) as tell:
        outcome = api.fold_path(source, output, options, progress=tell)
    if as_json:
        click.echo(json.dumps(outcome.to_dict(), indent=2))
    elif isinstance(outcome, api.FoldOutcome):
        click.echo(outcome.summary())
    else:
        print_table(outcome)
    sys.exit(outcome.exit_code())


@main.command(cls=LowerSpellingCommand)
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--max-left",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help=(
        "A gate for CI: exit 1 when a model would keep more than N inference "
        "BatchNorms unfolded (after lowering, with --lower-standalone)."
    ),
)
@quiet_option
@lower_options
@torch_options
@one_line_errors
def inspect(
    models: tuple[str, ...],
    as_json: bool,
    max_left: int | None,
    quiet: bool,
    lower_standalone: bool,
    lower_form: LowerForm | None,
    **torch_kw: Any,
) -> None:
    """List every fold bnfold would make in MODEL..., and every refusal with its reason.

    With --lower-standalone, also what the lowering would rewrite and what would
    still be left: the table ``fold --lower-standalone`` would end with.
    Exit 0, 1 when a model is over --max-left, 2 when one cannot be read (the
    others are still inspected).
    """
    from bnfold import api

    if torch_kw["module_spec"] is not None and models:
        raise InputError("give MODEL or --module, not both")
    sources = [model_source(model, **torch_kw) for model in models or [None]]
    lower = lowering(lower_standalone, lower_form)
    with progress("inspecting", quiet=quiet or as_json) as tell:
        run = api.inspect_each(
            sources, lower_standalone=lower, trust_pickle=torch_kw["trust_pickle"],
            max_left=max_left, progress=tell,
        )  # fmt: skip
    failed = [i for i in run.inspections if i.error]
    if len(run.inspections) == 1 and failed:
        raise InputError(failed[0].error)
    if as_json:
        click.echo(json.dumps(run.to_dict(), indent=2))
    else:
        _print_inspections(run.inspections)
    for inspection in failed:
        click.echo(f"bnfold: error: {one_line(inspection.error)}", err=True)
    sys.exit(run.exit_code())


def _print_inspections(inspections: list[Any]) -> None:
    """One model's summary as it is; several, each under its name."""
    if len(inspections) == 1:
        click.echo(inspections[0].summary())
        return
    for inspection in inspections:
        if not inspection.error:
            click.echo(f"== {inspection.model}\n{inspection.summary()}")


@main.command()
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--prove",
    is_flag=True,
    help="First prove FOLDED computes ORIGINAL's function for all inputs, without running them.",
)
@click.option(
    "--no-sample",
    is_flag=True,
    help="With --prove: run neither model (for models no runtime can load); the proof decides.",
)
@quiet_option
@torch_options
@verify_options
@one_line_errors
def verify(
    models: tuple[str, ...], as_json: bool, prove: bool, no_sample: bool, quiet: bool, **kw: Any
) -> None:
    """Compare FOLDED with ORIGINAL: `verify ORIGINAL FOLDED`, or `verify --module ... FOLDED`.

    ONNX models run on random inputs (or --inputs) at ORT_DISABLE_ALL; torch .pt2
    programs run eagerly on their example inputs and random draws (or --inputs).
    Outputs and fold sites are compared. With --prove the pair is first proven
    for all inputs from the graphs: a difference it finds fails, a proof that
    holds passes models no runtime can load, and a region it cannot model is left
    to the sampled check. Exit 0 if verified, 1 if the proof or a tensor fails or
    nothing could be checked (no runtime can load the original and no proof
    holds), 2 on bad input (a broken original among it).
    """
    torch_kw = {k: kw.pop(k) for k in ("module_spec", "weights", "trust_pickle", "input_shapes")}
    wanted = 1 if torch_kw["module_spec"] else 2
    if len(models) != wanted:
        raise InputError("expected ORIGINAL FOLDED (or --module ... FOLDED)")
    from bnfold import api

    source = model_source(models[0] if wanted == 2 else None, **torch_kw)
    options = verify_options_for(source, kw)
    with progress("verifying", quiet=quiet or as_json) as tell:
        if tell is not None:
            tell(models[-1])
        result = api.verify_models(
            source, models[-1], options, torch_kw["trust_pickle"], prove=prove, sample=not no_sample
        )
    code = EXIT_OK if result.passed else EXIT_VERIFY_FAILED
    if as_json:
        click.echo(json.dumps(envelope("verify", code, result.to_dict()), indent=2))
    else:
        click.echo(result.summary())
    sys.exit(code)


if __name__ == "__main__":
    main()
