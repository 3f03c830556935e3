"""Find affine nodes next to linear ops and decide, per site, the fold or the refusal.

A *site* is an affine node (BatchNormalization, or Mul/Add by a constant) beside
a linear op (Conv, ConvTranspose, Gemm, MatMul). :func:`plan` asks the rules of
:mod:`bnfold.onnx_front.rules` in turn, one pattern family each (a fold *after*
the op feeding the affine, *before* the op reading it, ...), and returns the
first plan, or the refusal that explains best why none applies. Planning never
modifies the graph; :mod:`bnfold.onnx_front.passes` applies plans.

The names other modules import from here (``MatchOptions``, ``FoldPlan``,
``LinearOp``, ``Direction``, ``label``, ``rank_of``, ...) live in
:mod:`bnfold.onnx_front.rules.base` and are re-exported; a rule's own helpers
are imported from its module.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from bnfold.core.affine import Affine
from bnfold.onnx_front.folded import DeferredWeight
from bnfold.onnx_front.rules.add_concat import JoinFold, join_site, plan_through_join
from bnfold.onnx_front.rules.after import plan_after
from bnfold.onnx_front.rules.base import (
    AFFINE_OPS,
    DEFAULT_BN_EPSILON,
    Direction,
    FoldPlan,
    LinearOp,
    MatchOptions,
    Rewrite,
    batchnorm_affine,
    bn_channels,
    label,
    rank_of,
    require_inference,
)
from bnfold.onnx_front.rules.before import linear_reader, plan_before
from bnfold.onnx_front.rules.branch_sum import BranchMerge, plan_branch_merge, why_not_tap
from bnfold.onnx_front.shapes import RANK_PRESERVING_OPS
from bnfold.report import FoldKind, Refusal
from bnfold.rules import precedence
from bnfold.rules.family import Refused
from bnfold.sites import Site

__all__ = [
    "AFFINE_OPS",
    "DEFAULT_BN_EPSILON",
    "RANK_PRESERVING_OPS",
    "BranchMerge",
    "Direction",
    "FoldPlan",
    "JoinFold",
    "LinearOp",
    "MatchOptions",
    "Rewrite",
    "inference_affine",
    "is_inference_batchnorm",
    "label",
    "plan",
    "rank_of",
]


def plan(
    node: ir.Node,
    ir_version: int,
    options: MatchOptions | None = None,
    hold: Callable[[DeferredWeight], bool] = lambda weight: True,
) -> FoldPlan | Rewrite | Refusal | None:
    """Plan the fold of one affine node into a linear op beside it, or of one branch sum.

    Matches (after):  BatchNormalization | Mul(·, c) | Add(·, c)  of
                      Conv | ConvTranspose | Gemm | MatMul(x, W, B?),
                      for BN possibly through one Reshape/Flatten/Squeeze/Unsqueeze/
                      Transpose that keeps each of the op's channels whole inside one
                      BN channel (Gemm -> Reshape(-1, C, 4, 4) -> BN folds too).
    Matches (before): Conv | ConvTranspose | Gemm | MatMul(BatchNormalization(x), W, B?),
                      possibly through a Flatten/Reshape into Gemm/MatMul; only
                      tried when the BN cannot fold after.
    Matches (sum):    Add/Sub trees of Conv(x), BatchNormalization(x) and x, also
                      scaled by constant Muls (FastViT's RepMixer), merged into one
                      Conv (see :mod:`bnfold.onnx_front.rules.branch_sum`).
    Matches (join):   BatchNormalization(Add | Concat(axis=1) of Conv/ConvTranspose/Gemm)
                      (see :mod:`bnfold.onnx_front.rules.add_concat`).
    Matches (pool):   BatchNormalization(AveragePool | MaxPool | Global*Pool(Conv(x)))
                      (see :mod:`bnfold.onnx_front.rules.pooling`).
    Produces: a FoldPlan with W' and B' (see bnfold.affine), or a Rewrite
              (BranchMerge, JoinFold) that edits several nodes.
    Refuses:
      TRAINING_MODE    BN has training_mode=1 / is_test=0, or its extra outputs are used
      NOT_CONSTANT     W, B or a BN parameter is not a constant (initializer,
                       Constant node, small constant subexpression, or an IR < 4
                       initializer listed as input)
      BRANCHING        the linear op's (or BN's) output has other consumers or is a graph output
      SHARED_WEIGHT    W or B is also read elsewhere (only with clone_shared=False)
      NOT_PER_CHANNEL  the affine is not per channel of the op (MatMul on a 3-D input
                       before BN, BN spatial=0, Mul/Add constant over other axes, a
                       shape op that moves the channel)
      ZERO_PADDING     before-fold into a padded Conv (or a ConvTranspose) with a
                       nonzero shift: the border taps read zeros, not the shift
      NONLINEAR_INPUT  BN's input comes from a nonlinearity and no linear op reads it
      STANDALONE       no linear op beside the BN at all
      BAD_VALUES       NaN/inf, var + eps <= 0, or folded values overflow the dtype
      BAD_SHAPE        BN parameters do not have one value per channel
      BAD_GROUPS       channels not divisible by group
      UNSUPPORTED_DTYPE  the weight is not a floating-point tensor
      MERGE_MOVES_CHANNEL  a batch-merging reshape leaves other than C channels last
      BRANCH_MISMATCH, UNCENTRED_TAP  an identity BN's branch sum cannot merge
      POOL_PADDING, NEGATIVE_SCALE    the pool before the BN does not commute with it
      NOT_LINEAR_TERM  an input of the Add/Concat before the BN is no linear op of its own

    Returns None for a Mul/Add that is not an affine next to a linear op (say a
    residual Add): those are not sites and are not reported.

    ``hold(weight)`` says whether the plan may keep a folded weight's values in
    memory; if not, they are checked block by block and recomputed when read.
    """
    options = options or MatchOptions()
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    after = plan_after(node, ir_version, options, hold)
    if after is None and node.op_type == "Add":
        return _plan_sum(node, ir_version, options)
    if after is None or isinstance(after, FoldPlan) or node.op_type != "BatchNormalization":
        return after
    joined = None
    if precedence.nothing_beside(after.code):
        tap = why_not_tap(node, ir_version, options)
        if tap is not None:
            return tap
        joined = _plan_join(node, ir_version, options, hold)
        if isinstance(joined, JoinFold):
            return joined
        # The join's reason says more than "standalone", unless a fold before applies.
        after = joined or after
    consumer = linear_reader(node)
    if consumer is None:
        return after
    before = plan_before(node, consumer, ir_version, options, hold)
    if isinstance(before, FoldPlan):
        return before
    # A join's refusal says what the BN's input is; the before refusal leads it.
    lead_after = joined is None and precedence.after_leads(after.code)
    return precedence.explain_both(after, before, label(consumer[-1]), lead_after)


def _plan_sum(node: ir.Node, ir_version: int, options: MatchOptions) -> BranchMerge | None:
    """The merge of the branch sum topped by ``node``; its refusals are its BNs' to report."""
    try:
        return plan_branch_merge(node, ir_version, options)
    except Refused:
        return None


