"""The ONNX fold pass: apply planned folds with onnx_ir until nothing more folds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.onnx_front import match
from bnfold.onnx_front.folded import DeferredWeight, ExactBias
from bnfold.onnx_front.graph_edit import (
    drop_if_dead,
    new_initializer,
    set_constant_input,
    splice_out,
    write_linear_fold,
)
from bnfold.onnx_front.match import Direction, FoldPlan, LinearOp, MatchOptions
from bnfold.report import BatchNormCount, Code, Folded, FoldReport, Refusal, count_ops

# Folded weights up to this many bytes stay in memory from planning to saving;
# past it they are recomputed during the save. Small models then fold each weight
# once; a multi-GB model never holds more than this plus one weight.
HELD_WEIGHT_BYTES = 512 << 20


class _Budget:
    """Which folded weights a pass keeps in memory, and how many bytes it may still keep."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def allows(self, weight: DeferredWeight) -> bool:
        """Hold a weight read from memory while it fits; never one read from external data.

        A model with external data is saved with external data, and there a
        recomputed weight is streamed into the file a block at a time: that costs
        less than holding it and writing it whole (on an 800 MB model, 1.35 s
        against 2.0 s for the fold and save).
        """
        return not weight.mapped and weight.nbytes <= self.left

    def charge(self, plan: FoldPlan) -> None:
        """Count the weight an applied plan keeps in memory."""
        if plan.new_weight.values is not None:
            self.left -= plan.new_weight.nbytes


@dataclass
class FoldPassResult(ir.passes.PassResult):
    """The pass result plus the report of every fold and refusal.

    ``unfolded`` maps each affine node left in the model to its refusal (the
    report's ``refused``, by node), for the passes that run after folding.
    """

    report: FoldReport = field(default_factory=lambda: FoldReport(front="onnx"))
    unfolded: dict[ir.Node, Refusal] = field(default_factory=dict)


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference BatchNormalization and constant Mul/Add into a neighbouring linear op.

    Matches:  BatchNormalization | Mul(·, c) | Add(·, c)
              after Conv | ConvTranspose | Gemm | MatMul (BN also through one
              shape-only op), or a BN before one of them (also through Flatten),
              in the main graph and in every If/Loop/Scan body.
    Produces: the linear op with folded W' and B' (see bnfold.affine); the affine
              node is removed. Folding after, the affine's output name passes to
              the op, so the model's interface and downstream names are unchanged.
              A 2-D MatMul that gains a bias becomes a Gemm; an N-d one keeps a
              single Add. A weight other nodes also read is cloned first.
    Repeats to a fixpoint, so Conv -> BN -> Mul -> Add folds into one Conv and
    BN -> Conv -> BN folds both; a weight or bias folded several times is still
    rounded once (see :mod:`bnfold.onnx_front.folded`).
    Refuses: every code listed in :func:`bnfold.onnx_front.match.plan`; the
             site is left exactly as it was.
    Reports each fold and refusal, and in ``report.batchnorm`` how many inference
    BatchNorms were found, folded and left (by refusal code).

    An ``onnx_ir`` pass like any other (``bnfold.FoldBatchNormPass``), for
    pipelines of passes::

        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes
        import bnfold

        fold = bnfold.FoldBatchNormPass()
        pipeline = ir.passes.PassManager([
            common_passes.LiftConstantsToInitializersPass(),
            fold,
            common_passes.RemoveUnusedNodesPass(),
        ])
        pipeline(model)
        print(fold.report.summary())

    Called alone it returns a :class:`FoldPassResult` with the report; a
    PassManager returns only a plain PassResult, so the pass also keeps the
    report of its last call in ``report``. It folds to a fixpoint in one call:
    in a PassManager with ``steps > 1`` a later step finds nothing new and its
    report lists no folds, so nest the other passes in their own PassManager if
    they need several steps. The pass changes the model in place and verifies
    nothing: compare the result with a copy of the original (``bnfold.verify``).

    Args:
        options: clone shared weights (default) or refuse them, and the rounding
            of folded weights (:class:`bnfold.onnx_front.match.MatchOptions`).
        held_bytes: how many bytes of folded weights stay in memory until the save.
    """

    def __init__(
        self, options: MatchOptions | None = None, held_bytes: int = HELD_WEIGHT_BYTES
    ) -> None:
        super().__init__()
        self.options = options or MatchOptions()
        self.held_bytes = held_bytes
        self.report: FoldReport | None = None  # of the last call

    def call(self, model: ir.Model) -> FoldPassResult:
        report = FoldReport(
            front="onnx", ops_before=op_counts(model), rounding=self.options.rounding
        )
        found, training = batchnorm_census(model)
        refused: dict[ir.Node, Refusal] = {}
        budget = _Budget(self.held_bytes)
        progress = True
        while progress:
            progress, refused = self._one_round(model, report, self.options, budget)
        report.refused = list(refused.values())
        report.ops_after = op_counts(model)
        report.batchnorm = BatchNormCount.of(found, training, 0, left_codes(refused))
        self.report = report
        return FoldPassResult(model, bool(report.folded), report, refused)

    @staticmethod
    def _one_round(
        model: ir.Model, report: FoldReport, options: MatchOptions, budget: _Budget
    ) -> tuple[bool, dict[ir.Node, Refusal]]:
        """Plan and apply every site once; a refusal now may fold next round."""
        refused: dict[ir.Node, Refusal] = {}
        folded_any = False
        for node in list(all_nodes(model)):
            if node.graph is None:  # removed by an earlier fold this round
                continue
            outcome = match.plan(node, model.ir_version, options, hold=budget.allows)
            if isinstance(outcome, Refusal):
                refused[node] = outcome
            elif isinstance(outcome, FoldPlan):
                entry = _folded_entry(outcome)  # before apply_plan renames the values
                apply_plan(outcome, model)
                budget.charge(outcome)
                report.folded.append(entry)
                folded_any = True
            elif outcome is not None:  # a merge, or a fold into several ops
                entries = outcome.entries  # before apply renames the values
                outcome.apply(model)
                for plan in outcome.plans:
                    budget.charge(plan)
                report.folded.extend(entries)
                folded_any = True
        return folded_any, refused


# The name the pass had before it was public; api.py and the tests still use it.
FoldAffinePass = FoldBatchNormPass


def _folded_entry(plan: FoldPlan) -> Folded:
    # The value the site's result keeps its name in: folding after, the affine's
    # output passes to the op (see graph_edit.splice_out); folding before, the op's own.
    carrier = plan.affine_node if plan.direction is Direction.AFTER else plan.linear.node
    return plan.site.folded(plan.pattern, plan.bytes_added, value=carrier.outputs[0].name or "")


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    return iter(ir.traversal.RecursiveGraphIterator(model.graph))


def op_counts(model: ir.Model) -> dict[str, int]:
    return count_ops([node.op_type for node in all_nodes(model)])


def batchnorm_census(model: ir.Model) -> tuple[int, int]:
    """(inference, training-mode) BatchNormalization nodes in the model, subgraphs included."""
    bns = [
        n
        for n in all_nodes(model)
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]
    inference = sum(1 for n in bns if match.is_inference_batchnorm(n))
    return inference, len(bns) - inference


def left_codes(unfolded: dict[ir.Node, Refusal]) -> list[Code]:
    """The refusal code of each inference BatchNormalization still in the model."""
    return [
        refusal.code
        for node, refusal in unfolded.items()
        if node.graph is not None and match.is_inference_batchnorm(node)
    ]


def apply_plan(plan: FoldPlan, model: ir.Model) -> None:
    """Write the planned weight and bias, then remove the affine node."""
    linear, after = plan.linear, plan.direction is Direction.AFTER
    if not after:
        _bypass(plan.affine_node, reader=plan.between or linear.node)
    output = linear.output
    if linear.node.op_type != "MatMul" or plan.new_bias is None:
        write_linear_fold(plan, model)
    else:
        set_constant_input(linear.node, 1, plan.new_weight, model)
        if not after or linear.out_rank == 2:
            output = _matmul_to_gemm(linear, plan.new_bias, model).outputs[0]
        else:
            output = _append_bias_add(linear, plan.new_bias, model, name=plan.affine_node.name)
    if after:
        splice_out(plan.affine_node, plan.between.outputs[0] if plan.between else output)


def _bypass(affine_node: ir.Node, reader: ir.Node) -> None:
    """Make ``reader`` read the affine node's input directly, and remove the affine node."""
    graph = affine_node.graph
    assert graph is not None
    reader.replace_input_with(0, affine_node.inputs[0])
    params = [v for v in affine_node.inputs[1:] if v is not None]
    graph.remove(affine_node, safe=True)
    for value in params:
        drop_if_dead(value)


