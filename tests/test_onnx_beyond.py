"""Folds no other tool makes: BN before a linear op, shape ops in between, chains,
parameters computed by constant subexpressions, and low-precision models."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import bnfold
from bnfold import Code
from tests.builders import RNG, bn_node, bn_params, init, model, op_types, run
from tests.test_onnx_front import fold_and_check, to_proto

F32 = np.float32


def weight(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(F32)


def relu_bn_conv(pads: list[int], **bn: np.ndarray) -> onnx.ModelProto:
    """input -> Relu -> bn -> conv(pads) -> output: a pre-activation block."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Conv", ["b", "w"], ["output"], name="conv", pads=pads),
    ]
    inits = [init("w", weight(5, 4, 3, 3)), *bn_params("bn", 4, **bn)]
    return model(nodes, inits, [("input", [1, 4, 7, 7])], ["output"])


def test_bn_before_unpadded_conv_folds_into_it() -> None:
    result = fold_and_check(relu_bn_conv(pads=[0, 0, 0, 0]))
    assert [(f.site, f.pattern) for f in result.report.folded] == [
        ("bn -> conv", "BatchNormalization+Conv")
    ]
    assert op_types(to_proto(result.model)) == ["Relu", "Conv"]


def test_bn_before_zero_padded_conv_is_refused() -> None:
    result = bnfold.fold(relu_bn_conv(pads=[1, 1, 1, 1]))
    assert result.report.codes == [Code.ZERO_PADDING]
    assert "nonlinearity" in result.report.refused[0].detail


def test_bn_with_zero_shift_folds_even_before_a_padded_conv() -> None:
    # shift = beta - mean * scale = 0 when beta = mean = 0.
    m = relu_bn_conv(pads=[1, 1, 1, 1], bias=np.zeros(4), mean=np.zeros(4))
    assert len(fold_and_check(m).report.folded) == 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm_with_alpha_and_beta_folds(trans_b: int) -> None:
    b = weight(6, 4) if trans_b else weight(4, 6)
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node(
            "Gemm", ["b", "B", "C"], ["output"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3
        ),
    ]
    inits = [init("B", b), init("C", weight(6)), *bn_params("bn", 4)]
    result = fold_and_check(model(nodes, inits, [("input", [3, 4])], ["output"]))
    assert op_types(to_proto(result.model)) == ["Relu", "Gemm"]


def test_bn_before_matmul_becomes_gemm() -> None:
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("MatMul", ["b", "W"], ["output"], name="mm"),
    ]
    m = model(
        nodes, [init("W", weight(4, 6)), *bn_params("bn", 4)], [("input", [3, 4])], ["output"]
    )
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["Relu", "Gemm"]


def test_bn_before_flatten_then_gemm_scales_contiguous_feature_blocks() -> None:
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Flatten", ["b"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "B"], ["output"], name="fc", transB=1),
    ]
    inits = [init("B", weight(5, 3 * 2 * 2)), *bn_params("bn", 3)]
    result = fold_and_check(model(nodes, inits, [("input", [2, 3, 2, 2])], ["output"]))
    assert [f.pattern for f in result.report.folded] == ["BatchNormalization+Flatten+Gemm"]


