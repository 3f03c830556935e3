"""The prover's operator semantics agree with onnxruntime on random graphs and inputs.

The prover derives every map from its own reading of the ONNX operators. These tests
apply the derived map to random inputs (tests/proof/materialize.py) and compare with
what onnxruntime computes at ORT_DISABLE_ALL: a layout or border mistake in
bnfold.proof.ops would show here, independently of any fold.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.proof.regions import evaluate
from bnfold.proof.values import Affine
from tests.builders import init, run
from tests.proof.materialize import materialize

SETTINGS = settings(max_examples=25, deadline=None)


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], inputs: dict[str, list[int]]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _agrees(m: onnx.ModelProto, inputs: dict[str, list[int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    feeds = {n: rng.normal(size=s).astype(np.float32) for n, s in inputs.items()}
    expected = run(m, feeds)[0]
    value, layouts = evaluate(ir.serde.deserialize_model(m), "y")
    assert isinstance(value, Affine)
    got = materialize(value, feeds, layouts)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@st.composite
def conv_geometry(draw: st.DrawFn) -> dict[str, object]:
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 3)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    pads = [draw(st.integers(0, k - 1)) for k in kernel] + [
        draw(st.integers(0, k - 1)) for k in kernel
    ]
    sizes = [
        draw(st.integers(max(3, (k - 1) * d + 1), 7))
        for k, d in zip(kernel, dilations, strict=True)
    ]
    return {
        "rank": rank, "groups": groups, "kernel": kernel, "strides": strides,
        "dilations": dilations, "pads": pads, "sizes": sizes,
        "bias": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
    }  # fmt: skip


@SETTINGS
@given(conv_geometry())
def test_conv_matches_onnxruntime(g: dict) -> None:
    rng = np.random.default_rng(g["seed"])
    c_in, c_out = 2 * g["groups"], 3 * g["groups"]
    w = rng.normal(size=(c_out, c_in // g["groups"], *g["kernel"])).astype(np.float32)
    inits = [init("w", w)]
    ins = ["x", "w"]
    if g["bias"]:
        inits.append(init("b", rng.normal(size=c_out).astype(np.float32)))
        ins.append("b")
    node = helper.make_node(
        "Conv", ins, ["y"], group=g["groups"], strides=g["strides"], dilations=g["dilations"],
        pads=g["pads"], kernel_shape=g["kernel"],
    )  # fmt: skip
    inputs = {"x": [2, c_in, *g["sizes"]]}
    _agrees(_model([node], inits, inputs), inputs, g["seed"])


@SETTINGS
@given(conv_geometry(), st.data())
def test_convtranspose_matches_onnxruntime(g: dict, data: st.DataObject) -> None:
    rng = np.random.default_rng(g["seed"])
    c_in, c_out = 2 * g["groups"], 3 * g["groups"]
    w = rng.normal(size=(c_in, c_out // g["groups"], *g["kernel"])).astype(np.float32)
    out_pad = [
        data.draw(st.integers(0, max(0, min(s, d) - 1)))
        for s, d in zip(g["strides"], g["dilations"], strict=True)
    ]
    node = helper.make_node(
        "ConvTranspose", ["x", "w"], ["y"], group=g["groups"], strides=g["strides"],
        dilations=g["dilations"], pads=g["pads"], output_padding=out_pad,
        kernel_shape=g["kernel"],
    )  # fmt: skip
    sizes = [max(2, s - 3) for s in g["sizes"]]
    rank = g["rank"]
    for i in range(rank):
        span = (g["kernel"][i] - 1) * g["dilations"][i] + 1
        pads = g["pads"][i] + g["pads"][i + rank]
        assume(g["strides"][i] * (sizes[i] - 1) + out_pad[i] + span - pads > 0)
    inputs = {"x": [1, c_in, *sizes]}
    _agrees(_model([node], [init("w", w)], inputs), inputs, g["seed"])


@SETTINGS
@given(
    trans_b=st.booleans(),
    alpha=st.floats(-2, 2),
    beta=st.floats(-2, 2),
    c_shape=st.sampled_from([None, (5,), (1, 5), ()]),
    seed=st.integers(0, 2**16),
)
def test_gemm_matches_onnxruntime(
    trans_b: bool, alpha: float, beta: float, c_shape: tuple[int, ...] | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits, ins = [init("b", b)], ["x", "b"]
    if c_shape is not None:
        inits.append(init("c", rng.normal(size=c_shape).astype(np.float32)))
        ins.append("c")
    node = helper.make_node("Gemm", ins, ["y"], transB=int(trans_b), alpha=alpha, beta=beta)
    inputs = {"x": [3, 4]}
    _agrees(_model([node], inits, inputs), inputs, seed)


def test_matmul_on_tokens_then_flatten_matches_onnxruntime() -> None:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Flatten", ["a"], ["y"], axis=2),
    ]
    inits = [
        init("w", rng.normal(size=(6, 4)).astype(np.float32)),
        init("b", rng.normal(size=4).astype(np.float32)),
    ]
    inputs = {"x": [2, 3, 6]}
    _agrees(_model(nodes, inits, inputs), inputs, 0)


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 1, 1], [2, 0, 1, 2]])
def test_shift_before_a_padded_conv_matches_onnxruntime(pads: list[int]) -> None:
    """A BN before a zero-padded conv: its shift is missing in the padding (ones field)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["n"]),
        helper.make_node("Conv", ["n", "w"], ["y"], pads=pads, kernel_shape=[3, 3], strides=[2, 1]),
    ]
    inits = [
        init("s", rng.uniform(0.5, 1.5, 3).astype(np.float32)),
        init("t", rng.normal(size=3).astype(np.float32)),
        init("m", rng.normal(size=3).astype(np.float32)),
        init("v", rng.uniform(0.5, 2, 3).astype(np.float32)),
        init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
    ]
    inputs = {"x": [2, 3, 7, 6]}
    _agrees(_model(nodes, inits, inputs), inputs, 1)


def test_shape_ops_and_concat_match_onnxruntime() -> None:
    """Gemm -> Reshape to channels -> Mul per channel, concatenated with a conv branch."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Transpose", ["m"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Concat", ["t", "m"], ["y"], axis=1),
    ]
    inits = [
        init("w", rng.normal(size=(12, 5)).astype(np.float32)),
        init("shape", np.array([-1, 3, 2, 2], dtype=np.int64)),
        init("k", rng.normal(size=(3, 1, 1)).astype(np.float32)),
    ]
    inputs = {"x": [4, 5]}
    _agrees(_model(nodes, inits, inputs), inputs, 2)


def test_branch_sum_with_identity_matches_onnxruntime() -> None:
    """RepVGG: conv 3x3 + conv 1x1 + BN(x), summed, on one input."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["b"]),
        helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["c"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Sub", ["ab", "c"], ["y"]),
    ]
    inits = [
        init("w3", rng.normal(size=(4, 4, 3, 3)).astype(np.float32)),
        init("w1", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
        init("b1", rng.normal(size=4).astype(np.float32)),
        init("s", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        init("t", rng.normal(size=4).astype(np.float32)),
        init("m", rng.normal(size=4).astype(np.float32)),
        init("v", rng.uniform(0.5, 2, 4).astype(np.float32)),
    ]
    inputs = {"x": [2, 4, 5, 6]}
    _agrees(_model(nodes, inits, inputs), inputs, 3)
