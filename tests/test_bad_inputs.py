"""The bad-input matrix: one line, exit 2, no traceback, nothing written, input untouched.

Values a fold cannot use (NaN stats, var + eps <= 0, wrong shapes) are not
errors: that one site is refused with a reason code and the rest still fold.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold import BnfoldError, Code
from bnfold.api import verify as verify_models
from bnfold.onnx_front import io
from bnfold.report import NotVerified
from bnfold.verification import inputs as feeding
from tests.conftest import assert_one_line_error, conv_bn_model, snapshot

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, data: bytes | onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


def _fails_cleanly(cli, tmp_path: Path, model: Path, *, contains: str = "", extra=()) -> str:
    """fold, inspect and verify all refuse ``model`` with one line; nothing changes on disk."""
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    line = assert_one_line_error(cli(["fold", model, "-o", out, *extra]), contains=contains)
    assert_one_line_error(cli(["inspect", model]), contains=contains)
    assert_one_line_error(cli(["verify", model, model]), contains=contains)
    assert snapshot(tmp_path) == before
    assert list(out.parent.iterdir()) == []
    return line


# --- files that are not models ------------------------------------------------------


def test_empty_file(cli, tmp_path):
    model = _write(tmp_path / "empty.onnx", b"")
    _fails_cleanly(cli, tmp_path, model, contains="empty file")


def test_missing_file(cli, tmp_path):
    assert_one_line_error(cli(["fold", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"]))
    assert list(tmp_path.iterdir()) == []


def test_truncated_protobuf(cli, tmp_path, samples):
    data = (samples / "resnet_tiny.onnx").read_bytes()
    for cut in (1, 7, len(data) // 3, len(data) - 1):
        model = _write(tmp_path / f"cut{cut}.onnx", data[:cut])
        _fails_cleanly(cli, tmp_path, model, contains="not")


@pytest.mark.parametrize(
    "content",
    [
        b"ir_version: 8\ngraph { name: 'g' }\n",
        json.dumps({"irVersion": "8", "graph": {"node": []}}).encode(),
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
        b"PK\x03\x04" + bytes(64),  # a zip archive, e.g. a torch checkpoint renamed
    ],
    ids=["text", "json", "png", "zip"],
)
def test_non_protobuf_file_named_onnx(cli, tmp_path, content):
    model = _write(tmp_path / "model.onnx", content)
    _fails_cleanly(cli, tmp_path, model, contains="not")


@pytest.mark.parametrize(
    "message",
    [
        numpy_helper.from_array(np.ones((2, 3), np.float32), "t"),
        helper.make_graph([], "g", [], []),
        helper.make_node("Relu", ["x"], ["y"]),
        onnx.OperatorSetIdProto(domain="", version=17),
    ],
    ids=["TensorProto", "GraphProto", "NodeProto", "OperatorSetIdProto"],
)
def test_valid_protobuf_that_is_not_a_model(cli, tmp_path, message):
    model = _write(tmp_path / "model.onnx", message.SerializeToString())
    _fails_cleanly(cli, tmp_path, model, contains="not")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_special_file_named_onnx_is_refused_without_reading(cli, tmp_path, kind):
    """A FIFO would block a reader forever and /dev/zero never ends: refused by type."""
    model = tmp_path / "model.onnx"
    if kind == "fifo":
        os.mkfifo(model)
    else:
        os.symlink("/dev/zero", model)
    _fails_cleanly(cli, tmp_path, model, contains="not a regular file")


def test_model_with_no_graph(cli, tmp_path):
    proto = onnx.ModelProto(ir_version=8)
    proto.opset_import.add(domain="", version=17)
    model = _write(tmp_path / "model.onnx", proto)
    _fails_cleanly(cli, tmp_path, model, contains="no graph")


def test_model_with_no_opset_imports(cli, tmp_path):
    proto = conv_bn_model()
    del proto.opset_import[:]
    model = _write(tmp_path / "model.onnx", proto)
    _fails_cleanly(cli, tmp_path, model, contains="opset")


def test_directory_named_onnx_is_not_a_model_for_inspect(cli, tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    assert_one_line_error(cli(["inspect", tmp_path / "dir.onnx"]))


def test_api_raises_bnfold_error_not_protobuf_errors(tmp_path):
    model = _write(tmp_path / "model.onnx", b"\x08\x08\x12\xff\xff")
    with pytest.raises(BnfoldError):
        bnfold.fold(model)
    with pytest.raises(BnfoldError):
        bnfold.inspect(model)


# --- opsets onnxruntime cannot run --------------------------------------------------


def _ir3(proto: onnx.ModelProto) -> onnx.ModelProto:
    """IR < 4 lists every initializer as a graph input too."""
    for init in proto.graph.initializer:
        proto.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    return proto


def _old_opset_model(tmp_path: Path, opset: int, ir_version: int, bn_attrs: dict) -> Path:
    proto = conv_bn_model(opset=opset, ir_version=ir_version)
    for key, value in bn_attrs.items():
        proto.graph.node[1].attribute.append(helper.make_attribute(key, value))
    if ir_version < 4:
        _ir3(proto)
    return _write(tmp_path / "model.onnx", proto)


@pytest.mark.parametrize(
    ("opset", "ir_version", "bn_attrs"),
    [
        (1, 3, {"is_test": 1, "consumed_inputs": [0, 0, 0, 1, 1]}),
        (5, 3, {"is_test": 1}),
    ],
    ids=["opset1", "opset5"],
)
def test_opset_onnxruntime_cannot_run_is_verified_by_the_reference_evaluator(
    cli, tmp_path, opset, ir_version, bn_attrs
):
    model = _old_opset_model(tmp_path, opset, ir_version, bn_attrs)
    result = cli(["fold", model, "-o", tmp_path / "folded.onnx", "--json"])
    assert result.exit_code == 0, result.output
    verification = json.loads(result.stdout)["verification"]
    assert verification["status"] == "passed", verification
    assert verification["optimization_level"].startswith("onnx.reference")


@pytest.mark.parametrize(("opset", "ir_version", "bn_attrs"), [(99, 8, {})], ids=["opset99"])
def test_opset_no_runtime_knows_folds_but_is_not_verified(
    cli, tmp_path, opset, ir_version, bn_attrs
):
    """Fold still works; sampling says "not verified" with onnxruntime's reason.

    Without the proof: exit 0 and the fold is written; with --strict exit 1 and nothing
    written. The proof needs no runtime: it verifies the fold, and --strict writes it.
    """
    model = _old_opset_model(tmp_path, opset, ir_version, bn_attrs)
    before = model.read_bytes()
    out = tmp_path / "folded.onnx"
    result = cli(["fold", model, "-o", out, "--json", "--no-prove"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["verification"]["status"] == "not_verified"
    assert "onnxruntime cannot run the original" in payload["verification"]["reason"]
    assert len(payload["report"]["folded"]) == 1
    assert out.is_file() and model.read_bytes() == before
    strict = cli(["fold", model, "-o", tmp_path / "strict.onnx", "--strict", "--no-prove"])
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    assert "NOT VERIFIED" in strict.stdout and "--strict: nothing written" in strict.stdout
    assert not (tmp_path / "strict.onnx").exists() and model.read_bytes() == before
    proven = cli(["fold", model, "-o", tmp_path / "strict.onnx", "--strict", "--json"])
    assert proven.exit_code == 0, proven.output
    verification = json.loads(proven.stdout)["verification"]
    assert verification["status"] == "passed" and verification["proof"]["holds"]
    assert "onnxruntime cannot run the original" in verification["reason"]


# --- inputs too large to verify ----------------------------------------------------


def _spec(name: str, dims: list[int | None], dtype: type = np.float32) -> feeding.InputSpec:
    return feeding.InputSpec(name, dtype, dims, "tensor(float)")


def test_random_feeds_over_the_cap_raise_before_allocating(monkeypatch):
    def no_allocation(*args):
        raise AssertionError("random inputs were allocated")

    monkeypatch.setattr(feeding, "_random_array", no_allocation)
    inputs = [_spec("small", [1, 8]), _spec("image", [64, 3, 8192, 8192])]
    with pytest.raises(feeding.InputsTooLarge) as caught:
        feeding.random_feeds(inputs, np.random.default_rng(0), {}, max_bytes=1 << 30)
    assert caught.value.largest.name == "image"
    assert caught.value.total == 64 * 3 * 8192 * 8192 * 4 + 8 * 4
    assert "all inputs of one sample" in str(caught.value)


def test_random_feeds_cap_counts_shape_overrides_and_dynamic_dims():
    inputs = [_spec("x", [None, 3, 1024, 1024])]  # dynamic batch: 1 -> 12 MiB
    rng = np.random.default_rng(0)
    assert feeding.random_feeds(inputs, rng, {}, max_bytes=12 << 20)["x"].shape == (
        1,
        3,
        1024,
        1024,
    )
    with pytest.raises(feeding.InputsTooLarge, match="2x3x1024x1024"):
        feeding.random_feeds(inputs, rng, {"x": [2, 3, 1024, 1024]}, max_bytes=12 << 20)


@pytest.mark.parametrize(
    "dims, shape, message",
    [
        (
            [1, 3, 8, 8],
            [2, 3, 8, 8],
            "dimension 0 of the input is fixed at 1 (1x3x8x8), the shape gives 2",
        ),
        (
            [None, 3, 8, 8],
            [2, 4, 8, 8],
            "dimension 1 of the input is fixed at 3 (?x3x8x8), the shape gives 4",
        ),
        ([None, 3, 8, 8], [2, 3, 8], "the input has 4 dimensions (?x3x8x8), the shape gives 3"),
        ([None, 3], [0, 3], "every dimension must be positive, got 0x3"),
        ([], [-1], "every dimension must be positive, got -1"),
    ],
)
def test_a_shape_the_input_cannot_take_is_refused_by_name(dims, shape, message):
    with pytest.raises(BnfoldError) as caught:
        feeding.plan_feeds([_spec("x", dims)], {"x": shape})
    assert str(caught.value) == f"--shape x: {message}"


@pytest.mark.parametrize("dims", [[None, 3, None, None], []])
def test_a_shape_that_fits_dynamic_or_unknown_dims_is_taken(dims):
    """onnxruntime reports an unknown rank as [] (like a scalar): any positive shape goes."""
    plans = feeding.plan_feeds([_spec("x", dims)], {"x": [2, 3, 5, 7]})
    assert plans[0].shape == (2, 3, 5, 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.bool_])
def test_random_inputs_drawn_in_blocks_equal_one_draw(monkeypatch, dtype):
    """Blockwise drawing bounds memory but must not change what a seed gives."""
    monkeypatch.setattr(feeding, "_DRAW_BLOCK", 7)
    got = feeding.random_feeds([_spec("x", [3, 5, 4], dtype)], np.random.default_rng(5), {})["x"]
    rng = np.random.default_rng(5)
    if np.dtype(dtype).kind in "biu":
        want = rng.integers(0, 2, (3, 5, 4)).astype(dtype)
    else:
        want = rng.standard_normal((3, 5, 4)).astype(dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


def test_verify_with_a_small_cap_is_not_verified(tmp_path):
    model = _write(tmp_path / "model.onnx", conv_bn_model())  # 1x3x6x6 float32: 432 bytes
    result = bnfold.verify(str(model), str(model), max_input_bytes=431)
    assert result.status == "not_verified" and result.reason_code == NotVerified.INPUTS_TOO_LARGE
    assert "432 B" in result.reason and "431 B" in result.reason
    assert bnfold.verify(str(model), str(model), max_input_bytes=432).passed


# --- external data -------------------------------------------------------------------


def _external_model(folder: Path, name: str = "model.onnx", location: str = "model.data") -> Path:
    """conv->bn with every tensor in ``folder/location``."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = conv_bn_model(c_in=4, c_out=8)
    path = folder / name
    onnx.save_model(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def _set_location(model: Path, location: str, *, only_first: bool = False, **fields: int) -> None:
    proto = onnx.load(model, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
            elif entry.key in fields:
                entry.value = str(fields[entry.key])
        if only_first:
            break
    model.write_bytes(proto.SerializeToString())


def test_external_data_missing(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    (tmp_path / "m" / "model.data").unlink()
    _fails_cleanly(cli, tmp_path, model, contains="missing")


@pytest.mark.parametrize(
    "location", ["../../secret.data", "../secret.data", "sub/../../secret.data"]
)
def test_external_data_dotdot_escapes(cli, tmp_path, location):
    folder = tmp_path / "a" / "m"
    model = _external_model(folder)
    # The escaping target is a perfectly readable copy of the data: only the path is wrong.
    shutil.copy(folder / "model.data", tmp_path / "secret.data")
    shutil.copy(folder / "model.data", tmp_path / "a" / "secret.data")
    _set_location(model, location)
    _fails_cleanly(cli, tmp_path, model, contains="escapes the model's folder")


def test_external_data_absolute_location(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    secret = tmp_path / "secret.data"
    shutil.copy(tmp_path / "m" / "model.data", secret)
    _set_location(model, str(secret))
    _fails_cleanly(cli, tmp_path, model, contains="escapes the model's folder")


def test_external_data_absolute_location_inside_folder_is_refused_too(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    _set_location(model, str(tmp_path / "m" / "model.data"))
    _fails_cleanly(cli, tmp_path, model, contains="escapes")


def test_external_data_symlink_out_of_folder(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    secret = tmp_path / "secret.data"
    shutil.move(tmp_path / "m" / "model.data", secret)
    os.symlink(secret, tmp_path / "m" / "model.data")
    _fails_cleanly(cli, tmp_path, model, contains="outside the model's folder")


def test_external_data_symlinked_subfolder_out_of_folder(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "m" / "model.data", tmp_path / "elsewhere" / "model.data")
    os.symlink(tmp_path / "elsewhere", tmp_path / "m" / "sub")
    _set_location(model, "sub/model.data")
    _fails_cleanly(cli, tmp_path, model, contains="outside the model's folder")


def test_external_data_symlink_inside_folder_is_fine(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    os.rename(tmp_path / "m" / "model.data", tmp_path / "m" / "real.data")
    os.symlink("real.data", tmp_path / "m" / "model.data")
    result = cli(["fold", model, "-o", tmp_path / "m" / "folded.onnx"])
    assert result.exit_code == 0, result.output


def test_external_data_hard_link_is_refused(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    secret = tmp_path / "secret.data"
    shutil.move(tmp_path / "m" / "model.data", secret)
    os.link(secret, tmp_path / "m" / "model.data")
    _fails_cleanly(cli, tmp_path, model, contains="hard link")


def test_external_data_shorter_than_declared(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    data = tmp_path / "m" / "model.data"
    data.write_bytes(data.read_bytes()[:-5])
    _fails_cleanly(cli, tmp_path, model, contains="shorter than declared")


def test_external_data_offset_past_the_end(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    _set_location(model, "model.data", only_first=True, offset=1 << 20)
    _fails_cleanly(cli, tmp_path, model, contains="shorter than declared")


def test_external_data_length_disagrees_with_shape(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    _set_location(model, "model.data", only_first=True, length=4)
    _fails_cleanly(cli, tmp_path, model, contains="declares length")


def test_external_data_is_a_folder(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    (tmp_path / "m" / "model.data").unlink()
    (tmp_path / "m" / "model.data").mkdir()
    _fails_cleanly(cli, tmp_path, model, contains="not a regular file")


def test_external_data_of_a_constant_attribute_cannot_escape(cli, tmp_path):
    """Tensor attributes (a Constant's value) are checked like initializers."""
    folder = tmp_path / "m"
    folder.mkdir()
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    value = onnx.TensorProto(name="k", data_type=onnx.TensorProto.FLOAT, dims=[4])
    value.data_location = onnx.TensorProto.EXTERNAL
    value.external_data.add(key="location", value="../secret.data")
    proto = conv_bn_model()
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=value))
    proto.graph.output.append(helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [4]))
    model = _write(folder / "model.onnx", proto)
    _fails_cleanly(cli, tmp_path, model, contains="escapes")


# --- values a fold cannot use: refuse that site, fold the rest ------------------------


def _two_sites(**bad: np.ndarray) -> onnx.ModelProto:
    """input -> conv1 -> bn1 (``bad`` stats) -> conv2 -> bn2 (fine) -> output."""
    first = conv_bn_model(c_in=3, c_out=4, seed=1, **bad)
    second = conv_bn_model(c_in=4, c_out=4, seed=2)
    graph = first.graph
    graph.node[1].output[0] = "mid"
    for node in second.graph.node:
        node.name = node.name.replace("1", "2")
        node.input[:] = [
            "mid" if n == "input" else n.replace("1.", "2.").replace("c1", "c2") for n in node.input
        ]
        node.output[:] = [n.replace("c1", "c2") for n in node.output]
        graph.node.append(node)
    for init in second.graph.initializer:
        init.name = init.name.replace("1.", "2.")
        graph.initializer.append(init)
    return first


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("mean", [np.nan, 0, 0, 0]),
        ("var", [1, np.nan, 1, 1]),
        ("scale", [1, np.nan, 1, 1]),
        ("bias", [0, 0, np.nan, 0]),
        ("var", [1, 1, np.inf, 1]),
        ("mean", [0, 0, 0, -np.inf]),
        ("scale", [np.inf, 1, 1, 1]),
        ("bias", [0, -np.inf, 0, 0]),
    ],
    ids=["nan_mean", "nan_var", "nan_gamma", "nan_beta", "inf_var", "inf_mean", "inf_gamma",
         "inf_beta"],
)  # fmt: skip
def test_nan_or_inf_refuses_that_fold_and_folds_the_rest(cli, tmp_path, field, values):
    model = _write(tmp_path / "model.onnx", _two_sites(**{field: np.array(values)}))
    before = snapshot(tmp_path)
    result = bnfold.fold(str(model))
    assert [r.code for r in result.report.refused] == [Code.BAD_VALUES]
    assert result.report.refused[0].site == "conv1 -> bn1"
    assert [f.site for f in result.report.folded] == ["conv2 -> bn2"]
    out = tmp_path / "folded.onnx"
    cli_result = cli(["fold", model, "-o", out, "--json"])
    assert cli_result.exit_code == 0, cli_result.output
    payload = json.loads(cli_result.stdout)
    assert payload["report"]["refused"][0]["code"] == "bad_values"
    if field == "var" and np.isinf(values).any():  # that channel is its bias: still finite
        assert payload["verification"]["status"] == "passed"
    else:
        _assert_no_evidence(payload["verification"])
    folded_ops = [n.op_type for n in onnx.load(out).graph.node]
    assert folded_ops == ["Conv", "BatchNormalization", "Conv"]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "folded.onnx"} == before


def _assert_no_evidence(verification: dict) -> None:
    """bn1's non-finite channel reaches every value conv2 computes: each compared tensor
    is NaN or infinite throughout, in both models, so agreeing proves nothing. The fold
    of conv2 -> bn2 is proven for all inputs all the same: that verifies it."""
    assert verification["reason_code"] == "no_evidence"
    assert not any(r["evidence"] for r in verification["outputs"] + verification["sites"])
    assert verification["proof"]["holds"], verification["proof"]["headline"]
    assert verification["status"] == "passed", verification


def _with_epsilon(proto: onnx.ModelProto, eps: float) -> onnx.ModelProto:
    proto.graph.node[1].attribute.append(helper.make_attribute("epsilon", eps))
    return proto


@pytest.mark.parametrize(
    ("var", "eps"),
    [([1, -1e-3, 1, 1], 1e-3), ([1, 1, -2.0, 1], 1e-5), ([-3.0, -3.0, -3.0, -3.0], 1e-5)],
    ids=["sum_zero", "negative", "all_negative"],
)
def test_var_plus_eps_not_positive_refuses_that_fold(cli, tmp_path, var, eps):
    proto = _two_sites(var=np.array(var))
    _with_epsilon(proto, eps)
    model = _write(tmp_path / "model.onnx", proto)
    result = cli(["fold", model, "-o", tmp_path / "folded.onnx", "--json"])
    assert result.exit_code == 0, result.output
    _assert_no_evidence(json.loads(result.stdout)["verification"])
    report = json.loads(result.stdout)["report"]
    assert [r["code"] for r in report["refused"]] == ["bad_values"]
    assert [f["site"] for f in report["folded"]] == ["conv2 -> bn2"]


def test_var_plus_default_eps_zero_is_refused():
    eps32 = float(np.float32(1e-5))
    result = bnfold.fold(conv_bn_model(var=np.array([1, -eps32, 1, 1])))
    assert [r.code for r in result.report.refused] == [Code.BAD_VALUES]


def test_verify_accepts_identical_infinite_outputs(tmp_path):
    model = _write(tmp_path / "model.onnx", conv_bn_model(mean=np.array([0, 0, 0, -np.inf])))
    result = verify_models(str(model), str(model))
    assert result.passed, result.summary()


@pytest.mark.parametrize("c", [3, 5])
def test_bn_parameters_of_wrong_shape_are_refused(cli, tmp_path, c):
    """The site is refused (inspect says so); the original does not run: fold is bad input."""
    rng = np.random.default_rng(0)
    bad = {k: rng.uniform(0.5, 1.5, c) for k in ("scale", "bias", "mean", "var")}
    model = _write(tmp_path / "model.onnx", conv_bn_model(**bad))
    report = cli(["inspect", model, "--json"])
    assert report.exit_code == 0, report.output
    payload = json.loads(report.stdout)
    assert [r["code"] for r in payload["refused"]] == ["bad_shape"]
    assert payload["folded"] == []
    result = cli(["fold", model, "-o", tmp_path / "folded.onnx"])
    assert_one_line_error(result, contains="nothing to compare the fold with")
    assert not (tmp_path / "folded.onnx").exists()


def test_bn_parameter_of_wrong_rank_is_refused(tmp_path):
    proto = conv_bn_model()
    scale = next(i for i in proto.graph.initializer if i.name == "bn1.scale")
    scale.dims[:] = [2, 2]
    result = bnfold.fold(proto)
    assert [r.code for r in result.report.refused] == [Code.BAD_SHAPE]


@pytest.mark.parametrize(
    ("c_in", "c_out"), [(0, 4), (3, 0)], ids=["no_in_channels", "no_out_channels"]
)
def test_zero_size_tensors_fold_and_verify(cli, tmp_path, c_in, c_out):
    """No input channels: the output is the bias whatever the input. No output channels:
    nothing is computed. Either way the comparison carries no evidence."""
    model = _write(tmp_path / "model.onnx", conv_bn_model(c_in=c_in, c_out=c_out))
    result = cli(["fold", model, "-o", tmp_path / "folded.onnx", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["report"]["folded"]) == 1
    verification = payload["verification"]
    assert verification["reason_code"] == "no_evidence" and verification["proof"]["holds"]
    assert verification["status"] == "passed"  # by the proof: sampling has no evidence
    sampled = json.loads(
        cli(["fold", model, "-o", tmp_path / "s.onnx", "--json", "--no-prove"]).stdout
    )
    assert sampled["verification"]["status"] == "not_verified"


def test_zero_size_spatial_input_folds(cli, tmp_path):
    model = _write(tmp_path / "model.onnx", conv_bn_model(hw=0))
    result = cli(["fold", model, "-o", tmp_path / "folded.onnx", "--no-verify"])
    assert result.exit_code == 0, result.output


# --- output paths ------------------------------------------------------------------------


def test_output_equal_to_input_is_refused(cli, tmp_path, samples):
    model = tmp_path / "model.onnx"
    shutil.copy(samples / "conv2d_bn.onnx", model)
    before = snapshot(tmp_path)
    assert_one_line_error(cli(["fold", model, "-o", model]), contains="--in-place")
    os.symlink(model, tmp_path / "alias.onnx")
    before = snapshot(tmp_path)
    assert_one_line_error(cli(["fold", model, "-o", tmp_path / "alias.onnx"]), contains="in-place")
    assert_one_line_error(cli(["fold", model, "-o", tmp_path / "." / "model.onnx"]))
    assert snapshot(tmp_path) == before


def test_in_place_overwrites_atomically(cli, tmp_path, samples):
    model = tmp_path / "model.onnx"
    shutil.copy(samples / "conv2d_bn.onnx", model)
    inode = model.stat().st_ino
    result = cli(["fold", model, "--in-place"])
    assert result.exit_code == 0, result.output
    assert model.stat().st_ino != inode  # renamed into place, not rewritten
    assert [n.op_type for n in onnx.load(model).graph.node] == ["Conv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_in_place_with_external_data(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "original")
    result = cli(["fold", model, "--in-place"])
    assert result.exit_code == 0, result.output
    assert bnfold.inspect(str(model)).folded == []
    assert verify_models(str(tmp_path / "original" / "model.onnx"), str(model)).passed


def test_output_over_the_inputs_external_data_is_refused(cli, tmp_path):
    model = _external_model(tmp_path / "m")
    before = snapshot(tmp_path)
    line = assert_one_line_error(cli(["fold", model, "-o", tmp_path / "m" / "model.data"]))
    assert "not an ONNX model" in line or "external data" in line
    assert snapshot(tmp_path) == before


def test_output_over_a_file_that_is_not_a_model_is_refused(cli, tmp_path, samples):
    precious = tmp_path / "notes.onnx"
    precious.write_text("not a model, keep me")
    assert_one_line_error(cli(["fold", samples / "conv2d_bn.onnx", "-o", precious]))
    assert precious.read_text() == "not a model, keep me"


def test_output_folder_missing(cli, tmp_path, samples):
    result = cli(["fold", samples / "conv2d_bn.onnx", "-o", tmp_path / "no" / "such" / "o.onnx"])
    assert_one_line_error(result, contains="does not exist")
    assert list(tmp_path.iterdir()) == []


def test_output_is_a_folder(cli, tmp_path, samples):
    (tmp_path / "out.onnx").mkdir()
    assert_one_line_error(cli(["fold", samples / "conv2d_bn.onnx", "-o", tmp_path / "out.onnx"]))


def _make_read_only(folder: Path) -> bool:
    """chmod is enough for a normal user; root needs the immutable flag (if allowed)."""
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() != 0:
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def _undo_read_only(folder: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(stat.S_IRWXU)


def test_output_folder_read_only(cli, tmp_path, samples):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    if not _make_read_only(out_dir):
        _undo_read_only(out_dir)
        pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    try:
        result = cli(["fold", samples / "conv2d_bn.onnx", "-o", out_dir / "o.onnx"])
        assert_one_line_error(result, contains="cannot write")
        assert list(out_dir.iterdir()) == []
    finally:
        _undo_read_only(out_dir)


# --- disk full ------------------------------------------------------------------------------

_FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # then write() fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from bnfold.cli.main import main
sys.argv = ["bnfold", *sys.argv[2:]]
main()
"""


def _big_conv_bn(path: Path, c: int = 64, external: bool = False) -> Path:
    """~150 KB of weights, conv 64->64 3x3: inline, or as external data, whose
    folded weight the save streams block by block (write-behind)."""
    proto = conv_bn_model(c_in=c, c_out=c, hw=4)
    if not external:
        return _write(path, proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto, path, save_as_external_data=True, location="model.data", size_threshold=0
    )
    return path


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_disk_full_while_writing_leaves_nothing(tmp_path, external):
    """A file-size limit makes every write past 64 KiB fail, as a full disk would."""
    model = _big_conv_bn(tmp_path / "in" / "model.onnx", external=external)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(tmp_path / "in")
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(64 << 10), "fold", str(model), "-o",
         str(out_dir / "folded.onnx"), "--no-verify"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "too large" in lines[0], proc.stderr
    assert list(out_dir.iterdir()) == []
    assert snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_disk_full_on_a_tiny_tmpfs(tmp_path, external):
    """A real ENOSPC, where mounting a 64 KiB tmpfs is allowed (root in a container)."""
    model = _big_conv_bn(tmp_path / "in" / "model.onnx", external=external)
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mount not permitted here")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(mount / "f.onnx")],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"bnfold: error: cannot write {str(mount / 'f.onnx')!r}: no space left on device"
        ]
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_save_model_error_is_one_line_bnfold_error(tmp_path, monkeypatch):
    model = io.load_model(ROOT / "sample_models" / "conv2d_bn.onnx")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ir, "save", full)
    with pytest.raises(BnfoldError, match="no space left on device"):
        io.save_model(model, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bnfold_verify_stays_callable_after_a_verified_fold(samples):
    bnfold.fold(str(samples / "conv2d_bn.onnx"), verify=True)
    path = str(samples / "conv2d_bn.onnx")
    assert bnfold.verify(path, path).passed


def _proto_reading(location: str) -> onnx.ModelProto:
    proto = conv_bn_model()
    tensor = next(i for i in proto.graph.initializer if i.name == "bn1.mean")
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return proto


def test_model_from_proto_refuses_external_data_outside_the_folder(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "here").mkdir()
    with pytest.raises(BnfoldError, match="escapes"):
        io.model_from_proto(_proto_reading(str(secret)), tmp_path / "here")
    with pytest.raises(BnfoldError, match="escapes"):
        io.model_from_proto(_proto_reading("../secret.bin"), tmp_path / "here")
    model = io.model_from_proto(_proto_reading("secret.bin"), tmp_path)
    assert model.graph.initializers["bn1.mean"].const_value.numpy().tolist() == [0, 1, 2, 3]


def test_fold_of_a_proto_does_not_read_external_data_by_absolute_path(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(BnfoldError):
        bnfold.fold(_proto_reading(str(secret)))
