"""Lower the inference batch_norm nodes no fold removed to plain aten ops
(``--lower-standalone``): a mul-add, or a 1x1 depthwise conv.
"""

from __future__ import annotations

import torch
from torch import fx

from bnfold.affine import Unfoldable
from bnfold.report import Code, FoldReport, Lowered, LowerForm, Refusal
from bnfold.rules.lower import TORCH_TERMS, conv_form_note
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    arg_node,
    bn_affine,
    fetch,
    new_attr,
    owner_path,
    remove_bn,
    uses_batch_stats,
)
from bnfold.torch_front.census import refusal_naming
from bnfold.torch_front.tensors import as_parameter

aten = torch.ops.aten

_CONV_OF_RANK = {3: aten.conv1d.default, 4: aten.conv2d.default, 5: aten.conv3d.default}


def lower_left(gm: fx.GraphModule, report: FoldReport, form: LowerForm) -> None:
    """Rewrite every inference batch_norm still in ``gm`` as plain aten ops.

    Matches:  batch_norm nodes with running statistics (not training=True).
    Produces: ``add(mul(x, s), t)`` with ``s``, ``t`` of shape ``[C, 1, ...]``, or
              with ``form`` conv a 1x1 depthwise ``conv{1,2,3}d(x, s, t, groups=C)``
              (a rank-2 input has no spatial axis: mul-add, with the note of
              :func:`bnfold.rules.lower.conv_form_note`); ``s``
              and ``t`` are the BN's affine (:func:`bnfold.affine.bn_to_affine`)
              in float64, cast once to the input's dtype, as new attributes.
    Refuses (the BN stays, its refusal extended): NOT_CONSTANT (statistics not
    attributes), UNKNOWN_RANK (no traced shape), BAD_VALUES.
    The BN's refusal moves from ``report.refused`` to ``report.lowered``.
    """
    for bn in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]:
        if uses_batch_stats(bn):
            continue
        owner = owner_path(bn.args[1:5]) or bn.name
        refusal = refusal_naming(owner, report.refused) or Refusal(
            owner, Code.UNTRACEABLE, "no finder reported this BatchNorm"
        )
        outcome = _lower_one(gm, bn, form, refusal)
        if refusal in report.refused:
            report.refused.remove(refusal)
        if isinstance(outcome, Refusal):
            report.refused.append(outcome)
        else:
            report.lowered.append(outcome)
    gm.recompile()


def _lower_one(
    gm: fx.GraphModule, bn: fx.Node, form: LowerForm, refusal: Refusal
) -> Lowered | Refusal:
    """Lower one batch_norm node, or say why it stays."""
    stats = bn.args[3:5]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in stats):
        return refusal.not_lowered(Code.NOT_CONSTANT, "running statistics are not attributes")
    traced = bn.meta.get("val")
    if not isinstance(traced, torch.Tensor):
        return refusal.not_lowered(Code.UNKNOWN_RANK, "the BatchNorm carries no traced shape")
    rank = traced.dim()
    note = conv_form_note({rank}, TORCH_TERMS) if form is LowerForm.CONV else ""
    conv = _CONV_OF_RANK[rank] if form is LowerForm.CONV and not note else None
    like = torch.empty(0, dtype=traced.dtype, device=fetch(gm, stats[0]).device)
    try:
        affine = bn_affine(gm, bn)
        channels = affine.scale.shape[0]
        s_shape = (channels, 1) + (1,) * (rank - 2) if conv else (channels,) + (1,) * (rank - 2)
        scale = as_parameter(affine.scale.reshape(s_shape), like)
        shift = as_parameter(affine.shift.reshape((channels,) if conv else s_shape), like)
    except Unfoldable as err:
        return refusal.not_lowered(Code.BAD_VALUES, str(err))
    owner = owner_path(stats) or bn.name
    s = new_attr(gm, bn, f"{owner}.lowered_scale", scale)
    t = new_attr(gm, bn, f"{owner}.lowered_shift", shift)
    x = arg_node(bn.args[0])
    with gm.graph.inserting_before(bn):
        if conv is not None:
            ones, zeros = [1] * (rank - 2), [0] * (rank - 2)
            out = gm.graph.call_function(conv, (x, s, t, ones, zeros, ones, channels))
        else:
            product = gm.graph.call_function(aten.mul.Tensor, (x, s))
            out = gm.graph.call_function(aten.add.Tensor, (product, t))
    remove_bn(gm, bn, out)
    used = LowerForm.CONV if conv is not None else LowerForm.MUL_ADD
    return Lowered(owner, used, refusal.code, refusal.detail, note)
