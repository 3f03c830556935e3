"""Shape-only ops a per-channel affine can look through (Reshape, Flatten, Transpose, ...).

An element-moving op between a linear op and a BatchNorm keeps the fold exact
when each of the op's output channels stays whole inside one BN channel; these
helpers prove that from shapes and constant targets, or refuse NOT_PER_CHANNEL.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from bnfold.core import layouts
from bnfold.onnx_front.constants import constant_array
from bnfold.onnx_front.rules.base import LinearOp, label
from bnfold.report import Code
from bnfold.rules.family import Refused

# Ops that only move elements around; a per-channel affine can pass them when the
# channel axis provably stays a channel axis (see channel_block_through).
SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


def channel_block_through(shape_op: ir.Node, linear: LinearOp, ir_version: int) -> int:
    """How many of the linear op's channels make up one BN channel past ``shape_op``.

    1 when every element keeps its channel (a Transpose moving the channel axis
    to 1, a Reshape with the same channels and inner size); ``k`` when the op
    regroups each sample's elements so that BN channel ``c`` is linear channels
    ``c*k .. c*k+k-1`` (Gemm -> Reshape(N, C, 4, 4) -> BN, as in DCGAN
    generators; see :func:`bnfold.layouts.channel_block`).

    Raises:
        Refused: NOT_PER_CHANNEL, when neither can be shown from the shapes.
    """
    axis = linear.channel_axis()
    source, result = shape_op.inputs[0], shape_op.outputs[0]
    if shape_op.op_type == "Transpose":
        perm = shape_op.attributes.get_ints("perm")
        if axis is not None and perm is not None and list(perm).index(axis) == 1:
            return 1
    elif _same_channel_index(source.shape, result.shape, axis, linear.channels):  # type: ignore[union-attr]
        return 1
    elif axis == 1 and (block := _regrouped_block(shape_op, linear, ir_version)) is not None:
        return block
    raise Refused(
        Code.NOT_PER_CHANNEL,
        f"{shape_op.op_type} {label(shape_op)!r} does not keep {linear.node.op_type}'s output "
        "channels whole within the BatchNorm's channels (or its shapes are unknown)",
    )


def _regrouped_block(shape_op: ir.Node, linear: LinearOp, ir_version: int) -> int | None:
    """:func:`layouts.channel_block` across a batch-preserving Reshape/Flatten, if shown."""
    sample = _per_sample_dims(shape_op.inputs[0], linear)
    if sample is None:
        return None
    regrouped = _regrouped_sample(shape_op, sample, ir_version) or _annotated_sample(shape_op)
    if regrouped is None:
        return None
    return layouts.channel_block((1, *regrouped), (1, *sample))


def _annotated_sample(shape_op: ir.Node) -> tuple[int, ...] | None:
    """The output's per-sample dims from its shape, when it provably keeps the batch:
    the same known batch dim on both sides (a static export's ``Reshape(x, [2, C, H, W])``
    of a ``[2, F]`` input, say)."""
    before, after = shape_op.inputs[0].shape, shape_op.outputs[0].shape  # type: ignore[union-attr]
    if before is None or after is None or len(before) < 1 or len(after) < 2:
        return None
    rest = list(after.dims[1:])
    if not same_known_batch(before, after) or not all(isinstance(d, int) for d in rest):
        return None
    return tuple(rest)  # type: ignore[arg-type]


def _per_sample_dims(value: ir.Value | None, linear: LinearOp) -> tuple[int, ...] | None:
    """The linear op's output without its batch axis: ``(C, *spatial)``, static, or None."""
    shape = None if value is None else value.shape
    if shape is not None and len(shape) >= 2:
        dims = list(shape.dims[1:])
        if all(isinstance(d, int) for d in dims) and dims[0] == linear.channels:
            return tuple(dims)  # type: ignore[arg-type]
    if linear.out_rank == 2:  # Gemm, 2-D MatMul: (N, C) whatever the annotations say
        return (linear.channels,)
    return None


