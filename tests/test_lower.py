"""lower_standalone: every inference BatchNorm that cannot fold becomes plain ops, verified,
and the report counts each BN found, folded, lowered and left."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import helper

import bnfold
from bnfold import Code, FoldOptions, LowerForm
from bnfold.api import fold_file
from bnfold.cli.main import main
from bnfold.onnx_front import lower
from bnfold.onnx_front.match import DEFAULT_BN_EPSILON
from tests.builders import RNG, bn_node, bn_params, init, model
from tests.test_onnx_front import SAMPLES, assert_same_function, to_proto

F32 = np.float32
FORMS = [LowerForm.MUL_ADD, LowerForm.CONV]


def all_nodes(m: ir.Model) -> list[ir.Node]:
    return list(ir.traversal.RecursiveGraphIterator(m.graph))


def op_types(m: ir.Model) -> list[str]:
    return [n.op_type for n in all_nodes(m)]


def lower_and_check(
    m: onnx.ModelProto, form: LowerForm = LowerForm.MUL_ADD, rtol: float = 1e-5
) -> bnfold.FoldResult:
    """Fold with lowering; the result is a valid model computing the same function."""
    result = bnfold.fold(m, verify=True, lower_standalone=form)
    out = to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    assert_same_function(m, out, rtol)
    assert result.verification is not None and result.verification.passed
    return result


def relu_bn_relu(
    shape: tuple[int, ...] = (2, 4, 5, 5), dtype: type = F32, opset: int = 17
) -> onnx.ModelProto:
    """input -> Relu -> bn -> Relu -> output: a BN with nothing linear next to it."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu_in"),
        bn_node("bn", "r", "b"),
        helper.make_node("Relu", ["b"], ["output"], name="relu_out"),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model(
        nodes, bn_params("bn", shape[1], dtype), [("input", shape)], ["output"],
        dtype=elem, opset=opset,
    )  # fmt: skip


def expected_affine(m: onnx.ModelProto, prefix: str = "bn") -> tuple[np.ndarray, np.ndarray]:
    """The BN's scale and shift computed here in float64, independently of bnfold."""
    p = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}
    scale = p[f"{prefix}.scale"] / np.sqrt(p[f"{prefix}.var"] + DEFAULT_BN_EPSILON)
    return scale, p[f"{prefix}.bias"] - p[f"{prefix}.mean"] * scale


def constant(m: ir.Model, name: str) -> np.ndarray:
    return m.graph.initializers[name].const_value.numpy()


# --- the lowering itself -------------------------------------------------------------


def test_relu_bn_relu_becomes_mul_add_with_names_kept() -> None:
    m = relu_bn_relu()
    result = lower_and_check(m)
    graph = result.model.graph
    assert [n.op_type for n in graph] == ["Relu", "Mul", "Add", "Relu"]
    mul, add = list(graph)[1:3]
    assert (mul.name, add.name) == ("bn_mul", "bn")  # the Add produces the BN's output
    assert add.outputs[0].name == "b"
    assert [(lo.site, lo.form, lo.code) for lo in result.report.lowered] == [
        ("bn", LowerForm.MUL_ADD, Code.NONLINEAR_INPUT)
    ]
    assert result.report.refused == []
    assert not any(name.startswith("bn.") for name in graph.initializers)  # BN params dropped


def test_lowered_constants_are_the_float64_affine_cast_once() -> None:
    m = relu_bn_relu()
    result = bnfold.fold(m, lower_standalone=True)
    scale, shift = expected_affine(m)
    np.testing.assert_array_equal(
        constant(result.model, "bn_scale"), scale.astype(F32)[:, None, None]
    )
    np.testing.assert_array_equal(
        constant(result.model, "bn_shift"), shift.astype(F32)[:, None, None]
    )


def test_conv_form_is_a_1x1_depthwise_conv_under_the_bn_name() -> None:
    m = relu_bn_relu()
    result = lower_and_check(m, LowerForm.CONV)
    conv = next(n for n in result.model.graph if n.op_type == "Conv")
    assert conv.name == "bn" and conv.outputs[0].name == "b"
    assert conv.attributes.get_int("group") == 4
    assert list(conv.attributes.get_ints("kernel_shape")) == [1, 1]
    scale, shift = expected_affine(m)
    np.testing.assert_array_equal(
        constant(result.model, "bn_scale"), scale.astype(F32).reshape(4, 1, 1, 1)
    )
    np.testing.assert_array_equal(constant(result.model, "bn_shift"), shift.astype(F32))
    assert result.report.lowered[0].note == ""


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 7), (1, 4, 3, 5), (1, 4, 2, 3, 3)])
def test_every_rank_lowers_exactly(form: LowerForm, shape: tuple[int, ...]) -> None:
    result = lower_and_check(relu_bn_relu(shape), form)
    assert "BatchNormalization" not in op_types(result.model)


