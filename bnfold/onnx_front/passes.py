"""The ONNX fold pass: apply planned folds with onnx_ir until nothing more folds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.onnx_front import match
from bnfold.onnx_front.constants import is_pure_constant_op
from bnfold.onnx_front.folded import ConstantData, DeferredWeight, ExactBias, as_tensor
from bnfold.onnx_front.match import Direction, FoldPlan, LinearOp, MatchOptions
from bnfold.report import Folded, FoldReport, Refusal, count_ops

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
    """The pass result plus the report of every fold and refusal."""

    report: FoldReport = field(default_factory=lambda: FoldReport(front="onnx"))


class FoldAffinePass(ir.passes.InPlacePass):
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
    """

    def __init__(
        self, options: MatchOptions | None = None, held_bytes: int = HELD_WEIGHT_BYTES
    ) -> None:
        super().__init__()
        self.options = options or MatchOptions()
        self.held_bytes = held_bytes

    def call(self, model: ir.Model) -> FoldPassResult:
        report = FoldReport(
            front="onnx", ops_before=op_counts(model), rounding=self.options.rounding
        )
        refused: list[Refusal] = []
        budget = _Budget(self.held_bytes)
        progress = True
        while progress:
            progress, refused = self._one_round(model, report, self.options, budget)
        report.refused = refused
        report.ops_after = op_counts(model)
        return FoldPassResult(model, bool(report.folded), report)

    @staticmethod
    def _one_round(
        model: ir.Model, report: FoldReport, options: MatchOptions, budget: _Budget
    ) -> tuple[bool, list[Refusal]]:
        """Plan and apply every site once; a refusal now may fold next round."""
        refused: list[Refusal] = []
        folded_any = False
        for node in list(all_nodes(model)):
            if node.graph is None:  # removed by an earlier fold this round
                continue
            outcome = match.plan(node, model.ir_version, options, hold=budget.allows)
            if isinstance(outcome, Refusal):
                refused.append(outcome)
            elif outcome is not None:
                entry = _folded_entry(outcome)  # before apply_plan renames the values
                apply_plan(outcome, model)
                budget.charge(outcome)
                report.folded.append(entry)
                folded_any = True
        return folded_any, refused


def _folded_entry(plan: FoldPlan) -> Folded:
    # The value the site's result keeps its name in: folding after, the affine's
    # output passes to the op (see _splice_out); folding before, the op's own.
    carrier = plan.affine_node if plan.direction is Direction.AFTER else plan.linear.node
    return Folded(
        plan.site,
        plan.pattern,
        match.label(plan.linear.node),
        match.label(plan.affine_node),
        bytes_added=plan.bytes_added,
        value=carrier.outputs[0].name or "",
    )


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    return iter(ir.traversal.RecursiveGraphIterator(model.graph))


def op_counts(model: ir.Model) -> dict[str, int]:
    return count_ops([node.op_type for node in all_nodes(model)])


def apply_plan(plan: FoldPlan, model: ir.Model) -> None:
    """Write the planned weight and bias, then remove the affine node."""
    linear, after = plan.linear, plan.direction is Direction.AFTER
    if not after:
        _bypass(plan.affine_node, reader=plan.between or linear.node)
    set_constant_input(linear.node, 1, plan.new_weight, model)
    output = linear.output
    if plan.new_bias is not None:
        if linear.node.op_type != "MatMul":
            set_constant_input(linear.node, 2, plan.new_bias, model, suffix="_bias")
            if linear.resets_beta:
                linear.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        elif not after or linear.out_rank == 2:
            output = _matmul_to_gemm(linear, plan.new_bias, model).outputs[0]
        else:
            output = _append_bias_add(linear, plan.new_bias, model, name=plan.affine_node.name)
    if after:
        _splice_out(plan.affine_node, plan.between.outputs[0] if plan.between else output)


def _bypass(affine_node: ir.Node, reader: ir.Node) -> None:
    """Make ``reader`` read the affine node's input directly, and remove the affine node."""
    graph = affine_node.graph
    assert graph is not None
    reader.replace_input_with(0, affine_node.inputs[0])
    params = [v for v in affine_node.inputs[1:] if v is not None]
    graph.remove(affine_node, safe=True)
    for value in params:
        drop_if_dead(value)


def set_constant_input(
    node: ir.Node, index: int, array: ConstantData, model: ir.Model, suffix: str = ""
) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    An initializer read only by ``node`` is updated in place (same name). Anything
    else (a Constant node's output, a missing optional input) gets a new
    initializer; the old producer is removed if nothing else reads it.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and match.readers(old) == 1:
        old.const_value = as_tensor(array, old.name)
        return
    graph = node.graph
    assert graph is not None
    if old is not None and old.name and match.readers(old) > 1:
        base = f"{old.name}__{match.label(node)}"  # a clone for this node only
    elif old is not None and old.name:
        base = old.name
    else:
        base = f"{match.label(node)}{suffix}"
    new = new_initializer(graph, base, array, model)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new)
    if old is not None:
        drop_if_dead(old)
    if new.name != base and base not in _taken_names(graph):
        new.name = base  # the computed value it replaces is gone: take its name


def new_initializer(graph: ir.Graph, base: str, array: ConstantData, model: ir.Model) -> ir.Value:
    """Register a new initializer with a name unused in ``graph``.

    IR < 4 requires every initializer of the main graph to be listed as a graph
    input too; subgraph inputs mean something else (loop state), so not there.
    """
    name = _unique_name(graph, base)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=as_tensor(array, name),
    )
    graph.register_initializer(value)
    if model.ir_version < 4 and graph is model.graph:
        graph.inputs.append(value)
    return value


def _taken_names(graph: ir.Graph) -> set[str | None]:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    return taken | {out.name for node in graph for out in node.outputs}


def _unique_name(graph: ir.Graph, base: str) -> str:
    taken = _taken_names(graph)
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def _splice_out(affine_node: ir.Node, replacement: ir.Value) -> None:
    """Remove ``affine_node``; ``replacement`` takes over its output and its name.

    Keeping the affine output's name keeps the graph's outputs and every
    downstream reference (value_info, subgraph captures) unchanged.
    """
    graph = affine_node.graph
    assert graph is not None
    out = affine_node.outputs[0]
    name = out.name
    if replacement.shape is None:
        replacement.shape = out.shape
    if replacement.type is None:
        replacement.type = out.type
    inputs = [v for v in affine_node.inputs if v is not None]
    ir.convenience.replace_all_uses_with(out, replacement, replace_graph_outputs=True)
    graph.remove(affine_node, safe=True)
    out.name = None
    replacement.name = name
    for value in inputs:
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


def drop_if_dead(value: ir.Value) -> None:
    """Remove an initializer or constant subexpression that nothing reads any more."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:
        if is_pure_constant_op(producer) and producer.graph is not None:
            inputs = [v for v in producer.inputs if v is not None]
            producer.graph.remove(producer, safe=True)
            for source in inputs:
                drop_if_dead(source)
        return
    if value.is_graph_input():
        # IR < 4 lists initializers as inputs. Removing one would change the
        # model's input interface (callers may feed it by name), so it stays.
        return
    graph = value.graph
    if value.is_initializer() and graph is not None:
        graph.initializers.pop(value.name)  # type: ignore[arg-type]
