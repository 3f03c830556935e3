"""Generate the big benchmark models, each with BatchNorm and with twins folded by hand.

Variants of one network, from the same random parameters (rounded once to the
model's dtype, so every variant starts from identical stored values):

  bn     Conv (no bias) -> BatchNormalization, as exported from a framework.
  nobn   the no-BN twin: Conv with weights and bias of an exact float64 fold,
         cast once. It is both the latency floor (the network without BN) and
         the "exact float64 fold" that error targets compare against.
  naive  Conv with a fold computed in the model's own dtype (every step rounded
         to fp32 or fp16): what a fold without float64 arithmetic gives.

Networks:
  resnet50   ResNet-50 topology (bottlenecks 3-4-6-3, residual Adds, ReLU, max
             pool, global average pool, FC 1000): 25.5 M parameters, ~102 MB fp32.
  huge       a chain of 1x1 Conv(8192 -> 8192) + BN + ReLU blocks, >2 GB fp32,
             always saved with external data. Only behind --big.

Usage:
  python benchmarks/make_big_models.py OUT_DIR [--size 128] [--fp16] [--big]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

VARIANTS = ("bn", "nobn", "naive")
EPS = 1e-5
OPSET = 17
HUGE_CHANNELS = 8192
HUGE_BLOCKS = 9  # 9 x 8192^2 x 4 bytes = 2.42 GB of fp32 weights


class Builder:
    """Collects nodes and initializers of one variant of a network."""

    def __init__(self, variant: str, dtype: type, seed: int) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        self.variant, self.dtype = variant, np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(
        self, x: str, cin: int, cout: int, k: int, stride: int, name: str, gamma: float = 1.0
    ) -> str:
        """Conv(k x k, stride, same padding) followed by BN, or its fold, per variant."""
        d = self.dtype
        # Variances over four decades: a small one makes scale large, where folds lose
        # bits. As in a trained net, a channel's weights match its running variance,
        # so BN brings each channel back to unit scale and activations stay bounded.
        v64 = 10 ** self.rng.uniform(-3, 1, cout)
        he = math.sqrt(2 / (cin * k * k))
        w = self.rng.standard_normal((cout, cin, k, k)) * he * np.sqrt(v64)[:, None, None, None]
        w = w.astype(d)
        g = (self.rng.uniform(0.5, 1.5, cout) * gamma).astype(d)
        b = self.rng.normal(0, 0.1, cout).astype(d)
        m = (self.rng.normal(0, 0.1, cout) * np.sqrt(v64)).astype(d)
        v = v64.astype(d)
        attrs = {"kernel_shape": [k, k], "strides": [stride] * 2, "pads": [k // 2] * 4}
        if self.variant == "bn":
            conv = self.node("Conv", [x, self.const(f"{name}.w", w)], f"{name}.conv", **attrs)
            params = [
                self.const(f"{name}.bn.{p}", a) for p, a in zip("gbmv", (g, b, m, v), strict=True)
            ]
            return self.node("BatchNormalization", [conv, *params], f"{name}.bn", epsilon=EPS)
        w2, b2 = fold_exact(w, g, b, m, v) if self.variant == "nobn" else fold_naive(w, g, b, m, v)
        inputs = [x, self.const(f"{name}.w", w2), self.const(f"{name}.b", b2)]
        return self.node("Conv", inputs, f"{name}.conv", **attrs)

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> ir.Model:
        graph = helper.make_graph(self.nodes, "bench", inputs, outputs, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 8
        return ir.serde.deserialize_model(proto)


def fold_exact(w, g, b, m, v) -> tuple[np.ndarray, np.ndarray]:
    """Fold in float64, cast once: the best a fold can store in ``w.dtype``."""
    s = g.astype(np.float64) / np.sqrt(v.astype(np.float64) + EPS)
    w2 = w.astype(np.float64) * s[:, None, None, None]
    return w2.astype(w.dtype), (b.astype(np.float64) - m.astype(np.float64) * s).astype(w.dtype)


def fold_naive(w, g, b, m, v) -> tuple[np.ndarray, np.ndarray]:
    """Fold with every step rounded to the model's dtype."""
    d = w.dtype.type
    s = g / np.sqrt(v + d(EPS))
    return w * s[:, None, None, None], b - m * s


