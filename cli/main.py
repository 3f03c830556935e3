"""The ``bnfold`` command line: thin click commands over the Python API.

Exit codes: 0 ok, 1 verification failed (or not verified with --strict),
2 bad input or usage (one line on stderr, no traceback). ``fold`` writes its
output exactly when it exits 0.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from bnfold.cli.bench_cmd import bench
from bnfold.cli.errors import (
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    F,
    InputError,
    OneLineUsageGroup,
    one_line_errors,
)
from bnfold.options import (
    DEFAULT_BENCH_LEVELS,
    MAX_INPUT_BYTES,
    FoldOptions,
    LowerForm,
    Rounding,
)


def verify_options(func: F) -> F:
    """The options that tune verification, shared by fold and verify."""
    options = [
        click.option(
            "--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance."
        ),
        click.option(
            "--rtol",
            type=float,
            default=None,
            help="Relative tolerance (of max|output|); default by dtype.",
        ),
        click.option(
            "--samples",
            type=click.IntRange(1),
            default=3,
            show_default=True,
            help="Random input draws.",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."
        ),
        click.option(
            "--shape",
            "shapes",
            multiple=True,
            metavar="NAME:1x3x224x224",
            help="Concrete shape for an input with dynamic dims (repeatable).",
        ),
        click.option(
            "--max-input-mib",
            type=click.IntRange(1),
            default=None,
            help=(
                "Cap on one sample of random inputs, all inputs together, in MiB; "
                f"larger: not verified.  [default: {MAX_INPUT_BYTES >> 20}]"
            ),
        ),
        click.option(
            "--inputs",
            "inputs",
            type=click.Path(),
            metavar="FEEDS",
            help=(
                "Verify on these inputs instead of random ones: an .npz (one array per "
                "input name), a folder of .npz files (one sample each), or an .npy "
                "(single-input model)."
            ),
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _verify_options(
    atol: float,
    rtol: float | None,
    samples: int,
    seed: int,
    shapes: tuple[str, ...],
    max_input_mib: int | None,
    inputs: str | None = None,
) -> Any:
    from bnfold.api import VerifyOptions
    from bnfold.compare import parse_shapes

    max_bytes = MAX_INPUT_BYTES if max_input_mib is None else max_input_mib << 20
    return VerifyOptions(atol, rtol, samples, seed, parse_shapes(shapes), max_bytes, inputs)


def lower_option(func: F) -> F:
    """``--lower-standalone[=mul-add|conv]``, shared by fold and inspect (its preview)."""
    return click.option(
        "--lower-standalone",
        "lower",
        type=click.Choice([f.value for f in LowerForm]),
        is_flag=False,
        flag_value=LowerForm.MUL_ADD.value,
        default=None,
        callback=lambda _ctx, _param, value: None if value is None else LowerForm(value),
        help=(
            "ONNX and .pt2: after folding, rewrite every inference BatchNorm that could not "
            "fold as Mul+Add (alone, or =mul-add) or a 1x1 depthwise Conv (=conv). Before "
            "MODEL, write it with '='."
        ),
    )(func)


def torch_options(func: F) -> F:
    """Options that name a torch model built by a factory, shared by every command."""
    options = [
        click.option(
            "--module",
            "module_spec",
            metavar="PKG.MOD:FACTORY",
            help="torch: build the model by calling this (class or function).",
        ),
        click.option("--weights", type=click.Path(dir_okay=False), help="torch: state_dict file."),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help=(
                "torch: load --weights and .pt2 files as torch would, running any code "
                "they carry (pickles, shape expressions); only for files you trust."
            ),
        ),
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="1x3x224x224",
            help="torch: shape of each positional input of --module (repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _parse_dims(specs: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(d) for d in spec.lower().split("x")) for spec in specs)
    except ValueError:
        raise InputError(f"bad --input-shape in {list(specs)}; expected 1x3x224x224") from None


def _source(
    path: str | None,
    module_spec: str | None,
    weights: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
) -> Any:
    """MODEL and the torch flags as the model the API folds: a path or a module factory."""
    from bnfold.api import model_source

    return model_source(path, module_spec, weights, trust_pickle, _parse_dims(input_shapes))


def _verify_options_for(source: Any, verify_kw: dict[str, Any]) -> Any:
    """The verify flags as VerifyOptions; the ONNX-only ones are refused for a torch model."""
    from bnfold.api import kind_of

    if kind_of(source).is_torch and (
        verify_kw.get("shapes") or verify_kw.get("max_input_mib") is not None
    ):
        raise InputError(
            "--shape/--max-input-mib are for ONNX inputs; torch models take --input-shape"
        )
    return _verify_options(**verify_kw)


@click.group(cls=OneLineUsageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold inference BatchNorm into Conv/ConvTranspose/Gemm/MatMul/Linear, verify, measure."""