def test_conv_form_on_rank_2_input_falls_back_to_mul_add_and_says_why() -> None:
    result = lower_and_check(relu_bn_relu((3, 4)), LowerForm.CONV)
    lowered = result.report.lowered[0]
    assert lowered.form is LowerForm.MUL_ADD
    assert "no spatial axis" in lowered.note
    assert "Conv" not in op_types(result.model)


@pytest.mark.parametrize("form", FORMS)
def test_bn_on_a_graph_input_is_lowered(form: LowerForm) -> None:
    m = onnx.load(SAMPLES / "neg_standalone_bn.onnx")
    result = lower_and_check(m, form)
    assert result.report.lowered[0].code is Code.STANDALONE
    assert "BatchNormalization" not in op_types(result.model)


@pytest.mark.parametrize("form", FORMS)
def test_bn_after_a_branching_conv_is_lowered_and_the_conv_kept(form: LowerForm) -> None:
    m = onnx.load(SAMPLES / "neg_branching.onnx")
    result = lower_and_check(m, form)
    assert result.report.lowered[0].code is Code.BRANCHING
    conv = next(n for n in result.model.graph if n.name == "conv1")
    original = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    np.testing.assert_array_equal(conv.inputs[1].const_value.numpy(), original[conv.inputs[1].name])


