"""Run an ONNX model in float64 with torch, whatever its stored dtype.

onnxruntime has no float64 Conv, so the error columns of compare_tools use this
small interpreter instead: every tensor is upcast to float64 and each op runs in
float64. Comparing a folded model with its original this way measures only what
the fold changed (the rounding of the stored weights), free of runtime noise.
It covers the ops of the sample and generated models, and says which op it lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper


class UnsupportedOp(NotImplementedError):
    """The interpreter has no float64 implementation of this op."""


def run_f64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` on ``feeds``, computed in float64."""
    env: dict[str, torch.Tensor] = {
        init.name: _f64(numpy_helper.to_array(init)) for init in model.graph.initializer
    }
    env.update({name: _f64(value) for name, value in feeds.items()})
    with torch.inference_mode():
        for node in model.graph.node:
            op = _OPS.get(node.op_type)
            if op is None or node.domain not in ("", "ai.onnx"):
                raise UnsupportedOp(node.op_type)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            args = [env[name] if name else None for name in node.input]
            env[node.output[0]] = op(args, attrs)
    return [env[out.name].numpy() for out in model.graph.output]


def max_rel_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """max |got - ref| / max |ref|, over all outputs (the error relative to the outputs' scale)."""
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        scale = float(np.max(np.abs(r64))) or 1.0
        worst = max(worst, float(np.max(np.abs(g64 - r64))) / scale)
    return worst


def _f64(value: np.ndarray) -> torch.Tensor:
    arr = np.asarray(value)
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float64))
    return torch.from_numpy(arr.copy())


def _spatial_padding(x: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, list[int]]:
    """ONNX pads (all begins, then all ends) as torch symmetric padding, padding first if not."""
    n = len(pads) // 2
    begins, ends = pads[:n], pads[n:]
    if begins == ends:
        return x, begins
    flat: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        flat += [b, e]
    return F.pad(x, flat), [0] * n


def _conv(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w, b = [*args, None][:3]
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedOp("Conv auto_pad")
    nd = w.dim() - 2
    x, pads = _spatial_padding(x, attrs.get("pads", [0] * 2 * nd))
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    stride, dil = attrs.get("strides", [1] * nd), attrs.get("dilations", [1] * nd)
    return fn(x, w, b, stride, pads, dil, attrs.get("group", 1))


def _conv_transpose(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w, b = [*args, None][:3]
    nd = w.dim() - 2
    pads = attrs.get("pads", [0] * 2 * nd)
    if pads[:nd] != pads[nd:] or "output_shape" in attrs:
        raise UnsupportedOp("ConvTranspose with asymmetric pads or output_shape")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(
        x,
        w,
        b,
        attrs.get("strides", [1] * nd),
        pads[:nd],
        attrs.get("output_padding", [0] * nd),
        attrs.get("group", 1),
        attrs.get("dilations", [1] * nd),
    )


def _batchnorm(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, g, b, m, v = args[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = g / torch.sqrt(v + attrs.get("epsilon", 1e-5))
    return (x - m.reshape(shape)) * scale.reshape(shape) + b.reshape(shape)


def _gemm(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    a, b, c = [*args, None][:3]
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _pool(kind: str) -> Callable[[list[Any], dict[str, Any]], torch.Tensor]:
    def run(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = args[0]
        k = attrs["kernel_shape"]
        nd = len(k)
        x, pads = _spatial_padding(x, attrs.get("pads", [0] * 2 * nd))
        stride, ceil = attrs.get("strides", [1] * nd), bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return fn(x, k, stride, pads, attrs.get("dilations", [1] * nd), ceil)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        return fn(x, k, stride, pads, ceil, bool(attrs.get("count_include_pad", 0)))

    return run


def _reshape(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, shape = args[0], [int(d) for d in args[1].tolist()]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, axis = args[0], attrs.get("axis", 1)
    axis = axis % x.dim() if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _unsqueeze(x: torch.Tensor, axes: Any) -> torch.Tensor:
    axes = [int(a) for a in (axes.tolist() if torch.is_tensor(axes) else axes)]
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(x: torch.Tensor, axes: Any) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    dims = [int(a) % x.dim() for a in (axes.tolist() if torch.is_tensor(axes) else axes)]
    return x.squeeze(tuple(dims))


def _cast(args: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    # Casts between float types stay float64: the evaluation is exact by design.
    target = helper.tensor_dtype_to_np_dtype(attrs["to"])
    if target.kind == "f":
        return args[0].to(torch.float64)
    return torch.from_numpy(args[0].numpy().astype(target))


_OPS: dict[str, Callable[[list[Any], dict[str, Any]], torch.Tensor]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batchnorm,
    "Gemm": _gemm,
    "MatMul": lambda a, _: torch.matmul(a[0], a[1]),
    "Add": lambda a, _: a[0] + a[1],
    "Sub": lambda a, _: a[0] - a[1],
    "Mul": lambda a, _: a[0] * a[1],
    "Div": lambda a, _: a[0] / a[1],
    "Relu": lambda a, _: torch.relu(a[0]),
    "Sigmoid": lambda a, _: torch.sigmoid(a[0]),
    "Identity": lambda a, _: a[0],
    "Sqrt": lambda a, _: torch.sqrt(a[0]),
    "Reciprocal": lambda a, _: 1.0 / a[0],
    "Unsqueeze": lambda a, at: _unsqueeze(a[0], a[1] if len(a) > 1 else at["axes"]),
    "Squeeze": lambda a, at: _squeeze(a[0], a[1] if len(a) > 1 else at.get("axes")),
    "Cast": _cast,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, _: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, at: a[0].permute(*at.get("perm", range(a[0].dim() - 1, -1, -1))),
    "Concat": lambda a, at: torch.cat(a, dim=at["axis"]),
}
