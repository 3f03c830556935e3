"""How far a correct fold may move a tensor: a bound from its dtype and the reductions behind it.

A fold does not compute the same floating-point operations as the original: the
folded weight ``W*s`` is rounded once where the original rounds ``W·x``, then
``s·(W·x) + t`` in the BatchNorm. Both models round every partial sum of every
reduction (a Conv output is a sum of ``K = C_in/group · prod(kernel)`` terms), and
those rounding errors travel to every tensor downstream. So the error of a
*correct* fold grows with the reductions that lead to a tensor, not with its
magnitude alone, which is why a fixed rtol (the old 1e-5 for fp32) both fails
correct folds of deep detectors and is looser than needed for shallow nets.

The bound, relative to the tensor's scale ``max|original|``::

    rtol = c(M) · (2·u·sqrt(D + 1) + u_acc·sqrt(K))

* ``u`` is the unit roundoff of the tensor's dtype (2^-24 for float32, 2^-11 for
  float16, 2^-8 for bfloat16, 2^-53 for float64): each stored value (a layer's
  output, a folded weight, the BatchNorm's scale and shift) is rounded with a
  relative error below ``u``. ``D`` counts the reducing ops on the deepest path
  to the tensor; about four values are rounded per layer (output, folded weight,
  BN scale, BN shift) in one model or the other, hence ``2·u·sqrt(D + 1)``.
* ``u_acc`` is the unit roundoff of the accumulation: float32 for 16-bit floats
  (onnxruntime's and torch's CPU kernels accumulate fp16/bf16 in float32), the
  dtype's own otherwise. ``K`` sums the reduction lengths on the path where that
  sum is largest: every term of every reduction is one rounded addition.
* Rounding errors of different operations are modelled as independent, uniform
  in ``[-u, u]`` (standard deviation ``u/sqrt(3)``): they add in quadrature,
  hence the square roots (the worst case, linear in ``K``, is never reached by
  rounding to nearest over thousands of terms). The difference of two models'
  errors has ``sqrt(2)`` times that deviation. The largest of ``M`` compared
  elements exceeds ``sqrt(2·ln(M/p))`` deviations with probability below ``p``
  (Gaussian tail, ``p`` = :data:`FALSE_ALARM`), so
  ``c(M) = sqrt(2/3)·sqrt(2·ln(M/p)) = sqrt(4·ln(M/p) / 3)``: 3.0 for one element,
  5.3 for a million, 5.9 for 300 million. A tail bound, not the expected largest
  error: on a 1x1 Linear the expected largest is below one rounding step, and a
  correct fold went past it on 3 seeds in 200.

This is the floor. Real networks also amplify an error on its way through the
layers, which no count of reductions sees: where a tensor goes past this bound,
:mod:`bnfold.verification.calibrate` measures how far rounding-level nudges of the
original's own weights move it, and the bound widens to a multiple of that.

The scale is the tensor's own ``max|original|``, or for a sum or difference its
largest operand's (:meth:`bnfold.verification.plan.Plan.rescale`): the rounding errors of
``a - b`` are relative to ``a`` and ``b``, not to a small difference. A
cancellation further upstream is not seen; there ``--atol`` states the absolute
error that is acceptable. Integer and boolean tensors have no rounding: their
bound is exact equality.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

# Ops whose outputs jump when their inputs move by a rounding error: an index
# chosen, a box kept or dropped, a comparison flipped. A difference downstream of
# one says nothing about the fold by itself; the fold sites upstream do.
DISCONTINUOUS_OPS = frozenset(
    {
        "NonMaxSuppression", "TopK", "ArgMax", "ArgMin", "NonZero", "Unique", "Hardmax",
        "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or",
        "Xor", "Round", "Floor", "Ceil", "Sign", "Mod", "QuantizeLinear", "If", "Loop",
        "DynamicQuantizeLinear", "IsInf", "IsNaN",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Reductions:
    """The reductions leading to a tensor: summed length ``K`` and count ``D``."""

    length: int = 0
    depth: int = 0

    def then(self, k: int) -> Reductions:
        """After one more op that sums ``k`` terms per output (k <= 1: elementwise)."""
        if k <= 1:
            return self
        return Reductions(self.length + k, self.depth + 1)

    @staticmethod
    def widest(items: Iterable[Reductions]) -> Reductions:
        """The bound over several inputs: each count at its largest (an upper bound)."""
        items = list(items)
        return Reductions(
            max((r.length for r in items), default=0), max((r.depth for r in items), default=0)
        )

    def describe(self) -> str:
        return f"K={self.length} over {self.depth} reductions"


def dtype_name(dtype: Any) -> str:
    """The key of :data:`UNIT_ROUNDOFF` for a numpy or torch dtype.

    ``np.float32`` -> ``"float32"``, ``ml_dtypes.bfloat16`` -> ``"bfloat16"``,
    ``torch.float16`` -> ``"float16"``.
    """
    text = str(dtype)
    if text.startswith("torch."):  # numpy cannot read torch dtypes; their names agree
        return text.removeprefix("torch.")
    dt = np.dtype(dtype)
    return "bfloat16" if dt == ml_dtypes.bfloat16 else dt.name


# How often a correct fold may go past its derived bound, per compared tensor.
FALSE_ALARM = 1e-3


def elements_factor(elements: int) -> float:
    """``c(M) = sqrt(4 ln(M/p) / 3)``: M two-model errors stay below c(M) deviations of one,
    but with probability p (:data:`FALSE_ALARM`)."""
    return math.sqrt(4.0 * math.log(max(elements, 1) / FALSE_ALARM) / 3.0)


def derived_rtol(dtype: str, reductions: Reductions, elements: int) -> float:
    """The default bound (relative to max|original|) for one tensor; 0 for exact dtypes."""
    u = UNIT_ROUNDOFF.get(dtype)
    if u is None:
        return 0.0
    u_acc = min(u, UNIT_ROUNDOFF["float32"])
    spread = 2.0 * u * math.sqrt(reductions.depth + 1) + u_acc * math.sqrt(reductions.length)
    return elements_factor(elements) * spread


def describe_basis(dtype: str, reductions: Reductions, elements: int) -> str:
    """How :func:`derived_rtol` was reached, for the report."""
    return f"{dtype}, {reductions.describe()}, {elements} elements"
