"""Rule: a BatchNorm before the linear op reading it, ``linear(BN(x))``.

Matches:  Conv | ConvTranspose | Gemm | MatMul(BatchNormalization(x), W, B?),
          possibly through a Flatten/Reshape into Gemm/MatMul; tried only when
          the BN cannot fold after.
Produces: a :class:`~bnfold.onnx_front.rules.base.FoldPlan` with direction BEFORE.
Refuses:  ZERO_PADDING (a padded Conv or a ConvTranspose with a nonzero shift),
          NOT_PER_CHANNEL, BAD_SHAPE, and the codes shared with every fold.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.onnx_front.folded import DeferredWeight
from bnfold.onnx_front.rules.base import (
    LINEAR_OPS,
    Direction,
    FoldPlan,
    LinearOp,
    MatchOptions,
    batchnorm_affine,
    bn_channels,
    describe_linear,
    label,
    make_plan,
    name_of,
    names,
    rank_of,
)
from bnfold.onnx_front.rules.shape_ops import require_flattens_batch
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules.before import exact_before
from bnfold.rules.family import Refused
from bnfold.sites import Site


def linear_reader(bn: ir.Node) -> tuple[ir.Node, ...] | None:
    """(linear,) or (flatten, linear) when the BN's only reader feeds a linear op's input 0."""
    out = bn.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        return None
    reader = uses[0].node
    if reader.op_type in LINEAR_OPS:
        return (reader,)
    if reader.op_type not in ("Flatten", "Reshape") or reader.outputs[0].is_graph_output():
        return None
    next_uses = list(reader.outputs[0].uses())
    if len(next_uses) != 1 or next_uses[0].idx != 0:
        return None
    follower = next_uses[0].node
    return (reader, follower) if follower.op_type in ("Gemm", "MatMul") else None


def plan_before(
    bn: ir.Node,
    chain: tuple[ir.Node, ...],
    ir_version: int,
    options: MatchOptions,
    hold: Callable[[DeferredWeight], bool],
) -> FoldPlan | Refusal:
    linear_node, between = chain[-1], (chain[0] if len(chain) == 2 else None)
    site = Site(FoldKind.ADJACENT, names(linear_node), label(bn), name_of(between), before=True)
    try:
        linear = describe_linear(linear_node, ir_version, options)
        per_channel = batchnorm_affine(bn, bn_channels(bn, ir_version), ir_version)
        affine = _spread_to_input_features(per_channel, linear, between, ir_version)
        _require_exact_before(linear, affine)
        gain = linear.input_gain / linear.bias_gain
        affine = Affine(affine.scale, affine.shift * gain)
        return make_plan(
            site, Direction.BEFORE, linear, bn, between, affine, options.rounding, hold
        )
    except Refused as refused:
        return site.refusal(refused.code, refused.detail)


def _spread_to_input_features(
    affine: Affine, linear: LinearOp, between: ir.Node | None, ir_version: int
) -> Affine:
    """Map the BN's per-channel affine onto the linear op's input features.

    Directly, channel c is input channel c. Through a Flatten of ``(N, C, *rest)``
    into ``(N, C * R)``, channel c is the contiguous block of features
    ``c*R .. c*R + R - 1``.
    """
    op = linear.node.op_type
    if op == "Gemm" and linear.node.attributes.get_int("transA", 0) != 0:
        raise Refused(Code.NOT_PER_CHANNEL, "Gemm transA=1 reads the BN's channels as rows")
    features = linear.in_channels
    channels = affine.scale.shape[0]
    if between is None:
        data_rank = rank_of(linear.node.inputs[0], ir_version)
        if op == "MatMul" and data_rank != 2:
            raise Refused(
                Code.NOT_PER_CHANNEL,
                f"MatMul reads features on the last axis of a rank-{data_rank or '?'} input, "
                "the BatchNorm normalizes axis 1",
            )
        if features != channels:
            raise Refused(Code.BAD_SHAPE, f"BatchNorm has {channels} channels, op reads {features}")
        return affine
    require_flattens_batch(between, ir_version)
    if channels == 0 or features % channels:
        raise Refused(Code.BAD_SHAPE, f"{features} features are not a multiple of {channels}")
    return affine.spread(features)


def _require_exact_before(linear: LinearOp, affine: Affine) -> None:
    """Zero padding reads zeros at the borders, never the shift (:func:`exact_before`)."""
    node = linear.node
    pads = node.attributes.get_ints("pads", ())
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    padded = node.op_type == "Conv" and (any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER"))
    transposed = node.op_type == "ConvTranspose"
    found = exact_before(affine.shift, node.op_type, transposed=transposed, zero_padded=padded)
    Refused.check(found)