def test_bn_before_a_zero_padded_conv_is_lowered() -> None:
    """Relu -> BN -> Conv(pads=1) refuses to fold before (zero_padding): lowering takes it."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        bn_node("bn", "r", "b"),
        helper.make_node("Conv", ["b", "w"], ["output"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [init("w", RNG.normal(size=(5, 4, 3, 3)).astype(F32)), *bn_params("bn", 4)]
    result = lower_and_check(model(nodes, inits, [("input", [1, 4, 6, 6])], ["output"]))
    assert [lo.code for lo in result.report.lowered] == [Code.ZERO_PADDING]


def test_bn_refused_for_a_shared_weight_is_lowered() -> None:
    m = onnx.load(SAMPLES / "neg_shared_weight.onnx")
    result = bnfold.fold(m, verify=True, clone_shared=False, lower_standalone=True)
    assert [lo.code for lo in result.report.lowered] == [Code.SHARED_WEIGHT] * 2
    assert result.verification is not None and result.verification.passed


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*.onnx"))
)
def test_no_sample_model_keeps_an_inference_bn(path: str) -> None:
    result = bnfold.fold(SAMPLES / path, verify=True, lower_standalone=True)
    counts = result.report.batchnorm
    assert counts.left == 0 and counts.found == counts.folded + counts.lowered
    assert op_types(result.model).count("BatchNormalization") == counts.training
    # A model the run left unchanged has no fold to verify (issue 23).
    assert result.verification.passed if result.modified else result.verification is None


def test_ir3_lists_the_new_constants_as_graph_inputs() -> None:
    """IR < 4 wants every main-graph initializer listed as a graph input too."""
    m = relu_bn_relu(opset=7)
    m.ir_version = 3
    for tensor in m.graph.initializer:
        m.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
    result = lower_and_check(m)
    inputs = {v.name for v in result.model.graph.inputs}
    assert {"bn_scale", "bn_shift"} <= inputs
    assert "bn.scale" in inputs  # the input interface does not shrink


def test_foldable_bns_still_fold_and_only_the_rest_is_lowered() -> None:
    result = lower_and_check(onnx.load(SAMPLES / "resnet_tiny.onnx"))
    assert len(result.report.folded) == 6 and result.report.lowered == []


def if_body_bn_model() -> onnx.ModelProto:
    """If(cond) { Relu(input) -> inner_bn } else { Relu(input) }: a standalone BN in a body."""
    then_graph = helper.make_graph(
        [
            helper.make_node("Relu", ["input"], ["r"], name="inner_relu"),
            bn_node("inner_bn", "r", "then_out"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
        initializer=bn_params("inner_bn", 4),
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["else_out"], name="else_relu")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
    )
    if_node = helper.make_node(
        "If", ["cond"], ["output"], name="if", then_branch=then_graph, else_branch=else_graph
    )
    return model([if_node], [init("cond", np.array(True))], [("input", [1, 4, 3, 3])], ["output"])


@pytest.mark.parametrize("form", FORMS)
def test_bn_inside_an_if_body_is_lowered_there(form: LowerForm) -> None:
    result = lower_and_check(if_body_bn_model(), form)
    body = next(n for n in result.model.graph if n.op_type == "If").attributes["then_branch"].value
    assert "BatchNormalization" not in [n.op_type for n in body]
    assert {"inner_bn_scale", "inner_bn_shift"} <= set(body.initializers)
    assert body.outputs[0].name == "then_out"
    assert result.report.batchnorm.lowered == 1


def test_bn_inside_a_loop_body_is_lowered_there() -> None:
    """Loop(2) { x = BN(Relu(x)) }: the BN reads a loop-carried value."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
            helper.make_node("Relu", ["x_in"], ["r"], name="body_relu"),
            bn_node("body_bn", "r", "x_out"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", onnx.TensorProto.FLOAT, [1, 4, 3, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, [1, 4, 3, 3]),
        ],
        initializer=bn_params("body_bn", 4),
    )
    loop = helper.make_node("Loop", ["trips", "cond", "input"], ["output"], name="loop", body=body)
    inits = [init("trips", np.array(2, np.int64)), init("cond", np.array(True))]
    m = model([loop], inits, [("input", [1, 4, 3, 3])], ["output"], output_shapes=[[1, 4, 3, 3]])
    result = lower_and_check(m)
    assert "BatchNormalization" not in op_types(result.model)
    assert [lo.site for lo in result.report.lowered] == ["body_bn"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtype_is_kept(form: LowerForm, dtype: type) -> None:
    m = relu_bn_relu(dtype=dtype)
    result = lower_and_check(m, form, rtol=1e-2 if dtype == np.float16 else 1e-12)
    for name in ("bn_scale", "bn_shift"):
        assert constant(result.model, name).dtype == dtype
    conv_kept = form is LowerForm.CONV and dtype == np.float16
    assert (result.report.lowered[0].form is LowerForm.CONV) == conv_kept
    scale, _ = expected_affine(m)
    np.testing.assert_array_equal(
        constant(result.model, "bn_scale").reshape(-1), scale.astype(dtype)
    )


def test_fp16_input_with_fp32_statistics_lowers_to_fp16_constants() -> None:
    """Opset 15 lets the statistics differ in type from x; the Mul must match x."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu_in"),
        bn_node("bn", "r", "b"),
        helper.make_node("Relu", ["b"], ["output"], name="relu_out"),
    ]
    m = model(
        nodes, bn_params("bn", 4, F32), [("input", [2, 4, 3, 3])], ["output"],
        dtype=onnx.TensorProto.FLOAT16, opset=15,
    )  # fmt: skip
    del m.graph.value_info[:]
    result = lower_and_check(m, rtol=1e-2)
    assert constant(result.model, "bn_scale").dtype == np.float16


@pytest.mark.parametrize("form", FORMS)
def test_bf16_is_kept_and_conv_below_opset_22_falls_back(form: LowerForm) -> None:
    m = relu_bn_relu(dtype=ml_dtypes.bfloat16)
    result = bnfold.fold(m, lower_standalone=form)
    assert constant(result.model, "bn_scale").dtype == ml_dtypes.bfloat16
    lowered = result.report.lowered[0]
    assert lowered.form is LowerForm.MUL_ADD
    assert ("bfloat16 at opset 17" in lowered.note) == (form is LowerForm.CONV)


def test_unknown_rank_is_refused_and_the_bn_left() -> None:
    graph = helper.make_graph(
        [bn_node("bn", "input", "output")],
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)],
        initializer=bn_params("bn", 4),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold(m, lower_standalone=True)
    assert op_types(result.model) == ["BatchNormalization"]
    assert result.report.lowered == []
    (refusal,) = result.report.refused
    assert refusal.code is Code.UNKNOWN_RANK
    assert "standalone" not in refusal.detail and "not a linear op" in refusal.detail
    assert result.report.batchnorm.left_by_code == {"unknown_rank": 1}


def test_rank_known_only_from_the_producer_is_enough() -> None:
    """An unannotated Relu output still has its input's rank."""
    m = relu_bn_relu()
    del m.graph.value_info[:]
    assert lower_and_check(m).report.lowered[0].site == "bn"


def unannotated(nodes: list, inits: list, c: int) -> onnx.ModelProto:
    m = model(nodes, inits + bn_params("bn", c), [("input", [1, 4, 5, 5])], ["output"])
    del m.graph.value_info[:]  # as exporters often leave it: no intermediate shapes
    return m


def test_rank_is_read_through_a_difference_of_convs() -> None:
    """Sub(conv_a(x), conv_b(Relu(x))) -> BN: the convs' weights give the rank. (A BN
    after an Add of convs folds into both; a Sub of convs of two inputs keeps this BN
    for the lowering.)"""
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b"),
        helper.make_node("Sub", ["a", "b"], ["s"], name="sub"),
        bn_node("bn", "s", "output"),
    ]
    inits = [
        init("wa", RNG.normal(size=(4, 4, 3, 3)).astype(F32)),
        init("wb", RNG.normal(size=(4, 4, 1, 1)).astype(F32)),
    ]
    result = lower_and_check(unannotated(nodes, inits, 4))
    assert [lo.code for lo in result.report.lowered] == [Code.STANDALONE]