def resnet50(variant: str, dtype: type = np.float32, size: int = 128, seed: int = 0) -> ir.Model:
    """ResNet-50 (v1.5: stride on the 3x3) on a [1, 3, size, size] input."""
    net = Builder(variant, dtype, seed)
    x = net.node("Relu", [net.conv_bn("x", 3, 64, 7, 2, "stem")], "stem.relu")
    x = net.node("MaxPool", [x], "stem.pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            x = bottleneck(net, x, cin, width, stride, f"layer{stage + 1}.{i}")
            cin = width * 4
    x = net.node("GlobalAveragePool", [x], "gap")
    x = net.node("Flatten", [x], "flatten")
    d = net.dtype
    fc_w = (net.rng.standard_normal((1000, cin)) / math.sqrt(cin)).astype(d)
    fc_b = net.rng.normal(0, 0.01, 1000).astype(d)
    net.node("Gemm", [x, net.const("fc.w", fc_w), net.const("fc.b", fc_b)], "logits", transB=1)
    elem = helper.np_dtype_to_tensor_dtype(d)
    return net.model(
        [helper.make_tensor_value_info("x", elem, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", elem, [1, 1000])],
    )


def bottleneck(net: Builder, x: str, cin: int, width: int, stride: int, name: str) -> str:
    y = net.node("Relu", [net.conv_bn(x, cin, width, 1, 1, f"{name}.1")], f"{name}.relu1")
    y = net.node("Relu", [net.conv_bn(y, width, width, 3, stride, f"{name}.2")], f"{name}.relu2")
    # A small last gamma keeps the residual stream bounded over 16 blocks (fp16 headroom).
    y = net.conv_bn(y, width, width * 4, 1, 1, f"{name}.3", gamma=0.2)
    if stride != 1 or cin != width * 4:
        x = net.conv_bn(x, cin, width * 4, 1, stride, f"{name}.down")
    return net.node("Relu", [net.node("Add", [y, x], f"{name}.add")], f"{name}.out")


def huge(variant: str, channels: int = HUGE_CHANNELS, blocks: int = HUGE_BLOCKS) -> ir.Model:
    """A >2 GB chain of 1x1 Conv + BN + ReLU on a [1, channels, 1, 1] input."""
    net = Builder(variant, np.float32, seed=1)
    x = "x"
    for i in range(blocks):
        x = net.node(
            "Relu", [net.conv_bn(x, channels, channels, 1, 1, f"block{i}")], f"block{i}.out"
        )
    vi = helper.make_tensor_value_info
    return net.model(
        [vi("x", TensorProto.FLOAT, [1, channels, 1, 1])],
        [vi(x, TensorProto.FLOAT, [1, channels, 1, 1])],
    )


def save(model: ir.Model, path: Path, external: bool) -> Path:
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    return path


def generate(
    out_dir: Path, size: int = 128, fp16: bool = True, big: bool = False
) -> Iterator[Path]:
    """Write every variant into ``out_dir``; yields the paths as they are written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtypes = [("", np.float32)] + ([("_fp16", np.float16)] if fp16 else [])
    for suffix, dtype in dtypes:
        for variant in VARIANTS:
            model = resnet50(variant, dtype, size)
            yield save(model, out_dir / f"resnet50_{variant}{suffix}.onnx", external=False)
    if big:
        for variant in ("bn", "nobn"):
            yield save(huge(variant), out_dir / f"huge_{variant}.onnx", external=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", type=int, default=128, help="ResNet-50 input height and width")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 ResNet-50 variants")
    parser.add_argument("--big", action="store_true", help="also write the >2 GB model and twin")
    args = parser.parse_args()
    for path in generate(args.out_dir, args.size, not args.no_fp16, args.big):
        data = path.with_name(path.name + ".data")
        size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        print(path, f"{size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()


def torch_resnet50(seed: int = 0) -> Any:
    """The same ResNet-50 topology as an eval-mode ``nn.Module`` (Conv2d / BatchNorm2d),
    with the same kind of BN statistics as the ONNX variants."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def conv_bn(cin: int, cout: int, k: int, stride: int, gamma: float = 1.0) -> nn.Sequential:
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        bn = nn.BatchNorm2d(cout)
        var = 10 ** torch.empty(cout).uniform_(-3, 1)
        with torch.no_grad():
            conv.weight.normal_(0, math.sqrt(2 / (cin * k * k))).mul_(
                var.sqrt()[:, None, None, None]
            )
            bn.weight.uniform_(0.5, 1.5).mul_(gamma)
            bn.bias.normal_(0, 0.1)
            bn.running_mean.normal_(0, 0.1).mul_(var.sqrt())
            bn.running_var.copy_(var)
        return nn.Sequential(conv, bn)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            self.branch = nn.Sequential(
                conv_bn(cin, width, 1, 1),
                nn.ReLU(),
                conv_bn(width, width, 3, stride),
                nn.ReLU(),
                conv_bn(width, width * 4, 1, 1, gamma=0.2),
            )
            needs_down = stride != 1 or cin != width * 4
            self.down = conv_bn(cin, width * 4, 1, stride) if needs_down else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.branch(x) + self.down(x))

    layers: list[nn.Module] = [conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if i == 0 and stage > 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers).eval()