def _plan_join(
    bn: ir.Node, ir_version: int, options: MatchOptions, hold: Callable[[DeferredWeight], bool]
) -> JoinFold | Refusal | None:
    """The fold of ``bn`` over the Add/Concat feeding it, its refusal, or None if none feeds it."""
    try:
        return plan_through_join(bn, ir_version, options, hold)
    except Refused as refused:
        join = None if bn.inputs[0] is None else bn.inputs[0].producer()
        assert join is not None  # plan_through_join refuses only a join's BN
        return join_site(join, bn).refusal(refused.code, refused.detail)


def is_inference_batchnorm(node: ir.Node) -> bool:
    """A default-domain BatchNormalization in inference mode: one a fold or lowering may remove."""
    if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    try:
        require_inference(node)
    except Refused:
        return False
    return True


def inference_affine(node: ir.Node, ir_version: int) -> Affine | Refusal:
    """The per-channel affine an inference BatchNormalization computes, or why it has none.

    Refuses with the BN's own codes: TRAINING_MODE, NOT_PER_CHANNEL (spatial=0),
    NOT_CONSTANT, BAD_SHAPE, BAD_VALUES.
    """
    try:
        return batchnorm_affine(node, bn_channels(node, ir_version), ir_version)
    except Refused as refused:
        return Site(FoldKind.ADJACENT, bn=label(node)).refusal(refused.code, refused.detail)