def test_rank_is_read_through_a_constant_node() -> None:
    """Relu(Add(conv(x), Constant)) -> BN, as MobileOne exports: the Constant has its own rank."""
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        helper.make_node(
            "Constant", [], ["k"], name="k", value=init("kv", np.ones((4, 1, 1), F32))
        ),
        helper.make_node("Add", ["c", "k"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        bn_node("bn", "r", "output"),
    ]
    inits = [init("w", RNG.normal(size=(4, 4, 1, 1)).astype(F32))]
    result = lower_and_check(unannotated(nodes, inits, 4))
    assert result.report.batchnorm.lowered == 1


def test_rank_is_read_through_a_concat() -> None:
    """Concat(Relu(x), MaxPool(x)) -> BN, as in a DenseNet block."""
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["input"], ["p"], name="pool", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["r", "p"], ["cat"], name="cat", axis=1),
        bn_node("bn", "cat", "output"),
    ]
    result = lower_and_check(unannotated(nodes, [], 8))
    assert result.report.batchnorm.lowered == 1


def test_training_mode_bn_is_never_touched() -> None:
    m = onnx.load(SAMPLES / "neg_training_bn.onnx")
    result = bnfold.fold(m, lower_standalone=True)
    assert result.report.lowered == [] and result.report.codes == [Code.TRAINING_MODE]
    assert op_types(result.model) == [n.op_type for n in m.graph.node]
    counts = result.report.batchnorm
    assert (counts.found, counts.training, counts.left) == (0, 1, 0)


def test_bn_with_non_constant_params_stays_with_the_reason() -> None:
    m = relu_bn_relu()
    m.graph.input.append(helper.make_tensor_value_info("bn.var", onnx.TensorProto.FLOAT, [4]))
    result = bnfold.fold(m, lower_standalone=True)  # IR 8: an input-listed initializer may change
    (refusal,) = result.report.refused
    assert refusal.code is Code.NOT_CONSTANT and "not lowered" in refusal.detail
    assert "BatchNormalization" in op_types(result.model)


# --- verification ----------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_a_wrong_lowering_fails_verification_and_nothing_is_written(
    form: LowerForm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = "_write_conv" if form is LowerForm.CONV else "_write_mul_add"
    real = getattr(lower, writer)

    def planted(bn, scale, shift, rank, m):  # type: ignore[no-untyped-def]
        real(bn, scale, shift + np.asarray(0.01, scale.dtype), rank, m)

    monkeypatch.setattr(lower, writer, planted)
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(relu_bn_relu(), source)
    result, written = fold_file(source, out, lower_standalone=form)
    assert not written and not out.exists()
    assert result.verification is not None and result.verification.status == "failed"


# --- counts ---------------------------------------------------------------------------


