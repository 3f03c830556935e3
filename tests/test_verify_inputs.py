"""Verification that exercises the model, reports what it fed, and needs evidence (issue 23).

Dynamic dimensions get sizes that make the model compute (batch 2, every strided
op seeing more than one position), the shapes fed are printed, a model that
refuses bnfold's random inputs is "not verified" rather than bad input, constant
tensors are no evidence, and the interfaces of two models must match.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import NotVerified
from tests.conftest import assert_one_line_error
from tests.test_verify_evidence import _bn, _conv, conv_net

F32 = np.float32


def _model(nodes, inits, inputs, outputs=("output",), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def strided_net(stages: int = 6) -> onnx.ModelProto:
    """image (N, 3, H, W all dynamic) -> ``stages`` x (stride-2 conv -> BN): at H = W = 32 the
    last conv sees one position; at 64, two by two."""
    nodes, inits, x, c = [], [], "image", 3
    for i in range(stages):
        conv, w = _conv(f"conv{i}", x, c, 4, f"c{i}", F32)
        conv.attribute.append(helper.make_attribute("strides", [2, 2]))
        bn, p = _bn(f"bn{i}", f"c{i}", 4, f"b{i}", F32)
        nodes += [conv, bn]
        inits += w + p
        x, c = f"b{i}", 4
    nodes[-1].output[0] = "output"
    return _model(nodes, inits, [("image", TensorProto.FLOAT, ["N", 3, "H", "W"])])


def padded_sequence_net(pad: int, bn: bool = True) -> onnx.ModelProto:
    """audio (batch, samples) -> reflect Pad by ``pad`` -> Conv1d -> BN: a Pad that
    refuses an input of ``pad`` samples or fewer (silero-VAD's first op)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([0, pad, 0, pad], np.int64), "pads"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(rng.normal(size=(4, 1, 3)).astype(F32), "w"),
    ]
    nodes = [
        helper.make_node("Pad", ["audio", "pads"], ["padded"], mode="reflect", name="pad"),
        helper.make_node("Unsqueeze", ["padded", "axis1"], ["wave"], name="unsqueeze"),
        helper.make_node("Conv", ["wave", "w"], ["conv" if bn else "output"], name="conv"),
    ]
    if bn:
        node, params = _bn("bn", "conv", 4, "output", F32)
        nodes.append(node)
        inits += params
    return _model(nodes, inits, [("audio", TensorProto.FLOAT, ["batch", "samples"])])


def constant_net() -> onnx.ModelProto:
    """The output does not depend on the input's values: Conv -> BN of ones shaped like it."""
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    conv, w = _conv("conv", "ones", 3, 4, "c", F32)
    bn, p = _bn("bn", "c", 4, "output", F32)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=ones, name="fill"),
        conv,
        bn,
    ]
    return _model(nodes, w + p, [("x", TensorProto.FLOAT, [1, 3, 8, 8])])


def _save(tmp_path: Path, name: str, proto: onnx.ModelProto) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, path)
    return path


def _fold_json(cli, src: Path, out: Path, *extra: object) -> tuple[int, dict]:
    result = cli(["fold", src, "-o", out, "--json", *extra])
    return result.exit_code, json.loads(result.stdout)


# --- inputs that exercise the model -------------------------------------------------


def test_dynamic_dims_get_batch_two_and_a_size_every_strided_op_sees_more_than_one_of(
    tmp_path, cli
):
    src, out = _save(tmp_path, "strided", strided_net()), tmp_path / "out.onnx"
    code, payload = _fold_json(cli, src, out)
    assert code == 0, payload
    verification = payload["verification"]
    assert verification["status"] == "passed"
    assert verification["fed"] == [
        {"name": "image", "dtype": "float32", "shapes": [[2, 3, 64, 64]]}
    ]
    assert "batch 2" in verification["shapes_note"]
    text = cli(["fold", src, "-o", out])
    assert "fed: image 2x3x64x64 float32 (batch 2, other dynamic dims 64" in text.stdout


def test_given_shapes_and_input_files_are_printed_as_fed(tmp_path, cli):
    src, out = _save(tmp_path, "strided", strided_net()), tmp_path / "out.onnx"
    _, payload = _fold_json(cli, src, out, "--shape", "image:1x3x96x64")
    assert payload["verification"]["fed"][0]["shapes"] == [[1, 3, 96, 64]]
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    for i, side in enumerate((64, 128)):
        image = np.random.default_rng(i).normal(size=(1, 3, side, side)).astype(F32)
        np.savez(feeds / f"{i}.npz", image=image)
    _, payload = _fold_json(cli, src, out, "--inputs", feeds)
    assert payload["verification"]["fed"][0]["shapes"] == [[1, 3, 64, 64], [1, 3, 128, 128]]


