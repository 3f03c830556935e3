"""Random geometries: bnfold's fold is proven; the same fold with one weight moved is not."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.proof import prove_onnx
from tests.builders import bn_node, bn_params, init
from tests.proof.folding import as_ir, fold, initializer, node, with_initializer

SETTINGS = settings(max_examples=20, deadline=None)


def _model(nodes: list, inits: list, shape: list[int | str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _proven_then_broken(original: onnx.ModelProto, linear: str, seed: int) -> None:
    """The fold is proven; moving one of its folded weights by 4 ulp breaks the proof."""
    folded, report = fold(original)
    assert report.folded, report.summary()
    certificate = prove_onnx(original, folded, report)
    assert certificate.holds, certificate.summary()
    name = node(folded, linear).inputs[1].name
    assert name is not None
    w = initializer(folded, name)
    flat = w.reshape(-1)
    i = int(np.random.default_rng(seed).integers(flat.size))
    assume(flat[i] != 0)
    for _ in range(4):
        flat[i] = np.nextafter(flat[i], np.float32(np.inf) * np.sign(flat[i]))
    broken = prove_onnx(original, with_initializer(folded, name, w), report)
    assert not broken.holds, broken.summary()


@st.composite
def conv_bn(draw: st.DrawFn) -> tuple[onnx.ModelProto, int]:
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 4]))
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    pads = [draw(st.integers(0, k - 1)) for k in kernel * 2]
    dynamic = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    c_in, c_out = 4, 2 * groups
    w = rng.normal(size=(c_out, c_in // groups, *kernel)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["input", "w"], ["c"], name="conv", group=groups, strides=strides,
            dilations=dilations, pads=pads,
        ),
        bn_node("bn", "c", "output"),
    ]  # fmt: skip
    spatial: list[int | str] = [f"S{i}" for i in range(rank)] if dynamic else [6] * rank
    shape: list[int | str] = ["N" if dynamic else 1, c_in, *spatial]
    return _model(nodes, [init("w", w), *bn_params("bn", c_out)], shape), seed


@SETTINGS
@given(conv_bn())
def test_conv_bn_fold_is_proven_and_a_moved_weight_is_not(
    case: tuple[onnx.ModelProto, int],
) -> None:
    model, seed = case
    _proven_then_broken(model, "conv", seed)


@st.composite
def convtranspose_bn(draw: st.DrawFn) -> tuple[onnx.ModelProto, int]:
    groups = draw(st.sampled_from([1, 2]))
    kernel = [draw(st.integers(1, 3)) for _ in range(2)]
    strides = [draw(st.integers(1, 3)) for _ in range(2)]
    out_pad = [draw(st.integers(0, s - 1)) for s in strides]
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    c_in, c_out = 2 * groups, 3 * groups
    w = rng.normal(size=(c_in, c_out // groups, *kernel)).astype(np.float32)
    nodes = [
        helper.make_node(
            "ConvTranspose", ["input", "w"], ["c"], name="deconv", group=groups, strides=strides,
            output_padding=out_pad,
        ),
        bn_node("bn", "c", "output"),
    ]  # fmt: skip
    return _model(nodes, [init("w", w), *bn_params("bn", c_out)], [1, c_in, 4, 5]), seed


@SETTINGS
@given(convtranspose_bn())
def test_convtranspose_bn_fold_is_proven_and_a_moved_weight_is_not(
    case: tuple[onnx.ModelProto, int],
) -> None:
    model, seed = case
    _proven_then_broken(model, "deconv", seed)


@SETTINGS
@given(
    trans_b=st.booleans(),
    alpha=st.floats(0.25, 2),
    beta=st.floats(0.25, 2),
    with_c=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_bn_fold_is_proven_and_a_moved_weight_is_not(
    trans_b: bool, alpha: float, beta: float, with_c: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [init("b", b), *bn_params("bn", 6)]
    ins = ["input", "b"]
    if with_c:
        inits.append(init("c", rng.normal(size=6).astype(np.float32)))
        ins.append("c")
    nodes = [
        helper.make_node(
            "Gemm", ins, ["g"], name="gemm", transB=int(trans_b), alpha=alpha, beta=beta
        ),
        bn_node("bn", "g", "output"),
    ]
    _proven_then_broken(_model(nodes, inits, ["N", 5]), "gemm", seed)


@pytest.mark.parametrize("linear", ["conv1x1", "conv_unpadded", "gemm"])
def test_bn_folded_before_a_linear_op_is_proven(linear: str) -> None:
    """Relu -> BN -> linear: the BN folds into the op after it (pre-activation nets)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"), bn_node("bn", "r", "n")]
    inits = list(bn_params("bn", 4))
    if linear == "gemm":
        nodes += [
            helper.make_node("Flatten", ["n"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w"], ["output"], name="lin", transB=1),
        ]
        inits.append(init("w", rng.normal(size=(3, 4 * 2 * 2)).astype(np.float32)))
    else:
        kernel = 1 if linear == "conv1x1" else 3
        nodes.append(helper.make_node("Conv", ["n", "w"], ["output"], name="lin"))
        inits.append(init("w", rng.normal(size=(3, 4, kernel, kernel)).astype(np.float32)))
    model = _model(nodes, inits, [1, 4, 2, 2] if linear == "gemm" else ["N", 4, "H", "W"])
    folded, report = fold(model)
    assert [f.linear for f in report.folded] == ["lin"], report.summary()
    certificate = prove_onnx(model, folded, report)
    assert certificate.holds, certificate.summary()
    assert "bn" in certificate.sites[0].original_nodes


def test_matmul_folded_into_gemm_is_proven() -> None:
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["m"], name="mm"),
        bn_node("bn", "m", "output"),
    ]
    inits = [init("w", rng.normal(size=(5, 4)).astype(np.float32)), *bn_params("bn", 4)]
    model = _model(nodes, inits, ["N", 5])
    folded, report = fold(model)
    assert node(folded, "mm").op_type == "Gemm"
    assert prove_onnx(model, folded, report).holds


def test_fp16_fold_is_proven_in_fp16_ulps() -> None:
    rng = np.random.default_rng(8)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "output"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT16, None)],
        initializer=[init("w", w), *bn_params("bn", 4, np.float16)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded, report = fold(model)
    certificate = prove_onnx(model, folded, report)
    assert certificate.holds, certificate.summary()
    assert 0 < certificate.worst_ulp <= 1
    w2 = initializer(folded, "w")
    away = np.float16(np.inf) * np.sign(w2[0, 0, 0, 0])
    for _ in range(2):
        w2[0, 0, 0, 0] = np.nextafter(w2[0, 0, 0, 0], away)
    assert not prove_onnx(as_ir(model), with_initializer(folded, "w", w2), report).holds