def bn_reshape_matmul(target: list[int], batch: int | None) -> onnx.ModelProto:
    """Relu -> BN -> Reshape(target) -> MatMul on a (batch?, 4, 2, 2) input, the
    Reshape's output annotated (batch?, 16): an unknown batch dim proves nothing."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Reshape", ["b", "target"], ["f"], name="reshape"),
        helper.make_node("MatMul", ["f", "W"], ["output"], name="fc"),
    ]
    inits = [init("target", np.array(target, np.int64)), init("W", weight(16, 5))]
    inits += bn_params("bn", 4)
    dims = [batch if batch is not None else "", 4, 2, 2]
    m = model(nodes, inits, [("input", dims)], ["output"], output_shapes=[[batch or "", 5]])
    for name, shape in (("b", [batch, 4, 2, 2]), ("f", [batch, 16])):
        info = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
        m.graph.value_info.append(info)
    return m


def test_reshape_with_unknown_batch_dims_is_not_taken_for_a_flatten() -> None:
    """Reshape(x, [-1, 16]) of an (?, 4, 2, 2) input annotated (?, 16): the two unknown
    batch dims compare equal in onnx_ir, but -1 may merge batch and channels. Folding
    the BN over the 16 features as blocks of 4 would then be wrong (it was)."""
    result = bnfold.fold(bn_reshape_matmul([-1, 16], batch=None))
    assert [r.code for r in result.report.refused] == [Code.NOT_PER_CHANNEL]
    assert not result.report.folded


@pytest.mark.parametrize(("target", "batch"), [([0, -1], None), ([-1, 16], 2)])
def test_reshape_that_provably_keeps_the_batch_folds_like_a_flatten(target, batch) -> None:
    """A constant [0, -1] copies the batch dim; a known batch dim on both sides shows it."""
    result = fold_and_check(bn_reshape_matmul(target, batch))
    assert [f.pattern for f in result.report.folded] == ["BatchNormalization+Reshape+MatMul"]


def conv_then(
    shape_nodes: list[onnx.NodeProto], inits: list, bn_channels: int = 4
) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        *shape_nodes,
        bn_node("bn", "s", "output"),
    ]
    inits = [init("w", weight(4, 3, 1, 1)), *inits, *bn_params("bn", bn_channels)]
    return model(nodes, inits, [("input", [2, 3, 3, 5])], ["output"])


def test_bn_after_reshape_that_keeps_channels_folds_through_it() -> None:
    reshape = helper.make_node("Reshape", ["c", "shape"], ["s"], name="reshape")
    m = conv_then([reshape], [init("shape", np.array([2, 4, 15]))])
    result = fold_and_check(m)
    assert [f.pattern for f in result.report.folded] == ["Conv+Reshape+BatchNormalization"]
    assert op_types(to_proto(result.model)) == ["Conv", "Reshape"]


def test_bn_after_flatten_that_mixes_channels_is_refused() -> None:
    flatten = helper.make_node("Flatten", ["c"], ["s"], name="flatten")
    result = bnfold.fold(conv_then([flatten], [], bn_channels=60))
    assert result.report.codes == [Code.NOT_PER_CHANNEL]


def test_bn_after_matmul_transposed_to_channels_first_folds() -> None:
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["y"], name="mm"),
        helper.make_node("Transpose", ["y"], ["t"], name="to_nct", perm=[0, 2, 1]),
        bn_node("bn", "t", "output"),
    ]
    m = model(
        nodes, [init("W", weight(8, 6)), *bn_params("bn", 6)], [("input", [2, 5, 8])], ["output"]
    )
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["MatMul", "Add", "Transpose"] or op_types(
        to_proto(result.model)
    ) == ["MatMul", "Transpose"]


def test_bn_conv_bn_chain_folds_both_sides() -> None:
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn0", "r", "b0"),
        helper.make_node("Conv", ["b0", "w"], ["c"], name="conv"),
        bn_node("bn1", "c", "output"),
    ]
    inits = [init("w", weight(5, 4, 1, 1)), *bn_params("bn0", 4), *bn_params("bn1", 5)]
    result = fold_and_check(model(nodes, inits, [("input", [1, 4, 3, 3])], ["output"]))
    assert op_types(to_proto(result.model)) == ["Relu", "Conv"]
    assert len(result.report.folded) == 2


def test_conv_bn_bn_chain_folds_to_one_conv() -> None:
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("bn1", "c", "b1"),
        bn_node("bn2", "b1", "output"),
    ]
    inits = [init("w", weight(4, 3, 1, 1)), *bn_params("bn1", 4), *bn_params("bn2", 4)]
    result = fold_and_check(model(nodes, inits, [("input", [1, 3, 3, 3])], ["output"]))
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_gemm_mul_add_mul_chain_folds_to_one_gemm() -> None:
    nodes = [
        helper.make_node("Gemm", ["input", "B", "C"], ["g"], name="gemm"),
        helper.make_node("Mul", ["g", "s1"], ["m1"], name="mul1"),
        helper.make_node("Add", ["t1", "m1"], ["a1"], name="add1"),
        helper.make_node("Mul", ["a1", "s2"], ["output"], name="mul2"),
    ]
    inits = [
        init("B", weight(4, 6)),
        init("C", weight(6)),
        init("s1", weight(6)),
        init("t1", weight(1, 6)),
        init("s2", np.array(0.5, dtype=F32)),
    ]
    result = fold_and_check(model(nodes, inits, [("input", [3, 4])], ["output"]))
    assert op_types(to_proto(result.model)) == ["Gemm"]


def test_params_from_constant_subexpressions_fold_and_are_removed() -> None:
    """Conv bias as Expand(CastLike(Constant)), BN scale from ConstantOfShape."""
    nodes = [
        helper.make_node("Constant", [], ["zero"], name="zero", value=init("z", np.array([0.0]))),
        helper.make_node("CastLike", ["zero", "w"], ["zero32"], name="castlike"),
        helper.make_node("Expand", ["zero32", "bias_shape"], ["bias"], name="expand"),
        helper.make_node(
            "ConstantOfShape",
            ["bias_shape"],
            ["bn.scale"],
            name="ones",
            value=init("v", np.array([1.5], dtype=F32)),
        ),
        helper.make_node("Conv", ["input", "w", "bias"], ["c"], name="conv"),
        bn_node("bn", "c", "output"),
    ]
    params = [p for p in bn_params("bn", 4) if p.name != "bn.scale"]
    inits = [init("w", weight(4, 3, 1, 1)), init("bias_shape", np.array([4])), *params]
    result = fold_and_check(model(nodes, inits, [("input", [1, 3, 3, 3])], ["output"]))
    assert op_types(to_proto(result.model)) == ["Conv"]
    assert set(result.model.graph.initializers) == {"w", "bias"}


def test_fp16_fold_is_more_accurate_than_a_fold_in_fp16() -> None:
    """Computing in float64 and casting once beats folding in the model's dtype."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float16)
    gamma, beta = rng.uniform(0.5, 1.5, 16), rng.normal(0, 0.5, 16)
    mean, var = rng.normal(0, 0.5, 16), rng.uniform(1e-4, 1e-2, 16)  # tiny var: large scale
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "output"),
    ]
    params = {"scale": gamma, "bias": beta, "mean": mean, "var": var}
    inits = [init("w", w), *bn_params("bn", 16, np.float16, **params)]
    m = model(nodes, inits, [("input", [1, 8, 5, 5])], ["output"], dtype=onnx.TensorProto.FLOAT16)
    folded = bnfold.fold(m).model.graph.initializers["w"].const_value.numpy()

    p16 = {k: v.astype(np.float16).astype(np.float64) for k, v in params.items()}
    exact = w.astype(np.float64) * (p16["scale"] / np.sqrt(p16["var"] + 1e-5))[:, None, None, None]
    s16 = params["scale"].astype(np.float16) / np.sqrt(
        params["var"].astype(np.float16) + np.float16(1e-5)
    )
    in_fp16 = w * s16[:, None, None, None]

    def rel_error(approx: np.ndarray) -> float:
        return float((np.abs(approx.astype(np.float64) - exact) / np.abs(exact)).max())

    assert folded.dtype == np.float16
    # Cast once means correctly rounded: within half an fp16 ulp (2**-11) of the exact fold.
    assert rel_error(folded) <= 2.0**-11
    assert rel_error(folded) < rel_error(in_fp16)


