"""Lower the BatchNormalizations no fold could remove into plain ops (``--lower-standalone``).

An inference BatchNormalization is the per-channel affine ``y = s * x + t``
(:func:`bnfold.affine.bn_to_affine`). Once folding has reached its fixpoint,
each one still in the model can therefore become

    mul-add:  Add(Mul(x, s), t)                      s, t of shape [C, 1, ..., 1]
    conv:     Conv(x, s as [C, 1, 1, ...], t, group=C)   a 1x1 depthwise Conv

for toolchains that reject BatchNormalization (or fuse only Conv). ``s`` and
``t`` are computed in float64 and cast once to the BN's dtype. The constants
are shaped to broadcast on axis 1, the BN's channel axis, which needs the
input's rank. Exported models often carry no shapes for intermediate values,
so the rank is read through what produced the input
(:class:`~bnfold.onnx_front.shapes.Shapes`); an input
whose rank still cannot be known is refused (``unknown_rank``) rather than
guessed, because ``[C]`` alone would broadcast on the *last* axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.core.cast import Unfoldable, cast_checked
from bnfold.onnx_front import match
from bnfold.onnx_front.constants import constant_array
from bnfold.onnx_front.graph_edit import new_initializer, splice_out
from bnfold.onnx_front.passes import FoldPassResult, left_codes, op_counts
from bnfold.onnx_front.shapes import Shapes
from bnfold.report import BatchNormCount, Code, Lowered, LowerForm, Refusal
from bnfold.rules.lower import ONNX_TERMS, conv_form_note


def lower_unfolded(result: FoldPassResult, form: LowerForm) -> None:
    """Rewrite every inference BatchNormalization the fold pass left as ``form``.

    Matches:  BatchNormalization (inference mode) still in ``result.model``, in the
              main graph and every If/Loop/Scan body.
    Produces: ``Mul`` + ``Add`` (the Add keeps the BN's name and output name), or a
              depthwise ``Conv`` under the BN's name; the BN's parameters go when
              nothing else reads them. Conv needs a spatial axis and a dtype Conv
              takes: a rank-2 input, float64 (no onnxruntime kernel) or bf16
              below opset 22 is lowered to mul-add, with a note saying why.
    Refuses (the BN stays; its refusal says why it could not fold and why it
    could not be lowered): NOT_CONSTANT, BAD_SHAPE, BAD_VALUES, NOT_PER_CHANNEL
    (spatial=0), UNKNOWN_RANK.
    Training-mode BatchNormalization is never touched.

    ``result.report`` gains the ``lowered`` entries; its ``refused``,
    ``ops_after`` and ``batchnorm`` counts are brought up to date.
    """
    model, report, unfolded = result.model, result.report, result.unfolded
    opset = model.opset_imports.get("", 1)
    # One reader for every BN: a lowering keeps each value's rank and type, so what
    # was found for one BN stays true for the next (residual chains reach the same
    # values by many paths).
    shapes = Shapes(model.ir_version)
    for node, refusal in list(unfolded.items()):
        if node.graph is None or not match.is_inference_batchnorm(node):
            continue
        outcome = lower_batchnorm(node, refusal, form, model, opset, shapes)
        if isinstance(outcome, Lowered):
            report.lowered.append(outcome)
            del unfolded[node]
        else:
            unfolded[node] = outcome
    report.refused = list(unfolded.values())
    report.ops_after = op_counts(model)
    before = report.batchnorm or BatchNormCount()
    report.batchnorm = BatchNormCount.of(
        before.found, before.training, len(report.lowered), left_codes(unfolded)
    )


def lower_batchnorm(
    bn: ir.Node,
    refusal: Refusal,
    form: LowerForm,
    model: ir.Model,
    opset: int,
    shapes: Shapes | None = None,
) -> Lowered | Refusal:
    """Lower one BatchNormalization that ``refusal`` kept from folding, or say why not."""
    affine = match.inference_affine(bn, model.ir_version)
    if isinstance(affine, Refusal):
        return refusal.not_lowered(affine.code, affine.detail)
    shapes = shapes or Shapes(model.ir_version)
    rank = shapes.rank(bn.inputs[0])
    if rank is None and bn.outputs[0].shape is not None:
        rank = len(bn.outputs[0].shape)
    if rank is None:
        return refusal.not_lowered(
            Code.UNKNOWN_RANK,
            "the input's rank is unknown, so no constant shape is sure to broadcast on axis 1 "
            "(run shape inference first)",
        )
    if rank < 2:
        return refusal.not_lowered(Code.BAD_SHAPE, f"rank-{rank} input has no channel axis")
    dtype = _batchnorm_dtype(bn, model.ir_version, shapes)
    try:
        scale = cast_checked(affine.scale, dtype, "scale")
        shift = cast_checked(affine.shift, dtype, "shift")
    except Unfoldable as err:
        return refusal.not_lowered(Code.BAD_VALUES, str(err))
    note = conv_form_note({rank}, ONNX_TERMS, dtype, opset) if form is LowerForm.CONV else ""
    if form is LowerForm.CONV and not note:
        _write_conv(bn, scale, shift, rank, model)
    else:
        form = LowerForm.MUL_ADD
        _write_mul_add(bn, scale, shift, rank, model)
    return Lowered(match.label(bn), form, refusal.code, refusal.detail, note)


def _batchnorm_dtype(bn: ir.Node, ir_version: int, shapes: Shapes) -> np.dtype:
    """The dtype of the BN's input (the Mul's operands must match it exactly).

    Read from the annotations, else from what produced the input (a typed graph
    input, a Cast, a constant), else from the BN's scale: before opset 15 that has
    the input's type by definition; from 15 on it may differ (an fp16 model with
    fp32 statistics), and verification would then fail to load the output.
    """
    if bn.outputs[0].type is not None:
        return np.dtype(bn.outputs[0].type.dtype.numpy())
    found = shapes.dtype(bn.inputs[0])
    if found is not None:
        return found
    scale = constant_array(bn.inputs[1], ir_version)
    assert scale is not None  # batchnorm_affine read it
    return scale.dtype


def _write_mul_add(
    bn: ir.Node, scale: np.ndarray, shift: np.ndarray, rank: int, model: ir.Model
) -> None:
    """Replace ``bn`` with ``Add(Mul(x, s), t)``; the Add takes the BN's names."""
    shape = (scale.shape[0],) + (1,) * (rank - 2)
    graph, s, t = _affine_constants(bn, scale.reshape(shape), shift.reshape(shape), model)
    mul_name = _unique_node_name(graph, f"{match.label(bn)}_mul")
    mul = ir.Node("", "Mul", [bn.inputs[0], s], name=mul_name)
    add = ir.Node("", "Add", [mul.outputs[0], t], name=bn.name)
    _annotate_like(mul.outputs[0], bn.outputs[0])
    graph.insert_before(bn, [mul, add])
    splice_out(bn, add.outputs[0])


