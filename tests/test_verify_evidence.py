"""Verification a deployment can rely on: the user's inputs, per-site evidence, derived bounds.

Wrong folds are planted by editing a correct fold's weights (a scale off in one
channel, a shift on the wrong channel) and must be caught; correct folds of
the same nets pass on random and on file inputs.
"""

from __future__ import annotations

import json
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.options import VerifyOptions
from bnfold.verification import plan, runtimes, verdict
from bnfold.verification.cones import Cones, walk
from bnfold.verification.tolerance import Reductions, derived_rtol
from bnfold.verification.verdict import Compared, SiteValue, TensorDiff, judge
from tests.conftest import assert_one_line_error, snapshot

RNG = np.random.default_rng(7)


def _bn(name: str, x: str, c: int, out: str, dtype: type) -> tuple[onnx.NodeProto, list]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    params = {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0, 0.5, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.5, 2.0, c),
    }
    inits = [numpy_helper.from_array(v.astype(dtype), f"{name}.{k}") for k, v in params.items()]
    node = helper.make_node(
        "BatchNormalization", [x, *(f"{name}.{k}" for k in params)], [out], name=name
    )
    return node, inits


def _conv(name: str, x: str, c_in: int, c_out: int, out: str, dtype: type, k: int = 3):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    w = rng.normal(0, 1 / np.sqrt(c_in * k * k), (c_out, c_in, k, k)).astype(dtype)
    b = rng.normal(0, 0.1, c_out).astype(dtype)
    inits = [numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
    node = helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [out], name=name, pads=[k // 2] * 4
    )
    return node, inits


def conv_net(dtype: type = np.float32) -> onnx.ModelProto:
    """input -> (conv -> bn -> relu) x3 -> output: three fold sites."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    nodes, inits, x, c = [], [], "input", 3
    for i, c_out in enumerate((8, 8, 6)):
        n, w = _conv(f"conv{i}", x, c, c_out, f"c{i}", dtype)
        m, p = _bn(f"bn{i}", f"c{i}", c_out, f"b{i}", dtype)
        nodes += [n, m, helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += w + p
        x, c = f"r{i}", c_out
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("input", elem, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", elem, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def detection_net() -> onnx.ModelProto:
    """A tiny detector: backbone conv -> BN -> relu, a box head decoded through exp(), NMS.

    Outputs ``selected`` (NonMaxSuppression indices, int64) and ``kept`` (the
    boxes it keeps): both are discontinuous in the head's values.
    """
    f = np.float32
    nodes, inits = [], []
    for node, params in (
        _conv("stem", "image", 3, 8, "s", f),
        _bn("stem_bn", "s", 8, "sb", f),
        _conv("box", "r", 8, 4, "bx", f),
        _bn("box_bn", "bx", 4, "bb", f),
        _conv("cls", "r", 8, 1, "cl", f),
        _bn("cls_bn", "cl", 1, "cb", f),
    ):
        nodes.append(node)
        inits += params
        if node.name == "stem_bn":
            nodes.append(helper.make_node("Relu", ["sb"], ["r"], name="relu"))
    consts = {
        "perm_shape": np.array([1, 64, 4], np.int64),
        "score_shape": np.array([1, 1, 64], np.int64),
        "two": np.array([2], np.int64),
        "zero": np.array([0], np.int64),
        "four": np.array([4], np.int64),
        "last": np.array([2], np.int64),
        "half": np.array(0.5, f),
        "max_out": np.array([10], np.int64),
        "iou": np.array([0.5], f),
        "thr": np.array([0.2], f),
        "col": np.array(2, np.int64),
    }
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    mk = helper.make_node
    nodes += [
        mk("Transpose", ["bb"], ["bt"], perm=[0, 2, 3, 1], name="bt"),
        mk("Reshape", ["bt", "perm_shape"], ["deltas"], name="deltas"),
        mk("Slice", ["deltas", "zero", "two", "last"], ["center"], name="center"),
        mk("Slice", ["deltas", "two", "four", "last"], ["logsize"], name="logsize"),
        mk("Exp", ["logsize"], ["size"], name="exp"),
        mk("Mul", ["size", "half"], ["halfsize"], name="halfsize"),
        mk("Sub", ["center", "halfsize"], ["lo"], name="lo"),
        mk("Add", ["center", "halfsize"], ["hi"], name="hi"),
        mk("Concat", ["lo", "hi"], ["boxes"], axis=2, name="boxes"),
        mk("Sigmoid", ["cb"], ["prob"], name="prob"),
        mk("Reshape", ["prob", "score_shape"], ["scores"], name="scores"),
        mk("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "thr"], ["selected"]),
        mk("Gather", ["selected", "col"], ["which"], axis=1, name="which"),
        mk("Gather", ["boxes", "which"], ["kept"], axis=1, name="kept"),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("selected", TensorProto.INT64, None),
            helper.make_tensor_value_info("kept", TensorProto.FLOAT, None),
        ],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


NETS = {
    "conv": (conv_net, "input", np.float32, "conv1"),
    "detector": (detection_net, "image", np.float32, "box"),
    "fp16": (lambda: conv_net(np.float16), "input", np.float16, "conv1"),
}


def _save(tmp_path: Path, name: str, proto: onnx.ModelProto) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    return path


def _fold(tmp_path: Path, net: str) -> tuple[Path, Path]:
    make, *_ = NETS[net]
    src = _save(tmp_path, net, make())
    out = tmp_path / f"{net}_folded.onnx"
    result, written = bnfold.api.fold_file(src, out)
    assert written, result.verification.summary() if result.verification else ""
    return src, out


def _image_file(tmp_path: Path, name: str, dtype: type) -> Path:
    """An image-like sample: a smooth gradient with a bright square, in [0, 1]."""
    yy, xx = np.mgrid[0:8, 0:8] / 8.0
    img = np.stack([xx, yy, (xx + yy) / 2])
    img[:, 2:5, 3:6] = 0.9
    path = tmp_path / "feeds.npz"
    np.savez(path, **{name: img[None].astype(dtype)})
    return path


def _plant(folded: Path, conv: str, how: str, dtype: type) -> Path:
    """A copy of a correct fold with one wrong fold planted in ``conv``'s weight or bias."""
    model = ir.load(folded)
    node = next(n for n in model.graph if n.name == conv)
    w, b = node.inputs[1], node.inputs[2]
    weights, bias = w.const_value.numpy().copy(), b.const_value.numpy().copy()
    if how == "scale":  # channel 1's scale off by 1e-3 (fp16: 5e-2, see the test)
        error = 5e-2 if dtype == np.float16 else 1e-3
        weights[1] *= 1 + error
        bias[1] *= 1 + error
    else:  # the shift of channel 0 applied to channel 1: swap two channels' biases
        bias[[0, 1]] = bias[[1, 0]]
    w.const_value = ir.tensor(weights, name=w.name)
    b.const_value = ir.tensor(bias, name=b.name)
    path = folded.with_name(f"planted_{how}.onnx")
    ir.save(model, path)
    return path


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("how", ["scale", "shift"])
def test_planted_wrong_fold_is_caught_at_its_site(tmp_path, cli, net, how):
    """fp16 plants a 5e-2 scale error: 1e-3 is two fp16 ulps, and a correct fp16 fold's
    rounding reaches the fp16 bound (about 0.5% of the site's scale) by itself."""
    _, input_name, dtype, conv = NETS[net]
    src, folded = _fold(tmp_path, net)
    bad = _plant(folded, conv, how, dtype)
    for extra in ([], ["--inputs", _image_file(tmp_path, input_name, dtype)]):
        result = cli(["verify", src, bad, "--json", *extra])
        assert result.exit_code == 1, result.output
        payload = json.loads(result.stdout)
        failed = [s for s in payload["sites"] if not s["passed"]]
        assert failed, payload
        assert all(o["judged_by"] == "bound" for o in payload["outputs"])


@pytest.mark.parametrize("net", sorted(NETS))
def test_correct_fold_passes_on_random_and_file_inputs(tmp_path, cli, net):
    _, input_name, dtype, _ = NETS[net]
    src, folded = _fold(tmp_path, net)
    feeds = _image_file(tmp_path, input_name, dtype)
    for extra, said in (([], "3 random samples (seed 0)"), (["--inputs", feeds], "feeds.npz")):
        result = cli(["verify", src, folded, *extra])
        assert result.exit_code == 0, result.output
        assert said in result.stdout
        assert "sites: 3 compared, all within their bounds" in result.stdout
    payload = json.loads(cli(["fold", src, "-o", folded, "--inputs", feeds, "--json"]).stdout)
    verification = payload["verification"]
    assert verification["inputs"] == "1 sample from file feeds.npz"
    assert verification["derived"] is True and len(verification["sites"]) == 3
    assert all(
        s["site"] and s["basis"].startswith(np.dtype(dtype).name) for s in verification["sites"]
    )


def test_fold_json_names_the_value_each_site_is_compared_at(tmp_path):
    result = bnfold.fold(conv_net(), verify=True)
    assert [f.value for f in result.report.folded] == ["b0", "b1", "b2"]
    assert [s.name for s in result.verification.sites] == ["b0", "b1", "b2"]


# --- judging discontinuous outputs by the sites --------------------------------------


# One sample of the original at onnxruntime, fed from input "x".
ONE_SAMPLE = {"samples": 1, "level": "ORT", "inputs": "x"}


def _diff(max_abs: float, scale: float = 1.0, dtype: str = "float32") -> TensorDiff:
    """A compared tensor whose original values spanned [-scale, scale]."""
    return TensorDiff(max_abs, scale, dtype, 100, lowest=-scale, highest=scale)


def test_discontinuous_output_that_differs_is_vouched_for_by_sites_within_bounds():
    cones = Cones(discontinuous={"boxes"})
    sites = [(SiteValue("s", "conv -> bn"), _diff(1e-8))]
    result = judge(Compared([("boxes", _diff(3.0))], sites), cones, VerifyOptions(), **ONE_SAMPLE)
    assert result.passed and result.outputs[0].judged_by == "sites"
    assert "every fold site within its bound" in result.summary()


def test_discontinuous_output_fails_when_a_site_is_beyond_its_bound():
    cones = Cones(discontinuous={"boxes"})
    sites = [(SiteValue("s", "conv -> bn"), _diff(1e-3))]
    result = judge(Compared([("boxes", _diff(3.0))], sites), cones, VerifyOptions(), **ONE_SAMPLE)
    assert not result.passed and result.outputs[0].judged_by == "bound"
    assert "1 of 1 beyond their bounds" in result.summary()


def test_discontinuous_output_fails_when_a_value_feeding_the_jump_moved():
    cones = Cones(discontinuous={"boxes"})
    sites = [(SiteValue("s", "conv -> bn"), _diff(1e-8))]
    frontier = [("scores", _diff(1e-3))]
    compared = Compared([("boxes", _diff(3.0))], sites, frontier)
    result = judge(compared, cones, VerifyOptions(), **ONE_SAMPLE)
    assert not result.passed and result.frontier[0].passed is False
    assert "before discontinuous ops: 1 of 1 beyond their bounds" in result.summary()


def test_change_before_nms_outside_any_fold_site_fails(tmp_path, cli):
    """The box decoding's constant 0.5 off by 1e-3 in the fold: no site sees it, the boxes do."""
    src, folded = _fold(tmp_path, "detector")
    model = ir.load(folded)
    half = model.graph.initializers["half"]
    half.const_value = ir.tensor(np.array(0.5 * (1 + 1e-3), np.float32), name="half")
    bad = tmp_path / "bad.onnx"
    ir.save(model, bad)
    payload = json.loads(cli(["verify", src, bad, "--json"]).stdout)
    assert payload["status"] == "failed"
    assert all(s["passed"] for s in payload["sites"])
    assert [f["name"] for f in payload["frontier"] if not f["passed"]] == ["boxes"]


def test_discontinuous_output_needs_every_site_compared():
    cones = Cones(discontinuous={"boxes"})
    sites = [(SiteValue("s", "conv -> bn"), _diff(1e-8))]
    compared = Compared([("boxes", _diff(3.0))], sites, every_site=False)
    result = judge(compared, cones, VerifyOptions(), **ONE_SAMPLE)
    assert not result.passed


def test_continuous_output_is_held_to_its_own_bound_whatever_the_sites():
    sites = [(SiteValue("s", "conv -> bn"), _diff(1e-8))]
    result = judge(Compared([("y", _diff(3.0))], sites), Cones(), VerifyOptions(), **ONE_SAMPLE)
    assert not result.passed


def test_nms_output_is_found_discontinuous(tmp_path):
    from bnfold.verification.cones import analyse

    cones = analyse(ir.load(_save(tmp_path, "det", detection_net())))
    assert {"selected", "kept"} <= cones.discontinuous
    assert "boxes" not in cones.discontinuous
    assert {"boxes", "scores"} <= cones.frontier
    assert cones.of("bb") == Reductions(27 + 72, 2)  # stem (3*3*3) then box head (8*3*3)


def test_a_jump_over_shapes_alone_marks_nothing_downstream():
    """A resize whose size is computed by Floor over a Shape depends on shapes, not values."""
    mk = helper.make_node
    nodes = [
        mk("Shape", ["x"], ["shape"]),
        mk("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        mk("Floor", ["shape_f"], ["floored"]),
        mk("Cast", ["floored"], ["size"], to=TensorProto.INT64),
        mk("Resize", ["x", "", "", "size"], ["y"], mode="nearest"),
        mk("TopK", ["y", "k"], ["top", "idx"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("top", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([2], np.int64), "k")],
    )
    cones = walk(ir.from_proto(helper.make_model(graph)).graph)
    assert "y" not in cones.discontinuous and {"top", "idx"} <= cones.discontinuous
    assert cones.frontier == {"y"}


# --- derived bounds -------------------------------------------------------------------


def test_derived_bound_grows_with_reductions_and_is_exact_for_integers():
    small = derived_rtol("float32", Reductions(27, 1), 1000)
    deep = derived_rtol("float32", Reductions(30000, 70), 1000)
    assert small < deep < 1e-4
    assert derived_rtol("float16", Reductions(27, 1), 1000) > 100 * small
    assert derived_rtol("int64", Reductions(27, 1), 1000) == 0.0


def test_rtol_overrides_every_derived_bound(tmp_path):
    src, folded = _fold(tmp_path, "conv")
    result = bnfold.verify(src, folded, rtol=0.5)
    assert {o.rtol for o in result.outputs + result.sites} == {0.5}
    assert {o.basis for o in result.outputs + result.sites} == {"--rtol"}


def difference_net() -> onnx.ModelProto:
    """out = BN_a(conv(x)) - BN_b(conv'(x)): two branches near 1000 whose difference is ~0.01."""
    f = np.float32
    conv_a, w_a = _conv("conv_a", "input", 3, 4, "ca", f)
    conv_b, w_b = _conv("conv_a", "input", 3, 4, "cb", f)  # same weights, own initializers
    conv_b.name, conv_b.input[1:] = "conv_b", ["conv_b.w", "conv_b.b"]
    w_b = [
        numpy_helper.from_array(numpy_helper.to_array(t), t.name.replace("_a", "_b")) for t in w_b
    ]
    bn_a, p_a = _bn("bn_a", "ca", 4, "ya", f)
    bn_b, p_b = _bn("bn_a", "cb", 4, "yb", f)
    bn_b.name, bn_b.input[1:] = "bn_b", [f"bn_b.{k}" for k in ("scale", "bias", "mean", "var")]
    params = {t.name: numpy_helper.to_array(t) for t in p_a}
    params["bn_a.bias"] = params["bn_a.bias"] + 1000
    p_a = [numpy_helper.from_array(v, k) for k, v in params.items()]
    shifted = dict(params, **{"bn_a.mean": params["bn_a.mean"] + 0.01})
    p_b = [numpy_helper.from_array(v, k.replace("bn_a", "bn_b")) for k, v in shifted.items()]
    sub = helper.make_node("Sub", ["ya", "yb"], ["output"], name="sub")
    graph = helper.make_graph(
        [conv_a, conv_b, bn_a, bn_b, sub],
        "difference",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=w_a + w_b + p_a + p_b,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_small_difference_of_large_values_is_scaled_by_its_operands(tmp_path):
    src = _save(tmp_path, "difference", difference_net())
    out = tmp_path / "folded.onnx"
    result, written = bnfold.api.fold_file(src, out)
    assert written, result.verification.summary()
    row = result.verification.outputs[0]
    assert "scale max|ya, yb|" in row.basis
    # Against its own scale (max|output| ~ 0.01) the same error would be far past the bound.
    own_scale = np.abs(_run_onnx(src)).max()
    assert row.max_abs / own_scale > 10 * row.rtol
    planted = _plant(out, "conv_a", "scale", np.float32)
    assert not bnfold.verify(src, planted).passed


def _run_onnx(path: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    return session.run(None, {"input": x})[0]


# --- input files ------------------------------------------------------------------------


def test_folder_of_samples_and_npy_are_fed(tmp_path):
    src, folded = _fold(tmp_path, "conv")
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", input=RNG.random((1, 3, 8, 8), dtype=np.float32))
    result = bnfold.verify(src, folded, inputs=folder)
    assert (
        result.passed and result.samples == 3 and result.inputs == "3 samples from folder samples"
    )
    np.save(tmp_path / "x.npy", RNG.random((1, 3, 8, 8), dtype=np.float32))
    assert bnfold.verify(src, folded, inputs=tmp_path / "x.npy").passed


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"image": np.zeros((1, 3, 8, 8), np.float32)},
            "missing input; no model input named image",
        ),
        (
            {"input": np.zeros((1, 3, 8, 8), np.float64)},
            "'input' is float64, the model wants float32",
        ),
        (
            {"input": np.zeros((1, 3, 8, 9), np.float32)},
            "has shape 1x3x8x9, the model wants 1x3x8x8",
        ),
        ({"input": np.zeros((3, 8, 8), np.float32)}, "has shape 3x8x8"),
        ({"input": np.array([object()], dtype=object)}, "cannot read it"),
    ],
    ids=["name", "dtype", "shape", "rank", "pickle"],
)
def test_input_file_that_does_not_fit_is_one_line_and_writes_nothing(
    tmp_path, cli, arrays, message
):
    src = _save(tmp_path, "conv", conv_net())
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **arrays)
    before = snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli(["fold", src, "-o", out, "--inputs", feeds]), contains=message)
    assert_one_line_error(cli(["verify", src, src, "--inputs", feeds]), contains=message)
    assert_one_line_error(cli(["bench", src, "--inputs", feeds, "--runs", "1"]), contains=message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nothing.npz", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .npz files"),
        (lambda p: (p / "x.txt").write_text("1") and p / "x.txt", "expected an .npz or .npy"),
    ],
    ids=["missing", "empty_folder", "suffix"],
)
def test_bad_inputs_path_is_one_line(tmp_path, cli, make, message):
    src = _save(tmp_path, "conv", conv_net())
    result = cli(["verify", src, src, "--inputs", make(tmp_path)])
    assert_one_line_error(result, contains=message)