def test_bf16_weights_fold_in_float64_and_stay_bf16() -> None:
    bf16 = ml_dtypes.bfloat16
    w = RNG.normal(size=(4, 3, 1, 1)).astype(bf16)
    m = ir.serde.deserialize_model(model([], [], [], [], opset=17))
    graph = m.graph
    x = ir.Value(
        name="input", type=ir.TensorType(ir.DataType.BFLOAT16), shape=ir.Shape([1, 3, 2, 2])
    )
    graph.inputs.append(x)

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    conv = ir.Node("", "Conv", [x, const("w", w)], name="conv")
    stats = [const(f"bn.{k}", RNG.uniform(0.5, 1.5, 4).astype(bf16)) for k in ("s", "b", "m", "v")]
    bn = ir.Node("", "BatchNormalization", [conv.outputs[0], *stats], name="bn")
    graph.extend([conv, bn])
    graph.outputs.append(bn.outputs[0])
    s, _, _, v = (a.const_value.numpy().astype(np.float64) for a in stats)
    exact = w.astype(np.float64) * (s / np.sqrt(v + 1e-5))[:, None, None, None]
    result = bnfold.fold(m)
    folded = result.model.graph.initializers["w"].const_value.numpy()
    assert folded.dtype == bf16
    np.testing.assert_array_equal(folded, exact.astype(bf16))


