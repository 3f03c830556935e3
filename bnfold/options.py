"""Option values shared by the command line and the library.

Only the standard library here: the CLI builds its options from these values at
import time, and ``bnfold --help`` must not wait for numpy, onnx or onnx_ir.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
