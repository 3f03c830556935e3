"""Smoke tests of the latency harness and `bnfold bench`. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold import bench, bench_report
from bnfold.cli.bench_cmd import bench as bench_command
from bnfold.errors import BnfoldError

C = 4


def conv_bn_model(with_bn: bool = True) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->C, 3x3, pad 1) -> BatchNormalization (or nothing) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "B"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c" if with_bn else "y"], pads=[1] * 4)]
    if with_bn:
        for name in ("gamma", "beta", "mean"):
            inits.append(numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), name))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, C).astype(np.float32), "var"))
        nodes.append(
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])
        )
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_files(tmp_path: Path) -> tuple[str, str]:
    original, twin = tmp_path / "conv_bn.onnx", tmp_path / "conv.onnx"
    onnx.save(conv_bn_model(), original)
    onnx.save(conv_bn_model(with_bn=False), twin)
    return str(original), str(twin)


def test_bench_onnx_report_has_each_level_and_environment(model_files):
    original, twin = model_files
    report = bench.bench_onnx(
        original, twin, ["disable_all", "all-minus-fusions"], warmup=1, runs=3
    )
    assert [t.level for t in report.levels] == ["disable_all", "all-minus-fusions"]
    for timing in report.levels:
        assert timing.original.runs == timing.folded.runs == 3
        assert timing.original.median_ms > 0 and timing.folded.iqr_ms >= 0
        assert timing.ratio > 0
    env = report.environment
    assert env.threads == 1 and env.runs == 3 and env.cpu_count >= 1
    assert env.versions["onnxruntime"] != "not installed"


def test_bench_json_is_parseable(model_files):
    original, twin = model_files
    data = json.loads(bench.bench_onnx(original, twin, ["basic"], warmup=0, runs=3).to_json())
    level = data["levels"][0]
    assert level["level"] == "basic"
    assert set(level["original"]) == {"median_ms", "iqr_ms", "min_ms", "runs"}
    assert level["ratio"] == pytest.approx(
        level["folded"]["median_ms"] / level["original"]["median_ms"]
    )
    assert data["environment"]["runtime"] == "onnxruntime"
    assert level["ort_level"] == "ORT_ENABLE_BASIC" and level["disabled_optimizers"] == []


def test_bench_folds_in_memory_when_folded_is_omitted(model_files):
    report = bench.bench_onnx(model_files[0], None, ["disable_all"], warmup=0, runs=2)
    assert report.folds == 1
    assert report.folded == "(folded in memory)"


def test_bench_accepts_in_memory_models():
    import onnx_ir as ir

    proto = conv_bn_model()
    report = bench.bench_onnx(
        proto, ir.serde.deserialize_model(conv_bn_model(False)), ["all"], warmup=0, runs=2
    )
    assert len(report.levels) == 1


def test_all_minus_fusions_keeps_batchnorm_in_orts_graph(model_files):
    original, _ = model_files
    # Without the fold, ORT's own ConvBNFusion removes the BN at every level but this one.
    # At ORT_ENABLE_ALL the surviving BN is rewritten to an NCHWc Conv, so count nodes.
    fused = bench.optimized_op_types(original, "all")
    kept = bench.optimized_op_types(original, "all-minus-fusions")
    assert len(kept) == len(fused) + 1
    assert "BatchNormalization" not in bench.optimized_op_types(original, "extended")


def linear_then(affine: str) -> onnx.ModelProto:
    """A Conv (or MatMul for "MatMulBN") followed by the op ORT's fusion targets."""
    rng = np.random.default_rng(1)
    vec = rng.uniform(0.5, 2, C).astype(np.float32)
    if affine == "MatMulBN":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
        w = numpy_helper.from_array(rng.standard_normal((16, C)).astype(np.float32), "W")
        linear = helper.make_node("MatMul", ["x", "W"], ["c"])
        out_shape = [2, C]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
        w = numpy_helper.from_array(rng.standard_normal((C, 3, 1, 1)).astype(np.float32), "W")
        linear = helper.make_node("Conv", ["x", "W"], ["c"])
        out_shape = [1, C, 8, 8]
    if affine in ("Mul", "Add"):
        inits = [w, numpy_helper.from_array(vec.reshape(C, 1, 1), "k")]
        node = helper.make_node(affine, ["c", "k"], ["y"])
    else:
        names = ["gamma", "beta", "mean", "var"]
        inits = [w, *(numpy_helper.from_array(vec + i, n) for i, n in enumerate(names))]
        node = helper.make_node("BatchNormalization", ["c", *names], ["y"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph([linear, node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("fusion", "affine", "op"),
    [
        ("ConvBNFusion", "BN", "BatchNormalization"),
        ("ConvMulFusion", "Mul", "Mul"),
        ("ConvAddFusion", "Add", "Add"),
        ("MatMul_BatchNormalization_Fusion", "MatMulBN", "BatchNormalization"),
    ],
)
def test_each_disabled_fusion_name_is_a_real_ort_optimizer(fusion, affine, op, tmp_path):
    # ORT ignores unknown names in disabled_optimizers, so a typo would pass silently:
    # check that ORT removes the op with the name enabled and keeps it with it disabled.
    assert fusion in bench.ORT_BN_FUSIONS
    model = linear_then(affine)
    others = [f for f in bench.ORT_BN_FUSIONS if f != fusion]
    assert op not in _extended_ops(model, others, tmp_path)
    assert op in _extended_ops(model, bench.ORT_BN_FUSIONS, tmp_path)


def _extended_ops(model: onnx.ModelProto, disabled, tmp_path: Path) -> list[str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(
        model.SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled),
    )
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_unknown_level_is_a_user_error(model_files):
    with pytest.raises(BnfoldError, match="unknown level"):
        bench.bench_onnx(model_files[0], model_files[1], ["turbo"], runs=1)


def test_random_feeds_set_dynamic_dims_to_one(model_files):
    sess = bench.make_session(model_files[0], "disable_all")
    feeds = bench.random_feeds(sess)
    assert feeds["x"].shape == (1, 3, 8, 8) and feeds["x"].dtype == np.float32


def test_bench_feeds_the_shapes_asked_for_and_reports_them(model_files):
    report = bench.bench_onnx(
        *model_files, ["disable_all"], runs=1, warmup=0, shapes={"x": [2, 3, 8, 8]}
    )
    assert report.inputs == {"x": [2, 3, 8, 8]}
    assert "x 2x3x8x8" in report.summary()


def test_bench_inputs_over_the_cap_are_refused_before_allocation(model_files):
    huge = {"x": [1 << 20, 3, 8, 8]}  # 768 MiB of float32: over a 1 MiB cap
    with pytest.raises(BnfoldError, match="limit for random inputs"):
        bench.bench_onnx(
            *model_files, ["disable_all"], runs=1, shapes=huge, max_input_bytes=1 << 20
        )


def test_cli_bench_onnx_shape_and_input_cap(model_files):
    args = [*model_files, "--runs", "1", "--warmup", "0", "--level", "disable_all"]
    result = CliRunner().invoke(bench_command, [*args, "--shape", "x:3x3x8x8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["inputs"] == {"x": [3, 3, 8, 8]}
    result = CliRunner().invoke(
        bench_command, [*args, "--shape", "x:4096x3x8x8", "--max-input-mib", "1"]
    )
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--max-input-mib" in result.output


def test_time_interleaved_alternates_the_models_and_their_order():
    calls: list[str] = []
    a_ms, b_ms = bench.time_interleaved(
        lambda: calls.append("a"), lambda: calls.append("b"), warmup=1, runs=4
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2
    assert len(a_ms) == len(b_ms) == 4


@pytest.mark.parametrize(("n", "rank"), [(5, 0), (6, 0), (10, 1), (20, 5), (100, 39)])
def test_median_interval_ranks_match_the_binomial_tables(n, rank):
    # Published 95 % order-statistic intervals for the median (1-based ranks rank+1, n-rank).
    assert bench_report._median_interval_rank(n) == rank


@given(
    st.lists(st.floats(0.5, 50.0), min_size=1, max_size=60),
    st.lists(st.floats(0.5, 50.0), min_size=60, max_size=60),
)
def test_paired_ratio_interval_holds_its_median(original, folded):
    folded = folded[: len(original)]
    paired = bench_report.PairedRatio.of(original, folded)
    ratios = [f / o for o, f in zip(original, folded, strict=True)]
    assert paired.pairs == len(original)
    assert min(ratios) <= paired.low <= paired.median <= paired.high <= max(ratios)


def test_paired_ratio_of_identical_runs_is_one():
    paired = bench_report.PairedRatio.of([2.0, 3.0, 4.0] * 4, [2.0, 3.0, 4.0] * 4)
    assert (paired.median, paired.low, paired.high) == (1.0, 1.0, 1.0)


def test_progress_reaches_total(model_files):
    seen: list[tuple[int, int]] = []
    bench.bench_onnx(
        model_files[0],
        model_files[1],
        ["disable_all"],
        warmup=1,
        runs=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (6, 6)


def test_bench_torch_eager_smoke():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), torch.nn.BatchNorm2d(C))
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3))
    report = bench.bench_torch(conv, plain, (torch.randn(1, 3, 8, 8),), warmup=1, runs=3)
    assert [t.level for t in report.levels] == ["eager"]
    assert report.environment.runtime == "torch-eager"
    assert json.loads(report.to_json())["levels"][0]["folded"]["runs"] == 3


def test_cli_bench_prints_table_with_threads_and_runs(model_files):
    result = CliRunner().invoke(bench_command, [*model_files, "--runs", "3", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert "1 thread(s)" in result.output and "3 runs" in result.output
    assert "all-minus-fusions" in result.output


def test_cli_bench_defaults_to_the_three_levels_side_by_side(model_files):
    """No --level: onnxruntime unoptimised, at its default (which fuses Conv+BN
    itself), and at its default without those fusions."""
    result = CliRunner().invoke(
        bench_command, [*model_files, "--runs", "2", "--warmup", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    levels = json.loads(result.output)["levels"]
    assert [lv["level"] for lv in levels] == ["disable_all", "all", "all-minus-fusions"]
    assert all(lv["folded"]["runs"] == 2 and lv["original"]["runs"] == 2 for lv in levels)


def test_the_cli_offers_every_harness_level():
    """The CLI lists level names from bnfold.options so that --help need not
    import the harness; both must name the same levels."""
    from bnfold.options import BENCH_LEVEL_NAMES, DEFAULT_BENCH_LEVELS

    assert tuple(bench.LEVELS) == BENCH_LEVEL_NAMES
    assert set(DEFAULT_BENCH_LEVELS) <= set(BENCH_LEVEL_NAMES)


def test_cli_bench_json_and_levels(model_files):
    args = [*model_files, "--runs", "2", "--warmup", "0", "--json"]
    result = CliRunner().invoke(bench_command, [*args, "--level", "disable_all", "--level", "all"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [lv["level"] for lv in data["levels"]] == ["disable_all", "all"]


def test_cli_bench_plot_writes_a_file(model_files, tmp_path):
    # matplotlib is in the dev extra: a missing one fails here rather than skipping.
    out = tmp_path / "bench.png"
    args = [*model_files, "--runs", "2", "--warmup", "0", "--plot", str(out)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_bench_bad_model_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(bench_command, [str(bad), str(bad), "--runs", "1"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0


@pytest.mark.parametrize("with_folded", [True, False])
def test_cli_bench_torch_modules(tmp_path, with_folded):
    torch = pytest.importorskip("torch")
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), torch.nn.BatchNorm2d(C)).eval()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3)).eval()
    torch.save(conv, tmp_path / "conv_bn.pt")
    torch.save(plain, tmp_path / "conv.pt")
    files = [str(tmp_path / "conv_bn.pt")] + ([str(tmp_path / "conv.pt")] if with_folded else [])
    args = [*files, "--shape", "1,3,8,8", "--runs", "2", "--warmup", "0", "--json"]
    refused = CliRunner().invoke(bench_command, args)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    result = CliRunner().invoke(bench_command, [*args, "--trust-pickle"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["environment"]["runtime"] == "torch-eager"
    assert data["folds"] == (None if with_folded else 1)


def test_cli_bench_pt2_programs_need_no_trust(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3), torch.nn.BatchNorm2d(C)).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),), strict=False)
    torch.export.save(program, tmp_path / "conv_bn.pt2")
    args = [str(tmp_path / "conv_bn.pt2"), "--shape", "1,3,8,8", "--runs", "2", "--warmup", "0"]
    result = CliRunner().invoke(bench_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["folds"] == 1


def test_cli_bench_torch_without_shape_is_a_user_error(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, C, 3)), tmp_path / "m.pt")
    args = [str(tmp_path / "m.pt"), "--runs", "1", "--trust-pickle"]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 2
    assert "--shape" in result.output
    capped = [*args, "--shape", "1,3,8,8", "--max-input-mib", "1"]
    result = CliRunner().invoke(bench_command, capped)
    assert result.exit_code == 2 and "for ONNX models" in result.output


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_compare_tools_smoke_run(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "compare"
    args = ["--only", "sample", "--match", "conv2d_bn", "--tools", "bnfold,ir-load-save"]
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "compare_tools.py"),
            *args,
            "--runs",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["tool"]: r for r in data["rows"]}
    assert rows["bnfold"]["status"] == "ok" and rows["bnfold"]["bn_left"] == 0
    assert rows["ir-load-save"]["bn_left"] == 1
    assert rows["bnfold"]["err_f64"] < 1e-5
    assert data["machine"]["cores"] >= 1
    assert "| conv2d_bn | bnfold |" in out.with_suffix(".md").read_text()


def test_fold_time_rounds_smoke_run(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "conv2d_bn.onnx"
    model.write_bytes(
        (Path(__file__).resolve().parent.parent / "sample_models" / model.name).read_bytes()
    )
    out = tmp_path / "rounds.json"
    args = ["--rounds", "2", "--settle", "--tools", "bnfold,ir-load-save", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "fold_time_rounds.py"), str(model), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and len(report["per_round"]) == 2
    assert set(report["per_round"][1]) == {"bnfold", "ir-load-save"}
    ratio = report["bnfold / tool"]["ir-load-save"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv2d_bn.onnx", "rounds.json"]


def test_generated_resnet50_twin_matches_the_bn_model():
    import importlib.util

    import onnx_ir as ir
    import onnxruntime as ort

    spec = importlib.util.spec_from_file_location(
        "make_big_models", BENCHMARKS / "make_big_models.py"
    )
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outs = []
    for variant in ("bn", "nobn"):
        proto = ir.serde.serialize_model(make.resnet50(variant, size=32)).SerializeToString()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": x})[0])
    assert np.isfinite(outs[0]).all()
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5 * np.abs(outs[0]).max())
