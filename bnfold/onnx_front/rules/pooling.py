"""Rule: a BatchNorm after a pooling op that commutes with a per-channel affine.

Matches:  Conv | ConvTranspose -> AveragePool | GlobalAveragePool | MaxPool |
          GlobalMaxPool -> BatchNormalization (DenseNet-style transitions,
          pooled heads). The pool is left in place; the BN folds into the op
          before it, so ``pool(BN(y))`` replaces ``BN(pool(y))``.
Produces: the after-fold of :mod:`.after`, through the pool.
Refuses:
  POOL_PADDING    AveragePool with count_include_pad=1 and padding (or ceil_mode=1),
                  and a nonzero shift: a border window averages the shift with the
                  padding's zeros, so it no longer passes through unchanged
  NEGATIVE_SCALE  MaxPool with a negative BN scale: max(s*y) is s*min(y) there
  TRAINING_MODE   MaxPool's Indices output is used (they would not change, but
                  bnfold does not reason about them)

Why it is exact: every window of a pool reads one channel. An average is
linear, so the scale passes through; the shift passes when the window's average
of a constant is that constant, which holds unless padded zeros count in the
divisor. A max commutes with ``s*y + t`` for every ``s >= 0``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.onnx_front.rules.base import LinearOp, Refused, label
from bnfold.report import Code

AVERAGE_POOLS = frozenset({"AveragePool", "GlobalAveragePool"})
MAX_POOLS = frozenset({"MaxPool", "GlobalMaxPool"})
POOL_OPS = AVERAGE_POOLS | MAX_POOLS


def require_pool_commutes(pool: ir.Node, linear: LinearOp, affine: Affine) -> None:
    """Refuse unless ``pool(affine(y)) == affine(pool(y))`` for the linear op's output y.

    Raises:
        Refused: POOL_PADDING, NEGATIVE_SCALE, TRAINING_MODE or NOT_PER_CHANNEL.
    """
    if linear.channel_axis() != 1:
        raise Refused(
            Code.NOT_PER_CHANNEL,
            f"{linear.node.op_type}'s channels are not axis 1, which {pool.op_type} keeps",
        )
    if pool.op_type in MAX_POOLS:
        _require_max_commutes(pool, affine)
    elif np.any(affine.shift != 0) and _padding_counts(pool):
        raise Refused(
            Code.POOL_PADDING,
            f"{pool.op_type} {label(pool)!r} counts padded zeros in its average "
            "(count_include_pad=1 with padding or ceil_mode): the shift would not pass",
        )


def _require_max_commutes(pool: ir.Node, affine: Affine) -> None:
    if np.any(affine.scale < 0):
        channel = int(np.flatnonzero(affine.scale < 0)[0])
        raise Refused(
            Code.NEGATIVE_SCALE,
            f"{pool.op_type} {label(pool)!r}: BN scale is negative at channel {channel}, "
            "and the max of a negated window is its negated min",
        )
    for extra in pool.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            raise Refused(Code.TRAINING_MODE, f"{label(pool)!r}'s Indices output is used")


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