def test_standalone_bn_is_reported_and_untouched() -> None:
    m = model(
        [bn_node("bn", "input", "output")],
        bn_params("bn", 3),
        [("input", [1, 3, 2, 2])],
        ["output"],
    )
    result = bnfold.fold(m)
    assert result.report.codes == [Code.STANDALONE]
    assert op_types(to_proto(result.model)) == ["BatchNormalization"]
    feeds = {"input": RNG.normal(size=(1, 3, 2, 2)).astype(F32)}
    np.testing.assert_array_equal(run(m, feeds)[0], run(to_proto(result.model), feeds)[0])


def test_fold_inside_loop_body_with_outer_scope_weight() -> None:
    """Loop of 2 iterations: state = bn(conv(state, w_outer)); w and BN stats from outside."""
    tensor = onnx.TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("Conv", ["state_in", "w"], ["c"], name="body_conv", pads=[1, 1, 1, 1]),
            bn_node("body_bn", "c", "state_out"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", tensor, [1, 4, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", tensor, [1, 4, 5, 5]),
        ],
    )
    loop = helper.make_node("Loop", ["trips", "cond", "input"], ["output"], name="loop", body=body)
    inits = [
        init("trips", np.array(2, dtype=np.int64)),
        init("cond", np.array(True)),
        init("w", weight(4, 4, 3, 3) * F32(0.3)),
        *bn_params("body_bn", 4),
    ]
    m = model([loop], inits, [("input", [1, 4, 5, 5])], ["output"], output_shapes=[[1, 4, 5, 5]])
    onnx.checker.check_model(m, full_check=True)
    result = fold_and_check(m)
    assert [f.site for f in result.report.folded] == ["body_conv -> body_bn"]
    assert "BatchNormalization" not in result.report.ops_after