def test_a_pad_that_refuses_size_one_gets_a_size_it_takes(tmp_path, cli):
    src = _save(tmp_path, "padded", padded_sequence_net(pad=16))
    code, payload = _fold_json(cli, src, tmp_path / "out.onnx")
    assert code == 0
    verification = payload["verification"]
    assert verification["status"] == "passed", verification
    assert verification["fed"][0]["shapes"] == [[2, 32]]


def test_nothing_folded_is_written_unchanged_whatever_the_inputs(tmp_path, cli):
    src, out = (
        _save(tmp_path, "no_bn", padded_sequence_net(pad=1000, bn=False)),
        tmp_path / "o.onnx",
    )
    for extra in ([], ["--strict"]):
        result = cli(["fold", src, "-o", out, *extra])
        assert result.exit_code == 0, result.output
        assert "nothing folded or lowered: the model is unchanged" in result.stdout
        assert "wrote" in result.stdout and out.exists()


def test_random_inputs_the_model_refuses_are_not_verified_not_bad_input(tmp_path, cli):
    src, out = _save(tmp_path, "padded", padded_sequence_net(pad=1000)), tmp_path / "out.onnx"
    code, payload = _fold_json(cli, src, out, "--no-prove")
    assert code == 0 and payload["written"] is True
    verification = payload["verification"]
    assert (verification["status"], verification["reason_code"]) == (
        "not_verified",
        NotVerified.INPUTS_UNUSABLE.value,
    )
    assert "--shape" in verification["reason"] and "--inputs" in verification["reason"]
    assert verification["fed"]  # what was tried first is still said
    strict = cli(["fold", src, "-o", tmp_path / "strict.onnx", "--strict", "--no-prove"])
    assert strict.exit_code == 1 and not (tmp_path / "strict.onnx").exists()
    # The fold is proven for all inputs: sampling's unusable inputs no longer matter.
    code, payload = _fold_json(cli, src, out)
    verification = payload["verification"]
    assert (verification["status"], verification["reason_code"]) == ("passed", "inputs_unusable")
    assert verification["proof"]["holds"]
    given = cli(["fold", src, "-o", out, "--shape", "audio:1x1500", "--json"])
    assert json.loads(given.stdout)["verification"]["status"] == "passed"


def test_the_users_inputs_failing_is_bad_input(tmp_path, cli):
    src = _save(tmp_path, "padded", padded_sequence_net(pad=16))
    np.save(tmp_path / "short.npy", np.zeros((1, 4), F32))
    result = cli(["fold", src, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "short.npy"])
    assert_one_line_error(result, contains="the original model failed to run")
    assert not (tmp_path / "out.onnx").exists()


