"""A ``torch.export`` program as a graph the ONNX prover reads.

Each aten call becomes a node. The calls whose meaning the prover models become the
ONNX operator with the same semantics (convolutions, batch_norm in inference, linear,
mm/addmm, add/sub/mul/div, cat, view/reshape/flatten, (un)squeeze, permute/t, pools,
dropout in eval); every other call becomes an opaque node in the ``aten`` domain whose
non-tensor arguments are an attribute, so the diff requires it unchanged. Parameters,
buffers and constants become initializers named by their state_dict key, user inputs
keep their names, and shapes come from the program's fake tensors (a dynamic size is a
named symbol).

Node and value names are canonical: ``module.path/op#k``, the k-th call of ``op`` made
inside that module, so two exports of one network name their calls alike whatever fx
numbered them. :func:`align_names` then gives a value of the folded program the name its
twin has in the original where the same call reads it (what bnfold's ONNX fold does when
it hands a BN's output name to the conv), so nodes after a fold site stay identical.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

AT = "aten"
"""Domain of the opaque nodes (calls the prover does not model)."""

MODELED_SPATIAL = {1: "1d", 2: "2d", 3: "3d"}


def _short(target: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``."""
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


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

    # -- calls ---------------------------------------------------------------------------

    def canonical(self, node: Any) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        key = f"{path}/{_short(node.target)}"
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
            self.values[node.name] = self.multi[source.name][index]
            return
        translated = _translate(self, node, name)
        if translated is None:
            translated = self.opaque(node, name)
        outs = list(translated.outputs)
        meta = node.meta.get("val")
        if isinstance(meta, list | tuple):
            self.multi[node.name] = outs
        else:
            self.values[node.name] = outs[0]
            outs[0].shape = _shape(meta)
            if meta is not None and hasattr(meta, "dtype"):
                outs[0].dtype = _dtype(meta.dtype)

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


def _attr(name: str, value: Any) -> ir.Attr:
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, bool | int):
        return ir.AttrInt64(name, int(value))
    return ir.AttrInt64s(name, [int(v) for v in value])


def _ints(value: Any, rank: int) -> list[int]:
    if isinstance(value, int):
        return [value] * rank
    return [int(v) for v in value]


