"""Generate the small ONNX sample models that bnfold is tried and tested on.

Usage::

    python sample_models/make.py [OUT_DIR]

With no argument the files are written beside this script (``sample_models/``).
Every model is built directly with ``onnx.helper``: float32, opset 17 and IR
version 8 unless the sample says otherwise, fixed small input shapes and unique
node names ("conv1", "bn1", ...). Weights are random and so are the BatchNorm
statistics (gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5), mean ~ N(0, 0.5),
var ~ U(0.5, 2)), so a wrong fold shows up as a numeric difference.

The output is deterministic: each sample draws from its own generator, seeded
from ``SEED`` and the file name, so regenerating gives byte-identical files.
Each model is checked with ``onnx.checker.check_model(full_check=True)`` as it
is written. ``README.md`` (the table of samples and the fold outcome bnfold
should reach on each) is generated from the same registry, ``SAMPLES``.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20240601
OPSET = 17
IR_VERSION = 8
EPS = 1e-5
EPS_ALT = 1e-3  # non-default epsilon used on some samples
PRODUCER = "bnfold-sample-models"

Shape = Sequence[int]


# --------------------------------------------------------------------------- builder


@dataclass
class Builder:
    """Collects nodes, initializers and graph inputs/outputs for one model."""

    name: str
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)

    def input(self, name: str, shape: Shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def output(self, name: str) -> None:
        # Shapes are filled in by shape inference in ``finish``.
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def weight(self, name: str, shape: Shape, fan_in: int) -> str:
        return self.const(name, self.rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape))

    def vector(self, name: str, shape: Shape, scale: float = 0.5) -> str:
        return self.const(name, self.rng.normal(0.0, scale, size=shape))

    def node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def graph(self, inits_as_inputs: bool = False) -> onnx.GraphProto:
        inputs = list(self.inputs)
        if inits_as_inputs:  # IR < 4 requires every initializer to be a graph input
            inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
            ]
        return helper.make_graph(self.nodes, self.name, inputs, self.outputs, self.inits)


def finish(
    b: Builder, opset: int = OPSET, ir_version: int = IR_VERSION, inits_as_inputs: bool = False
) -> onnx.ModelProto:
    """Wrap the graph in a model and give the graph outputs their inferred shapes."""
    model = helper.make_model(
        b.graph(inits_as_inputs),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        producer_name=PRODUCER,
        producer_version="1",
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


# --------------------------------------------------------------------------- ops


def conv(
    b: Builder,
    name: str,
    x: str,
    c_in: int,
    c_out: int,
    kernel: Shape,
    *,
    bias: bool = True,
    group: int = 1,
    weight: str | None = None,
    out: str | None = None,
    **attrs,
) -> str:
    """Conv with weight ``[c_out, c_in / group, *kernel]``; ``weight`` reuses an initializer."""
    fan_in = c_in // group * int(np.prod(kernel))
    w = weight or b.weight(f"{name}.weight", [c_out, c_in // group, *kernel], fan_in)
    inputs = [x, w] + ([b.vector(f"{name}.bias", [c_out], 0.1)] if bias else [])
    if group != 1:
        attrs["group"] = group
    return b.node("Conv", inputs, name, out, kernel_shape=list(kernel), **attrs)


def conv_transpose(
    b: Builder,
    name: str,
    x: str,
    c_in: int,
    c_out: int,
    kernel: Shape,
    *,
    bias: bool = True,
    group: int = 1,
    out: str | None = None,
    **attrs,
) -> str:
    """ConvTranspose with weight ``[c_in, c_out / group, *kernel]``."""
    fan_in = c_in // group * int(np.prod(kernel))
    w = b.weight(f"{name}.weight", [c_in, c_out // group, *kernel], fan_in)
    inputs = [x, w] + ([b.vector(f"{name}.bias", [c_out], 0.1)] if bias else [])
    if group != 1:
        attrs["group"] = group
    return b.node("ConvTranspose", inputs, name, out, kernel_shape=list(kernel), **attrs)


def bn_params(b: Builder, name: str, c: int) -> list[str]:
    """Random, non-trivial scale, bias, running mean and running variance."""
    rng = b.rng
    return [
        b.const(f"{name}.scale", rng.uniform(0.5, 1.5, size=c)),
        b.const(f"{name}.bias", rng.normal(0.0, 0.5, size=c)),
        b.const(f"{name}.mean", rng.normal(0.0, 0.5, size=c)),
        b.const(f"{name}.var", rng.uniform(0.5, 2.0, size=c)),
    ]


def batchnorm(
    b: Builder, name: str, x: str, c: int, eps: float = EPS, out: str | None = None, **attrs
) -> str:
    """Inference-mode BatchNormalization over ``c`` channels (axis 1)."""
    if eps != EPS:
        attrs["epsilon"] = eps
    return b.node("BatchNormalization", [x, *bn_params(b, name, c)], name, out, **attrs)


def gemm(
    b: Builder,
    name: str,
    x: str,
    k: int,
    n: int,
    *,
    trans_b: int = 1,
    with_c: bool = True,
    out: str | None = None,
    **attrs,
) -> str:
    """Gemm ``x [M, k] -> [M, n]``; B is ``[n, k]`` if trans_b else ``[k, n]``."""
    w = b.weight(f"{name}.weight", [n, k] if trans_b else [k, n], k)
    inputs = [x, w] + ([b.vector(f"{name}.bias", [n], 0.1)] if with_c else [])
    if trans_b:
        attrs["transB"] = 1
    return b.node("Gemm", inputs, name, out, **attrs)


def matmul(b: Builder, name: str, x: str, k: int, n: int, out: str | None = None) -> str:
    w = b.weight(f"{name}.weight", [k, n], k)
    return b.node("MatMul", [x, w], name, out)


def mul_const(b: Builder, name: str, x: str, shape: Shape, out: str | None = None) -> str:
    """Mul by a positive-and-negative random constant (a per-channel scale)."""
    scale = b.rng.uniform(0.5, 1.5, size=shape) * b.rng.choice([-1.0, 1.0], size=shape)
    return b.node("Mul", [x, b.const(f"{name}.scale", scale)], name, out)


def add_const(b: Builder, name: str, x: str, shape: Shape, out: str | None = None) -> str:
    return b.node("Add", [x, b.vector(f"{name}.shift", shape)], name, out)


def relu(b: Builder, name: str, x: str, out: str | None = None) -> str:
    return b.node("Relu", [x], name, out)


# --------------------------------------------------------------------------- positives


def conv2d_bn(b: Builder, bias: bool = True, eps: float = EPS) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], bias=bias, pads=[1, 1, 1, 1])
    b.output(batchnorm(b, "bn1", y, 8, eps=eps, out="output"))
    return finish(b)


def conv1d_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 32])
    y = conv(b, "conv1", x, 3, 8, [3], pads=[1, 1], strides=[2])
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def conv3d_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 2, 4, 6, 6])
    y = conv(b, "conv1", x, 2, 4, [3, 3, 3], pads=[1] * 6)
    b.output(batchnorm(b, "bn1", y, 4, eps=EPS_ALT, out="output"))
    return finish(b)


def conv_grouped_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 4, 16, 16])
    y = conv(b, "conv1", x, 4, 8, [3, 3], group=2, dilations=[2, 2], strides=[2, 2])
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def depthwise_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 6, 12, 12])
    y = conv(b, "conv1", x, 6, 6, [3, 3], group=6, pads=[1, 1, 1, 1])
    b.output(batchnorm(b, "bn1", y, 6, eps=EPS_ALT, out="output"))
    return finish(b)


def convtranspose_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 4, 8, 8])
    y = conv_transpose(
        b,
        "deconv1",
        x,
        4,
        6,
        [3, 3],
        group=2,
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    )
    b.output(batchnorm(b, "bn1", y, 6, out="output"))
    return finish(b)


def convtranspose_nobias_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 4, 8, 8])
    y = conv_transpose(b, "deconv1", x, 4, 6, [2, 2], bias=False, strides=[2, 2])
    b.output(batchnorm(b, "bn1", y, 6, eps=EPS_ALT, out="output"))
    return finish(b)


def gemm_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [4, 16])
    y = gemm(b, "gemm1", x, 16, 8, trans_b=1, alpha=0.7, beta=1.3)
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def gemm_transb0_noc_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [4, 16])
    y = gemm(b, "gemm1", x, 16, 8, trans_b=0, with_c=False)
    b.output(batchnorm(b, "bn1", y, 8, eps=EPS_ALT, out="output"))
    return finish(b)


def gemm_reshape_bn(b: Builder) -> onnx.ModelProto:
    """A DCGAN generator's first layer: features viewed as (C, H, W), then BN per C."""
    x = b.input("input", [2, 16])
    y = gemm(b, "fc1", x, 16, 8 * 2 * 2, trans_b=1)
    b.inits.append(numpy_helper.from_array(np.array([-1, 8, 2, 2], dtype=np.int64), "shape1"))
    y = b.node("Reshape", [y, "shape1"], "reshape1")
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def matmul_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [4, 16])
    y = matmul(b, "matmul1", x, 16, 8)
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def conv_mul_add(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    y = mul_const(b, "mul1", y, [1, 8, 1, 1])
    b.output(add_const(b, "add1", y, [8, 1, 1], out="output"))
    return finish(b)


def gemm_mul_add(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [4, 16])
    y = gemm(b, "gemm1", x, 16, 8)
    y = mul_const(b, "mul1", y, [])
    b.output(add_const(b, "add1", y, [8], out="output"))
    return finish(b)


def chain_conv_bn_mul_add(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    y = batchnorm(b, "bn1", y, 8)
    y = mul_const(b, "mul1", y, [8, 1, 1])
    b.output(add_const(b, "add1", y, [1, 8, 1, 1], out="output"))
    return finish(b)


def conv_bn_relu(b: Builder, name: str, x: str, c_in: int, c_out: int, stride: int = 1) -> str:
    y = conv(
        b,
        f"{name}.conv",
        x,
        c_in,
        c_out,
        [3, 3],
        bias=False,
        pads=[1, 1, 1, 1],
        strides=[stride, stride],
    )
    y = batchnorm(b, f"{name}.bn", y, c_out)
    return relu(b, f"{name}.relu", y)


def basic_block(b: Builder, name: str, x: str, c_in: int, c_out: int, stride: int) -> str:
    """conv-bn-relu-conv-bn plus an identity or 1x1 conv-bn shortcut, Add, Relu."""
    y = conv_bn_relu(b, f"{name}.1", x, c_in, c_out, stride)
    y = conv(b, f"{name}.2.conv", y, c_out, c_out, [3, 3], bias=False, pads=[1, 1, 1, 1])
    y = batchnorm(b, f"{name}.2.bn", y, c_out, eps=EPS_ALT)
    shortcut = x
    if stride != 1 or c_in != c_out:
        shortcut = conv(
            b, f"{name}.down.conv", x, c_in, c_out, [1, 1], bias=False, strides=[stride, stride]
        )
        shortcut = batchnorm(b, f"{name}.down.bn", shortcut, c_out)
    y = b.node("Add", [y, shortcut], f"{name}.add")
    return relu(b, f"{name}.relu", y)


def resnet_tiny(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 32, 32])
    y = conv_bn_relu(b, "stem", x, 3, 16)
    y = basic_block(b, "layer1", y, 16, 16, stride=1)
    y = basic_block(b, "layer2", y, 16, 32, stride=2)
    y = b.node("GlobalAveragePool", [y], "pool")
    y = b.node("Flatten", [y], "flatten", axis=1)
    b.output(gemm(b, "fc", y, 32, 10, out="output"))
    return finish(b)


def old_opset_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    b.output(batchnorm(b, "bn1", y, 8, out="output", spatial=1))
    return finish(b, opset=7, ir_version=3, inits_as_inputs=True)


def int_const(b: Builder, name: str, values: Sequence[int]) -> str:
    b.inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def token_linear_bn(b: Builder) -> onnx.ModelProto:
    """LeViT's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``.

    As torch exports it without constant folding: the weight is a Transpose of
    nn.Linear's, and the reshape back reads the MatMul's Shape.
    """
    x = b.input("input", [2, 5, 16])
    w = b.weight("fc1.weight", [8, 16], 16)
    wt = b.node("Transpose", [w], "fc1.weight_t", perm=[1, 0])
    y = b.node("MatMul", [x, wt], "fc1")
    merged = b.node("Flatten", [y], "flatten1", axis=2)
    z = batchnorm(b, "bn1", merged, 8)
    shape = b.node("Shape", [y], "shape1")
    b.output(b.node("Reshape", [z, shape], "unflatten1", out="output"))
    return finish(b)


def rep_block(
    b: Builder,
    x: str,
    c: int,
    kxk: tuple[int, list[int]] = (3, [1, 1, 1, 1]),
    small: tuple[int, list[int]] = (1, [0, 0, 0, 0]),
    small_group: int = 1,
    group: int = 1,
) -> tuple[str, str]:
    """A RepVGG train-time block: BN(Conv_kxk(x)) + BN(Conv_small(x)) + BN(x), then Relu.

    Returns the Relu's output and the small branch's BN output.
    """
    k, pads = kxk
    y = conv(b, "conv_kxk", x, c, c, [k, k], bias=False, pads=pads, group=group)
    y = batchnorm(b, "bn_kxk", y, c)
    s_k, s_pads = small
    z = conv(b, "conv_small", x, c, c, [s_k, s_k], bias=False, pads=s_pads, group=small_group)
    z = batchnorm(b, "bn_small", z, c)
    i = batchnorm(b, "bn_identity", x, c)
    total = b.node("Add", [b.node("Add", [y, z], "add_branches"), i], "add_identity")
    return relu(b, "relu", total, out="output"), z


def repvgg_block(b: Builder) -> onnx.ModelProto:
    b.output(rep_block(b, b.input("input", [1, 4, 8, 8]), 4)[0])
    return finish(b)


def repvit_dw_block(b: Builder) -> onnx.ModelProto:
    """RepViT's RepVGGDW: BN(BN(dw conv 3x3(x)) + dw conv 1x1(x) + x)."""
    x = b.input("input", [1, 4, 8, 8])
    y = conv(b, "conv_kxk", x, 4, 4, [3, 3], bias=False, pads=[1, 1, 1, 1], group=4)
    y = batchnorm(b, "bn_kxk", y, 4)
    z = conv(b, "conv_small", x, 4, 4, [1, 1], group=4)
    total = b.node("Add", [b.node("Add", [y, z], "add_branches"), x], "add_identity")
    b.output(batchnorm(b, "bn_out", total, 4, out="output"))
    return finish(b)


def mobileone_dw_block(b: Builder) -> onnx.ModelProto:
    """MobileOne's depthwise block: 3x3 and 1x1 depthwise branches and an identity BN."""
    b.output(rep_block(b, b.input("input", [1, 4, 8, 8]), 4, small_group=4, group=4)[0])
    return finish(b)


def rep_mixer(b: Builder, x: str, c: int, scale: str) -> tuple[str, str]:
    """FastViT's train-time RepMixer: ``x + scale * (mixer(x) - norm(x))``.

    ``mixer`` is a MobileOne depthwise block (BN(dw 3x3) + BN(dw 1x1) + BN(x)), ``norm``
    an identity-only one (BN(x)). Returns the output and the norm BN's output.
    """
    y = conv(b, "conv_kxk", x, c, c, [3, 3], bias=False, pads=[1, 1, 1, 1], group=c)
    z = conv(b, "conv_small", x, c, c, [1, 1], bias=False, group=c)
    branches = b.node("Add", [batchnorm(b, "bn_kxk", y, c), batchnorm(b, "bn_small", z, c)],
                      "add_branches")  # fmt: skip
    mixer = b.node("Add", [branches, batchnorm(b, "bn_mixer", x, c)], "add_mixer")
    norm = batchnorm(b, "bn_norm", x, c)
    diff = b.node("Sub", [mixer, norm], "sub_norm")
    scaled = b.node("Mul", [diff, scale], "layer_scale")
    return b.node("Add", [x, scaled], "add_residual", out="output"), norm


def layer_scale(b: Builder, c: int) -> str:
    # Random, not timm's 1e-5 init: a wrong coefficient must show in the outputs.
    return b.const("layer_scale.gamma", b.rng.uniform(0.5, 1.5, size=(c, 1, 1)))


def repmixer_block(b: Builder) -> onnx.ModelProto:
    b.output(rep_mixer(b, b.input("input", [1, 4, 8, 8]), 4, layer_scale(b, 4))[0])
    return finish(b)


def mobileone_1x1_block(b: Builder) -> onnx.ModelProto:
    """MobileOne's kernel-1 block as exported: ``(BN(x) + 0) + BN(Conv 1x1(x))``."""
    x = b.input("input", [1, 4, 8, 8])
    zero = b.node("Add", [batchnorm(b, "bn_identity", x, 4), b.const("zero", np.array(0.0))],
                  "add_zero")  # fmt: skip
    y = batchnorm(b, "bn_conv", conv(b, "conv_1x1", x, 4, 4, [1, 1], bias=False), 4)
    b.output(b.node("Add", [zero, y], "add_conv", out="output"))
    return finish(b)


def conv_pool_bn(b: Builder, pool: str, gamma_sign: float = 1.0, **attrs) -> onnx.ModelProto:
    """Conv -> ``pool`` -> BN; ``gamma_sign`` -1 flips the BN scale of channel 0."""
    x = b.input("input", [1, 3, 12, 12])
    y = conv(b, "conv1", x, 3, 6, [3, 3], pads=[1, 1, 1, 1])
    y = b.node(pool, [y], "pool1", **attrs)
    z = batchnorm(b, "bn1", y, 6, out="output")
    if gamma_sign != 1.0:
        scale = next(t for t in b.inits if t.name == "bn1.scale")
        values = numpy_helper.to_array(scale).copy()
        values[0] *= gamma_sign
        scale.CopyFrom(numpy_helper.from_array(values, "bn1.scale"))
    b.output(z)
    return finish(b)


def conv_avgpool_bn(b: Builder) -> onnx.ModelProto:
    return conv_pool_bn(
        b, "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
        count_include_pad=0,
    )  # fmt: skip


def conv_maxpool_bn(b: Builder) -> onnx.ModelProto:
    return conv_pool_bn(b, "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


def two_convs(b: Builder, c_a: int, c_b: int) -> tuple[str, str]:
    """conv_a(input) and conv_b(Relu(input)): two linear ops on different inputs."""
    x = b.input("input", [1, 3, 8, 8])
    a = conv(b, "conv_a", x, 3, c_a, [3, 3], pads=[1, 1, 1, 1])
    z = conv(b, "conv_b", relu(b, "relu_in", x), 3, c_b, [1, 1], bias=False)
    return a, z


def conv_add_bn(b: Builder) -> onnx.ModelProto:
    a, z = two_convs(b, 6, 6)
    b.output(batchnorm(b, "bn1", b.node("Add", [a, z], "add1"), 6, out="output"))
    return finish(b)


def conv_concat_bn(b: Builder) -> onnx.ModelProto:
    a, z = two_convs(b, 3, 5)
    y = b.node("Concat", [a, z], "concat1", axis=1)
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


# --------------------------------------------------------------------------- negatives


def neg_bn_after_relu(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    y = relu(b, "relu1", y)
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def neg_training_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    outs = ["output", "running_mean", "running_var"]
    b.nodes.append(
        helper.make_node(
            "BatchNormalization",
            [y, *bn_params(b, "bn1", 8)],
            outs,
            name="bn1",
            training_mode=1,
            momentum=0.9,
        )
    )
    for name in outs:
        b.output(name)
    return finish(b, opset=15)


def neg_branching(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    y = conv(b, "conv1", x, 3, 8, [3, 3], pads=[1, 1, 1, 1])
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    b.output(relu(b, "relu1", y, out="relu_output"))
    return finish(b)


def neg_shared_weight(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 3, 16, 16])
    w = b.weight("shared.weight", [8, 3, 3, 3], 27)
    ya = conv(b, "conv_a", x, 3, 8, [3, 3], weight=w, pads=[1, 1, 1, 1])
    yb = conv(b, "conv_b", x, 3, 8, [3, 3], weight=w, strides=[2, 2], pads=[1, 1, 1, 1])
    b.output(batchnorm(b, "bn_a", ya, 8, out="output_a"))
    b.output(batchnorm(b, "bn_b", yb, 8, out="output_b"))
    return finish(b)


def neg_standalone_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 8, 16, 16])
    b.output(batchnorm(b, "bn1", x, 8, out="output"))
    return finish(b)


def neg_matmul_3d_bn(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [2, 4, 16])
    y = matmul(b, "matmul1", x, 16, 8)  # [2, 4, 8]: MatMul's channels are the last axis
    b.output(batchnorm(b, "bn1", y, 4, out="output"))  # BN normalises axis 1 (4)
    return finish(b)


def neg_merge_moves_channel(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [2, 4, 16])
    y = matmul(b, "matmul1", x, 16, 8)  # [2, 4, 8]
    y = b.node("Reshape", [y, int_const(b, "shape1", [-1, 4])], "reshape1")  # [16, 4]
    b.output(batchnorm(b, "bn1", y, 4, out="output"))  # each BN channel mixes 2 of the 8
    return finish(b)


def neg_avgpool_pad_bn(b: Builder) -> onnx.ModelProto:
    return conv_pool_bn(
        b, "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
        count_include_pad=1,
    )  # fmt: skip


def neg_maxpool_negative_bn(b: Builder) -> onnx.ModelProto:
    return conv_pool_bn(b, "MaxPool", gamma_sign=-1.0, kernel_shape=[2, 2], strides=[2, 2])


def neg_concat_pool_bn(b: Builder) -> onnx.ModelProto:
    """DenseNet's pattern: the block input (a pool) concatenated with a conv's features."""
    x = b.input("input", [1, 4, 8, 8])
    pooled = b.node("MaxPool", [x], "pool1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    a = conv(b, "conv_a", pooled, 4, 4, [3, 3], pads=[1, 1, 1, 1])
    y = b.node("Concat", [pooled, a], "concat1", axis=1)
    b.output(batchnorm(b, "bn1", y, 8, out="output"))
    return finish(b)


def neg_add_branching_bn(b: Builder) -> onnx.ModelProto:
    a, z = two_convs(b, 6, 6)
    b.output(batchnorm(b, "bn1", b.node("Add", [a, z], "add1"), 6, out="output"))
    b.output(relu(b, "relu_a", a, out="a_output"))
    return finish(b)


def neg_repmixer_shared(b: Builder) -> onnx.ModelProto:
    out, norm = rep_mixer(b, b.input("input", [1, 4, 8, 8]), 4, layer_scale(b, 4))
    b.output(out)
    b.output(b.node("Identity", [norm], "tap_norm", out="norm_output"))
    return finish(b)


def neg_repmixer_dynamic_scale(b: Builder) -> onnx.ModelProto:
    b.output(rep_mixer(b, b.input("input", [1, 4, 8, 8]), 4, b.input("scale", [4, 1, 1]))[0])
    return finish(b)


def neg_branch_groups(b: Builder) -> onnx.ModelProto:
    b.output(rep_block(b, b.input("input", [1, 4, 8, 8]), 4, small_group=2)[0])
    return finish(b)


def neg_branch_uncentred(b: Builder) -> onnx.ModelProto:
    x = b.input("input", [1, 4, 8, 8])
    b.output(rep_block(b, x, 4, small=(2, [0, 0, 1, 1]))[0])  # a 2x2 kernel has no centre
    return finish(b)


def neg_branch_shared(b: Builder) -> onnx.ModelProto:
    out, small = rep_block(b, b.input("input", [1, 4, 8, 8]), 4)
    b.output(out)
    b.output(b.node("Identity", [small], "tap_small", out="small_output"))
    return finish(b)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Sample:
    """One sample file and the outcome bnfold should reach on it."""

    file: str
    contents: str
    folds: str
    refusals: str
    build: Callable[[Builder], onnx.ModelProto]
    external_data: bool = False


NONE = "-"
ONE = "1: conv1 -> bn1"

SAMPLES: list[Sample] = [
    Sample("conv2d_bn.onnx", "Conv 3->8, 3x3, pad 1, bias -> BN; input [1,3,16,16]",
           ONE, NONE, conv2d_bn),
    Sample("conv2d_nobias_bn.onnx", "Conv without bias -> BN (eps 1e-3)",
           ONE + " (a bias is created)", NONE, lambda b: conv2d_bn(b, bias=False, eps=EPS_ALT)),
    Sample("conv1d_bn.onnx", "Conv1d 3->8, k3, stride 2 -> BN; input [1,3,32]",
           ONE, NONE, conv1d_bn),
    Sample("conv3d_bn.onnx", "Conv3d 2->4, k3 -> BN (eps 1e-3); input [1,2,4,6,6]",
           ONE, NONE, conv3d_bn),
    Sample("conv_grouped_bn.onnx", "Conv 4->8, group 2, dilations 2, strides 2 -> BN",
           ONE, NONE, conv_grouped_bn),
    Sample("depthwise_bn.onnx", "Depthwise Conv (group = C = 6) -> BN (eps 1e-3)",
           ONE, NONE, depthwise_bn),
    Sample("convtranspose_bn.onnx",
           "ConvTranspose 4->6, group 2, strides 2, output_padding 1, bias -> BN",
           "1: deconv1 -> bn1", NONE, convtranspose_bn),
    Sample("convtranspose_nobias_bn.onnx", "ConvTranspose 4->6, group 1, k2 s2, no bias -> BN",
           "1: deconv1 -> bn1", NONE, convtranspose_nobias_bn),
    Sample("gemm_bn.onnx", "Gemm transB=1, alpha 0.7, beta 1.3, C [8] -> BN; input [4,16]",
           "1: gemm1 -> bn1", NONE, gemm_bn),
    Sample("gemm_transb0_noc_bn.onnx", "Gemm transB=0, no C -> BN (eps 1e-3)",
           "1: gemm1 -> bn1", NONE, gemm_transb0_noc_bn),
    Sample("gemm_reshape_bn.onnx",
           "Gemm 16->32 -> Reshape(-1, 8, 2, 2) -> BN(8), as a DCGAN generator's first layer",
           "1: fc1 -> reshape1 -> bn1 (each BN channel is 4 Gemm features)", NONE,
           gemm_reshape_bn),
    Sample("matmul_bn.onnx", "MatMul x [4,16] @ W [16,8] -> BN",
           "1: matmul1 -> bn1", NONE, matmul_bn),
    Sample("conv_mul_add.onnx", "Conv -> Mul (const [1,8,1,1]) -> Add (const [8,1,1])",
           "2: conv1 -> mul1, conv1 -> add1", NONE, conv_mul_add),
    Sample("gemm_mul_add.onnx", "Gemm -> Mul (scalar const, shape []) -> Add (const [8])",
           "2: gemm1 -> mul1, gemm1 -> add1", NONE, gemm_mul_add),
    Sample("chain_conv_bn_mul_add.onnx", "Conv -> BN -> Mul [8,1,1] -> Add [1,8,1,1]",
           "3: conv1 -> bn1, conv1 -> mul1, conv1 -> add1 (a single Conv remains)", NONE,
           chain_conv_bn_mul_add),
    Sample("resnet_tiny.onnx",
           "ResNet-like: stem conv-bn-relu, 2 basic blocks (identity and 1x1 conv-bn "
           "shortcut), GlobalAveragePool, Flatten, Gemm; input [1,3,32,32]",
           "6: X.conv -> X.bn for X in stem, layer1.1, layer1.2, layer2.1, layer2.2, layer2.down",
           NONE + " (fc has no BN)", resnet_tiny),
    Sample("old_opset_bn.onnx",
           "Conv -> BN (spatial=1) at opset 7, IR 3, initializers also graph inputs",
           ONE, NONE, old_opset_bn),
    Sample("external_data/conv_bn_ext.onnx",
           "as conv2d_bn, all tensors in external file conv_bn_ext.onnx.data",
           ONE, NONE, conv2d_bn, external_data=True),
    Sample("neg_bn_after_relu.onnx", "Conv -> Relu -> BN",
           "0", "bn1: `nonlinear_input`", neg_bn_after_relu),
    Sample("neg_training_bn.onnx",
           "Conv -> BN training_mode=1 with running_mean/running_var outputs, opset 15",
           "0", "conv1 -> bn1: `training_mode`", neg_training_bn),
    Sample("neg_branching.onnx", "Conv feeds BN and a Relu that is a graph output",
           "0", "conv1 -> bn1: `branching`", neg_branching),
    Sample("neg_shared_weight.onnx", "conv_a and conv_b read one weight, each -> BN",
           "2 (one weight cloned)", "with `--no-clone-shared`: both `shared_weight`",
           neg_shared_weight),
    Sample("neg_standalone_bn.onnx", "graph input [1,8,16,16] -> BN",
           "0", "bn1: `standalone`", neg_standalone_bn),
    Sample("neg_matmul_3d_bn.onnx",
           "MatMul [2,4,16] @ [16,8] -> BN over axis 1 (C=4, not MatMul's output axis)",
           "0", "matmul1 -> bn1: `not_per_channel`", neg_matmul_3d_bn),
    Sample("token_linear_bn.onnx",
           "LeViT token MLP: MatMul [2,5,16] @ Transpose(W) -> Flatten(axis=2) [10,8] -> BN "
           "-> Reshape back by the MatMul's Shape",
           "1: fc1 -> flatten1 -> bn1 (the batch merge keeps C last; the shift becomes an Add)",
           NONE, token_linear_bn),
    Sample("neg_merge_moves_channel.onnx", "MatMul [2,4,16] @ [16,8] -> Reshape(-1, 4) -> BN(4)",
           "0", "matmul1 -> reshape1 -> bn1: `merge_moves_channel`", neg_merge_moves_channel),
    Sample("repvgg_block.onnx",
           "RepVGG train-time block: BN(Conv 3x3 pad 1) + BN(Conv 1x1) + BN(x) -> Relu",
           "4: conv_kxk -> bn_kxk, conv_small -> bn_small, then bn_identity as a centred tap "
           "(`identity_tap`) and both convs merged into conv_kxk (`reparam`): one Conv, one Relu",
           NONE, repvgg_block),
    Sample("mobileone_dw_block.onnx",
           "MobileOne depthwise block: BN(depthwise Conv 3x3) + BN(depthwise Conv 1x1) + BN(x)",
           "4: as repvgg_block, with groups = 4", NONE, mobileone_dw_block),
    Sample("conv_avgpool_bn.onnx",
           "Conv -> AveragePool 3x3 s2 pad 1 (count_include_pad=0) -> BN",
           "1: conv1 -> pool1 -> bn1 (the pool stays; the BN folds into the conv before it)",
           NONE, conv_avgpool_bn),
    Sample("conv_maxpool_bn.onnx", "Conv -> MaxPool 3x3 s2 pad 1 -> BN (all scales > 0)",
           "1: conv1 -> pool1 -> bn1", NONE, conv_maxpool_bn),
    Sample("neg_avgpool_pad_bn.onnx", "as conv_avgpool_bn, with count_include_pad=1", "0",
           "conv1 -> pool1 -> bn1: `pool_padding`", neg_avgpool_pad_bn),
    Sample("neg_maxpool_negative_bn.onnx", "Conv -> MaxPool 2x2 s2 -> BN with a negative scale",
           "0", "conv1 -> pool1 -> bn1: `negative_scale`", neg_maxpool_negative_bn),
    Sample("conv_add_bn.onnx", "Add(conv_a(x), conv_b(Relu(x))) -> BN",
           "1: conv_a, conv_b -> add1 -> bn1 (scale into both, shift into conv_a's bias)",
           NONE, conv_add_bn),
    Sample("conv_concat_bn.onnx", "Concat(conv_a(x) [3 ch], conv_b(Relu(x)) [5 ch], axis=1) -> BN",
           "1: conv_a, conv_b -> concat1 -> bn1 (channels 0-2 into conv_a, 3-7 into conv_b)",
           NONE, conv_concat_bn),
    Sample("neg_concat_pool_bn.onnx", "Concat(MaxPool(x), conv_a(MaxPool(x))) -> BN, as DenseNet",
           "0", "concat1 -> bn1: `not_linear_term`", neg_concat_pool_bn),
    Sample("neg_add_branching_bn.onnx", "as conv_add_bn, conv_a also feeds a Relu output",
           "0", "add1 -> bn1: `branching`", neg_add_branching_bn),
    Sample("repvit_dw_block.onnx",
           "RepViT block: BN(BN(depthwise Conv 3x3) + depthwise Conv 1x1 + x)",
           "3: conv_kxk -> bn_kxk, conv_kxk -> add_identity -> bn_out (folded into the "
           "merge), conv_kxk + conv_small + x (`reparam`): one Conv", NONE, repvit_dw_block),
    Sample("mobileone_1x1_block.onnx",
           "MobileOne kernel-1 block as exported: (BN(x) + 0) + BN(Conv 1x1(x))",
           "2: conv_1x1 -> bn_conv, then bn_identity as a tap (`identity_tap`, the constant "
           "0 to the bias) into conv_1x1 (`reparam`): one Conv", NONE, mobileone_1x1_block),
    Sample("repmixer_block.onnx",
           "FastViT RepMixer: x + gamma * (mixer(x) - BN(x)), mixer = BN(dw Conv 3x3) + "
           "BN(dw Conv 1x1) + BN(x), gamma a [4,1,1] constant",
           "4: conv_kxk -> bn_kxk, conv_small -> bn_small, bn_mixer and bn_norm as taps "
           "(gamma and -gamma), everything merged into conv_kxk (`reparam`): one Conv", NONE,
           repmixer_block),
    Sample("neg_repmixer_shared.onnx", "as repmixer_block, bn_norm also a graph output",
           "3: the branch BNs, bn_mixer (the mixer merges on its own, `reparam`)",
           "bn_norm -> add_residual: `branching`", neg_repmixer_shared),
    Sample("neg_repmixer_dynamic_scale.onnx",
           "as repmixer_block, gamma a graph input (a Mul by a value computed at run time)",
           "4: the mixer's own sum merges (`reparam` at add_mixer); the Sub under the "
           "run-time Mul tops no tree (only an Add does), so the Mul and the residual Add stay",
           "bn_norm: `standalone`", neg_repmixer_dynamic_scale),
    Sample("neg_branch_groups.onnx", "as repvgg_block, but the 1x1 conv has group 2",
           "2 (the branch BNs)", "bn_identity -> add_identity: `branch_mismatch`",
           neg_branch_groups),
    Sample("neg_branch_uncentred.onnx", "as repvgg_block, but a 2x2 conv (pads 0,0,1,1) "
           "instead of the 1x1", "2 (the branch BNs)",
           "bn_identity -> add_identity: `uncentred_tap`", neg_branch_uncentred),
    Sample("neg_branch_shared.onnx", "as repvgg_block, the 1x1 branch also a graph output",
           "2 (the branch BNs)", "bn_identity -> add_identity: `branching`", neg_branch_shared),
]  # fmt: skip


# --------------------------------------------------------------------------- writing

README_HEAD = """\
# Sample models

Generated by `make.py` (`python sample_models/make.py [OUT_DIR]`); do not edit by hand,
this README included. Regenerating gives byte-identical files (fixed seed per file).

All models are float32, opset 17 / IR 8 unless noted, with random weights and random
BatchNorm statistics (gamma ~ U(0.5,1.5), beta ~ N(0,0.5), mean ~ N(0,0.5),
var ~ U(0.5,2)); some BNs use epsilon 1e-3. Each passes
`onnx.checker.check_model(full_check=True)` and runs in onnxruntime with
`ORT_DISABLE_ALL`. "Folds" counts the BN / per-channel affine nodes that should be
folded away (site as `linear -> affine`); "Refused" gives the site and reason code.

| File | Contents | Folds | Refused (reason code) |
|---|---|---|---|
"""

README_NOTES = """
Notes:

- `neg_training_bn.onnx`: onnxruntime (CPU, `ORT_DISABLE_ALL`) does run it, in
  training mode: `output` is normalised with the batch statistics and
  `running_mean`/`running_var` are the momentum-updated stats. Folding the running
  stats into the conv would change `output`, hence the refusal.
- `neg_shared_weight.onnx`: both convs read `shared.weight`, so folding either BN into
  it in place would change the other conv. By default bnfold clones the weight for the
  first fold (`bytes_added` 864) and folds the second in place; with
  `--no-clone-shared` both are refused with `shared_weight`.
- `neg_matmul_3d_bn.onnx`: MatMul's output channels are its last axis (8), BN's are
  axis 1 (4), so the BN scale does not act per column of W.
- With `--lower-standalone` every refused BN above except the training-mode one is
  lowered to Mul + Add (or a 1x1 depthwise Conv); `neg_standalone_bn.onnx` is the
  smallest such model.
"""


def seed_for(file: str) -> int:
    return SEED + zlib.crc32(file.encode())


def build(sample: Sample) -> onnx.ModelProto:
    name = Path(sample.file).stem
    return sample.build(Builder(name, np.random.default_rng(seed_for(sample.file))))


def write_sample(sample: Sample, out_dir: Path) -> Path:
    model = build(sample)
    onnx.checker.check_model(model, full_check=True)
    path = out_dir / sample.file
    path.parent.mkdir(parents=True, exist_ok=True)
    if not sample.external_data:
        onnx.save(model, str(path))
        return path
    location = path.name + ".data"
    (path.parent / location).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def readme() -> str:
    rows = [f"| `{s.file}` | {s.contents} | {s.folds} | {s.refusals} |" for s in SAMPLES]
    return README_HEAD + "\n".join(rows) + "\n" + README_NOTES


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args[0]) if args else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for sample in SAMPLES:
        path = write_sample(sample, out_dir)
        print(f"{path}  {path.stat().st_size} bytes")
    (out_dir / "README.md").write_text(readme())


if __name__ == "__main__":
    main()