def mixed_model() -> onnx.ModelProto:
    """conv -> bn_a (folds), Relu -> bn_b (cannot fold), bn_t in training mode."""
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("bn_a", "c", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        bn_node("bn_b", "r", "output"),
        bn_node("bn_t", "r", "t", training_mode=1),
    ]
    inits = [init("w", RNG.normal(size=(4, 3, 1, 1)).astype(F32))]
    inits += bn_params("bn_a", 4) + bn_params("bn_b", 4) + bn_params("bn_t", 4)
    return model(nodes, inits, [("input", [2, 3, 4, 4])], ["output", "t"], opset=15)


def test_counts_without_lowering_give_each_left_bn_its_code() -> None:
    counts = bnfold.fold(mixed_model()).report.batchnorm
    assert counts == bnfold.BatchNormCount(
        found=2, folded=1, lowered=0, left=1, left_by_code={"nonlinear_input": 1}, training=1
    )


def test_counts_with_lowering_leave_no_inference_bn() -> None:
    result = bnfold.fold(mixed_model(), lower_standalone=True)
    counts = result.report.batchnorm
    assert (counts.found, counts.folded, counts.lowered, counts.left) == (2, 1, 1, 0)
    assert counts.left_by_code == {} and counts.training == 1
    assert op_types(result.model).count("BatchNormalization") == 1  # the training-mode one


def test_json_carries_the_counts_and_the_lowered_list() -> None:
    payload = json.loads(bnfold.fold(mixed_model(), lower_standalone="conv").to_json())
    report = payload["report"]
    assert report["batchnorm"] == {
        "found": 2, "folded": 1, "lowered": 1, "left": 0, "left_by_code": {}, "training": 1
    }  # fmt: skip
    assert report["lowered"] == [
        {
            "site": "bn_b",
            "form": "conv",
            "code": "nonlinear_input",
            "detail": report["lowered"][0]["detail"],
            "note": "",
        }
    ]


def test_inspect_reports_what_would_be_left() -> None:
    report = bnfold.inspect(mixed_model())
    assert report.batchnorm.left_by_code == {"nonlinear_input": 1}
    table = report.summary().splitlines()
    assert any(line.split() == ["would", "fold", "1"] for line in table)
    assert any(line.split() == ["nonlinear_input", "1"] for line in table)


@pytest.mark.parametrize("form", list(LowerForm))
def test_inspect_previews_the_lowering_fold_would_make(form: LowerForm) -> None:
    model = mixed_model()
    preview = bnfold.inspect(model, lower_standalone=form)
    done = bnfold.fold(model, lower_standalone=form, verify=False).report
    assert preview.batchnorm == done.batchnorm and preview.batchnorm.left == 0
    assert [(lo.site, lo.form) for lo in preview.lowered] == [
        (lo.site, lo.form) for lo in done.lowered
    ]
    lines = preview.summary().splitlines()
    assert any(line.split() == ["would", "lower", "1"] for line in lines)
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}  # left unchanged


def test_unknown_lower_form_is_a_user_error() -> None:
    with pytest.raises(bnfold.BnfoldError, match="mul-add, conv"):
        bnfold.fold(relu_bn_relu(), lower_standalone="depthwise")


# --- command line ---------------------------------------------------------------------


