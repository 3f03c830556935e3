"""The aten calls the prover models, each as the ONNX node with the same semantics.

:func:`translate` is what :mod:`bnfold.proof.torch_graph` asks of every call of a
program: convolutions, batch_norm in inference, linear, mm/addmm, add/sub/mul/div,
cat, view/reshape/flatten, (un)squeeze, permute/t, pools, dropout in eval. A call
outside this table, or whose arguments a translation does not model
(:class:`_Untranslatable`), stays an opaque node that must be unchanged.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir


class Builder(Protocol):
    """What a translation needs of the graph being built (``torch_graph._Builder``)."""

    def constant(self, array: np.ndarray, name: str) -> ir.Value: ...

    def value_of(self, arg: Any, scalar_name: str = "", like: Any = None) -> ir.Value | None: ...

    def add(
        self,
        op: str,
        inputs: list[ir.Value | None],
        name: str,
        outputs: int = 1,
        domain: str = "",
        **attrs: Any,
    ) -> ir.Node: ...


def short(target: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``."""
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _ints(value: Any, rank: int) -> list[int]:
    if isinstance(value, int):
        return [value] * rank
    return [int(v) for v in value]


def _arg(node: Any, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def translate(b: Builder, node: Any, name: str) -> ir.Node | None:
    """The ONNX node with this aten call's semantics, or None (then it stays opaque)."""
    op = short(node.target)
    translate = _TRANSLATIONS.get(op)
    if translate is None:
        return None
    with contextlib.suppress(_Untranslatable):
        return translate(b, node, name)
    return None


Translation = Callable[[Builder, Any, str], ir.Node]
"""An aten call (the builder, the fx node, the node's canonical name) as ONNX."""


class _Untranslatable(Exception):
    """This call's arguments are outside what the translation models: keep it opaque."""


def _tensor_rank(b: Builder, node: Any) -> int:
    """The rank of an fx node's tensor: its fake tensor's, else (a tensor a rewrite
    added, which has none) that of the value the builder holds for it."""
    meta = node.meta.get("val")
    if meta is not None:
        return len(meta.shape)
    value = b.value_of(node)
    if value is None or value.shape is None:
        raise _Untranslatable
    return len(value.shape)


def _conv(b: Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias", None)
    rank = _tensor_rank(b, w) - 2
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


def _convolution(b: Builder, node: Any, name: str) -> ir.Node:
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


def _conv_transpose(b: Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    rank = _tensor_rank(b, w) - 2
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
    b: Builder, node: Any, name: str, weight: Any, bias: Any
) -> tuple[ir.Value, ir.Value]:
    channels = int(node.args[0].meta["val"].shape[1])
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    w = b.value_of(weight) if weight is not None else b.constant(ones, f"{name}.weight")
    c = b.value_of(bias) if bias is not None else b.constant(zeros, f"{name}.bias")
    assert w is not None and c is not None
    return w, c


def _batch_norm(b: Builder, node: Any, name: str) -> ir.Node:
    x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
    if training or mean is None:
        raise _Untranslatable
    w, c = _bn_params(b, node, name, weight, bias)
    inputs = [b.value_of(x), w, c, b.value_of(mean), b.value_of(var)]
    return b.add("BatchNormalization", inputs, name, epsilon=torch_epsilon(eps))


def _native_batch_norm(b: Builder, node: Any, name: str) -> ir.Node:
    x, weight, bias, mean, var, _momentum, eps = node.args[:7]
    w, c = _bn_params(b, node, name, weight, bias)
    inputs = [b.value_of(x), w, c, b.value_of(mean), b.value_of(var)]
    # aten returns (out, save_mean, save_invstd): the last two are not modelled.
    return b.add("BatchNormalization", inputs, name, 3, epsilon=torch_epsilon(eps))


def torch_epsilon(eps: Any) -> float:
    """The epsilon of a torch BN: the Python float it stores, exactly.

    torch's kernels add it to the running variance in the input's compute type
    (float64 for a float64 input, float32 otherwise), rounding ``var + eps`` there; the
    cast of ``eps`` to float32 is part of that run-time rounding, which sampled
    verification measures. The map the stored parameters define adds the stored float
    (unlike an ONNX ``epsilon``, which is stored as a float32: commit 3f618a7).
    """
    return float(eps)


def _linear(b: Builder, node: Any, name: str) -> ir.Node:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias", None)
    if _tensor_rank(b, x) == 2:
        return b.add("Gemm", [b.value_of(x), b.value_of(w), b.value_of(bias)], name, transB=1)
    wt = b.add("Transpose", [b.value_of(w)], f"{name}.weight_t", perm=[1, 0])
    mm = b.add(
        "MatMul", [b.value_of(x), wt.outputs[0]], f"{name}.matmul" if bias is not None else name
    )
    if bias is None:
        return mm
    return b.add("Add", [mm.outputs[0], b.value_of(bias)], name)


def _addmm(b: Builder, node: Any, name: str) -> ir.Node:
    bias, x, w = node.args[:3]
    beta = float(node.kwargs.get("beta", 1.0))
    alpha = float(node.kwargs.get("alpha", 1.0))
    return b.add(
        "Gemm", [b.value_of(x), b.value_of(w), b.value_of(bias)], name, alpha=alpha, beta=beta
    )


def _binary(op: str, in_place: bool = False) -> Translation:
    """``add``/``sub``/``mul``/``div``; ``in_place``: ``add_`` and its kin, as the
    out-of-place op where nothing else reads the tensor it overwrites (the residual
    ``out += identity`` of torchvision's blocks). Overwriting a value that is read
    again, or a parameter, buffer or input (state beyond this call), stays opaque."""

    def translate(b: Builder, node: Any, name: str) -> ir.Node:
        left, right = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise _Untranslatable
        if in_place and not _overwrites_a_temporary(node):
            raise _Untranslatable
        operands = [b.value_of(left, f"{name}.0", node), b.value_of(right, f"{name}.1", node)]
        return b.add(op, operands, name)

    return translate


def _overwrites_a_temporary(node: Any) -> bool:
    """Whether ``node`` (an in-place call) overwrites a call's result that only it reads,
    in storage of its own: a view's (``view``, ``permute``, ``alias``...) is its base's,
    which the write changes too."""
    target = node.args[0]
    if getattr(target, "op", "") != "call_function" or list(target.users) != [node]:
        return False
    return _returns_fresh_storage(target)


def _returns_fresh_storage(node: Any) -> bool:
    """Whether an fx call's result owns its storage: its aten schema's return aliases no
    argument (``returns[i].alias_info`` is None); a part of a tuple call (``getitem``)
    is asked of that call. A call without a schema may alias: no."""
    index = 0
    if node.target is operator.getitem:
        node, index = node.args
    schema = getattr(getattr(node, "target", None), "_schema", None)
    returns = getattr(schema, "returns", None)
    if not isinstance(index, int) or not returns or index >= len(returns):
        return False
    return returns[index].alias_info is None


def _cat(b: Builder, node: Any, name: str) -> ir.Node:
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


def _reshape(b: Builder, node: Any, name: str) -> ir.Node:
    shape = b.constant(np.asarray(_static_or_one_dynamic(node), dtype=np.int64), f"{name}.shape")
    return b.add("Reshape", [b.value_of(node.args[0]), shape], name)


def _unsqueeze(b: Builder, node: Any, name: str) -> ir.Node:
    axes = b.constant(np.asarray([int(node.args[1])], dtype=np.int64), f"{name}.axes")
    return b.add("Unsqueeze", [b.value_of(node.args[0]), axes], name)


def _squeeze(b: Builder, node: Any, name: str) -> ir.Node:
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        return _reshape(b, node, name)
    axes = b.constant(np.asarray(_ints(dims, 1), dtype=np.int64), f"{name}.axes")
    return b.add("Squeeze", [b.value_of(node.args[0]), axes], name)


def _permute(b: Builder, node: Any, name: str) -> ir.Node:
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=[int(d) for d in node.args[1]])


def _t(b: Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(b, node.args[0])
    perm = [1, 0] if rank == 2 else [0]
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=perm)


def _transpose(b: Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(b, node.args[0])
    a, c = (int(d) % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[a], perm[c] = perm[c], perm[a]
    return b.add("Transpose", [b.value_of(node.args[0])], name, perm=perm)


def _identity(b: Builder, node: Any, name: str) -> ir.Node:
    if short(node.target) == "dropout" and _arg(node, 2, "train", False):
        raise _Untranslatable
    return b.add("Identity", [b.value_of(node.args[0])], name)


def _window(b: Builder, node: Any) -> tuple[int, list[int], list[int], list[int]]:
    """A pool call's spatial rank, kernel, stride (the kernel when not given) and padding:
    its arguments 1-3, as every aten pool orders them."""
    rank = _tensor_rank(b, node.args[0]) - 2
    kernel = _ints(node.args[1], rank)
    stride = _arg(node, 2, "stride", [])
    stride = _ints(stride, rank) if stride else kernel
    return rank, kernel, stride, _ints(_arg(node, 3, "padding", 0), rank)


def _max_pool(b: Builder, node: Any, name: str) -> ir.Node:
    x = node.args[0]
    rank, kernel, stride, padding = _window(b, node)
    dilation = _ints(_arg(node, 4, "dilation", 1), rank)
    ceil = int(bool(_arg(node, 5, "ceil_mode", False)))
    outputs = 2 if "indices" in str(node.target) else 1
    return b.add(
        "MaxPool", [b.value_of(x)], name, outputs, kernel_shape=kernel, strides=stride,
        pads=padding * 2, dilations=dilation, ceil_mode=ceil,
    )  # fmt: skip


def _avg_pool(b: Builder, node: Any, name: str) -> ir.Node:
    x = node.args[0]
    _, kernel, stride, padding = _window(b, node)
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
    """An adaptive pool to one value per channel as ``op`` (GlobalAveragePool/MaxPool).

    ``adaptive_max_pool*`` returns (values, indices); ONNX's GlobalMaxPool has no
    indices, so a call whose indices are read stays opaque (with both outputs); one
    whose indices nothing reads is the pool alone.
    """

    def translate(b: Builder, node: Any, name: str) -> ir.Node:
        if any(int(s) != 1 for s in node.args[1]):
            raise _Untranslatable
        if isinstance(node.meta.get("val"), list | tuple) and _reads_part(node, 1):
            raise _Untranslatable
        return b.add(op, [b.value_of(node.args[0])], name)

    return translate


def _reads_part(node: Any, index: int) -> bool:
    """Whether a tuple call's part ``index`` is read (an ``operator.getitem`` of it that
    has users: export keeps the unread parts), or the tuple is read whole."""
    return any(
        user.target is not operator.getitem or (user.args[1] == index and bool(user.users))
        for user in node.users
    )


def _mean(b: Builder, node: Any, name: str) -> ir.Node:
    rank = _tensor_rank(b, node.args[0])
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
    "add_": _binary("Add", True), "sub_": _binary("Sub", True), "mul_": _binary("Mul", True),
    "div_": _binary("Div", True),
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


__all__ = ["Builder", "short", "translate"]
