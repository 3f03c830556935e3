"""Rule: an affine after the linear op feeding it, ``affine(linear(x))``.

Matches:  BatchNormalization | Mul(·, c) | Add(·, c) of Conv | ConvTranspose |
          Gemm | MatMul(x, W, B?), for BN possibly through one shape-only op
          (see :mod:`bnfold.onnx_front.rules.shape_ops`), a batch-merging
          reshape (:mod:`.batch_merge`) or a pool (:mod:`.pooling`).
Produces: a :class:`~bnfold.onnx_front.rules.base.FoldPlan` with direction AFTER.
Refuses:  see :func:`bnfold.onnx_front.match.plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.onnx_front.constants import constant_array
from bnfold.onnx_front.folded import DeferredWeight
from bnfold.onnx_front.rules.base import (
    LINEAR_OPS,
    Direction,
    FoldPlan,
    LinearOp,
    MatchOptions,
    batchnorm_affine,
    checked,
    data_input,
    describe_linear,
    label,
    make_plan,
    name_of,
    names,
    per_channel_vector,
    producer_op,
    require_single_consumer,
)
from bnfold.onnx_front.rules.batch_merge import merges_leading_axes
from bnfold.onnx_front.rules.pooling import POOL_OPS, require_pool_commutes
from bnfold.onnx_front.rules.shape_ops import SHAPE_OPS, channel_block_through
from bnfold.onnx_front.shapes import NONLINEAR_OPS
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules.adjacent import Feed, why_unpaired
from bnfold.rules.family import Refused
from bnfold.sites import Site


def plan_after(
    node: ir.Node, ir_version: int, options: MatchOptions, hold: Callable[[DeferredWeight], bool]
) -> FoldPlan | Refusal | None:
    data = data_input(node, ir_version)
    if data is None:
        return None
    producer = data.producer()
    between = None
    if (
        node.op_type == "BatchNormalization"
        and producer is not None
        and producer.op_type in SHAPE_OPS | POOL_OPS
        and producer_op(producer) in LINEAR_OPS
    ):
        between, producer = producer, producer.inputs[0].producer()  # type: ignore[union-attr]
    linear_node = producer if producer is not None and producer.op_type in LINEAR_OPS else None
    site = Site(FoldKind.ADJACENT, names(linear_node), label(node), name_of(between))
    try:
        if linear_node is None:
            return _refuse_unpaired(node, producer)
        linear = _linear_for_after(node, linear_node, ir_version, options)
        if linear is None:
            return None
        if between is not None:
            require_single_consumer(between)
        pool = between if between is not None and between.op_type in POOL_OPS else None
        block = 1
        reshape = None if pool is not None else between
        merged = reshape is not None and merges_leading_axes(reshape, node, linear, ir_version)
        if reshape is not None and not merged:
            block = channel_block_through(reshape, linear, ir_version)
        affine = _affine_after(node, linear, ir_version, between, block)
        if affine is None:
            return None
        if pool is not None:
            require_pool_commutes(pool, linear, affine)
        kind = FoldKind.BATCH_MERGE if merged else FoldKind.ADJACENT
        site = replace(site, kind=FoldKind.THROUGH_POOL if pool is not None else kind)
        return make_plan(
            site, Direction.AFTER, linear, node, between, affine, options.rounding, hold
        )
    except Refused as refused:
        return site.refusal(refused.code, refused.detail)


def _refuse_unpaired(node: ir.Node, producer: ir.Node | None) -> Refusal | None:
    """Why a BN fed by no linear op cannot fold after it (:func:`why_unpaired`)."""
    if node.op_type != "BatchNormalization":
        return None  # a Mul/Add by a constant elsewhere is simply not our business
    source = "a graph input" if producer is None else f"{producer.op_type} {label(producer)!r}"
    nonlinear = producer is not None and producer.op_type in NONLINEAR_OPS
    raise Refused(*why_unpaired(Feed(source, nonlinear)))


def _linear_for_after(
    affine_node: ir.Node, producer: ir.Node, ir_version: int, options: MatchOptions
) -> LinearOp | None:
    try:
        linear = describe_linear(producer, ir_version, options)
        require_single_consumer(producer)
        return linear
    except Refused as refused:
        # Mul/Add after a MatMul of two activations (attention scaling, say) is
        # not a fold candidate; reporting it would bury the real refusals.
        weightless = refused.code in (Code.NOT_CONSTANT, Code.UNSUPPORTED_DTYPE)
        if affine_node.op_type != "BatchNormalization" and weightless:
            return None
        raise


def _affine_after(
    node: ir.Node, linear: LinearOp, ir_version: int, between: ir.Node | None, block: int = 1
) -> Affine | None:
    """The per-output-channel affine an affine node applies, or a refusal.

    ``block``: linear channels per BN channel past a regrouping shape op.
    """
    if node.op_type == "BatchNormalization":
        if between is None and linear.channel_axis() != 1:
            raise Refused(
                Code.NOT_PER_CHANNEL,
                f"BatchNorm normalizes axis 1 but {linear.node.op_type}'s output features are "
                f"axis {linear.channel_axis() if linear.out_rank else '? (input rank unknown)'}",
            )
        return batchnorm_affine(node, linear.channels // block, ir_version).spread(linear.channels)
    operand = next(v for v in node.inputs if v is not linear.output)
    array = constant_array(operand, ir_version)
    vector = per_channel_vector(array, linear)
    if vector is None:
        shape = None if array is None else list(array.shape)
        raise Refused(
            Code.NOT_PER_CHANNEL,
            f"{node.op_type} constant of shape {shape} is not per output channel",
        )
    if node.op_type == "Add" and linear.node.op_type == "MatMul" and linear.out_rank != 2:
        return None  # MatMul (N-d) + Add has nowhere better to put the bias: no gain
    if node.op_type == "Mul":
        return checked(lambda: Affine.of(vector, 0.0, linear.channels))
    return checked(lambda: Affine.of(1.0, vector, linear.channels))