def test_npy_for_a_model_with_two_inputs_is_refused(tmp_path):
    from bnfold.verification.files import Expected, InputFiles

    np.save(tmp_path / "x.npy", np.zeros(3, np.float32))
    two = [Expected("a", np.dtype(np.float32), (3,)), Expected("b", np.dtype(np.float32), (3,))]
    with pytest.raises(bnfold.BnfoldError, match=r"a \.npy holds one input, the model has 2"):
        next(InputFiles.open(tmp_path / "x.npy").samples(two))


def test_shape_and_inputs_together_are_refused(tmp_path, cli):
    src = _save(tmp_path, "conv", conv_net())
    feeds = _image_file(tmp_path, "input", np.float32)
    result = cli(["verify", src, src, "--inputs", feeds, "--shape", "input:1x3x8x8"])
    assert_one_line_error(result, contains="--inputs has its own")


# --- memory -----------------------------------------------------------------------------


def test_comparison_makes_no_float64_copy_of_a_whole_output():
    ref = RNG.random(4 << 20, dtype=np.float32)  # 16 MiB; a float64 copy is 32 MiB
    new = ref + np.float32(1e-3)
    tracemalloc.start()
    max_abs, scale = verdict.abs_error(ref, new)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert max_abs == pytest.approx(1e-3, rel=1e-2) and scale > 0.99
    # Whole float64 copies of both would be 64 MiB; a few float64 chunks are ~10 MiB.
    assert peak < ref.nbytes