def test_fold_inside_scan_body_with_outer_scope_weight() -> None:
    """Scan over axis 0 of [2, 1, 3, 5, 5]: each step is conv(outer w) -> bn on one slice."""
    tensor = onnx.TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["state_in"], ["state_out"], name="carry"),
            helper.make_node("Conv", ["step_in", "w"], ["c"], name="scan_conv", pads=[1, 1, 1, 1]),
            bn_node("scan_bn", "c", "step_out"),
        ],
        "body",
        [
            helper.make_tensor_value_info("state_in", tensor, [1]),
            helper.make_tensor_value_info("step_in", tensor, [1, 3, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("state_out", tensor, [1]),
            helper.make_tensor_value_info("step_out", tensor, [1, 4, 5, 5]),
        ],
    )
    scan = helper.make_node(
        "Scan", ["state", "input"], ["final_state", "output"], name="scan", body=body,
        num_scan_inputs=1,
    )  # fmt: skip
    inits = [
        init("state", np.zeros(1, dtype=F32)),
        init("w", weight(4, 3, 3, 3)),
        *bn_params("scan_bn", 4),
    ]
    m = model(
        [scan], inits, [("input", [2, 1, 3, 5, 5])], ["final_state", "output"],
        output_shapes=[[1], [2, 1, 4, 5, 5]],
    )  # fmt: skip
    onnx.checker.check_model(m, full_check=True)
    result = fold_and_check(m)
    assert [f.site for f in result.report.folded] == ["scan_conv -> scan_bn"]
    assert "BatchNormalization" not in result.report.ops_after


def gemm_then_reshape(
    target: list[int], bn_channels: int, shapes: bool, batch: int | str = 2
) -> onnx.ModelProto:
    """Gemm (N, 12) -> Reshape(target) -> BN, as a DCGAN generator's first layer."""
    nodes = [
        helper.make_node("Gemm", ["input", "B", "C"], ["y"], name="fc", transB=1),
        helper.make_node("Reshape", ["y", "shape"], ["s"], name="reshape"),
        bn_node("bn", "s", "output"),
    ]
    inits = [init("B", weight(12, 5)), init("C", weight(12)), init("shape", np.array(target))]
    m = model(nodes, [*inits, *bn_params("bn", bn_channels)], [("input", [batch, 5])], ["output"])
    if not shapes:  # as torch's exporter leaves them: no shapes on intermediate values
        m.graph.ClearField("value_info")
    return m


@pytest.mark.parametrize("shapes", [True, False], ids=["inferred_shapes", "no_shapes"])
@pytest.mark.parametrize(
    ("target", "bn_channels"),
    [([-1, 3, 2, 2], 3), ([0, 3, -1], 3), ([0, 12, 1], 12)],
    ids=["minus1_c_h_w", "copy_batch_infer_rest", "unsqueeze_like"],
)
def test_bn_after_a_reshape_of_gemm_features_into_channels_folds(target, bn_channels, shapes):
    result = fold_and_check(gemm_then_reshape(target, bn_channels, shapes))
    assert [f.pattern for f in result.report.folded] == ["Gemm+Reshape+BatchNormalization"]
    assert op_types(to_proto(result.model)) == ["Gemm", "Reshape"]


def test_a_reshape_to_the_static_batch_of_a_static_model_folds():
    # torch's dynamo exporter writes Reshape(x, [2, C, 2, 2]) for a batch-2 export.
    result = fold_and_check(gemm_then_reshape([2, 3, 2, 2], 3, shapes=True))
    assert [f.pattern for f in result.report.folded] == ["Gemm+Reshape+BatchNormalization"]


@pytest.mark.parametrize("shapes", [True, False], ids=["inferred_shapes", "no_shapes"])
def test_a_reshape_that_could_move_samples_is_refused(shapes):
    # A dynamic batch reshaped to an explicit 2: for N != 2 samples would be regrouped.
    result = bnfold.fold(gemm_then_reshape([2, 3, 2, 2], 3, shapes, batch="N"))
    assert result.report.codes == [Code.NOT_PER_CHANNEL] and not result.report.folded


def test_bn_after_a_reshape_that_groups_conv_channels_folds() -> None:
    # Conv (N, 4, 3, 5) viewed as (N, 2, 30): BN channel c is conv channels 2c and 2c+1.
    reshape = helper.make_node("Reshape", ["c", "shape"], ["s"], name="reshape")
    result = fold_and_check(conv_then([reshape], [init("shape", np.array([0, 2, 30]))], 2))
    assert [f.pattern for f in result.report.folded] == ["Conv+Reshape+BatchNormalization"]


def test_bn_after_a_reshape_that_splits_conv_channels_is_refused() -> None:
    # (N, 4, 3, 5) as (N, 12, 5): each conv channel spans three BN channels.
    reshape = helper.make_node("Reshape", ["c", "shape"], ["s"], name="reshape")
    result = bnfold.fold(conv_then([reshape], [init("shape", np.array([0, 12, 5]))], 12))
    assert result.report.codes == [Code.NOT_PER_CHANNEL]
