"""Graph edits every rewrite shares: set a constant input, add an initializer, drop dead ones."""

from __future__ import annotations

import onnx_ir as ir

from bnfold.onnx_front.constants import is_pure_constant_op
from bnfold.onnx_front.folded import ConstantData, as_tensor
from bnfold.onnx_front.rules.base import FoldPlan, label, readers


def set_constant_input(
    node: ir.Node, index: int, array: ConstantData, model: ir.Model, suffix: str = ""
) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    An initializer read only by ``node`` is updated in place (same name). Anything
    else (a Constant node's output, a missing optional input) gets a new
    initializer; the old producer is removed if nothing else reads it.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and readers(old) == 1:
        old.const_value = as_tensor(array, old.name)
        return
    graph = node.graph
    assert graph is not None
    if old is not None and old.name and readers(old) > 1:
        base = f"{old.name}__{label(node)}"  # a clone for this node only
    elif old is not None and old.name:
        base = old.name
    else:
        base = f"{label(node)}{suffix}"
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


def splice_out(affine_node: ir.Node, replacement: ir.Value) -> None:
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


def write_linear_fold(plan: FoldPlan, model: ir.Model) -> None:
    """Write a plan's weight, and its bias into the op's bias slot (not for a MatMul's bias)."""
    linear = plan.linear
    set_constant_input(linear.node, 1, plan.new_weight, model)
    if plan.new_bias is None:
        return
    set_constant_input(linear.node, 2, plan.new_bias, model, suffix="_bias")
    if linear.resets_beta:
        linear.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
