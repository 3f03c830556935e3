"""Family ``adjacent``: an affine right after the linear op feeding it, ``affine(linear(x))``.

Matches:  BatchNorm | Mul by a constant | Add of a constant, after a Conv,
          ConvTranspose, Gemm/MatMul or Linear whose output only it reads, also
          through one shape-only op that keeps each of the op's channels whole
          inside one BN channel (:func:`bnfold.core.layouts.channel_block`).
Produces: the linear op with the affine folded into its weight and bias
          (:func:`bnfold.core.affine.fold_after`), kind ``adjacent``.
Refuses (every family refuses with these too, when reading the BN or the op):
  TRAINING_MODE      the BN uses batch statistics, or its extra outputs are read
  NO_RUNNING_STATS   (torch) the BN has no running statistics
  NOT_CONSTANT       a weight, bias or BN parameter is computed
  BRANCHING          the linear op's output has other readers
  SHARED_WEIGHT      the weight is also read elsewhere (when not cloned)
  NOT_PER_CHANNEL    the affine is not per output channel of the op
  BAD_VALUES         NaN/inf, var + eps <= 0, or folded values overflow
  BAD_SHAPE          the BN's parameters are not one value per channel (:func:`stats_fit`)
  BAD_GROUPS         channels not divisible by the op's groups
  UNSUPPORTED_DTYPE  the weight is not floating point
  NONLINEAR_INPUT, OP_BETWEEN, STANDALONE   no linear op feeds the BN (:func:`why_unpaired`)
  (eager) REUSED_MODULE, PARAMETRIZED, HOOKED, UNTRACEABLE: module-level reasons
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from bnfold.report import Code, FoldKind
from bnfold.rules.family import Family, Found


def is_float(array: np.ndarray) -> bool:
    """A floating-point array (bfloat16 included): the only values a fold writes."""
    return array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16


def channel_vector(
    array: np.ndarray | None, channels: int, max_rank: int, channel_from_end: int
) -> np.ndarray | None:
    """The ``(C,)`` float64 vector a constant multiplies or adds per output channel, else None.

    The constant must broadcast onto the op's output without growing it: rank at
    most ``max_rank``, every axis 1 except the channel axis (``channel_from_end``
    axes from the end: numpy aligns trailing axes), which is 1 or ``channels``. A
    scalar (or an all-ones shape) applies the same value to every channel.
    """
    if array is None or not is_float(array) or array.ndim > max_rank:
        return None
    channel_pos = array.ndim - channel_from_end
    for axis, size in enumerate(array.shape):
        if axis != channel_pos and size != 1:
            return None
    if channel_pos < 0 or array.shape[channel_pos] == 1:
        return np.full(channels, float(array.reshape(-1)[0]))
    if array.shape[channel_pos] != channels:
        return None
    vector: np.ndarray = array.reshape(channels).astype(np.float64)
    return vector


def stats_fit(parameters: Iterable[tuple[str, tuple[int, ...]]], channels: int) -> Found:
    """Each of a BN's parameters (``(name, shape)``, None ones left out) holds ``channels``
    values: BAD_SHAPE for the first that does not."""
    for name, shape in parameters:
        if shape != (channels,):
            return Code.BAD_SHAPE, f"{name} has shape {shape}, want ({channels},)"
    return None


@dataclass(frozen=True)
class Feed:
    """What feeds an affine that no linear op feeds directly, as its front saw it.

    Attributes:
        source: how details name the op feeding it ("Relu 'r'", "a graph input").
        nonlinear: that op is a nonlinearity.
        between: the ops of a single-input chain walked back from the affine to a
            linear op, nearest the affine first (empty when the walk found none).
        linear: that linear op ("" when none).
        affine: how details name the affine.
        through_nonlinear: some op of ``between`` is a nonlinearity.
    """

    source: str
    nonlinear: bool
    between: tuple[str, ...] = ()
    linear: str = ""
    affine: str = ""
    through_nonlinear: bool = False


def why_unpaired(feed: Feed) -> tuple[Code, str]:
    """Why an affine cannot fold after the op feeding it: that op is no linear op.

    NONLINEAR_INPUT when a nonlinearity lies between it and the linear op the
    chain reaches, or feeds it directly; OP_BETWEEN when other ops do;
    STANDALONE when nothing linear feeds it.
    """
    code = unpaired_code(feed)
    if feed.linear:
        chain = " -> ".join(reversed(feed.between))
        return code, f"{chain} between {feed.linear} and {feed.affine}"
    if code is Code.NONLINEAR_INPUT:
        return code, (
            f"input comes from {feed.source}; a BatchNorm cannot be folded across a nonlinearity"
        )
    return code, f"input comes from {feed.source}, not a linear op; left as is"


def unpaired_code(feed: Feed) -> Code:
    """The code of :func:`why_unpaired`, for a front that words the detail of a BN fed
    by no linear op in its own terms (the eager front names modules)."""
    if feed.linear:
        return Code.NONLINEAR_INPUT if feed.through_nonlinear else Code.OP_BETWEEN
    return Code.NONLINEAR_INPUT if feed.nonlinear else Code.STANDALONE


_READING = frozenset(
    {
        Code.TRAINING_MODE, Code.NOT_CONSTANT, Code.BRANCHING, Code.SHARED_WEIGHT,
        Code.NOT_PER_CHANNEL, Code.BAD_VALUES, Code.BAD_SHAPE, Code.BAD_GROUPS,
        Code.UNSUPPORTED_DTYPE, Code.NONLINEAR_INPUT, Code.STANDALONE,
    }
)  # fmt: skip
_TORCH = frozenset({Code.NO_RUNNING_STATS, Code.OP_BETWEEN, Code.UNTRACEABLE})

_ONNX = _READING
# An eager weight that is no Parameter is PARAMETRIZED, and torch builds no module whose
# groups do not divide its channels: NOT_CONSTANT and BAD_GROUPS never reach that front.
_EAGER = (_READING - {Code.NOT_CONSTANT, Code.BAD_GROUPS}) | _TORCH | {
    Code.REUSED_MODULE, Code.PARAMETRIZED, Code.HOOKED,
}  # fmt: skip
# .pt2 clones shared weights. An exported BN computes only on floats beside a float op, with
# statistics and affine of its channel count, and without running statistics only in training
# (TRAINING_MODE); torch builds no conv whose groups do not divide its channels.
_PT2 = (_READING | _TORCH) - {
    Code.UNTRACEABLE, Code.SHARED_WEIGHT, Code.UNSUPPORTED_DTYPE, Code.BAD_SHAPE,
    Code.NO_RUNNING_STATS, Code.BAD_GROUPS,
}  # fmt: skip

FAMILY = Family(
    "adjacent",
    frozenset({FoldKind.ADJACENT}),
    {
        "onnx": _ONNX,
        "eager": _EAGER | {Code.VERIFICATION_FAILED},
        "pt2": _PT2 | {Code.VERIFICATION_FAILED},
    },
    __doc__ or "",
)