def invoke(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("flag", "op"), [("--lower-standalone", "Mul"), ("--lower-standalone=conv", "Conv")]
)
def test_cli_fold_lowers(flag: str, op: str, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("fold", SAMPLES / "neg_standalone_bn.onnx", "-o", out, flag, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["report"]["batchnorm"]["lowered"] == 1
    assert payload["verification"]["status"] == "passed"
    assert next(n.op_type for n in onnx.load(out).graph.node) == op


def test_cli_fold_prints_the_batchnorm_table(tmp_path: Path) -> None:
    result = invoke("fold", SAMPLES / "neg_branching.onnx", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert ["found", "1"] in rows and ["left", "1"] in rows and ["branching", "1"] in rows


def test_cli_inspect_prints_the_batchnorm_table() -> None:
    result = invoke("inspect", SAMPLES / "neg_standalone_bn.onnx")
    assert result.exit_code == 0, result.output
    assert ["standalone", "1"] in [line.split() for line in result.output.splitlines()]


@pytest.mark.parametrize(
    ("flag", "form"), [("--lower-standalone", "mul-add"), ("--lower-standalone=conv", "conv")]
)
def test_cli_inspect_previews_the_lowering(flag: str, form: str) -> None:
    result = invoke("inspect", SAMPLES / "neg_standalone_bn.onnx", flag, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["dry_run"] and payload["batchnorm"]["left"] == 0
    assert [lo["form"] for lo in payload["lowered"]] == [form]


def test_cli_lower_standalone_before_model_is_a_plain_flag(tmp_path: Path) -> None:
    """It used to take an optional value and read MODEL as it (issue 20)."""
    model_path, out = SAMPLES / "neg_standalone_bn.onnx", tmp_path / "o.onnx"
    result = invoke("fold", "--lower-standalone", model_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert next(n.op_type for n in onnx.load(out).graph.node) == "Mul"


@pytest.mark.parametrize("flag", ["--lower-standalone", "--lower-standalone=conv"])
def test_folder_mode_passes_the_option_to_every_model(flag: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    onnx.save(relu_bn_relu(), models / "a.onnx")
    onnx.save(onnx.load(SAMPLES / "neg_branching.onnx"), models / "sub" / "b.onnx")
    result = invoke("fold", models, "-o", tmp_path / "out", flag, "--jobs", 2, "--json")
    assert result.exit_code == 0, result.output
    outcomes = json.loads(result.output)["outcomes"]
    assert [(o["lowered"], o["bn_left"]) for o in outcomes] == [(1, 0), (1, 0)]
    form = flag.partition("=")[2] or "mul-add"
    for rel in ("a.onnx", "sub/b.onnx"):
        ops = [n.op_type for n in onnx.load(tmp_path / "out" / rel).graph.node]
        assert "BatchNormalization" not in ops
        assert ("Mul" in ops) == (form == "mul-add")


# --- torch: exported programs lower at graph level, eager modules do not -------------


def relu_bn_net(bn_type: str = "BatchNorm2d"):  # type: ignore[no-untyped-def]
    """ReLU -> BN with random statistics, in eval mode."""
    torch = pytest.importorskip("torch")
    bn = getattr(torch.nn, bn_type)(3)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.normal_(0, 0.5)
    return torch.nn.Sequential(torch.nn.ReLU(), bn).eval()


def aten_ops(program) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    ("form", "op"), [("mul-add", "aten.mul.Tensor"), ("conv", "aten.conv2d.default")]
)
def test_exported_program_lowers_its_batch_norm(form: str, op: str) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(relu_bn_net(), (x,), strict=False)
    result = bnfold.fold(program, lower_standalone=form)
    assert result.verification is not None and result.verification.passed
    ops = aten_ops(result.model)
    assert op in ops and not any("batch_norm" in o for o in ops)
    assert [(lo.site, lo.form.value) for lo in result.report.lowered] == [("1", form)]
    torch.testing.assert_close(result.model.module()(x), program.module()(x))


def test_exported_lowering_keeps_fp16_and_falls_back_on_rank_2() -> None:
    torch = pytest.importorskip("torch")
    program = torch.export.export(relu_bn_net("BatchNorm1d").half(), (torch.randn(4, 3).half(),))
    result = bnfold.fold(program, lower_standalone="conv")
    (lowered,) = result.report.lowered
    assert lowered.form is LowerForm.MUL_ADD and "no spatial axis" in lowered.note
    assert {v.dtype for v in result.model.state_dict.values()} == {torch.float16}


def test_exported_counts_with_lowering_leave_no_inference_bn() -> None:
    torch = pytest.importorskip("torch")
    net, args = mixed_net()
    result = bnfold.fold(torch.export.export(net, args, strict=False), lower_standalone=True)
    assert result.report.batchnorm == bnfold.BatchNormCount(
        found=4, folded=2, lowered=2, left=0, left_by_code={}, training=2
    )
    assert sorted(lo.site for lo in result.report.lowered) == ["bn2", "bn4"]
    assert {r.site for r in result.report.refused} == {"bnt", "bnn"}  # batch statistics


def test_a_wrong_exported_lowering_fails_verification_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    from bnfold.affine import Affine
    from bnfold.torch_front.files import fold_torch_files
    from bnfold.torch_front.program import lower as program_lower

    real = program_lower.bn_affine

    def planted(gm, bn):  # type: ignore[no-untyped-def]
        affine = real(gm, bn)
        return Affine(affine.scale, affine.shift + 0.01)

    monkeypatch.setattr(program_lower, "bn_affine", planted)
    source, out = tmp_path / "in.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(relu_bn_net(), (torch.randn(1, 3, 4, 4),)), source)
    result, written = fold_torch_files(str(source), out, FoldOptions(lower=LowerForm.MUL_ADD))
    assert not written and not out.exists()
    assert result.verification is not None and result.verification.status == "failed"
    # lowered again after the rollback, still under the fold's own refusal code
    assert [lo.code for lo in result.report.lowered] == [Code.NONLINEAR_INPUT]


def test_exported_lowering_survives_the_rollback_of_a_wrong_fold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    from bnfold.torch_front.program import apply as program_apply

    real = program_apply.fold_after

    def planted(*args, **kwargs):  # type: ignore[no-untyped-def]
        weight, bias = real(*args, **kwargs)
        return weight, bias + 0.1

    monkeypatch.setattr(program_apply, "fold_after", planted)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), relu_bn_net()[1], *relu_bn_net()).eval()
    program = torch.export.export(net, (torch.randn(1, 3, 4, 4),))
    result = bnfold.fold(program, lower_standalone=True)
    assert result.verification is not None and result.verification.passed
    # the fold that failed is rolled back, and its BN is lowered like any other left
    assert result.report.folded == [] and result.report.refused == []
    assert [(lo.site, lo.code) for lo in result.report.lowered] == [
        ("1", Code.VERIFICATION_FAILED),
        ("3", Code.NONLINEAR_INPUT),
    ]


@pytest.mark.parametrize(
    ("form", "module_type"), [("mul-add", "LoweredBatchNorm"), ("conv", "Conv2d")]
)
def test_eager_module_lowers_each_bn_left_at_its_path(form: str, module_type: str) -> None:
    torch = pytest.importorskip("torch")
    net, x = relu_bn_net(), torch.randn(2, 3, 5, 5)
    result = bnfold.fold(net, (x,), lower_standalone=form)
    assert result.verification is not None and result.verification.passed
    assert type(result.model[1]).__name__ == module_type
    assert [(lo.site, lo.form.value, lo.code) for lo in result.report.lowered] == [
        ("1", form, Code.NONLINEAR_INPUT)
    ]
    assert result.report.refused == [] and result.report.batchnorm.left == 0
    torch.testing.assert_close(result.model(x), net(x))
    assert isinstance(net[1], torch.nn.BatchNorm2d)  # the original is untouched


def test_eager_lowering_counts_match_the_exported_front() -> None:
    torch = pytest.importorskip("torch")
    net, args = mixed_net()
    result = bnfold.fold(net, args, lower_standalone=True)
    assert result.report.batchnorm == bnfold.BatchNormCount(
        found=4, folded=2, lowered=2, left=0, left_by_code={}, training=2
    )
    assert sorted(lo.site for lo in result.report.lowered) == ["bn2", "bn4"]
    assert type(result.model.bnt) is torch.nn.BatchNorm2d  # training mode: untouched
    torch.testing.assert_close(result.model(*args), net(*args))


def test_eager_conv_form_on_rank_2_input_falls_back_to_mul_add_and_says_why() -> None:
    torch = pytest.importorskip("torch")
    net = relu_bn_net("BatchNorm1d")
    result = bnfold.fold(net, (torch.randn(4, 3),), lower_standalone="conv")
    (lowered,) = result.report.lowered
    assert lowered.form is LowerForm.MUL_ADD and "no spatial axis" in lowered.note
    assert result.verification is not None and result.verification.passed


def test_eager_lowering_keeps_the_dtype() -> None:
    torch = pytest.importorskip("torch")
    net = relu_bn_net().half()
    result = bnfold.fold(net, (torch.randn(1, 3, 4, 4).half(),), lower_standalone="conv")
    assert {v.dtype for v in result.model.state_dict().values()} == {torch.float16}


def test_eager_bn_subclass_that_runs_an_activation_is_not_lowered() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    class BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d, in short
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.act(super().forward(x))

    net = nn.Sequential(nn.ReLU(), BatchNormAct(3)).eval()
    result = bnfold.fold(net, (torch.randn(1, 3, 4, 4),), lower_standalone=True)
    assert result.report.lowered == [] and type(result.model[1]) is BatchNormAct
    (refusal,) = result.report.refused
    assert refusal.code is Code.PARAMETRIZED and "runs act" in refusal.detail


def test_a_wrong_eager_lowering_fails_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from bnfold.affine import Affine
    from bnfold.torch_front import lower_modules

    real = lower_modules.bn_affine

    def off_by_a_bit(bn):  # type: ignore[no-untyped-def]
        affine = real(bn)
        return Affine.of(affine.scale * (1 + 1e-3), affine.shift, channels=len(affine.scale))

    monkeypatch.setattr(lower_modules, "bn_affine", off_by_a_bit)
    result = bnfold.fold(relu_bn_net(), (torch.randn(1, 3, 4, 4),), lower_standalone=True)
    assert result.verification is not None and not result.verification.passed


def test_inspecting_a_program_previews_its_lowering_and_keeps_it() -> None:
    torch = pytest.importorskip("torch")
    net, args = mixed_net()
    program = torch.export.export(net, args, strict=False)
    preview = bnfold.inspect(program, lower_standalone=True)
    assert preview.dry_run and preview.batchnorm == bnfold.BatchNormCount(
        found=4, folded=2, lowered=2, left=0, left_by_code={}, training=2
    )
    assert any("batch_norm" in o for o in aten_ops(program))


def test_inspecting_an_eager_module_previews_its_lowering() -> None:
    torch = pytest.importorskip("torch")
    net, args = relu_bn_net(), (torch.randn(1, 3, 4, 4),)
    preview = bnfold.inspect(net, args, lower_standalone=True)
    assert preview.dry_run and [lo.site for lo in preview.lowered] == ["1"]
    assert isinstance(net[1], torch.nn.BatchNorm2d)


def test_cli_inspect_pt2_previews_the_lowering(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    source = tmp_path / "in.pt2"
    torch.export.save(torch.export.export(relu_bn_net(), (torch.randn(1, 3, 4, 4),)), source)
    result = invoke("inspect", source, "--lower-standalone=conv", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["batchnorm"]["lowered"] == 1


def test_cli_pt2_lowers_and_writes_a_program_without_batch_norm(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    source, out = tmp_path / "in.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(relu_bn_net(), (torch.randn(1, 3, 4, 4),)), source)
    result = invoke("fold", source, "-o", out, "--lower-standalone=conv", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"]["batchnorm"]["lowered"] == 1
    assert not any("batch_norm" in o for o in aten_ops(torch.export.load(out)))


def test_cli_factory_lowers_into_the_state_dict_and_the_onnx_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    (tmp_path / "lower_factory.py").write_text(RELU_BN_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, exported = tmp_path / "o.pt", tmp_path / "o.onnx"
    result = invoke(
        "fold", "--module", "lower_factory:make", "--input-shape", "1x3x8x8",
        "-o", out, "--to-onnx", exported, "--lower-standalone", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["report"]["batchnorm"]["lowered"] == 1
    keys = set(torch.load(out, weights_only=True))
    assert {"1.lowered_scale", "1.lowered_shift"} <= keys and "1.running_mean" not in keys
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(exported).graph.node}


RELU_BN_FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(nn.ReLU(), bn).eval()
"""


def mixed_net():  # type: ignore[no-untyped-def]
    """conv -> bn (folds), relu -> bn2, conv3 -> bn3 (folds), branching conv4 -> bn4,
    bnt in training mode, bnn without running stats."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.bnt, self.bnn = nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):  # type: ignore[no-untyped-def]
            y = self.bn2(torch.relu(self.bn(self.conv(x))))
            z = self.conv4(y)
            return self.bnn(self.bnt(self.bn3(self.conv3(y)) + self.bn4(z) + z))

    net = Net().eval()
    net.bnt.train()
    return net, (torch.randn(1, 3, 8, 8),)


def test_torch_counts_match_on_eager_and_exported_fronts() -> None:
    torch = pytest.importorskip("torch")
    net, args = mixed_net()
    expected = bnfold.BatchNormCount(
        found=4, folded=2, lowered=0, left=2,
        left_by_code={"branching": 1, "nonlinear_input": 1}, training=2,
    )  # fmt: skip
    assert bnfold.fold(net, args).report.batchnorm == expected
    program = torch.export.export(net, args, strict=False)
    assert bnfold.fold(program).report.batchnorm == expected
    assert bnfold.inspect(net, args).batchnorm == expected
