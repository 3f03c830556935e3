"""Family ``before``: a BatchNorm before the linear op reading it, ``linear(BN(x))``.

Matches:  Conv | ConvTranspose | Gemm | MatMul | Linear reading a BN's output, its
          only reader, possibly through a flatten/reshape into a Gemm, MatMul or
          Linear; asked only when the BN folds after no op (:mod:`.precedence`).
Produces: ``W (s x + t) + b = (W s) x + (b + W t)``
          (:func:`bnfold.core.affine.fold_before`), kind ``adjacent``.
Refuses:
  ZERO_PADDING     a zero-padded conv, or a transposed one, and a nonzero shift
                   (:func:`exact_before`)
  NOT_PER_CHANNEL  the op does not read the BN's channels as its input channels
  BAD_SHAPE        the BN's channels are not the op's input channels
"""

from __future__ import annotations

import numpy as np

from bnfold.report import Code, FoldKind
from bnfold.rules.family import Family, Found


def exact_before(
    shift: np.ndarray,
    label: str,
    *,
    transposed: bool,
    zero_padded: bool,
    affine_name: str = "BatchNorm",
) -> Found:
    """None when folding ``shift`` into the op's bias is exact, else ZERO_PADDING.

    ``W (s x + t)`` puts ``W t`` into every output, but zero padding reads zeros at
    the borders, never ``t``: a padded conv changes there, and a transposed conv's
    border outputs receive fewer taps. A zero shift is always exact. ``label``
    names the op and ``affine_name`` the affine in the detail.
    """
    if not np.any(shift != 0):
        return None
    if transposed:
        return Code.ZERO_PADDING, (
            f"{label}: border outputs receive fewer taps, so a nonzero shift changes them"
        )
    if zero_padded:
        return Code.ZERO_PADDING, (
            f"{label} pads with zeros: the borders would see the {affine_name}'s shift, not zeros"
        )
    return None


_CODES = frozenset({Code.ZERO_PADDING, Code.NOT_PER_CHANNEL, Code.BAD_SHAPE})

FAMILY = Family(
    "before",
    frozenset({FoldKind.ADJACENT}),
    # torch.export traces only a linear op whose input features are the BN's channels
    {"onnx": _CODES, "eager": _CODES, "pt2": _CODES - {Code.BAD_SHAPE}},
    __doc__ or "",
)