def test_runtime_log_lines_do_not_reach_stderr(tmp_path):
    """onnxruntime logs a failing kernel in colour before it raises; only bnfold's line shows."""
    src = _save(tmp_path, "padded", padded_sequence_net(pad=16))
    np.save(tmp_path / "short.npy", np.zeros((1, 4), F32))
    out = tmp_path / "out.onnx"
    command = [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(out)]
    done = subprocess.run(
        [*command, "--inputs", str(tmp_path / "short.npy")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("bnfold: error:")
    assert "\x1b[" not in done.stderr
    unusable = _save(tmp_path, "unusable", padded_sequence_net(pad=1000))
    done = subprocess.run(
        [*command[:4], str(unusable), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""


# --- evidence -----------------------------------------------------------------------


def test_constant_outputs_and_sites_are_not_verified_never_passed(tmp_path, cli):
    src, out = _save(tmp_path, "constant", constant_net()), tmp_path / "out.onnx"
    code, payload = _fold_json(cli, src, out, "--no-prove")
    verification = payload["verification"]
    assert code == 0 and payload["written"] is True
    assert (verification["status"], verification["reason_code"]) == ("not_verified", "no_evidence")
    assert [r["evidence"] for r in verification["outputs"] + verification["sites"]] == [
        False,
        False,
    ]
    text = cli(["verify", src, out])
    assert text.exit_code == 1 and "no evidence: constant over the samples" in text.stdout
    assert cli(["fold", src, "-o", tmp_path / "s.onnx", "--strict", "--no-prove"]).exit_code == 1
    # Evidence of another kind: the proof holds for all inputs, so the fold is verified.
    code, payload = _fold_json(cli, src, out, "--strict")
    assert code == 0 and payload["verification"]["status"] == "passed"
    assert payload["verification"]["reason_code"] == "no_evidence"
    assert cli(["verify", "--prove", src, out]).exit_code == 0


def test_sensitivity_counts_the_channels_a_planted_error_would_show_in(tmp_path, cli):
    src, out = _save(tmp_path, "conv", conv_net()), tmp_path / "out.onnx"
    _, payload = _fold_json(cli, src, out)
    sites = payload["verification"]["sites"]
    assert [(s["catches"], s["channels"]) for s in sites] == [(8, 8), (8, 8), (6, 6)]
    assert "would be caught at 3 of 3 sites" in cli(["verify", src, out]).stdout
    dim = conv_net()
    gamma = next(i for i in dim.graph.initializer if i.name == "bn1.scale")
    values = numpy_helper.to_array(gamma).copy()
    values[2] = 1e-9  # channel 2 of bn1 is all but zero: an error there hides
    gamma.CopyFrom(numpy_helper.from_array(values, "bn1.scale"))
    beta = next(i for i in dim.graph.initializer if i.name == "bn1.bias")
    shifts = numpy_helper.to_array(beta).copy()
    shifts[2] = 0.0
    beta.CopyFrom(numpy_helper.from_array(shifts, "bn1.bias"))
    src = _save(tmp_path, "dim", dim)
    _, payload = _fold_json(cli, src, out)
    (weak,) = [s for s in payload["verification"]["sites"] if s["catches"] < s["channels"]]
    assert weak["site"] == "conv1 -> bn1" and weak["catches"] == 7


# --- two models that cannot be compared ---------------------------------------------


def _renamed_input(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    old = proto.graph.input[0].name
    proto.graph.input[0].name = name
    for node in proto.graph.node:
        node.input[:] = [name if i == old else i for i in node.input]
    return proto


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: _renamed_input(conv_net(), "pixels"), "input 'input' only in the original"),
        (lambda: conv_net(np.float16), "input 'input' is float32 vs float16"),
    ],
    ids=["name", "dtype"],
)
def test_models_whose_interfaces_differ_are_bad_input(tmp_path, cli, other, message):
    a, b = _save(tmp_path, "a", conv_net()), _save(tmp_path, "b", other())
    result = cli(["verify", a, b])
    assert_one_line_error(result, contains=f"the interfaces differ: {message}")


def test_inputs_of_another_rank_are_bad_input(tmp_path, cli):
    a = _save(tmp_path, "a", padded_sequence_net(pad=16))
    other = padded_sequence_net(pad=16)
    other.graph.input[0].type.tensor_type.shape.dim.add().dim_param = "extra"
    b = _save(tmp_path, "b", other)
    assert_one_line_error(cli(["verify", a, b]), contains="input 'audio' has rank 2 vs 3")


# --- BatchNorms old exporters wrote --------------------------------------------------


def _bn_model(bn_inputs: list[str], bn_outputs: list[str]) -> onnx.ModelProto:
    conv, w = _conv("conv", "x", 3, 3, "c", F32)
    bn, p = _bn("bn", "c", 3, "output", F32)
    bn.input[:] = bn_inputs
    bn.output[:] = bn_outputs
    model = _model([conv, bn], w + p, [("x", TensorProto.FLOAT, [1, 3, 5, 5])], opset=9)
    model.ir_version = 7
    return model


def test_bn_with_an_empty_optional_output_is_inference_in_the_reference_evaluator(tmp_path, cli):
    """onnxruntime refuses two outputs at opset 9; onnx's evaluator ran it in training mode."""
    names = ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"]
    src = _save(tmp_path, "old", _bn_model(names, ["output", ""]))
    code, payload = _fold_json(cli, src, tmp_path / "out.onnx")
    assert code == 0
    verification = payload["verification"]
    assert verification["status"] == "passed", verification
    assert verification["optimization_level"].startswith("onnx.reference")


def test_bn_with_too_few_inputs_is_one_line(tmp_path, cli):
    src = _save(tmp_path, "short", _bn_model(["c", "bn.scale", "bn.bias"], ["output"]))
    for command in (["fold", src, "-o", tmp_path / "out.onnx"], ["verify", src, src]):
        assert_one_line_error(cli(command), contains="'bn' (BatchNormalization) has 3 inputs")


# --- the Python API says the same --------------------------------------------------


def test_verify_reports_the_shapes_it_fed(tmp_path):
    src = _save(tmp_path, "strided", strided_net())
    result = bnfold.verify(str(src), str(src))
    assert [(i.name, i.shapes) for i in result.fed] == [("image", [[2, 3, 64, 64]])]
    assert result.passed