def test_results_past_the_budget_wait_on_disk():
    arrays = [np.arange(1000, dtype=np.float32), np.arange(10, dtype=np.int64)]
    with runtimes.Held(budget=100) as held:
        held.append(arrays)
        assert isinstance(held.samples[0][0], Path) and not isinstance(held.samples[0][1], Path)
        spill = held.samples[0][0]
        back = held.pop(0)
        assert np.array_equal(back[0], arrays[0]) and np.array_equal(back[1], arrays[1])
        assert held.samples[0] == []
        del back
    assert not spill.exists()


# --- broken originals are bad input (issue 16, item 6) ------------------------------------


def _broken(kind: str) -> onnx.ModelProto:
    m = conv_net()
    if kind == "undefined_input":
        m.graph.node[0].input[0] = "ghost"
    elif kind == "cycle":
        m.graph.node[0].input[0] = "r1"
    elif kind == "no_outputs":
        del m.graph.output[:]
    elif kind == "rank2_conv_weight":
        w = next(i for i in m.graph.initializer if i.name == "conv0.w")
        w.dims[:] = [8, 27]
    return m


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("undefined_input", "reads 'ghost', which nothing defines"),
        ("cycle", "reads 'r1' before it is computed"),
        ("no_outputs", "has no graph outputs"),
        ("rank2_conv_weight", "nothing to compare the fold with"),
    ],
)
def test_broken_original_is_bad_input_and_nothing_is_written(tmp_path, cli, kind, message):
    src = _save(tmp_path, kind, _broken(kind))
    before = snapshot(tmp_path)
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli(["fold", src, "-o", out]), contains=message)
    assert_one_line_error(cli(["fold", src, "-o", out, "--json"]), contains=message)
    assert_one_line_error(cli(["verify", src, src]), contains=message)
    assert snapshot(tmp_path) == before


