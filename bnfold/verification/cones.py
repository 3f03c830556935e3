"""What leads to each value of an ONNX graph: its reductions, and whether a discontinuous op does.

Verification derives each compared tensor's tolerance from the reductions behind
it (:mod:`bnfold.verification.tolerance`) and judges a tensor downstream of a discontinuous
op (NonMaxSuppression, TopK, a comparison...) by the fold sites instead of by
its own difference. Both are one walk over the main graph in topological order.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.verification.tolerance import DISCONTINUOUS_OPS, Reductions

# Ops that sum over listed axes (all without axes); others are sized below.
_REDUCE_OPS = frozenset(
    {"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"}
)
# Ops whose output depends on the input's shape only, not its values.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size", "EyeLike"})
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
    # Values computed from the inputs' values (not from shapes or constants alone).
    data: set[str] = field(default_factory=set)

    def of(self, name: str) -> Reductions:
        return self.reductions.get(name, Reductions())


def analyse(model: ir.Model) -> Cones:
    """Walk ``model`` (shapes inferred first where onnx can; the model gains them)."""
    from onnx_ir.passes.common import ShapeInferencePass

    # Shapes only refine the bound: a model onnx cannot infer keeps its own, and
    # the pass's logged traceback would stand before bnfold's own one line.
    with contextlib.suppress(Exception), _silent("onnx_ir"):
        ShapeInferencePass(strict_mode=False)(model)
    return walk(model.graph)


@contextlib.contextmanager
def _silent(name: str) -> Iterator[None]:
    """No log records from logger ``name`` or its children inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def walk(graph: ir.Graph) -> Cones:
    """:class:`Cones` of every value of ``graph`` (subgraph bodies count as one op).

    Only values that depend on the inputs' *values* can jump: a Floor or Cast
    over a Shape (a resize computing its output size, say) depends on shapes
    alone, which both models share, so it marks nothing downstream.
    """
    cones = Cones()
    data = {v.name for v in graph.inputs if v.name and v.name not in graph.initializers}
    for node in graph:
        inputs = [v for v in node.inputs if v is not None and v.name]
        before = Reductions.widest(cones.of(v.name) for v in inputs)  # type: ignore[arg-type]
        after = before.then(reduction_length(node))
        fed = [v for v in inputs if v.name in data]
        jumps = bool(fed) and (node.op_type in DISCONTINUOUS_OPS or _casts_to_integer(node))
        jumps = jumps or any(v.name in cones.discontinuous for v in inputs)
        carries_data = bool(fed) and node.op_type not in _SHAPE_ONLY_OPS
        for out in node.outputs:
            if out.name:
                cones.reductions[out.name] = after
                if carries_data:
                    data.add(out.name)
                if jumps:
                    cones.discontinuous.add(out.name)
        if jumps:
            cones.frontier.update(
                v.name  # type: ignore[misc]
                for v in fed
                if v.name not in cones.discontinuous and _computed(v)
            )
    cones.frontier -= cones.discontinuous
    cones.data = data
    return cones


def _computed(value: ir.Value) -> bool:
    """Made by a node from the inputs (not a graph input, initializer or Constant)."""
    producer = value.producer()
    return producer is not None and producer.op_type != "Constant"


def reduction_length(node: ir.Node) -> int:
    """Terms summed per output element of ``node`` (1 when unknown or elementwise)."""
    op = node.op_type
    if op == "Conv":
        return _product(_shape(node, 1)[1:])
    if op == "ConvTranspose":
        return _conv_transpose(node)
    if op == "Gemm":
        b = _shape(node, 1)
        axis = 1 if node.attributes.get_int("transB", 0) else 0
        return max(1, b[axis]) if len(b) == 2 else 1
    if op == "MatMul":
        b = _shape(node, 1)
        return max(1, b[-2]) if len(b) >= 2 else 1
    if op in ("AveragePool", "LpPool"):
        return math.prod(node.attributes.get_ints("kernel_shape", ())) or 1
    if op in ("GlobalAveragePool", "GlobalLpPool", "InstanceNormalization"):
        return _product(_shape(node, 0)[2:])
    if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
        x = _shape(node, 0)
        axis = node.attributes.get_int("axis", -1)
        return max(1, x[axis]) if -len(x) <= axis < len(x) else 1
    if op in _REDUCE_OPS:
        return _reduced(node)
    if op == "Sum":
        return len(node.inputs)
    return 1


def _conv_transpose(node: ir.Node) -> int:
    # W is (C_in, C_out/g, *k): each output sums at most C_in/g inputs over the kernel.
    w = _shape(node, 1)
    groups = node.attributes.get_int("group", 1) or 1
    if len(w) < 2 or w[0] < 1:
        return 1
    return max(1, w[0] // groups) * _product(w[2:])


def _reduced(node: ir.Node) -> int:
    x = _shape(node, 0)
    axes = list(node.attributes.get_ints("axes", ()))
    if not axes and len(node.inputs) > 1 and node.inputs[1] is not None:
        const = node.inputs[1].const_value
        axes = [int(a) for a in const.numpy().reshape(-1)] if const is not None else []
    if not axes:
        return _product(x)
    return _product([x[a] for a in axes if -len(x) <= a < len(x)])


def _casts_to_integer(node: ir.Node) -> bool:
    if node.op_type != "Cast":
        return False
    to = node.attributes.get_int("to", 0)
    return to != 0 and ir.DataType(to) in _INTEGER_TYPES


def _shape(node: ir.Node, index: int) -> list[int]:
    """The dims of input ``index`` (-1 where unknown); [] when the shape is unknown."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or value.shape is None:
        return []
    return [d if isinstance(d, int) else -1 for d in value.shape]


def _product(dims: list[int]) -> int:
    """The product of ``dims``; 1 (unknown) when any is unknown or there are none."""
    if not dims or any(d < 0 for d in dims):
        return 1
    return max(1, math.prod(dims))