def _matmul_to_gemm(linear: LinearOp, bias: ExactBias, model: ir.Model) -> ir.Node:
    """A 2-D MatMul that gains a bias becomes Gemm(A, W', b') under the same name."""
    matmul = linear.node
    graph = matmul.graph
    assert graph is not None
    bias_value = new_initializer(graph, f"{match.label(matmul)}_bias", bias, model)
    gemm = ir.Node("", "Gemm", [matmul.inputs[0], matmul.inputs[1], bias_value], name=matmul.name)
    graph.insert_before(matmul, gemm)
    old_out = matmul.outputs[0]
    gemm.outputs[0].shape, gemm.outputs[0].type = old_out.shape, old_out.type
    ir.convenience.replace_all_uses_with(old_out, gemm.outputs[0], replace_graph_outputs=True)
    graph.remove(matmul, safe=True)
    gemm.outputs[0].name = old_out.name
    return gemm


def _append_bias_add(
    linear: LinearOp, bias: ExactBias, model: ir.Model, name: str | None
) -> ir.Value:
    """An N-d MatMul has no bias slot: add the folded bias right after it.

    Its output features are the last axis, so a ``(C,)`` bias broadcasts onto them.
    Returns the Add's output, which now feeds everything the MatMul fed.
    """
    matmul = linear.node
    graph = matmul.graph
    assert graph is not None
    bias_value = new_initializer(graph, f"{match.label(matmul)}_bias", bias, model)
    add = ir.Node("", "Add", [linear.output, bias_value], name=name)
    graph.insert_after(matmul, add)
    out = add.outputs[0]
    out.shape, out.type = linear.output.shape, linear.output.type
    for use in list(linear.output.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, out)
    return out