def _arg(node: Any, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _translate(b: _Builder, node: Any, name: str) -> ir.Node | None:
    """The ONNX node with this aten call's semantics, or None (then it stays opaque)."""
    op = _short(node.target)
    translate = _TRANSLATIONS.get(op)
    if translate is None:
        return None
    with contextlib.suppress(_Untranslatable):
        return translate(b, node, name)
    return None


Translation = Callable[["_Builder", Any, str], ir.Node]
"""An aten call (the builder, the fx node, the node's canonical name) as ONNX."""


class _Untranslatable(Exception):
    """This call's arguments are outside what the translation models: keep it opaque."""


def _tensor_rank(node: Any) -> int:
    meta = node.meta.get("val")
    if meta is None:
        raise _Untranslatable
    return len(meta.shape)


def _conv(b: _Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias", None)
    rank = _tensor_rank(w) - 2
    stride = _ints(_arg(node, 3, "stride", 1), rank)
    padding = _arg(node, 4, "padding", 0)
    dilation = _ints(_arg(node, 5, "dilation", 1), rank)
    groups = int(_arg(node, 6, "groups", 1))
    pad_attrs: dict[str, Any] = {}
    if isinstance(padding, str):
        pad_attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[padding]
    else:
        pad_attrs["pads"] = _ints(padding, rank) * 2
    inputs = [b.value_of(x), b.value_of(w), b.value_of(bias)]
    return b.add(
        "Conv", inputs, name, strides=stride, dilations=dilation, group=groups, **pad_attrs
    )


def _convolution(b: _Builder, node: Any, name: str) -> ir.Node:
    x, w, bias, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
    if not transposed:
        return b.add(
            "Conv", [b.value_of(x), b.value_of(w), b.value_of(bias)], name,
            strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
            group=int(groups),
        )  # fmt: skip
    return b.add(
        "ConvTranspose", [b.value_of(x), b.value_of(w), b.value_of(bias)], name,
        strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
        output_padding=list(output_padding), group=int(groups),
    )  # fmt: skip


def _conv_transpose(b: _Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    rank = _tensor_rank(w) - 2
    bias = _arg(node, 2, "bias", None)
    stride = _ints(_arg(node, 3, "stride", 1), rank)
    padding = _ints(_arg(node, 4, "padding", 0), rank)
    output_padding = _ints(_arg(node, 5, "output_padding", 0), rank)
    groups = int(_arg(node, 6, "groups", 1))
    dilation = _ints(_arg(node, 7, "dilation", 1), rank)
    return b.add(
        "ConvTranspose", [b.value_of(x), b.value_of(w), b.value_of(bias)], name,
        strides=stride, pads=padding * 2, dilations=dilation, output_padding=output_padding,
        group=groups,
    )  # fmt: skip


def _bn_params(
    b: _Builder, node: Any, name: str, weight: Any, bias: Any
) -> tuple[ir.Value, ir.Value]:
    channels = int(node.args[0].meta["val"].shape[1])
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    w = b.value_of(weight) if weight is not None else b.constant(ones, f"{name}.weight")
    c = b.value_of(bias) if bias is not None else b.constant(zeros, f"{name}.bias")
    assert w is not None and c is not None
    return w, c


def _batch_norm(b: _Builder, node: Any, name: str) -> ir.Node:
    x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
    if training or mean is None:
        raise _Untranslatable
    w, c = _bn_params(b, node, name, weight, bias)
    inputs = [b.value_of(x), w, c, b.value_of(mean), b.value_of(var)]
    return b.add("BatchNormalization", inputs, name, epsilon=float(eps))


def _native_batch_norm(b: _Builder, node: Any, name: str) -> ir.Node:
    x, weight, bias, mean, var, _momentum, eps = node.args[:7]
    w, c = _bn_params(b, node, name, weight, bias)
    inputs = [b.value_of(x), w, c, b.value_of(mean), b.value_of(var)]
    # aten returns (out, save_mean, save_invstd): the last two are not modelled.
    bn = b.add("BatchNormalization", inputs, name, 3, epsilon=float(eps))
    return bn


def _linear(b: _Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias", None)
    if _tensor_rank(x) == 2:
        return b.add("Gemm", [b.value_of(x), b.value_of(w), b.value_of(bias)], name, transB=1)
    wt = b.add("Transpose", [b.value_of(w)], f"{name}.weight_t", perm=[1, 0])
    mm = b.add(
        "MatMul", [b.value_of(x), wt.outputs[0]], f"{name}.matmul" if bias is not None else name
    )
    if bias is None:
        return mm
    return b.add("Add", [mm.outputs[0], b.value_of(bias)], name)


def _addmm(b: _Builder, node: Any, name: str) -> ir.Node:
    bias, x, w = node.args[:3]
    beta = float(node.kwargs.get("beta", 1.0))
    alpha = float(node.kwargs.get("alpha", 1.0))
    return b.add(
        "Gemm", [b.value_of(x), b.value_of(w), b.value_of(bias)], name, alpha=alpha, beta=beta
    )


def _binary(op: str) -> Translation:
    def translate(b: _Builder, node: Any, name: str) -> ir.Node:
        left, right = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise _Untranslatable
        operands = [b.value_of(left, f"{name}.0", node), b.value_of(right, f"{name}.1", node)]
        return b.add(op, operands, name)

    return translate


def _cat(b: _Builder, node: Any, name: str) -> ir.Node:
    tensors = node.args[0]
    dim = int(_arg(node, 1, "dim", 0))
    return b.add("Concat", [b.value_of(t) for t in tensors], name, axis=dim)


def _static_or_one_dynamic(node: Any) -> list[int]:
    """The output shape as Reshape's shape input (one unknown size as -1)."""
    meta = node.meta.get("val")
    if meta is None:
        raise _Untranslatable
    shape: list[int] = []
    for d in meta.shape:
        try:
            shape.append(int(d))
        except (TypeError, ValueError):
            shape.append(-1)
    if shape.count(-1) > 1:
        raise _Untranslatable
    return shape


def _reshape(b: _Builder, node: Any, name: str) -> ir.Node:
    shape = b.constant(np.asarray(_static_or_one_dynamic(node), dtype=np.int64), f"{name}.shape")
    return b.add("Reshape", [b.value_of(node.args[0]), shape], name)


def _unsqueeze(b: _Builder, node: Any, name: str) -> ir.Node:
    axes = b.constant(np.asarray([int(node.args[1])], dtype=np.int64), f"{name}.axes")
    return b.add("Unsqueeze", [b.value_of(node.args[0]), axes], name)


def _squeeze(b: _Builder, node: Any, name: str) -> ir.Node:
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        return _reshape(b, node, name)
    axes = b.constant(np.asarray(_ints(dims, 1), dtype=np.int64), f"{name}.axes")
    return b.add("Squeeze", [b.value_of(node.args[0]), axes], name)


def _permute(b: _Builder, node: Any, name: str) -> ir.Node:
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=[int(d) for d in node.args[1]])


def _t(b: _Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(node.args[0])
    perm = [1, 0] if rank == 2 else [0]
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=perm)


def _transpose(b: _Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(node.args[0])
    a, c = (int(d) % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[c] = perm[c], perm[a]
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=perm)


def _identity(b: _Builder, node: Any, name: str) -> ir.Node:
    if _short(node.target) == "dropout" and _arg(node, 2, "train", False):
        raise _Untranslatable
    return b.add("Identity", [b.value_of(node.args[0])], name)


def _max_pool(b: _Builder, node: Any, name: str) -> ir.Node:
    x = node.args[0]
    rank = _tensor_rank(x) - 2
    kernel = _ints(node.args[1], rank)
    stride = _arg(node, 2, "stride", [])
    stride = _ints(stride, rank) if stride else kernel
    padding = _ints(_arg(node, 3, "padding", 0), rank)
    dilation = _ints(_arg(node, 4, "dilation", 1), rank)
    ceil = int(bool(_arg(node, 5, "ceil_mode", False)))
    outputs = 2 if "indices" in str(node.target) else 1
    return b.add(
        "MaxPool", [b.value_of(x)], name, outputs, kernel_shape=kernel, strides=stride,
        pads=padding * 2, dilations=dilation, ceil_mode=ceil,
    )  # fmt: skip


def _avg_pool(b: _Builder, node: Any, name: str) -> ir.Node:
    x = node.args[0]
    rank = _tensor_rank(x) - 2
    kernel = _ints(node.args[1], rank)
    stride = _arg(node, 2, "stride", [])
    stride = _ints(stride, rank) if stride else kernel
    padding = _ints(_arg(node, 3, "padding", 0), rank)
    ceil = int(bool(_arg(node, 4, "ceil_mode", False)))
    include = bool(_arg(node, 5, "count_include_pad", True))
    if _arg(node, 6, "divisor_override", None) is not None:
        raise _Untranslatable
    # torch divides an overhanging ceil-mode window by what lies inside input + padding:
    # without padding that is ONNX's count_include_pad=0.
    include = include and any(padding)
    return b.add(
        "AveragePool", [b.value_of(x)], name, kernel_shape=kernel, strides=stride,
        pads=padding * 2, ceil_mode=ceil, count_include_pad=int(include),
    )  # fmt: skip


def _adaptive(op: str) -> Translation:
    def translate(b: _Builder, node: Any, name: str) -> ir.Node:
        if any(int(s) != 1 for s in node.args[1]):
            raise _Untranslatable
        return b.add(op, [b.value_of(node.args[0])], name)

    return translate


def _mean(b: _Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(node.args[0])
    dims = sorted(int(d) % rank for d in node.args[1])
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dims != list(range(2, rank)) or not keepdim:
        raise _Untranslatable
    return b.add("GlobalAveragePool", [b.value_of(node.args[0])], name)


_TRANSLATIONS: dict[str, Translation] = {
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _convolution,
    "conv_transpose1d": _conv_transpose, "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _native_batch_norm,
    "linear": _linear, "addmm": _addmm,
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "div": _binary("Div"),
    "cat": _cat, "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape,
    "reshape_as": _reshape, "view_as": _reshape,
    "flatten": _reshape, "unflatten": _reshape, "unsqueeze": _unsqueeze, "squeeze": _squeeze,
    "permute": _permute, "t": _t, "transpose": _transpose,
    "dropout": _identity, "clone": _identity, "alias": _identity, "detach": _identity,
    "contiguous": _identity,
    "max_pool1d": _max_pool, "max_pool2d": _max_pool, "max_pool3d": _max_pool,
    "max_pool2d_with_indices": _max_pool,
    "avg_pool1d": _avg_pool, "avg_pool2d": _avg_pool, "avg_pool3d": _avg_pool,
    "adaptive_avg_pool1d": _adaptive("GlobalAveragePool"),
    "adaptive_avg_pool2d": _adaptive("GlobalAveragePool"),
    "adaptive_avg_pool3d": _adaptive("GlobalAveragePool"),
    "adaptive_max_pool2d": _adaptive("GlobalMaxPool"),
    "mean": _mean,
}  # fmt: skip


def program_model(program: Any) -> ir.Model:
    """An exported program's graph as an onnx_ir model for the prover (module docstring)."""
    return _Builder(program).build()


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
