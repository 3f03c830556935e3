"""Rule: a channel-last linear op, a reshape merging its leading axes, then a BatchNorm.

Matches:  MatMul(x[B, N, K], W[K, C]) -> Flatten | Reshape(·, [M, X]) ->
          BatchNormalization(C) -> ..., as LeViT's ``bn(linear(x).flatten(0, 1))``.
Produces: the after-fold of :mod:`.after`. An eval BN is one affine per
          channel, so merging the batch with the token axes is harmless as
          long as the linear op's channels stay the last axis, where the BN
          (on axis 1 of the 2-D result) sees them. Only that case relaxes the
          "the batch axis must provably stay" rule of :mod:`.shape_ops`.
Refuses:  MERGE_MOVES_CHANNEL  the reshape's 2-D result has a BN with another
                               channel count than the op's C (its features mix
                               several of the op's channels, or split one).

Why a channel count proves it: a reshape keeps element order, so in a 2-D
result ``[M, X]`` element ``f`` sits in column ``f % X``, and in the op's
``[..., C]`` output in channel ``f % C``. A BN over axis 1 with X parameters
runs only when X is the result's second dim; X == C makes the two agree for
every element, whatever the leading axes were.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.onnx_front.constants import constant_array
from bnfold.onnx_front.rules.base import LinearOp, bn_channels, label
from bnfold.report import Code
from bnfold.rules.family import Refused


def merges_leading_axes(shape_op: ir.Node, bn: ir.Node, linear: LinearOp, ir_version: int) -> bool:
    """Whether ``shape_op`` is a 2-D reshape of a channel-last op that keeps C last.

    False when it is no 2-D reshape of a channel-last op (then
    :func:`~bnfold.onnx_front.rules.shape_ops.channel_block_through` decides).

    Raises:
        Refused: MERGE_MOVES_CHANNEL, a 2-D reshape whose BN has other than C channels.
    """
    if bn.op_type != "BatchNormalization" or not linear.channel_last:
        return False
    if not _to_two_dims(shape_op, ir_version):
        return False
    try:
        channels = bn_channels(bn, ir_version)
    except Refused:
        return False  # the BN's own check reports its non-constant parameters
    if channels != linear.channels:
        raise Refused(
            Code.MERGE_MOVES_CHANNEL,
            f"{shape_op.op_type} {label(shape_op)!r} makes {linear.node.op_type}'s output 2-D "
            f"with {channels} BatchNorm channels, not its {linear.channels} output channels",
        )
    return True


def _to_two_dims(shape_op: ir.Node, ir_version: int) -> bool:
    """A Flatten (always 2-D), or a Reshape to a constant two-entry target."""
    if shape_op.op_type == "Flatten":
        return True
    if shape_op.op_type != "Reshape" or shape_op.attributes.get_int("allowzero", 0) != 0:
        return False
    target = constant_array(shape_op.inputs[1] if len(shape_op.inputs) > 1 else None, ir_version)
    return target is not None and target.ndim == 1 and len(target) == 2
