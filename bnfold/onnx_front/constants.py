"""What value a graph input of an op has, when it is a compile-time constant.

Exporters do not always write parameters as initializers: torch's dynamo
exporter with ``optimize=False`` emits a missing conv bias as
``Expand(CastLike(Constant))``, others use ``ConstantOfShape`` or ``Cast``; with
constant folding off, torch's TorchScript exporter writes torchvision's
``FrozenBatchNorm2d`` as the arithmetic of its forward,
``Reshape(w * 1 / Sqrt(rv + eps))`` and ``Reshape(b - rm * scale)``.
:func:`constant_array` evaluates such small pure subexpressions with numpy so the
fold sees through them; :func:`is_pure_constant_op` tells the rewriter which
producers may be deleted once nothing reads them.

Arithmetic is evaluated in the operands' own dtype, as the runtime computes it
(no promotion: operands of two dtypes are no valid ONNX and are not evaluated).
Add, Sub, Mul, Div and Sqrt are correctly rounded in IEEE arithmetic, so numpy
gets the runtime's bits; integer arithmetic stops at Add, Sub, Mul and Neg,
which wrap alike everywhere (ONNX's integer Div truncates, numpy's floors).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

# Evaluating more than this many elements is not "a small constant subexpression".
MAX_ELEMENTS = 1 << 24
MAX_DEPTH = 8
# (op, input index) pairs that read only a value's type or shape, never its data.
METADATA_INPUTS = frozenset({("CastLike", 1), ("Shape", 0), ("Size", 0)})


def reads_data(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` of ``node`` depends on the values (not just the type/shape)."""
    return (node.op_type, index) not in METADATA_INPUTS


def is_constant(value: ir.Value | None, ir_version: int) -> bool:
    """Like ``constant_array(value) is not None``, without reading an initializer's data."""
    if value is not None and value.const_value is not None:
        return not (value.is_graph_input() and ir_version >= 4)
    return constant_array(value, ir_version) is not None


def constant_array(value: ir.Value | None, ir_version: int, depth: int = 0) -> np.ndarray | None:
    """The constant behind ``value``, or None if it can change at run time.

    Initializers, Constant nodes and the pure ops in :data:`_EVALUATORS` over
    constants are constant. An initializer that is also a graph input can be
    overridden by the caller, so it is not constant, except in IR < 4 where
    every initializer must be listed as an input.
    """
    if value is None or depth > MAX_DEPTH:
        return None
    if value.is_graph_input() and (ir_version >= 4 or value.const_value is None):
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    evaluate = _EVALUATORS.get(producer.op_type)
    if evaluate is None or len(producer.outputs) != 1:
        return None
    inputs: list = []
    for index, source in enumerate(producer.inputs):
        if source is None or not reads_data(producer, index):
            inputs.append(source)  # absent, or needed only for its type/shape
            continue
        array = constant_array(source, ir_version, depth + 1)
        if array is None:
            return None
        inputs.append(array)
    try:
        result = evaluate(producer, inputs)
    except (ValueError, TypeError, IndexError):
        return None
    if result is None or result.size > MAX_ELEMENTS:
        return None
    return np.asarray(result)


def is_pure_constant_op(node: ir.Node) -> bool:
    """A producer that computes a constant and has no other effect."""
    return node.domain in ("", "ai.onnx") and node.op_type in _EVALUATORS


def _constant(node: ir.Node, _: list) -> np.ndarray | None:
    if len(node.attributes) != 1:
        return None
    tensor = ir.convenience.get_const_tensor(node.outputs[0])
    return None if tensor is None else tensor.numpy()


def _constant_of_shape(node: ir.Node, inputs: list) -> np.ndarray:
    attr = node.attributes.get("value")
    fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
    shape = [int(d) for d in inputs[0]]
    if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise ValueError("too large")
    return np.full(shape, fill[0], dtype=fill.dtype)


def _expand(node: ir.Node, inputs: list) -> np.ndarray:
    x, shape = inputs
    target = np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))
    if int(np.prod(target, dtype=np.int64)) > MAX_ELEMENTS:
        raise ValueError("too large")
    return np.broadcast_to(x, target).copy()


def _cast(node: ir.Node, inputs: list) -> np.ndarray:
    return inputs[0].astype(ir.DataType(node.attributes.get_int("to")).numpy())


def _cast_like(node: ir.Node, inputs: list) -> np.ndarray | None:
    like = inputs[1]
    if like is None or like.dtype is None:
        return None
    return inputs[0].astype(like.dtype.numpy())


def _shape(node: ir.Node, inputs: list) -> np.ndarray | None:
    source = inputs[0]
    if source is None or source.shape is None or not source.shape.is_static():
        return None
    dims = list(source.shape.numpy())
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return np.array(dims[start:end], dtype=np.int64)


def _reshape(node: ir.Node, inputs: list) -> np.ndarray:
    x, shape = inputs[0], [int(d) for d in inputs[1]]
    if not node.attributes.get_int("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _axes(node: ir.Node, inputs: list) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in inputs[1]]
    axes = node.attributes.get_ints("axes")
    return None if axes is None else list(axes)


def _unsqueeze(node: ir.Node, inputs: list) -> np.ndarray:
    axes = _axes(node, inputs) or []
    rank = inputs[0].ndim + len(axes)
    return np.expand_dims(inputs[0], tuple(a % rank for a in axes))


def _squeeze(node: ir.Node, inputs: list) -> np.ndarray:
    axes = _axes(node, inputs)
    return np.squeeze(inputs[0], axis=None if axes is None else tuple(axes))


def _elementwise(
    compute: Callable[..., np.ndarray], integers: bool = False
) -> Callable[[ir.Node, list], np.ndarray | None]:
    """An evaluator of an elementwise op with numpy broadcasting (ONNX's multidirectional)."""

    def evaluate(node: ir.Node, inputs: list) -> np.ndarray | None:
        arrays = [np.asarray(a) for a in inputs]
        dtypes = {a.dtype for a in arrays}
        if len(dtypes) != 1:
            return None
        kind = dtypes.pop().kind
        if kind != "f" and not (integers and kind in "iu"):
            return None
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
            raise ValueError("too large")
        with np.errstate(all="ignore"):  # inf and nan are values too; the fold judges them
            return np.asarray(compute(*arrays)).astype(arrays[0].dtype, copy=False)

    return evaluate


def _transpose(node: ir.Node, inputs: list) -> np.ndarray:
    # torch's exporter without constant folding writes nn.Linear as MatMul(x, Transpose(W)).
    perm = node.attributes.get_ints("perm")
    return np.transpose(inputs[0], None if perm is None else tuple(perm))


_EVALUATORS: dict[str, Callable[[ir.Node, list], np.ndarray | None]] = {
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Shape": _shape,
    "Identity": lambda node, inputs: inputs[0],
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Transpose": _transpose,
    "Add": _elementwise(np.add, integers=True),
    "Sub": _elementwise(np.subtract, integers=True),
    "Mul": _elementwise(np.multiply, integers=True),
    "Neg": _elementwise(np.negative, integers=True),
    "Div": _elementwise(np.divide),
    "Sqrt": _elementwise(np.sqrt),
    "Reciprocal": _elementwise(np.reciprocal),
}
