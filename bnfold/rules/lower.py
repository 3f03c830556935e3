"""Family ``lower``: a BatchNorm no fold could remove, as plain ops (``lower_standalone``).

Matches:  an inference BatchNorm still in the model once folding reached its fixpoint.
Produces: ``x * s + t`` (mul-add, ``s`` and ``t`` shaped ``[C, 1, ...]`` to broadcast
          on axis 1) or a 1x1 depthwise conv (weight ``s``, bias ``t``), the BN's
          affine in float64 cast once. A conv needs what :func:`conv_form_note` checks;
          otherwise mul-add, with that note.
Refuses (the BN stays; its fold refusal is extended):
  UNKNOWN_RANK   (ONNX) the input's rank is unknown, so no constant shape is
                 sure to broadcast on axis 1
  BAD_SHAPE      (ONNX) the input has no channel axis
  BAD_VALUES     the affine is not finite, or does not fit the dtype
  NOT_CONSTANT, NOT_PER_CHANNEL  (ONNX, .pt2) the BN's own reasons
  PARAMETRIZED, HOOKED  (eager) the module does more than a BN
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

import numpy as np

from bnfold.report import Code
from bnfold.rules.family import Family


@dataclass(frozen=True)
class ConvTerms:
    """How a front names the depthwise conv a BN can become, and which ranks it has.

    Attributes:
        conv: the op's name in notes ("Conv", "conv").
        fallback: what the note says happens instead ("lowered to mul-add").
        max_rank: the largest input rank the front has a conv for (None: any).
    """

    conv: str
    fallback: str
    max_rank: int | None = None


ONNX_TERMS = ConvTerms("Conv", "lowered to mul-add")
TORCH_TERMS = ConvTerms("conv", "mul-add", max_rank=5)  # conv1d, conv2d, conv3d

# Conv's type constraint has no bfloat16 before opset 22. float64 Conv is valid
# ONNX, but onnxruntime has no kernel for it, so the output could not even be
# verified: such a BN is lowered to Mul + Add, which every runtime runs.
_CONV_BF16_OPSET = 22
_CONV_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32)})


def conv_form_note(
    ranks: Set[int],
    terms: ConvTerms,
    dtype: np.dtype | None = None,
    opset: int | None = None,
) -> str:
    """Why a 1x1 depthwise conv cannot replace the BN ("" when it can).

    ``ranks`` are the BN input's ranks (one, unless a module ran on several);
    ``dtype`` and ``opset`` are asked only of an ONNX Conv.
    """
    if not ranks:
        return f"the BatchNorm was not called on the example inputs: {terms.fallback}"
    if len(ranks) > 1:
        return f"called with inputs of ranks {sorted(ranks)}: {terms.fallback}"
    (rank,) = ranks
    if rank < 3 or (terms.max_rank is not None and rank > terms.max_rank):
        return f"rank-{rank} input has no spatial axis for a {terms.conv}: {terms.fallback}"
    if dtype is None:
        return ""
    if dtype == np.float64:
        return f"onnxruntime has no float64 {terms.conv}: {terms.fallback}"
    bf16_ok = dtype.name == "bfloat16" and opset is not None and opset >= _CONV_BF16_OPSET
    if dtype not in _CONV_DTYPES and not bf16_ok:
        return f"{terms.conv} takes no {dtype.name} at opset {opset}: {terms.fallback}"
    return ""


_ONNX = {
    Code.UNKNOWN_RANK,
    Code.BAD_SHAPE,
    Code.BAD_VALUES,
    Code.NOT_CONSTANT,
    Code.NOT_PER_CHANNEL,
}

FAMILY = Family(
    "lower",
    frozenset(),
    {
        "onnx": frozenset(_ONNX),
        "eager": frozenset({Code.PARAMETRIZED, Code.HOOKED, Code.BAD_VALUES}),
        # every node of an exported program carries its traced value: its rank is known
        "pt2": frozenset({Code.NOT_CONSTANT, Code.BAD_VALUES}),
    },
    __doc__ or "",
)