main.add_command(bench)


@main.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("-o", "--output", type=click.Path(), help="Folded model (or folder) to write.")
@click.option("--in-place", is_flag=True, help="Overwrite MODEL (still atomic and verified).")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with the original.")
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
@lower_option
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
        "all-minus-fusions, on inputs of the --shape given."
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
    strict: bool,
    report_path: str | None,
    as_json: bool,
    no_clone_shared: bool,
    rounding: Rounding,
    lower: LowerForm | None,
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

    source = _source(model, module_spec, weights, trust_pickle, input_shapes)
    options = FoldOptions(
        verify=not no_verify,
        verify_options=_verify_options_for(source, verify_kw),
        require_verified=strict,
        clone_shared=not no_clone_shared,
        rounding=rounding,
        lower=lower,
        in_place=in_place,
        to_onnx=to_onnx,
        trust_pickle=trust_pickle,
        jobs=jobs,
        report_path=report_path,
        bench_levels=DEFAULT_BENCH_LEVELS if run_bench else (),
    )
    if api.kind_of(source) is api.SourceKind.FOLDER:
        from bnfold.cli.batch_cmd import fold_directory

        sys.exit(fold_directory(source, output, options, as_json))
    outcome = api.fold_path(source, output, options)
    assert isinstance(outcome, api.FoldOutcome)  # one model, not a folder
    click.echo(json.dumps(outcome.to_dict(), indent=2) if as_json else outcome.summary())
    sys.exit(outcome.exit_code())


@main.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@lower_option
@torch_options
@one_line_errors
def inspect(model: str | None, as_json: bool, lower: LowerForm | None, **torch_kw: Any) -> None:
    """List every fold bnfold would make in MODEL, and every refusal with its reason.

    With --lower-standalone, also what the lowering would rewrite and what would
    still be left: the table ``fold --lower-standalone`` would end with.
    """
    from bnfold import api

    source = _source(model, **torch_kw)
    report = api.inspect(source, lower_standalone=lower, trust_pickle=torch_kw["trust_pickle"])
    click.echo(report.to_json() if as_json else report.summary())


@main.command()
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@torch_options
@verify_options
@one_line_errors
def verify(models: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Compare FOLDED with ORIGINAL: `verify ORIGINAL FOLDED`, or `verify --module ... FOLDED`.

    ONNX models run on random inputs (or --inputs) at ORT_DISABLE_ALL; torch .pt2
    programs run eagerly on their example inputs and random draws (or --inputs).
    Outputs and fold sites are compared. Exit 0 if every one is within its bound,
    1 if not or if no runtime can load the original, 2 on bad input (a broken
    original among it).
    """
    torch_kw = {k: kw.pop(k) for k in ("module_spec", "weights", "trust_pickle", "input_shapes")}
    wanted = 1 if torch_kw["module_spec"] else 2
    if len(models) != wanted:
        raise InputError("expected ORIGINAL FOLDED (or --module ... FOLDED)")
    from bnfold import api

    source = _source(models[0] if wanted == 2 else None, **torch_kw)
    options = _verify_options_for(source, kw)
    result = api.verify_models(source, models[-1], options, torch_kw["trust_pickle"])
    click.echo(result.to_json() if as_json else result.summary())
    sys.exit(EXIT_OK if result.passed else EXIT_VERIFY_FAILED)


if __name__ == "__main__":
    main()
