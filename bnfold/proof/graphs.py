"""The two models as the prover reads them: scopes, constants, tensors, shapes.

Memory: models are opened with onnx_ir, which memory-maps external data. Tensors are
compared byte for byte in chunks read with ``pread`` (never a whole external tensor in
memory, never a tensor of one model held while reading the other), and the few tensors a
proof needs as numbers are read once, into memory that is freed after their site.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.dims import Dim

CHUNK = 1 << 22
"""Bytes compared at a time (4 MiB)."""

CONSTANT_FOLDABLE = frozenset(
    {
        "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast",
        "CastLike", "Shape", "Size", "ConstantOfShape", "Expand", "Concat", "Gather",
        "Slice", "Split", "Tile", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal",
        "Abs", "Pow",
    }
)  # fmt: skip
"""Deterministic default-domain ops whose output is constant when their inputs are."""


class ModelError(Exception):
    """A model the prover cannot read; the message is for the user."""


def open_model(source: str | os.PathLike[str] | ir.Model | onnx.ModelProto) -> ir.Model:
    """An onnx_ir model from a path, an onnx_ir.Model or an onnx.ModelProto."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    path = Path(source)
    if not path.is_file():
        raise ModelError(f"no such model file: {str(path)!r}")
    try:
        return ir.load(path)
    except Exception as exc:  # a corrupt file: protobuf, onnx_ir and os errors alike
        raise ModelError(f"cannot read {str(path)!r}: {exc}") from exc


# -- tensors ----------------------------------------------------------------------------


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values; external data as a read-only memory map of just that tensor.

    The map shares the page cache (no copy, no anonymous memory) and is unmapped when
    the site that read it is done and drops it.
    """
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8:
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        shape = tuple(int(d) for d in tensor.shape.numpy())
        if not shape or 0 in shape:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(tensor.path, dtype=dtype, mode="r", offset=tensor.offset or 0, shape=shape)
    return np.asarray(tensor.numpy())


def _chunks(tensor: ir.TensorProtocol) -> Iterator[bytes | memoryview]:
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as f:
            start, remaining = tensor.offset or 0, tensor.nbytes
            while remaining > 0:
                piece = os.pread(f.fileno(), min(CHUNK, remaining), start)
                if not piece:
                    raise ModelError(f"external data of {tensor.name!r} is truncated")
                yield piece
                start += len(piece)
                remaining -= len(piece)
        return
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    view = memoryview(flat.data)
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK]


def same_tensor(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Bit-for-bit equality of two stored tensors (dtype, shape and bytes)."""
    if a.dtype != b.dtype or tuple(a.shape.numpy()) != tuple(b.shape.numpy()):
        return False
    if _same_location(a, b):
        return True
    if a.dtype.bitwidth < 8:
        return a.tobytes() == b.tobytes()
    if not isinstance(a, ir.ExternalTensor) and not isinstance(b, ir.ExternalTensor):
        return _memory(a) == _memory(b)  # memcmp of both buffers, nothing copied
    left, right = _rechunk(_chunks(a)), _rechunk(_chunks(b))
    return all(x == y for x, y in zip(left, right, strict=True))


def _memory(tensor: ir.TensorProtocol) -> memoryview:
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    return memoryview(flat.data)


