"""What leads to each value of an ONNX graph: its reductions, and whether a discontinuous op does.

Verification derives each compared tensor's tolerance from the reductions behind
it (:mod:`bnfold.tolerance`) and judges a tensor downstream of a discontinuous
op (NonMaxSuppression, TopK, a comparison...) by the fold sites instead of by
its own difference. Both are one walk over the main graph in topological order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.tolerance import DISCONTINUOUS_OPS, Reductions

# Ops that sum over listed axes (all without axes); others are sized below.
_REDUCE_OPS = frozenset(
    {"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"}
)
_INTEGER_TYPES = frozenset(
    {
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)  # fmt: skip


@dataclass
class Cones:
    """Per value name: the reductions leading to it, and whether a discontinuous op does."""

    reductions: dict[str, Reductions] = field(default_factory=dict)
    discontinuous: set[str] = field(default_factory=set)
    # Computed values that are continuous but feed a node whose output is not:
    # the last tensors a rounding error moves smoothly, so the evidence that
    # vouches for the jumps after them.
    frontier: set[str] = field(default_factory=set)

    def of(self, name: str) -> Reductions:
        return self.reductions.get(name, Reductions())


def analyse(model: ir.Model) -> Cones:
    """Walk ``model`` (shapes inferred first where onnx can; the model gains them)."""
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # shapes only refine the bound; a model onnx cannot infer keeps its own
        pass
    return walk(model.graph)


def walk(graph: ir.Graph) -> Cones:
    """:class:`Cones` of every value of ``graph`` (subgraph bodies count as one op)."""
    cones = Cones()
    for node in graph:
        inputs = [v for v in node.inputs if v is not None and v.name]
        before = Reductions.widest(cones.of(v.name) for v in inputs)  # type: ignore[arg-type]
        after = before.then(reduction_length(node))
        jumps = node.op_type in DISCONTINUOUS_OPS or _casts_to_integer(node)
        jumps = jumps or any(v.name in cones.discontinuous for v in inputs)
        for out in node.outputs:
            if out.name:
                cones.reductions[out.name] = after
                if jumps:
                    cones.discontinuous.add(out.name)
        if jumps:
            cones.frontier.update(
                v.name  # type: ignore[misc]
                for v in inputs
                if v.name not in cones.discontinuous and _computed(v)
            )
    cones.frontier -= cones.discontinuous
    return cones


def _computed(value: ir.Value) -> bool:
    """Made by a node from the inputs (not a graph input, initializer or Constant)."""
    producer = value.producer()
    return producer is not None and producer.op_type != "Constant"


def reduction_length(node: ir.Node) -> int:
    """Terms summed per output element of ``node`` (1 when unknown or elementwise)."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return _dims_product(_shape(node, 1), start=1) if op == "Conv" else _conv_transpose(node)
    if op == "Gemm":
        b = _shape(node, 1)
        trans_b = node.attributes.get_int("transB", 0)
        return int(b[1 if trans_b else 0]) if b and _known(b) else 1
    if op == "MatMul":
        b = _shape(node, 1)
        return int(b[-2]) if b and len(b) >= 2 and _known(b[-2:-1]) else 1
    if op in ("AveragePool", "LpPool"):
        kernel = node.attributes.get_ints("kernel_shape", ())
        return math.prod(kernel) if kernel else 1
    if op in ("GlobalAveragePool", "GlobalLpPool", "InstanceNormalization"):
        return _dims_product(_shape(node, 0), start=2)
    if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
        x = _shape(node, 0)
        axis = node.attributes.get_int("axis", -1)
        return int(x[axis]) if x and -len(x) <= axis < len(x) and _known([x[axis]]) else 1
    if op in _REDUCE_OPS:
        return _reduced(node)
    if op == "Sum":
        return len(node.inputs)
    return 1


def _conv_transpose(node: ir.Node) -> int:
    # W is (C_in, C_out/g, *k): each output sums at most C_in/g inputs over the kernel.
    w = _shape(node, 1)
    if not w or not _known(w):
        return 1
    groups = node.attributes.get_int("group", 1) or 1
    return max(1, int(w[0]) // groups) * math.prod(int(d) for d in w[2:])


def _reduced(node: ir.Node) -> int:
    x = _shape(node, 0)
    if not x or not _known(x):
        return 1
    axes: list[int] | None = list(node.attributes.get_ints("axes", ())) or None
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        const = node.inputs[1].const_value
        axes = [int(a) for a in const.numpy().reshape(-1)] if const is not None else None
    if axes is None:
        return math.prod(int(d) for d in x)
    return math.prod(int(x[a]) for a in axes if -len(x) <= a < len(x))


def _casts_to_integer(node: ir.Node) -> bool:
    if node.op_type != "Cast":
        return False
    to = node.attributes.get_int("to", 0)
    return to != 0 and ir.DataType(to) in _INTEGER_TYPES


def _shape(node: ir.Node, index: int) -> list[int | str | None] | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    shape = node.inputs[index].shape  # type: ignore[union-attr]
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


def _known(dims: list[int | str | None]) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in dims)


def _dims_product(dims: list[int | str | None] | None, start: int) -> int:
    if not dims or not _known(dims[start:]):
        return 1
    return max(1, math.prod(int(d) for d in dims[start:]))  # type: ignore[arg-type]
