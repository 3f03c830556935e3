"""Tiny ONNX graphs for tests, built with onnx.helper (or onnx_ir), and a reference runner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

RNG = np.random.default_rng(1234)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def bn_params(
    prefix: str,
    c: int,
    dtype: type = np.float32,
    rng: np.random.Generator = RNG,
    **overrides: np.ndarray,
) -> list:
    values = {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0, 0.5, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.5, 2.0, c),
    }
    values.update(overrides)
    return [init(f"{prefix}.{k}", np.asarray(v).astype(dtype)) for k, v in values.items()]


def bn_node(name: str, x: str, y: str, **attrs: object) -> onnx.NodeProto:
    inputs = [x] + [f"{name}.{k}" for k in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=name, **attrs)


def model(
    nodes: Sequence[onnx.NodeProto],
    inits: Sequence[onnx.TensorProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    *,
    dtype: int = onnx.TensorProto.FLOAT,
    opset: int = 17,
    ir_version: int = 8,
    output_shapes: Sequence[Sequence[int]] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(n, dtype, list(s)) for n, s in inputs],
        [
            helper.make_tensor_value_info(
                n, dtype, None if output_shapes is None else output_shapes[i]
            )
            for i, n in enumerate(outputs)
        ],
        initializer=list(inits),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    if output_shapes is not None:
        return m
    # The checker wants graph outputs with a shape: let inference fill them in.
    return onnx.shape_inference.infer_shapes(m)


def conv_bn(
    c_in: int = 3,
    c_out: int = 4,
    dtype: type = np.float32,
    conv_bias: bool = True,
    **bn: np.ndarray,
) -> tuple[list, list]:
    """Nodes and initializers of input -> conv1 -> bn1 -> output."""
    inits = [init("conv1.weight", RNG.normal(size=(c_out, c_in, 3, 3)).astype(dtype))]
    conv_inputs = ["input", "conv1.weight"]
    if conv_bias:
        inits.append(init("conv1.bias", RNG.normal(size=c_out).astype(dtype)))
        conv_inputs.append("conv1.bias")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1", "output"),
    ]
    return nodes, inits + bn_params("bn1", c_out, dtype, **bn)


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run at ORT_DISABLE_ALL, where onnxruntime does no Conv+BN fusion of its own."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        m.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def op_types(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def weight_add_model(value: float, n: int = 1000) -> ir.Model:
    """``y = x + w``, ``w`` an initializer of ``n`` floats all equal to ``value`` (onnx_ir)."""
    x = ir.Value(name="x", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(
        name="w",
        shape=ir.Shape([n]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(np.full(n, value, np.float32), name="w"),
    )
    node = ir.Node("", "Add", [x, w], name="add")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=8)
