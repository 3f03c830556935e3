"""Rule: a BatchNorm after a pooling op that commutes with a per-channel affine.

Matches:  Conv | ConvTranspose -> AveragePool | GlobalAveragePool | MaxPool |
          GlobalMaxPool -> BatchNormalization (DenseNet-style transitions,
          pooled heads). The pool is left in place; the BN folds into the op
          before it, so ``pool(BN(y))`` replaces ``BN(pool(y))``.
Produces: the after-fold of :mod:`.after`, through the pool.
Refuses (:mod:`bnfold.rules.pool`):
  POOL_PADDING    AveragePool with count_include_pad=1 and padding (or ceil_mode=1),
                  and a nonzero shift: a border window averages the shift with the
                  padding's zeros, so it no longer passes through unchanged
  NEGATIVE_SCALE  MaxPool with a negative BN scale: max(s*y) is s*min(y) there
  TRAINING_MODE   MaxPool's Indices output is used (they would not change, but
                  bnfold does not reason about them)

Why it is exact, and the checks themselves: :mod:`bnfold.rules.pool`; this
module reads an ONNX pool into its :class:`~bnfold.rules.pool.PoolSpec`.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.onnx_front.rules.base import LinearOp, label
from bnfold.report import Code
from bnfold.rules.family import Refused
from bnfold.rules.pool import AVERAGE, MAX, PoolSpec, commute_refusal

AVERAGE_POOLS = frozenset({"AveragePool", "GlobalAveragePool"})
MAX_POOLS = frozenset({"MaxPool", "GlobalMaxPool"})
POOL_OPS = AVERAGE_POOLS | MAX_POOLS


def require_pool_commutes(pool: ir.Node, linear: LinearOp, affine: Affine) -> None:
    """Refuse unless ``pool(affine(y)) == affine(pool(y))`` for the linear op's output y
    (:func:`bnfold.rules.pool.commute_refusal`).

    Raises:
        Refused: POOL_PADDING, NEGATIVE_SCALE, TRAINING_MODE or NOT_PER_CHANNEL.
    """
    if linear.channel_axis() != 1:
        raise Refused(
            Code.NOT_PER_CHANNEL,
            f"{linear.node.op_type}'s channels are not axis 1, which {pool.op_type} keeps",
        )
    Refused.check(commute_refusal(pool_spec(pool), affine))


def pool_spec(pool: ir.Node) -> PoolSpec:
    """An ONNX pooling node as the pool rule reads it."""
    name = f"{pool.op_type} {label(pool)!r}"
    if pool.op_type in MAX_POOLS:
        used = any(extra.uses() or extra.is_graph_output() for extra in pool.outputs[1:])
        indices = f"{label(pool)!r}'s Indices output is used" if used else ""
        return PoolSpec(name, MAX, indices_read=indices)
    return PoolSpec(
        name,
        AVERAGE,
        divides_by_padding=_padding_counts(pool),
        padding_cause="count_include_pad=1 with padding or ceil_mode",
    )


def _padding_counts(pool: ir.Node) -> bool:
    """Whether some window of an AveragePool divides by padded positions too."""
    if pool.op_type == "GlobalAveragePool":
        return False
    if pool.attributes.get_int("count_include_pad", 0) == 0:
        return False
    auto_pad = pool.attributes.get_string("auto_pad", "NOTSET")
    pads = pool.attributes.get_ints("pads", ())
    return (
        auto_pad in ("SAME_UPPER", "SAME_LOWER")
        or any(pads)
        or pool.attributes.get_int("ceil_mode", 0) == 1
    )
