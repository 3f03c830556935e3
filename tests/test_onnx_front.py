"""The ONNX fold pass: every pattern folds exactly, every refusal leaves the site alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import bnfold
from bnfold import Code
from tests.builders import RNG, bn_node, bn_params, conv_bn, init, model, op_types, run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"

# file -> number of folds; every affine in these files must disappear.
FOLDABLE = {
    "conv2d_bn.onnx": 1,
    "conv2d_nobias_bn.onnx": 1,
    "conv1d_bn.onnx": 1,
    "conv3d_bn.onnx": 1,
    "conv_grouped_bn.onnx": 1,
    "depthwise_bn.onnx": 1,
    "convtranspose_bn.onnx": 1,
    "convtranspose_nobias_bn.onnx": 1,
    "gemm_bn.onnx": 1,
    "gemm_transb0_noc_bn.onnx": 1,
    "matmul_bn.onnx": 1,
    "conv_mul_add.onnx": 2,
    "gemm_mul_add.onnx": 2,
    "chain_conv_bn_mul_add.onnx": 3,
    "resnet_tiny.onnx": 6,
    "old_opset_bn.onnx": 1,
    "external_data/conv_bn_ext.onnx": 1,
}
REFUSED = {
    "neg_bn_after_relu.onnx": [Code.NONLINEAR_INPUT],
    "neg_training_bn.onnx": [Code.TRAINING_MODE],
    "neg_branching.onnx": [Code.BRANCHING],
    "neg_standalone_bn.onnx": [Code.STANDALONE],
    "neg_matmul_3d_bn.onnx": [Code.NOT_PER_CHANNEL],
}
AFFINE_OPS = {"BatchNormalization", "Mul", "Add"}


def to_proto(m: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(m)


def random_feeds(m: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in m.graph.initializer}
    feeds = {}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_same_function(
    original: onnx.ModelProto, folded: onnx.ModelProto, rtol: float = 1e-5
) -> None:
    feeds = random_feeds(original)
    for ref, new in zip(run(original, feeds), run(folded, feeds), strict=True):
        scale = np.abs(ref).max()
        assert np.abs(ref.astype(np.float64) - new).max() <= rtol * scale


def fold_and_check(m: onnx.ModelProto, rtol: float = 1e-5) -> bnfold.FoldResult:
    result = bnfold.fold(m)
    folded = to_proto(result.model)
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(m, folded, rtol)
    return result


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_sample_folds_completely_and_verifies(name: str) -> None:
    path = SAMPLES / name
    result = bnfold.fold(path, verify=True)
    assert len(result.report.folded) == FOLDABLE[name]
    assert result.report.refused == []
    left = [n.op_type for n in result.model.graph if n.op_type in AFFINE_OPS]
    residual_adds = result.report.ops_before.get("Add", 0) - (name.count("add") and 1)
    assert left.count("BatchNormalization") == 0
    assert left.count("Mul") == 0
    assert left.count("Add") <= max(residual_adds, 0)
    assert result.verification is not None and result.verification.passed
    assert all(o.max_rel <= 1e-5 for o in result.verification.outputs)


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_fold_keeps_interface_names_opset_and_ir_version(name: str) -> None:
    original = ir.load(SAMPLES / name)
    folded = bnfold.fold(SAMPLES / name).model
    assert [v.name for v in folded.graph.inputs if not v.is_initializer()] == [
        v.name for v in original.graph.inputs if not v.is_initializer()
    ]
    assert [v.name for v in folded.graph.outputs] == [v.name for v in original.graph.outputs]
    assert folded.opset_imports == original.opset_imports
    assert folded.ir_version == original.ir_version
    linear_names = {
        n.name for n in original.graph if n.op_type in {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    }
    assert linear_names <= {n.name for n in folded.graph}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_negative_sample_is_left_unchanged_with_its_reason(name: str) -> None:
    original = onnx.load(SAMPLES / name)
    result = bnfold.fold(SAMPLES / name)
    assert result.report.folded == []
    assert result.report.codes == REFUSED[name]
    folded = to_proto(result.model)
    assert op_types(folded) == op_types(original)
    if name != "neg_training_bn.onnx":  # training BN normalizes by batch stats: random anyway
        assert_same_function(original, folded, rtol=0.0)


def test_shared_weight_is_cloned_and_both_sites_fold() -> None:
    original = onnx.load(SAMPLES / "neg_shared_weight.onnx")
    result = bnfold.fold(original)
    assert len(result.report.folded) == 2
    assert sum(f.bytes_added for f in result.report.folded) == 864  # one 8x3x3x3 fp32 copy
    folded = to_proto(result.model)
    assert "BatchNormalization" not in op_types(folded)
    assert_same_function(original, folded)


def test_shared_weight_is_refused_without_cloning() -> None:
    original = onnx.load(SAMPLES / "neg_shared_weight.onnx")
    result = bnfold.fold(original, clone_shared=False)
    assert result.report.codes == [Code.SHARED_WEIGHT, Code.SHARED_WEIGHT]
    assert op_types(to_proto(result.model)) == op_types(original)


def test_nan_stats_refuse_one_fold_and_the_rest_still_fold() -> None:
    nodes, inits = conv_bn()
    inits2 = [init("conv2.weight", RNG.normal(size=(4, 4, 1, 1)).astype(np.float32))]
    nan_mean = np.array([0.0, np.nan, 0.0, 0.0])
    nodes += [
        helper.make_node("Conv", ["output", "conv2.weight"], ["c2"], name="conv2"),
        bn_node("bn2", "c2", "out2"),
    ]
    inits += inits2 + bn_params("bn2", 4, mean=nan_mean)
    m = model(nodes, inits, [("input", [1, 3, 8, 8])], ["out2"])
    result = bnfold.fold(m)
    assert [f.site for f in result.report.folded] == ["conv1 -> bn1"]
    assert result.report.codes == [Code.BAD_VALUES]
    assert "mean is not finite at channel 1" in result.report.refused[0].detail


@pytest.mark.parametrize(
    ("var", "eps"), [([1.0, -2.0, 1.0, 1.0], 1e-5), ([1.0, 0.0, 1.0, 1.0], 0.0)]
)
def test_non_positive_variance_is_refused(var: list[float], eps: float) -> None:
    nodes, inits = conv_bn(var=np.array(var))
    nodes[1] = bn_node("bn1", "c1", "output", epsilon=eps)
    result = bnfold.fold(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    assert result.report.codes == [Code.BAD_VALUES]
    assert "var + eps <= 0" in result.report.refused[0].detail
    assert "BatchNormalization" in [n.op_type for n in result.model.graph]


def test_bn_params_of_wrong_shape_are_refused() -> None:
    nodes, inits = conv_bn(scale=np.ones(3))
    result = bnfold.fold(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    assert result.report.codes == [Code.BAD_SHAPE]


def test_bn_param_fed_at_run_time_is_not_constant() -> None:
    nodes, inits = conv_bn()
    inits = [i for i in inits if i.name != "bn1.mean"]
    m = model(nodes, inits, [("input", [1, 3, 8, 8]), ("bn1.mean", [4])], ["output"])
    assert bnfold.fold(m).report.codes == [Code.NOT_CONSTANT]


def test_overridable_initializer_in_ir4_is_not_constant() -> None:
    nodes, inits = conv_bn()
    m = model(nodes, inits, [("input", [1, 3, 8, 8]), ("bn1.var", [4])], ["output"])
    assert bnfold.fold(m).report.codes == [Code.NOT_CONSTANT]


def test_training_mode_attribute_is_refused() -> None:
    nodes, inits = conv_bn()
    nodes[1] = bn_node("bn1", "c1", "output", training_mode=1)
    m = model(nodes, inits, [("input", [2, 3, 8, 8])], ["output"], opset=15)
    assert bnfold.fold(m).report.codes == [Code.TRAINING_MODE]


def test_mul_not_per_channel_is_refused() -> None:
    w = init("w", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32))
    c = init("c", RNG.normal(size=(1, 1, 8, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["y"], name="conv"),
        helper.make_node("Mul", ["y", "c"], ["output"], name="mul"),
    ]
    result = bnfold.fold(model(nodes, [w, c], [("input", [1, 3, 8, 8])], ["output"]))
    assert result.report.codes == [Code.NOT_PER_CHANNEL]


def test_residual_add_is_not_a_site() -> None:
    w = init("w", RNG.normal(size=(3, 3, 1, 1)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["y"], name="conv"),
        helper.make_node("Add", ["y", "input"], ["output"], name="residual"),
    ]
    result = bnfold.fold(model(nodes, [w], [("input", [1, 3, 4, 4])], ["output"]))
    assert result.report.folded == [] and result.report.refused == []


def test_gemm_with_beta_zero_ignores_c_and_folds() -> None:
    b = init("B", RNG.normal(size=(6, 5)).astype(np.float32))
    c = init("C", RNG.normal(size=6).astype(np.float32))
    nodes = [
        helper.make_node("Gemm", ["input", "B", "C"], ["y"], name="gemm", transB=1, beta=0.0),
        bn_node("bn", "y", "output"),
    ]
    m = model(nodes, [b, c, *bn_params("bn", 6)], [("input", [3, 5])], ["output"])
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["Gemm"]


def test_mul_after_nd_matmul_folds_into_the_weight() -> None:
    w = init("w", RNG.normal(size=(8, 4)).astype(np.float32))
    s = init("s", RNG.uniform(0.5, 2, 4).astype(np.float32))
    t = init("t", RNG.normal(size=4).astype(np.float32))
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["y"], name="mm"),
        helper.make_node("Mul", ["y", "s"], ["z"], name="mul"),
        helper.make_node("Add", ["z", "t"], ["output"], name="add"),
    ]
    m = model(nodes, [w, s, t], [("input", [2, 3, 8])], ["output"])
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["MatMul", "Add"]


def test_bn_output_that_is_a_graph_output_keeps_its_name() -> None:
    nodes, inits = conv_bn()
    result = fold_and_check(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    assert [v.name for v in result.model.graph.outputs] == ["output"]
    assert [n.name for n in result.model.graph] == ["conv1"]


def test_unused_bn_params_are_removed() -> None:
    nodes, inits = conv_bn()
    result = bnfold.fold(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    assert set(result.model.graph.initializers) == {"conv1.weight", "conv1.bias"}


def test_ir3_new_bias_is_listed_as_graph_input() -> None:
    nodes, inits = conv_bn(conv_bias=False)
    inputs = [("input", [1, 3, 8, 8])] + [(i.name, list(i.dims)) for i in inits]
    m = model(nodes, inits, inputs, ["output"], opset=7, ir_version=3)
    result = fold_and_check(m)
    graph = result.model.graph
    assert set(graph.initializers) <= {v.name for v in graph.inputs}
    assert "conv1_bias" in graph.initializers  # the created bias is also listed as an input
    # The interface is unchanged: every original input is still listed.
    assert {i[0] for i in inputs} <= {v.name for v in graph.inputs}


def test_params_from_constant_nodes_fold_and_the_constants_go() -> None:
    nodes, inits = conv_bn()
    constants = [
        helper.make_node("Constant", [], [i.name], name=f"const_{i.name}", value=i)
        for i in inits
        if i.name.startswith("bn1.")
    ]
    inits = [i for i in inits if not i.name.startswith("bn1.")]
    m = model(constants + nodes, inits, [("input", [1, 3, 8, 8])], ["output"])
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_fp16_model_stays_fp16() -> None:
    nodes, inits = conv_bn(dtype=np.float16)
    m = model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"], dtype=onnx.TensorProto.FLOAT16)
    result = fold_and_check(m, rtol=1e-2)
    weight = result.model.graph.initializers["conv1.weight"].const_value
    assert weight.numpy().dtype == np.float16


def test_fp64_model_stays_fp64() -> None:
    # onnxruntime's CPU Conv has no double kernel; Gemm does.
    b = init("B", RNG.normal(size=(6, 5)))
    nodes = [
        helper.make_node("Gemm", ["input", "B"], ["y"], name="gemm", transB=1),
        bn_node("bn", "y", "output"),
    ]
    inits = [b, *bn_params("bn", 6, np.float64)]
    m = model(nodes, inits, [("input", [3, 5])], ["output"], dtype=onnx.TensorProto.DOUBLE)
    result = fold_and_check(m, rtol=1e-12)
    assert result.model.graph.initializers["B"].const_value.numpy().dtype == np.float64


def if_model(else_weight: str) -> onnx.ModelProto:
    """If(cond) { conv(input, w) -> bn } else { conv(input, else_weight) }, w from outer scope."""
    weights = [init(n, RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)) for n in ("w", "w2")]
    then_graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], name="inner_conv", pads=[1, 1, 1, 1]),
            bn_node("inner_bn", "c", "then_out"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=bn_params("inner_bn", 4),
    )
    else_conv = helper.make_node(
        "Conv", ["input", else_weight], ["else_out"], name="else_conv", pads=[1, 1, 1, 1]
    )
    else_graph = helper.make_graph(
        [else_conv],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
    )
    if_node = helper.make_node(
        "If", ["cond"], ["output"], name="if", then_branch=then_graph, else_branch=else_graph
    )
    cond = init("cond", np.array(True))
    return model([if_node], [*weights, cond], [("input", [1, 3, 6, 6])], ["output"])


def test_fold_inside_if_branch_with_outer_scope_weight() -> None:
    result = fold_and_check(if_model(else_weight="w2"))
    assert [f.site for f in result.report.folded] == ["inner_conv -> inner_bn"]


def test_outer_weight_read_by_both_branches_is_cloned_for_one() -> None:
    result = fold_and_check(if_model(else_weight="w"))
    assert result.report.folded[0].bytes_added == 4 * 3 * 3 * 3 * 4
    else_conv = next(
        n for n in ir.traversal.RecursiveGraphIterator(result.model.graph) if n.name == "else_conv"
    )
    assert else_conv.inputs[1].name == "w"  # the other reader keeps the original weight


def test_inspect_does_not_modify_the_model() -> None:
    nodes, inits = conv_bn()
    m = ir.serde.deserialize_model(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    report = bnfold.inspect(m)
    assert report.dry_run and len(report.folded) == 1
    assert [n.op_type for n in m.graph] == ["Conv", "BatchNormalization"]


def test_report_json_round_trips() -> None:
    import json

    report = bnfold.fold(SAMPLES / "neg_branching.onnx").report
    data = json.loads(report.to_json())
    assert data["refused"][0]["code"] == "branching"
    assert data["front"] == "onnx"


def test_opset6_bn_with_is_test_folds() -> None:
    nodes, inits = conv_bn()
    nodes[1] = bn_node("bn1", "c1", "output", is_test=1, spatial=1)
    inputs = [("input", [1, 3, 8, 8])] + [(i.name, list(i.dims)) for i in inits]
    m = model(nodes, inits, inputs, ["output"], opset=6, ir_version=3, output_shapes=[[1, 4, 8, 8]])
    result = bnfold.fold(m)
    assert [f.site for f in result.report.folded] == ["conv1 -> bn1"]


def test_opset6_bn_in_training_mode_is_refused() -> None:
    nodes, inits = conv_bn()
    nodes[1] = bn_node("bn1", "c1", "output", is_test=0)
    inputs = [("input", [1, 3, 8, 8])] + [(i.name, list(i.dims)) for i in inits]
    m = model(nodes, inits, inputs, ["output"], opset=6, ir_version=3, output_shapes=[[1, 4, 8, 8]])
    assert bnfold.fold(m).report.codes == [Code.TRAINING_MODE]


def test_fold_inplace_with_verify_compares_against_the_unfolded_model() -> None:
    nodes, inits = conv_bn()
    m = ir.serde.deserialize_model(model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"]))
    result = bnfold.fold(m, inplace=True, verify=True)
    assert result.model is m
    assert [n.op_type for n in m.graph] == ["Conv"]
    assert result.verification is not None and result.verification.passed


def test_import_does_not_load_torch() -> None:
    import subprocess
    import sys

    code = "import sys, bnfold, bnfold.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_weight_read_from_external_data_is_streamed_into_the_saved_file(tmp_path: Path) -> None:
    """Not held in memory; written block by block, the same bytes as computed whole."""
    from bnfold.onnx_front import io
    from bnfold.onnx_front.folded import FoldedTensor
    from bnfold.onnx_front.passes import FoldAffinePass

    model = FoldAffinePass()(io.load_model(SAMPLES / "external_data" / "conv_bn_ext.onnx")).model
    folded = [v.const_value for v in model.graph.initializers.values()]
    streamed = [t for t in folded if isinstance(t, FoldedTensor)]
    assert streamed, "the folded conv weight should be recomputed on save, not held"
    expected = {t.name: t.numpy() for t in streamed}
    io.save_model(model, tmp_path / "out.onnx", external_data=True)
    saved = io.load_model(tmp_path / "out.onnx")
    for name, values in expected.items():
        assert saved.graph.initializers[name].const_value.numpy().tobytes() == values.tobytes()


@pytest.mark.parametrize("gamma, folds", [(1.0, True), (3e4, False)])
def test_weight_not_held_is_still_checked_for_overflow(gamma: float, folds: bool) -> None:
    """With no memory budget every weight is bounded, not computed, in planning:
    an fp16 fold that overflows is refused all the same, and a safe one folds."""
    from bnfold.onnx_front.passes import FoldAffinePass

    nodes, inits = conv_bn(
        dtype=np.float16,
        conv_bias=False,
        scale=np.full(4, gamma),
        mean=np.zeros(4),
        var=np.full(4, 1e-3),
    )  # no conv bias, zero mean: the folded bias is beta, so only the weight can overflow
    for tensor in inits:
        if tensor.name == "conv1.weight":
            tensor.CopyFrom(init("conv1.weight", np.full((4, 3, 3, 3), 100.0, np.float16)))
    proto = model(
        nodes, inits, [("input", [1, 3, 8, 8])], ["output"], dtype=onnx.TensorProto.FLOAT16
    )
    result = FoldAffinePass(held_bytes=0)(ir.serde.deserialize_model(proto))
    assert bool(result.report.folded) == folds
    assert result.report.codes == ([] if folds else [Code.BAD_VALUES])
    assert folds or "folded weight overflows float16" in result.report.refused[0].detail


def test_write_behind_writes_every_block_in_order_and_reports_a_failed_write() -> None:
    import io as stdio

    from bnfold.core import cast as cast_module
    from bnfold.onnx_front.folded import _write_behind

    rng = np.random.default_rng(6)
    w = rng.normal(size=(300, 7)).astype(np.float16)
    factor = rng.uniform(0.5, 2.0, (300, 1))
    old = cast_module.CHUNK_BYTES
    cast_module.CHUNK_BYTES = 2 * 7 * 11  # 11 rows a block: 28 blocks
    try:
        sink = stdio.BytesIO()
        _write_behind(cast_module.scaled_blocks(w, factor, buffers=2), sink)
        assert sink.getvalue() == cast_module.scaled(w, factor).tobytes()

        class DiskFull(stdio.BytesIO):
            def write(self, data: object) -> int:
                raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            _write_behind(cast_module.scaled_blocks(w, factor, buffers=2), DiskFull())
    finally:
        cast_module.CHUNK_BYTES = old


def test_write_behind_sends_each_written_range_to_disk_once(tmp_path: Path, monkeypatch) -> None:
    """Early writeback covers the bytes written after the tensor's offset, in order,
    each range once, and never changes what is written."""
    import itertools
    import os

    from bnfold.core import cast as cast_module
    from bnfold.onnx_front import folded

    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advised.append((off, n)))
    monkeypatch.setattr(folded, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(cast_module, "CHUNK_BYTES", 2 * 7 * 11)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(300, 7)).astype(np.float16)
    factor = rng.uniform(0.5, 2.0, (300, 1))
    with open(tmp_path / "data", "wb") as file:
        file.write(b"x" * 100)  # the tensor starts at an offset, as in a shared data file
        folded._write_behind(cast_module.scaled_blocks(w, factor, buffers=2), file)
    written = (tmp_path / "data").read_bytes()
    assert written[100:] == cast_module.scaled(w, factor).tobytes()
    assert advised and advised[0][0] == 100
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(advised))
    assert advised[-1][0] + advised[-1][1] <= len(written)