def _same_location(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    """Both tensors are the same bytes of the same external data file."""
    return (
        isinstance(a, ir.ExternalTensor)
        and isinstance(b, ir.ExternalTensor)
        and os.path.realpath(a.path) == os.path.realpath(b.path)
        and a.offset == b.offset
        and a.nbytes == b.nbytes
    )


def _rechunk(pieces: Iterator[bytes | memoryview]) -> Iterator[bytes]:
    """Chunks of exactly CHUNK bytes (the last shorter), whatever the source yields."""
    pending = b""
    for piece in pieces:
        pending += bytes(piece)
        while len(pending) >= CHUNK:
            yield pending[:CHUNK]
            pending = pending[CHUNK:]
    if pending:
        yield pending


def constant_node_array(node: ir.Node) -> np.ndarray:
    """The value of a ``Constant`` node."""
    for name, attr in node.attributes.items():
        value = attr.value
        if name == "value":
            return np.asarray(value.numpy())
        if name in ("value_float", "value_int"):
            return np.asarray(value, dtype=np.float32 if name == "value_float" else np.int64)
        if name in ("value_floats", "value_ints"):
            return np.asarray(list(value), dtype=np.float32 if name == "value_floats" else np.int64)
    raise ModelError(f"Constant {node.name!r} has no value the prover reads")


# -- scopes -------------------------------------------------------------------------------


@dataclass
class Scope:
    """One graph (the main graph or an If/Loop/Scan body) of one model."""

    graph: ir.Graph
    path: str  # "" for the main graph, "3.then_branch" style below it
    ir_version: int
    opset: int
    parent: Scope | None = None
    _producers: dict[str, ir.Node] = field(default_factory=dict)
    _locals: dict[str, ir.Value] = field(default_factory=dict)
    _const: dict[str, bool] = field(default_factory=dict)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value in self.graph.inputs:
            self._locals[value.name or ""] = value
        for name, value in self.graph.initializers.items():
            self._locals[name] = value
        for node in self.graph:
            for out in node.outputs:
                if out.name:
                    self._producers[out.name] = node
                    self._locals[out.name] = out

    def child(self, node_index: int, attr: str, graph: ir.Graph) -> Scope:
        return Scope(graph, f"{self.path}/{node_index}.{attr}", self.ir_version, self.opset, self)

    def producer(self, name: str) -> ir.Node | None:
        return self._producers.get(name)

    def defines(self, name: str) -> bool:
        return name in self._locals

    def value(self, name: str) -> ir.Value | None:
        """The value named ``name`` here or in an enclosing scope."""
        if name in self._locals:
            return self._locals[name]
        return None if self.parent is None else self.parent.value(name)

    def true_inputs(self) -> list[ir.Value]:
        """Graph inputs that are not constants (IR < 4 lists initializers as inputs)."""
        return [v for v in self.graph.inputs if not self.is_const(v.name or "")]

    def is_const(self, name: str) -> bool:
        """Whether ``name`` is a constant in this scope (memoised)."""
        if name not in self._const:
            self._const[name] = self._compute_is_const(name)
        return self._const[name]

    def _compute_is_const(self, name: str) -> bool:
        if name not in self._locals:
            return self.parent is not None and self.parent.is_const(name)
        value = self._locals[name]
        if name in self.graph.initializers:
            # IR >= 4: an initializer that is also a graph input may be fed at run time.
            return self.ir_version < 4 or not value.is_graph_input()
        node = self._producers.get(name)
        if node is None:
            return False
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return True
        if node.op_type not in CONSTANT_FOLDABLE or node.domain not in ("", "ai.onnx"):
            return False
        return all(v is None or not v.name or self.is_const(v.name) for v in node.inputs)

    def stored_tensor(self, name: str) -> ir.TensorProtocol | None:
        """The tensor of an initializer or ``Constant`` node (not of a computed constant)."""
        if name not in self._locals:
            return None if self.parent is None else self.parent.stored_tensor(name)
        value = self._locals[name]
        if value.const_value is not None and name in self.graph.initializers:
            # Also the default of an IR >= 4 initializer that is a graph input.
            return value.const_value
        node = self._producers.get(name)
        if node is not None and node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None:
                return attr.value  # type: ignore[no-any-return]
        return None

    def const_array(self, name: str) -> np.ndarray:
        """The value of a constant (computed in its own dtype, by onnx's reference code)."""
        if name not in self._locals:
            assert self.parent is not None, f"{name} is not a constant"
            return self.parent.const_array(name)
        if name not in self._arrays:
            self._arrays[name] = self._evaluate(name)
        return self._arrays[name]

    def forget_all(self) -> None:
        """Drop cached constants (a site is done: keep memory bounded)."""
        self._arrays.clear()
        if self.parent is not None:
            self.parent.forget_all()

    def _evaluate(self, name: str) -> np.ndarray:
        tensor = self.stored_tensor(name)
        if tensor is not None:
            return read_array(tensor)
        node = self._producers[name]
        if node.op_type == "Constant":
            return constant_node_array(node)
        return _run_node(node, self)[name]


def _run_node(node: ir.Node, scope: Scope) -> dict[str, np.ndarray]:
    """Evaluate one constant-foldable node (plain numpy for shape-only ops, else onnx's
    reference evaluator)."""
    simple = _shape_only(node, scope)
    if simple is not None:
        return {node.outputs[0].name or "": simple}
    from onnx.reference import ReferenceEvaluator

    feeds = {v.name: scope.const_array(v.name) for v in node.inputs if v is not None and v.name}
    proto = ir.serde.serialize_node(node)
    inputs = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in feeds
    ]
    outputs = [
        onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.UNDEFINED, None)
        for v in node.outputs
        if v.name
    ]
    graph = onnx.helper.make_graph([proto], "constant", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", scope.opset)])
    results = ReferenceEvaluator(model).run(None, feeds)
    names = [v.name for v in node.outputs if v.name]
    return {name: np.asarray(r) for name, r in zip(names, results, strict=True)}


def _shape_only(node: ir.Node, scope: Scope) -> np.ndarray | None:
    """Identity, Transpose and Flatten of a constant, which move values without arithmetic."""
    if len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
        return None
    source = node.inputs[0].name
    if not source:
        return None
    if node.op_type == "Identity":
        return scope.const_array(source)
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        array = scope.const_array(source)
        return np.transpose(array, None if perm is None else list(perm.value))
    if node.op_type == "Flatten":
        array = scope.const_array(source)
        attr = node.attributes.get("axis")
        axis = 1 if attr is None else int(attr.value)
        axis = axis + array.ndim if axis < 0 else axis
        return array.reshape(int(np.prod(array.shape[:axis])), -1)
    return None


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def main_scope(model: ir.Model) -> Scope:
    return Scope(model.graph, "", int(model.ir_version or 0), default_opset(model))


def subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """The graph attributes of a node (If branches, Loop and Scan bodies), by name."""
    found: list[tuple[str, ir.Graph]] = []
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            found.append((name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend((f"{name}[{i}]", g) for i, g in enumerate(attr.value))
    return found


# -- shapes -------------------------------------------------------------------------------

DimsTable = dict[str, dict[str, tuple[Dim | None, ...]]]
"""scope path -> value name -> dims (None: that dim is unknown)."""


class Shapes:
    """The dims of a model's values: as the model declares them, else inferred.

    onnx shape inference runs once, on a weightless copy, and only when some value the
    prover needs has no complete declared shape.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._inferred: DimsTable | None = None

    def dims(self, name: str, scope: Scope) -> tuple[Dim | None, ...] | None:
        declared = _declared(name, scope)
        if declared is not None and all(d is not None for d in declared):
            return declared
        if self._inferred is None:
            self._inferred = infer_shapes(self.model)
        s: Scope | None = scope
        while s is not None:
            table = self._inferred.get(s.path, {})
            if name in table:
                return table[name]
            if s.defines(name):
                break
            s = s.parent
        return declared


def _declared(name: str, scope: Scope) -> tuple[Dim | None, ...] | None:
    value = scope.value(name)
    if value is None or value.shape is None:
        return None
    found: list[Dim | None] = []
    for d in value.shape:
        if isinstance(d, int):
            found.append(d)
        else:
            found.append(dims.named(d.value) if d.value else None)
    return tuple(found)


def infer_shapes(model: ir.Model) -> DimsTable:
    """Shapes of every value of ``model`` (onnx shape inference on a weightless copy).

    Large float initializers become typed graph inputs so that the copy stays small;
    models onnx cannot infer keep the shapes they declare.
    """
    proto = _skeleton(model)
    # An op onnx does not know, a broken annotation: keep the shapes the model declares.
    with contextlib.suppress(Exception):
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    shapes: DimsTable = {}
    _collect(proto.graph, "", shapes)
    return shapes


def _skeleton(model: ir.Model) -> onnx.ModelProto:
    graph = onnx.GraphProto(name=model.graph.name or "graph")
    graph.node.extend(ir.serde.serialize_node(n) for n in model.graph)
    declared = {v.name for v in model.graph.inputs}
    graph.input.extend(ir.serde.serialize_value(v) for v in model.graph.inputs)
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        small = tensor is not None and (tensor.nbytes <= 4096 or tensor.dtype.is_integer())
        if small:
            graph.initializer.append(ir.serde.serialize_tensor(tensor))  # type: ignore[arg-type]
        elif name not in declared and tensor is not None:
            info = onnx.helper.make_tensor_value_info(
                name, int(tensor.dtype), list(tensor.shape.numpy())
            )
            graph.input.append(info)
    graph.output.extend(ir.serde.serialize_value(v) for v in model.graph.outputs)
    for value in _annotated(model.graph):
        graph.value_info.append(ir.serde.serialize_value(value))
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
    )
    proto.ir_version = max(int(model.ir_version or 0), 4)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto


def _annotated(graph: ir.Graph) -> Iterator[ir.Value]:
    for node in graph:
        for out in node.outputs:
            if (
                out.name
                and out.type is not None
                and out.shape is not None
                and not out.is_graph_output()
            ):
                yield out


def _collect(graph: onnx.GraphProto, path: str, shapes: DimsTable) -> None:
    table = shapes.setdefault(path, {})
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            table[info.name] = tuple(_dim(d) for d in info.type.tensor_type.shape.dim)
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect(attr.g, f"{path}/{i}.{attr.name}", shapes)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for j, g in enumerate(attr.graphs):
                    _collect(g, f"{path}/{i}.{attr.name}[{j}]", shapes)


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim | None:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return dims.named(d.dim_param)
    return None