def _write_conv(
    bn: ir.Node, scale: np.ndarray, shift: np.ndarray, rank: int, model: ir.Model
) -> None:
    """Replace ``bn`` with a 1x1 depthwise Conv (weight ``s`` as ``[C, 1, 1...]``, bias ``t``)."""
    channels, spatial = scale.shape[0], rank - 2
    weight = scale.reshape((channels, 1) + (1,) * spatial)
    graph, w, b = _affine_constants(bn, weight, shift, model)
    attributes = [ir.AttrInt64("group", channels), ir.AttrInt64s("kernel_shape", [1] * spatial)]
    conv = ir.Node("", "Conv", [bn.inputs[0], w, b], attributes=attributes, name=bn.name)
    graph.insert_before(bn, conv)
    splice_out(bn, conv.outputs[0])


def _affine_constants(
    bn: ir.Node, scale: np.ndarray, shift: np.ndarray, model: ir.Model
) -> tuple[ir.Graph, ir.Value, ir.Value]:
    """The BN's graph and new initializers ``<bn>_scale`` and ``<bn>_shift`` in it."""
    graph = bn.graph
    assert graph is not None
    name = match.label(bn)
    s = new_initializer(graph, f"{name}_scale", scale, model)
    t = new_initializer(graph, f"{name}_shift", shift, model)
    return graph, s, t


def _annotate_like(value: ir.Value, like: ir.Value) -> None:
    """An intermediate value of the lowering has the BN output's shape and type."""
    value.shape = None if like.shape is None else like.shape.copy()
    value.type = like.type


def _unique_node_name(graph: ir.Graph, base: str) -> str:
    taken = {node.name for node in graph}
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name
