"""Option values shared by the command line and the library.

Only the standard library here: the CLI builds its options from these values at
import time, and ``bnfold --help`` must not wait for numpy, onnx or onnx_ir.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bnfold.errors import BnfoldError

# Default cap on one sample of random inputs (all inputs together). Shapes come
# from the model, and a declared 64x3x8192x8192 input alone is 48 GiB: past the
# cap verification does not run ("not_verified") instead of exhausting memory.
MAX_INPUT_BYTES = 1 << 30


BENCH_LEVEL_NAMES = ("disable_all", "basic", "extended", "all", "all-minus-fusions")
"""onnxruntime levels ``bnfold bench`` times at; ``bnfold.bench.LEVELS`` says what each sets."""

DEFAULT_BENCH_LEVELS = ("disable_all", "all", "all-minus-fusions")
"""The whole story side by side: no optimisation, what onnxruntime already does at
load (its own Conv+BN fusion included), and that level without its BN fusions,
where the gain of folding shows."""


class Rounding(str, enum.Enum):
    """How a folded weight's exact float64 products become the model's dtype.

    NEAREST rounds each product to nearest: bit for bit the exact float64 fold.
    BALANCED starts from nearest and rounds a few products near a tie the other
    way, so that each output channel's rounding errors cancel
    (:func:`bnfold.affine.balanced_cast`): worth it in fp16 and bf16, where those
    errors are a visible share of the output's; biases are rounded to nearest
    either way.
    """

    NEAREST = "nearest"
    BALANCED = "balanced"


class LowerForm(str, enum.Enum):
    """What ``lower_standalone`` turns a BatchNorm that cannot fold into.

    MUL_ADD is ``Mul(x, s) -> Add(·, t)``; CONV a 1x1 depthwise ``Conv`` (group = C)
    with the shift as its bias, for compilers that fuse only Conv.
    """

    MUL_ADD = "mul-add"
    CONV = "conv"


@dataclass(frozen=True)
class VerifyOptions:
    """How two models are compared.

    Attributes:
        atol: absolute tolerance.
        rtol: relative tolerance (of max |original|) for every compared tensor;
            None derives one per tensor from its dtype and the reductions behind
            it (:mod:`bnfold.verification.tolerance`).
        samples: how many random input draws (unused with ``inputs``).
        seed: seed for the draws.
        shapes: concrete shapes for inputs with dynamic dimensions (others use 1).
        max_input_bytes: cap on one sample's random inputs, all inputs together;
            past it the result is "not_verified" (inputs_too_large). A quarter
            of it is the memory the original's results are held in; past it
            they wait on disk.
        inputs: the user's input file or folder (see :mod:`bnfold.verification.files`)
            instead of random inputs.
    """

    atol: float = 0.0
    rtol: float | None = None
    samples: int = 3
    seed: int = 0
    shapes: Mapping[str, Sequence[int]] | None = None
    max_input_bytes: int = MAX_INPUT_BYTES
    inputs: str | os.PathLike[str] | None = None


DEFAULT_VERIFY = VerifyOptions()


# --- how a fold runs -------------------------------------------------------------------


def rounding_of(value: Rounding | str) -> Rounding:
    """``value`` as a Rounding; an unknown name is a user error naming the choices."""
    try:
        return Rounding(value)
    except ValueError:
        choices = ", ".join(r.value for r in Rounding)
        raise BnfoldError(f"unknown rounding {value!r}; choose from {choices}") from None


def lower_form_of(value: bool | LowerForm | str | None) -> LowerForm | None:
    """``lower_standalone`` as a LowerForm: True is mul-add, False/None no lowering."""
    if value is None or value is False:
        return None
    if value is True:
        return LowerForm.MUL_ADD
    try:
        return LowerForm(value)
    except ValueError:
        choices = ", ".join(f.value for f in LowerForm)
        raise BnfoldError(f"unknown lower_standalone {value!r}; choose from {choices}") from None


@dataclass(frozen=True)
class FoldOptions:
    """How a fold runs and what it writes besides the model: one bundle for every front.

    The CLI builds it from its flags and :func:`bnfold.api.fold_path` routes it to
    the front that folds the source; each layer below reads the fields it needs
    instead of passing a dozen keywords by hand. A field the source's front has no
    use for keeps its default: the router refuses ``to_onnx`` for an ONNX source,
    ``in_place`` for anything but one ONNX file, and so on.

    Attributes:
        verify: compare the folded model with the original before it is written;
            a failed comparison writes nothing.
        prove: with ``verify``, first prove the fold for all inputs
            (:mod:`bnfold.proof`): a difference the proof finds writes nothing,
            a proof that holds verifies a fold sampling cannot check.
        verify_options: tolerances, draws, input shapes and files
            (:class:`VerifyOptions`); None: its defaults.
        require_verified: write only a verified fold (CLI ``--strict``): a result
            that could not be verified is kept back like a failed one.
        clone_shared: ONNX: copy a weight other nodes also read so its site can
            fold (``bytes_added``); False refuses such sites (``shared_weight``).
        rounding: how folded weights are cast to the model's dtype.
        lower: rewrite each inference BatchNorm left after folding as this form;
            None leaves them.
        in_place: one ONNX file: the output may be the source itself.
        to_onnx: torch: also export the folded model to this ONNX file.
        trust_pickle: torch: load ``.pt2`` files (and ``--weights``) as torch
            would, running any code they carry.
        jobs: a folder: worker processes.
        report_path: also write the JSON report (what ``--json`` prints) here.
        bench_levels: one ONNX file: once written, time it against the source at
            these onnxruntime levels (``BENCH_LEVEL_NAMES``).
    """

    verify: bool = True
    prove: bool = True
    verify_options: VerifyOptions | None = None
    require_verified: bool = False
    clone_shared: bool = True
    rounding: Rounding = Rounding.NEAREST
    lower: LowerForm | None = None
    in_place: bool = False
    to_onnx: str | os.PathLike[str] | None = None
    trust_pickle: bool = False
    jobs: int = 1
    report_path: str | os.PathLike[str] | None = None
    bench_levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Names as users spell them ("balanced", "conv") become the enums here, once.
        object.__setattr__(self, "rounding", rounding_of(self.rounding))
        object.__setattr__(self, "lower", lower_form_of(self.lower))
        if self.require_verified and not self.verify:
            raise BnfoldError("--strict needs verification; drop --no-verify")
        if self.jobs < 1:
            raise BnfoldError(f"jobs must be at least 1, not {self.jobs}")
        unknown = [level for level in self.bench_levels if level not in BENCH_LEVEL_NAMES]
        if unknown:
            choices = ", ".join(BENCH_LEVEL_NAMES)
            raise BnfoldError(f"unknown bench level {unknown[0]!r}; choose from {choices}")