def test_without_a_fold_report_a_bn_the_fold_no_longer_names_leaves_the_sites_incomplete(
    tmp_path,
):
    """`verify ORIGINAL FOLDED` finds sites from the original's BN outputs. A BN folded
    into the Conv after it leaves no value of its own, so it cannot be compared; then
    the sites must not count as every fold's evidence for an output that jumps."""
    c = 3
    nodes = [
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization", ["r", "g", "b", "m", "v"], ["n"], name="bn", epsilon=1e-5
        ),
        helper.make_node("Conv", ["n", "w"], ["output"], name="conv"),
    ]
    rng = np.random.default_rng(0)
    params = {
        "g": rng.uniform(0.5, 1.5, c), "b": rng.normal(0, 0.1, c),
        "m": rng.normal(0, 0.1, c), "v": rng.uniform(0.5, 2, c),
        "w": rng.normal(size=(4, c, 1, 1)),
    }  # fmt: skip
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in params.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    original = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), original)
    result = bnfold.fold(original)
    assert [f.pattern for f in result.report.folded] == ["BatchNormalization+Conv"]
    folded = tmp_path / "f.onnx"
    ir.save(result.model, folded)
    from bnfold.verification import site_values

    with_report = plan.Plan.of(original, folded, site_values(result.report))
    without = plan.Plan.of(original, folded, None)
    assert with_report.every_site
    assert without.sites == [] and not without.every_site
