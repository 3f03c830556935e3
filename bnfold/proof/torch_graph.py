"""A ``torch.export`` program as a graph the ONNX prover reads.

Each aten call becomes a node. The calls whose meaning the prover models become the
ONNX operator with the same semantics (:mod:`bnfold.proof.torch_aten`: convolutions,
batch_norm in inference, linear, mm/addmm, add/sub/mul/div, cat, view/reshape/flatten,
(un)squeeze, permute/t, pools, dropout in eval); every other call becomes an opaque
node in the ``aten`` domain whose non-tensor arguments are an attribute, so the diff
requires it unchanged. Parameters, buffers and constants become initializers named by
their state_dict key, user inputs keep their names, and shapes come from the program's
fake tensors (a dynamic size is a named symbol).

Node and value names are canonical: ``module.path/op#k``, the k-th call of ``op`` made
inside that module, so two exports of one network name their calls alike whatever fx
numbered them. :func:`align_names` then gives a value of the folded program the name its
twin has in the original where the same call reads it (what bnfold's ONNX fold does when
it hands a BN's output name to the conv), so nodes after a fold site stay identical.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.proof.torch_aten import short, translate

AT = "aten"
"""Domain of the opaque nodes (calls the prover does not model)."""

MODELED_SPATIAL = {1: "1d", 2: "2d", 3: "3d"}


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor's values (bf16 through its bits: numpy has no bf16 of its own)."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return np.asarray(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    return np.asarray(t.numpy())


def _dtype(torch_dtype: Any) -> ir.DataType:
    import torch

    table = {
        torch.float32: ir.DataType.FLOAT,
        torch.float16: ir.DataType.FLOAT16,
        torch.bfloat16: ir.DataType.BFLOAT16,
        torch.float64: ir.DataType.DOUBLE,
        torch.int64: ir.DataType.INT64,
        torch.int32: ir.DataType.INT32,
        torch.bool: ir.DataType.BOOL,
    }
    return table.get(torch_dtype, ir.DataType.UNDEFINED)


def _shape(meta_val: Any) -> ir.Shape | None:
    shape = getattr(meta_val, "shape", None)
    if shape is None:
        return None
    dims: list[int | ir.SymbolicDim] = []
    for d in shape:
        try:
            dims.append(int(d))
        except (TypeError, ValueError):
            dims.append(ir.SymbolicDim(str(d)))
    return ir.Shape(dims)


class _Builder:
    """Translates one exported program, call by call."""

    def __init__(self, program: Any) -> None:
        self.program = program
        self.graph = ir.Graph([], [], nodes=[], name="program", opset_imports={"": 17, AT: 1})
        self.values: dict[str, ir.Value] = {}  # fx node name -> value
        self.multi: dict[str, list[ir.Value]] = {}  # fx node name -> outputs of a tuple call
        self.counts: Counter[str] = Counter()

    # -- values ---------------------------------------------------------------------

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        """An initializer; ``name`` is a state_dict key or derived from the reading call."""
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(list(array.shape))
        value.dtype = value.const_value.dtype  # type: ignore[union-attr]
        self.graph.register_initializer(value)
        return value

    def value_of(self, arg: Any, scalar_name: str = "", like: Any = None) -> ir.Value | None:
        """The graph value for an fx argument: a node's output, or a Python scalar made a
        constant named ``scalar_name`` in the dtype of ``like``'s result."""
        import torch.fx

        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node):
            return self.values[arg.name]
        meta = getattr(like, "meta", {}).get("val") if like is not None else None
        dtype = _NUMPY_DTYPES.get(str(getattr(meta, "dtype", "")), np.float32)
        return self.constant(np.asarray(arg, dtype=dtype), scalar_name)

    # -- placeholders ------------------------------------------------------------------

    def placeholders(self) -> None:
        if not hasattr(self.program, "graph_signature"):
            self.module_placeholders()
            return
        signature = self.program.graph_signature
        state = {**self.program.state_dict, **getattr(self.program, "constants", {})}
        targets = {}
        for spec in signature.input_specs:
            if spec.target is not None and spec.target in state:
                targets[spec.arg.name] = spec.target
        for node in self.program.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in targets:
                key = targets[node.name]
                try:
                    array = to_numpy(state[key])
                except (AttributeError, TypeError, RuntimeError):  # a script object
                    array = None
                if array is not None:
                    self.values[node.name] = self.constant(array, key)
                    continue
            if node.name in targets:
                value = ir.Value(name=targets[node.name])
                self.graph.inputs.append(value)
                self.values[node.name] = value
            else:
                value = ir.Value(name=node.name)
                meta = node.meta.get("val")
                value.shape = _shape(meta)
                if meta is not None and hasattr(meta, "dtype"):
                    value.dtype = _dtype(meta.dtype)
                self.graph.inputs.append(value)
                self.values[node.name] = value

    def module_placeholders(self) -> None:
        """A graph module's inputs, and its ``get_attr`` tensors as initializers.

        ``ExportedProgram.module()`` lifts nothing: its parameters and buffers are
        read by ``get_attr`` under their state_dict keys, the names a program's
        signature gives them, so a program and its module translate alike.
        """
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                self.graph.inputs.append(self._input(node, node.name))
            elif node.op == "get_attr":
                tensor = _attribute(self.program, str(node.target))
                if tensor is None:
                    self.graph.inputs.append(self._input(node, str(node.target)))
                else:
                    self.values[node.name] = self.constant(to_numpy(tensor), str(node.target))

    def _input(self, node: Any, name: str) -> ir.Value:
        value = ir.Value(name=name)
        meta = node.meta.get("val")
        value.shape = _shape(meta)
        if meta is not None and hasattr(meta, "dtype"):
            value.dtype = _dtype(meta.dtype)
        self.values[node.name] = value
        return value

    # -- calls ---------------------------------------------------------------------------

    def canonical(self, node: Any) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        key = f"{path}/{short(node.target)}"
        self.counts[key] += 1
        return f"{key}#{self.counts[key] - 1}"

    def add(
        self,
        op: str,
        inputs: list[ir.Value | None],
        name: str,
        outputs: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> ir.Node:
        node = ir.Node(
            domain, op, inputs, attributes=[_attr(k, v) for k, v in attrs.items() if v is not None],
            num_outputs=outputs, name=name,
        )  # fmt: skip
        for i, out in enumerate(node.outputs):
            out.name = name if outputs == 1 else f"{name}:{i}"
        self.graph.append(node)
        return node

    def call(self, node: Any) -> None:
        name = self.canonical(node)
        if node.target is operator.getitem:
            source, index = node.args
            parts = self.multi[source.name]
            if index < len(parts) or node.users:  # a part nothing reads may be untranslated
                self.values[node.name] = parts[index]
            return
        translated = translate(self, node, name)
        if translated is None:
            translated = self.opaque(node, name)
        outs = list(translated.outputs)
        meta = node.meta.get("val")
        if isinstance(meta, list | tuple):
            self.multi[node.name] = outs
            for out, part in zip(outs, meta, strict=False):
                _typed(out, part)
        else:
            self.values[node.name] = outs[0]
            _typed(outs[0], meta)
            if meta is None:  # a call a rewrite made (lowering) carries no fake tensor
                _infer_type(translated)

    def opaque(self, node: Any, name: str) -> ir.Node:
        import torch.fx

        tensors: list[ir.Value | None] = []

        def keep(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                value = self.values.get(a.name)
                if value is None and self.multi.get(a.name):
                    value = self.multi[a.name][0]
                tensors.append(value)
                return "<tensor>"
            if isinstance(a, list | tuple):
                return [keep(x) for x in a]
            return a

        described = repr((keep(list(node.args)), {k: keep(v) for k, v in node.kwargs.items()}))
        meta = node.meta.get("val")
        count = len(meta) if isinstance(meta, list | tuple) else 1
        return self.add(str(node.target), tensors, name, count, domain=AT, args=described)

    def outputs(self) -> None:
        for node in self.program.graph.nodes:
            if node.op == "output":
                for arg in node.args[0]:
                    self.graph.outputs.append(self.values[arg.name])

    def build(self) -> ir.Model:
        self.placeholders()
        for node in self.program.graph.nodes:
            if node.op == "call_function":
                self.call(node)
        self.outputs()
        return ir.Model(self.graph, ir_version=8)


_NUMPY_DTYPES: dict[str, type] = {
    "torch.float16": np.float16,
    "torch.float64": np.float64,
    "torch.float32": np.float32,
}


def _typed(value: ir.Value, meta: Any) -> None:
    """Give ``value`` the shape and dtype of its fake tensor (a tuple call's part too:
    a BN's output is part 0 of ``_native_batch_norm_legit_no_training``)."""
    value.shape = _shape(meta)
    if meta is not None and hasattr(meta, "dtype"):
        value.dtype = _dtype(meta.dtype)


def _infer_type(node: ir.Node) -> None:
    """The dtype and shape of an elementwise op's output (numpy broadcasting) or of a
    pointwise Conv's (1x1, stride 1, no padding: the input's with the weight's output
    channels), where every input has them; else left unknown."""
    inputs = [v for v in node.inputs if v is not None]
    if len(node.outputs) != 1 or not inputs:
        return
    dtype = inputs[0].dtype
    if dtype is None or any(v.dtype is None or v.shape is None for v in inputs):
        return
    try:
        shapes = [tuple(int(d) for d in v.shape or ()) for v in inputs]  # type: ignore[arg-type]
        if node.op_type in ("Add", "Sub", "Mul", "Div"):
            dims = list(np.broadcast_shapes(*shapes))
        elif node.op_type == "Conv" and _pointwise(node, shapes[1]):
            dims = [shapes[0][0], shapes[1][0], *shapes[0][2:]]
        else:
            return
    except (TypeError, ValueError):  # a symbolic size, or shapes that do not broadcast
        return
    node.outputs[0].dtype = dtype
    node.outputs[0].shape = ir.Shape(dims)


def _pointwise(conv: ir.Node, weight: tuple[int, ...]) -> bool:
    def ints(name: str) -> list[int]:
        attr = conv.attributes.get(name)
        return list(attr.value) if attr is not None else []  # type: ignore[arg-type]

    ones = all(k == 1 for k in weight[2:]) and all(s == 1 for s in ints("strides"))
    return ones and not any(ints("pads")) and "auto_pad" not in conv.attributes


def _attr(name: str, value: Any) -> ir.Attr:
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, bool | int):
        return ir.AttrInt64(name, int(value))
    return ir.AttrInt64s(name, [int(v) for v in value])


def program_model(program: Any) -> ir.Model:
    """An exported program's graph as an onnx_ir model for the prover (module docstring).

    ``program`` is a ``torch.export.ExportedProgram`` or its ``module()``: the
    graph module the ``.pt2`` front folds, which holds the same calls.
    """
    return _Builder(program).build()


def _attribute(module: Any, target: str) -> Any:
    """The tensor a ``get_attr`` reads (None for anything else: a script object)."""
    import torch

    value = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _same_call(mine: ir.Node, theirs: ir.Node, original: ir.Model, folded: ir.Model) -> bool:
    """Whether a folded call is its original twin unchanged (constants bit for bit)."""
    if (mine.domain, mine.op_type, mine.name) != (theirs.domain, theirs.op_type, theirs.name):
        return False
    names = [[v.name if v is not None else None for v in n.inputs] for n in (mine, theirs)]
    if names[0] != names[1] or [v.name for v in mine.outputs] != [v.name for v in theirs.outputs]:
        return False
    attrs = [{k: repr(a.value) for k, a in n.attributes.items()} for n in (mine, theirs)]
    if attrs[0] != attrs[1]:
        return False
    for name in names[0]:
        a, b = (
            folded.graph.initializers.get(name or ""),
            original.graph.initializers.get(name or ""),
        )
        if (a is None) != (b is None):
            return False
        if a is not None and b is not None:
            ta, tb = a.const_value, b.const_value
            if ta is None or tb is None or ta.dtype != tb.dtype or ta.tobytes() != tb.tobytes():
                return False
    return True


def align_names(original: ir.Model, folded: ir.Model) -> int:
    """Rename values of ``folded`` to what the same call reads in ``original``.

    Walks the folded graph in order; where a node has a twin of the same canonical name
    in the original reading another value at some input, and that value comes from a
    call the fold changed, or a call reading what a changed call made (a conv that took a
    BN in; the Add of two such convs), and has no other reader, it takes the original's
    name: what bnfold's ONNX fold does. A value of a call upstream of every change keeps
    its name (a Relu before a BN folded into the conv after it). Renaming an SSA
    value consistently does not change what a graph computes; a wrong alignment can
    only make the proof fail, never pass. Returns how many values were renamed.
    """
    twins = {n.name: n for n in original.graph}
    taken = {v.name for n in folded.graph for v in n.outputs} | {
        v.name for v in folded.graph.inputs
    }
    taken |= set(folded.graph.initializers)
    tainted: set[int] = set()  # folded calls that changed, or read what a changed call made

    def rename(mine: ir.Value, name: str) -> bool:
        producer = mine.producer()
        if producer is None or mine.is_graph_output() or name in taken:
            return False
        if id(producer) not in tainted:
            return False
        taken.discard(mine.name)
        mine.name = name
        taken.add(name)
        return True

    renamed = 0
    for node in folded.graph:
        twin = twins.get(node.name or "")
        upstream = any(v is not None and id(v.producer()) in tainted for v in node.inputs)
        if twin is None or upstream or not _same_call(node, twin, original, folded):
            tainted.add(id(node))
        if twin is None or len(twin.inputs) != len(node.inputs):
            continue
        for mine, theirs in zip(node.inputs, twin.inputs, strict=True):
            if mine is None or theirs is None or mine.name == theirs.name:
                continue
            if len(mine.uses()) == 1 and rename(mine, theirs.name or ""):
                renamed += 1
    # A program's outputs correspond by position.
    for mine, theirs in zip(folded.graph.outputs, original.graph.outputs, strict=False):
        if mine.name != theirs.name and mine.producer() is not None and theirs.name not in taken:
            taken.discard(mine.name)
            mine.name = theirs.name
            taken.add(theirs.name or "")
            renamed += 1
    return renamed