def _regrouped_sample(
    shape_op: ir.Node, sample: tuple[int, ...], ir_version: int
) -> tuple[int, ...] | None:
    """A sample's dims after a Flatten(axis=1) or a batch-preserving Reshape; else None.

    A Reshape keeps the batch axis when its constant target starts with 0 (copy
    the batch) or with -1 while the rest is exactly one sample. Anything else
    could split or merge samples, and then channels mean nothing per sample.
    """
    count = math.prod(sample)
    if shape_op.op_type == "Flatten":
        return (count,) if shape_op.attributes.get_int("axis", 1) == 1 else None
    if shape_op.op_type != "Reshape" or shape_op.attributes.get_int("allowzero", 0) != 0:
        return None
    target = constant_array(shape_op.inputs[1] if len(shape_op.inputs) > 1 else None, ir_version)
    if target is None or target.ndim != 1 or len(target) < 2 or int(target[0]) not in (0, -1):
        return None
    # With allowzero=0 a 0 copies the input's dim at the same position.
    rest = [sample[i] if d == 0 and i < len(sample) else int(d) for i, d in enumerate(target[1:])]
    inferred = rest.count(-1)
    if any(d == 0 or d < -1 for d in rest) or inferred > (1 if target[0] == 0 else 0):
        return None
    if inferred:
        known = math.prod(d for d in rest if d != -1)
        rest[rest.index(-1)] = count // known if count % known == 0 else -1
    return tuple(rest) if math.prod(rest) == count and -1 not in rest else None


def _same_channel_index(
    before: ir.Shape | None, after: ir.Shape | None, axis: int | None, channels: int
) -> bool:
    """Every element keeps its channel index when ``before[axis]`` becomes ``after[1]``.

    Reshape-like ops keep element order, so the channel of flat index f is
    ``f // inner % C`` on both sides; equal inner sizes and equal C make them agree.
    """
    if before is None or after is None or axis is None or len(after) < 2:
        return False
    inner_before = _static_product(before.dims[axis + 1 :])
    inner_after = _static_product(after.dims[2:])
    return (
        before.dims[axis] == channels
        and after.dims[1] == channels
        and inner_before is not None
        and inner_before == inner_after
    )


def _static_product(dims: object) -> int | None:
    values = list(dims)  # type: ignore[call-overload]
    if not all(isinstance(d, int) for d in values):
        return None
    return math.prod(values)


def same_known_batch(before: ir.Shape, after: ir.Shape) -> bool:
    """Both shapes provably start with the same batch dim: one integer, or one named
    symbol. Two unknown dims compare equal in onnx_ir but prove nothing: a Reshape
    to ``[-1, F]`` may merge the batch with the channels."""
    if len(before) < 1 or len(after) < 1:
        return False
    batch = before.dims[0]
    known = isinstance(batch, int) or getattr(batch, "value", None) is not None
    return known and batch == after.dims[0]


def require_flattens_batch(node: ir.Node, ir_version: int) -> None:
    """Refuse (NOT_PER_CHANNEL) a shape op that is not provably ``(N, C, ...) -> (N, -1)``.

    Proven by Flatten(axis=1), a Reshape to a constant ``[0, -1]`` (0 copies the
    batch dim), or a 2-D Reshape whose annotations show the same known batch dim.
    """
    if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) == 1:
        return
    if node.op_type == "Reshape" and _copies_batch_flattens_rest(node, ir_version):
        return
    out_shape = node.outputs[0].shape
    if node.op_type == "Reshape" and out_shape is not None and len(out_shape) == 2:
        in_shape = node.inputs[0].shape if node.inputs[0] is not None else None
        if in_shape is not None and same_known_batch(in_shape, out_shape):
            return
    raise Refused(
        Code.NOT_PER_CHANNEL,
        f"{node.op_type} {label(node)!r} does not flatten (N, C, ...) to (N, -1)",
    )


def _copies_batch_flattens_rest(reshape: ir.Node, ir_version: int) -> bool:
    if reshape.attributes.get_int("allowzero", 0) != 0:
        return False
    target = constant_array(reshape.inputs[1] if len(reshape.inputs) > 1 else None, ir_version)
    return target is not None and target.ndim == 1 and [int(d) for d in target] == [0, -1]
