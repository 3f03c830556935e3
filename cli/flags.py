"""The flags several commands share, and how they map to what the API takes.

Each group of flags is a decorator (``verify_options``, ``lower_options``,
``torch_options``); the functions after it turn parsed values into API values
(VerifyOptions, a LowerForm, a model source) and refuse combinations that mean
nothing, with one line and exit 2.
"""

from __future__ import annotations

from typing import Any

import click

from bnfold.cli.errors import F, InputError
from bnfold.options import MAX_INPUT_BYTES, LowerForm


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


def lower_options(func: F) -> F:
    """``--lower-standalone`` and ``--lower-form``, shared by fold and inspect (its preview)."""
    func = click.option(
        "--lower-form",
        type=click.Choice([f.value for f in LowerForm]),
        default=None,
        callback=lambda _ctx, _param, value: None if value is None else LowerForm(value),
        help=(
            "What --lower-standalone writes: mul-add (Mul then Add, the default) or conv "
            "(a 1x1 depthwise Conv, for compilers that fuse only Conv)."
        ),
    )(func)
    return click.option(
        "--lower-standalone",
        is_flag=True,
        help=(
            "ONNX and torch: after folding, rewrite every inference BatchNorm that could "
            "not fold as plain ops (see --lower-form)."
        ),
    )(func)


def lowering(lower_standalone: bool, lower_form: LowerForm | None) -> LowerForm | None:
    """The lowering the two flags ask for; a form alone asks for nothing, which is a mistake."""
    if not lower_standalone:
        if lower_form is not None:
            raise InputError("--lower-form chooses what --lower-standalone writes; add it")
        return None
    return lower_form or LowerForm.MUL_ADD


class LowerSpellingCommand(click.Command):
    """A command that also reads ``--lower-standalone=FORM``, the spelling before --lower-form.

    Scripts and docs written for the optional value keep working: the argument
    becomes ``--lower-standalone --lower-form FORM`` before click parses it.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _split_lower_spelling(args))


def _split_lower_spelling(args: list[str]) -> list[str]:
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":  # the rest are arguments, whatever they look like
            return out + args[i:]
        flag, eq, form = arg.partition("=")
        out += (
            ["--lower-standalone", "--lower-form", form]
            if flag == "--lower-standalone" and eq
            else [arg]
        )
    return out


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


def model_source(
    path: str | None,
    module_spec: str | None,
    weights: str | None,
    trust_pickle: bool,
    input_shapes: tuple[str, ...],
) -> Any:
    """MODEL and the torch flags as the model the API folds: a path or a module factory."""
    from bnfold import api

    return api.model_source(path, module_spec, weights, trust_pickle, _parse_dims(input_shapes))


def verify_options_for(source: Any, verify_kw: dict[str, Any]) -> Any:
    """The verify flags as VerifyOptions; the ONNX-only ones are refused for a torch model."""
    from bnfold.api import kind_of

    if kind_of(source).is_torch and (
        verify_kw.get("shapes") or verify_kw.get("max_input_mib") is not None
    ):
        raise InputError(
            "--shape/--max-input-mib are for ONNX inputs; torch models take --input-shape"
        )
    return _verify_options(**verify_kw)
