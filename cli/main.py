"""The ``bnfold`` command line: thin click commands over the Python API.

Exit codes: 0 ok, 1 verification failed (or not verified with --strict),
2 bad input or usage (one line on stderr, no traceback). ``fold`` writes its
output exactly when it exits 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
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
from bnfold.options import DEFAULT_BENCH_LEVELS, MAX_INPUT_BYTES, LowerForm, Rounding


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
    from bnfold.verification.inputs import parse_shapes

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


def _torch_source(
    path: str | None,
    module_spec: str | None,
    weights: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
) -> Any:
    """A ModuleSource for --module, the path for a torch file, None for ONNX input."""
    from bnfold.api import TORCH_SUFFIXES

    if module_spec is None and (path is None or not path.endswith(TORCH_SUFFIXES)):
        if weights or trust_pickle or input_shapes:
            raise InputError("--weights/--trust-pickle/--input-shape need --module")
        return None
    from bnfold.torch_front import require_torch

    require_torch()
    from bnfold.torch_front.files import ModuleSource

    if module_spec is None:
        return path
    return ModuleSource(module_spec, weights, trust_pickle, _parse_dims(input_shapes))


def _parse_dims(specs: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(d) for d in spec.lower().split("x")) for spec in specs)
    except ValueError:
        raise InputError(f"bad --input-shape in {list(specs)}; expected 1x3x224x224") from None


def _torch_verify_options(no_verify: bool, verify_kw: dict[str, Any]) -> Any:
    """The verify options for a torch model, or None with --no-verify."""
    if verify_kw.get("shapes") or verify_kw.get("max_input_mib") is not None:
        raise InputError(
            "--shape/--max-input-mib are for ONNX inputs; torch models take --input-shape"
        )
    return None if no_verify else _verify_options(**verify_kw)


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
    from bnfold.api import fold_file

    if strict and no_verify:  # --strict asks for a verified output; nothing would be verified
        raise InputError("--strict needs verification; drop --no-verify")
    torch_source = _torch_source(model, module_spec, weights, trust_pickle, input_shapes)
    if run_bench and (torch_source is not None or (model and os.path.isdir(model))):
        raise InputError("--bench times one ONNX model; for torch or folders use `bnfold bench`")
    if in_place and output is not None:
        raise InputError("-o and --in-place are exclusive: --in-place writes MODEL itself")
    if in_place and (torch_source is not None or (model and os.path.isdir(model))):
        raise InputError("--in-place folds one ONNX file; torch models and folders take -o")
    if run_bench and in_place:
        # The output would be timed against itself: the original is gone.
        raise InputError(
            "--bench times the output against MODEL, which --in-place replaces; use -o"
        )
    if torch_source is not None:
        if output is None:
            raise InputError("missing -o/--output")
        from bnfold.torch_front.files import fold_torch
        from bnfold.torch_front.io import factory_source_file

        module_file = factory_source_file(module_spec) if module_spec else None
        _require_safe_report(report_path, [output, to_onnx], [model, weights, module_file])

        options = _torch_verify_options(no_verify, verify_kw)
        result, written = fold_torch(
            torch_source, output, options, to_onnx, require_verified=strict, rounding=rounding,
            lower=lower,
            trust_pickle=trust_pickle,
        )  # fmt: skip
        _print_fold(result, written, output, as_json, report_path)
        sys.exit(_fold_exit_code(written))
    if model is None:
        raise InputError("missing MODEL (or --module for a torch factory)")
    if to_onnx is not None:
        raise InputError("--to-onnx is for torch models; the ONNX output is -o")
    if os.path.isdir(model):
        from bnfold.cli.batch_cmd import fold_directory

        if output is None:
            raise InputError("folder mode needs -o/--output OUTDIR")
        _require_safe_folder_report(report_path, model, output)
        code = fold_directory(
            model, output, jobs=jobs, verify=not no_verify, strict=strict,
            verify_options=_verify_options(**verify_kw), as_json=as_json,
            report_path=report_path, clone_shared=not no_clone_shared, rounding=rounding,
            lower_standalone=lower,
        )  # fmt: skip
        sys.exit(code)
    if output is None and not in_place:
        raise InputError("missing -o/--output (or --in-place to overwrite MODEL)")
    target = model if in_place else output
    assert target is not None
    _require_safe_report(report_path, [target], [model], in_place=in_place)
    options = _verify_options(**verify_kw)
    result, written = fold_file(
        model,
        target,
        verify=not no_verify,
        verify_options=options,
        in_place=in_place,
        clone_shared=not no_clone_shared,
        rounding=rounding,
        require_verified=strict,
        lower_standalone=lower,
    )
    timing = _bench_after_fold(model, target, options) if run_bench and written else None
    _print_fold(result, written, target, as_json, report_path, timing)
    sys.exit(_fold_exit_code(written))


def _bench_after_fold(original: str, folded: str, options: Any) -> Any:
    """Time the written output against MODEL on inputs of the shapes verification used."""
    from bnfold import bench as harness

    return harness.bench_onnx(
        original,
        folded,
        DEFAULT_BENCH_LEVELS,
        shapes=options.shapes,
        max_input_bytes=options.max_input_bytes,
        inputs=options.inputs,
    )


def _print_fold(
    result: Any,
    written: bool,
    target: str,
    as_json: bool,
    report_path: str | None,
    timing: Any = None,
) -> None:
    payload = {**result.to_dict(), "output": target, "written": written}
    if timing is not None:
        payload["bench"] = timing.to_dict()
    _write_report(report_path, payload)
    if as_json:
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(result.report.summary())
    if result.verification is not None:
        click.echo(result.verification.summary())
    click.echo(f"wrote {target}" if written else _nothing_written(result.verification))
    if timing is not None:
        click.echo(timing.summary())


def _nothing_written(verification: Any) -> str:
    """Why the library kept the output back: a failed or (with --strict) a missing verification."""
    if verification.status == "not_verified":
        return f"not verified ({verification.reason}); --strict: nothing written"
    return "verification FAILED: nothing written"


def _fold_exit_code(written: bool) -> int:
    # The library writes only a publishable fold (FoldResult.publishable): a
    # pipeline can rely on "exit 0" and "output written" meaning the same.
    return EXIT_OK if written else EXIT_VERIFY_FAILED


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
    torch_source = _torch_source(model, **torch_kw)
    if torch_source is not None:
        from bnfold.torch_front.files import inspect_torch

        report = inspect_torch(torch_source, trust_pickle=torch_kw["trust_pickle"], lower=lower)
    elif model is None:
        raise InputError("missing MODEL (or --module for a torch factory)")
    else:
        from bnfold.api import inspect as inspect_model

        report = inspect_model(model, lower_standalone=lower)
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
    original = models[0] if wanted == 2 else None
    torch_source = _torch_source(original, **torch_kw)
    if torch_source is not None:
        from bnfold.torch_front.files import verify_torch

        options = _torch_verify_options(False, kw)
        result = verify_torch(torch_source, models[-1], options, torch_kw["trust_pickle"])
    else:
        from bnfold.api import verify_models

        result = verify_models(models[0], models[1], _verify_options(**kw))
    click.echo(result.to_json() if as_json else result.summary())
    sys.exit(EXIT_OK if result.passed else EXIT_VERIFY_FAILED)


def _require_safe_report(
    report_path: str | None,
    outputs: list[str | None],
    inputs: list[str | None],
    in_place: bool = False,
) -> None:
    """Before folding: --report must be writable and none of the other files (any spelling).

    The library checks the model outputs against the inputs itself; this adds
    the report, which only the CLI writes, and the input's external data files.
    """
    if report_path is None:
        return
    from bnfold import paths
    from bnfold.onnx_front.io import external_data_files

    reads = [paths.Named.of("input", path) for path in inputs]
    for path in inputs:
        if path is not None and path.endswith(".onnx"):
            reads += [paths.Named("input's external data", p) for p in external_data_files(path)]
    writes = [paths.Named.of("output", path) for path in outputs]
    report = paths.Named("--report", Path(report_path))
    pair = (outputs[0], inputs[0]) if in_place else None
    paths.require_safe_outputs([*writes, report], reads, in_place=pair)  # type: ignore[arg-type]


def _require_safe_folder_report(report_path: str | None, model_dir: str, out_dir: str) -> None:
    """Folder mode: --report must not be one of the models found, their data or their outputs.

    Its folder may be OUTDIR, created by the run: then only the names are compared.
    """
    if report_path is None:
        return
    from bnfold import paths
    from bnfold.batch import find_models
    from bnfold.onnx_front.io import external_data_files

    report = paths.Named("--report", Path(report_path))
    models = find_models(Path(model_dir), Path(out_dir))
    reads = [paths.Named("input", Path(model_dir) / rel) for rel in models]
    reads += [
        paths.Named("input's external data", data)
        for rel in models
        for data in external_data_files(Path(model_dir) / rel)
    ]
    writes = [paths.Named("output", Path(out_dir) / rel) for rel in models]
    for other in (*reads, *writes):
        if paths.same_file(report.path, other.path):
            raise InputError(f"--report {report_path!r} is the {other.role} {str(other.path)!r}")
    if not paths.same_file(report.path.parent, out_dir):  # OUTDIR may not exist yet
        paths.require_safe_outputs([report], [])


def _write_report(path: str | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    from bnfold.paths import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=2), "report")


if __name__ == "__main__":
    main()
