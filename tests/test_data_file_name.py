"""The external data file is ``<model>.data`` (torch's exporter's name), published atomically.

A pipeline that copies ``out.onnx out.onnx.data`` ships a working model. Replacing
an output that already reads ``out.onnx.data`` goes through an interim name so that
the model in place reads its own data at every instant, and a data file another
model names is never replaced (the save then reports the interim name it used).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from bnfold.onnx_front import io
from tests.builders import weight_add_model as _model
from tests.conftest import assert_one_line_error


def _values_on_disk(model_file: Path) -> set[float]:
    """What any reader sees: the proto's location, offset and length, read from the file."""
    proto = onnx.load(str(model_file), load_external_data=False)
    (tensor,) = proto.graph.initializer
    info = {e.key: e.value for e in tensor.external_data}
    with open(model_file.parent / info["location"], "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        raw = fh.read(int(info["length"]))
    return set(np.unique(np.frombuffer(raw, np.float32)).tolist())


def test_data_file_is_named_like_torchs_exporter(tmp_path):
    out = tmp_path / "out.onnx"
    saved = io.save_model_files(_model(1.0), out, external_data=True)
    assert saved == io.SavedModel(out, tmp_path / "out.onnx.data")
    assert saved.files == (out, tmp_path / "out.onnx.data")
    # The pair copied elsewhere, by the names a pipeline expects, is a working model.
    elsewhere = tmp_path / "shipped"
    elsewhere.mkdir()
    for name in ("out.onnx", "out.onnx.data"):
        shutil.copy(tmp_path / name, elsewhere / name)
    assert _values_on_disk(elsewhere / "out.onnx") == {1.0}


def test_inline_save_lists_only_the_model(tmp_path):
    out = tmp_path / "out.onnx"
    assert io.save_model_files(_model(1.0), out, external_data=False) == io.SavedModel(out)


def test_a_model_without_tensors_gets_no_data_file(tmp_path):
    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.Node("", "Relu", [x])
    graph = ir.Graph([x], relu.outputs, nodes=[relu], opset_imports={"": 17})
    out = tmp_path / "out.onnx"
    assert io.save_model_files(ir.Model(graph, ir_version=8), out, external_data=True) == (
        io.SavedModel(out)
    )
    assert list(tmp_path.iterdir()) == [out]


def test_a_rejected_save_returns_none(tmp_path):
    assert io.save_model_files(_model(1.0), tmp_path / "o.onnx", accept=lambda _: False) is None
    assert list(tmp_path.iterdir()) == []


def test_every_step_of_a_resave_leaves_a_whole_model(tmp_path, monkeypatch):
    """After each rename, link and unlink of the publish (each a possible crash point), the
    model in place reads data of one version, whole; the last step leaves only the pair."""
    out = tmp_path / "out.onnx"
    io.save_model(_model(1.0), out, external_data=True)
    seen: list[set[float]] = []

    def checked(step):
        def run(*args, **kwargs):
            step(*args, **kwargs)
            seen.append(_values_on_disk(out))

        return run

    for name in ("replace", "link", "unlink"):
        monkeypatch.setattr(io.os, name, checked(getattr(io.os, name)))
    assert io.save_model_files(_model(2.0), out, external_data=True).data == out.with_name(
        "out.onnx.data"
    )
    monkeypatch.undo()
    assert len(seen) >= 4 and all(v in ({1.0}, {2.0}) for v in seen), seen
    assert seen[-1] == {2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_in_place_fold_keeps_the_exporters_data_name(cli, tmp_path, samples):
    folder = tmp_path / "m"
    shutil.copytree(samples / "external_data", folder)
    model = folder / "conv_bn_ext.onnx"
    result = cli(["fold", model, "--in-place"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["conv_bn_ext.onnx", "conv_bn_ext.onnx.data"]
    assert io.external_data_files(model) == [folder / "conv_bn_ext.onnx.data"]
    original = samples / "external_data" / "conv_bn_ext.onnx"
    assert cli(["verify", original, model]).exit_code == 0


def test_data_another_model_reads_is_never_replaced(tmp_path):
    out = tmp_path / "out.onnx"
    io.save_model(_model(1.0), out, external_data=True)
    shutil.copy(out, tmp_path / "copy.onnx")  # reads out.onnx.data too
    saved = io.save_model_files(_model(2.0), out, external_data=True)
    assert saved is not None and saved.data is not None
    assert saved.data.name.startswith("out.onnx.") and saved.data.name != "out.onnx.data"
    assert "out.onnx.data is read by copy.onnx" in saved.note
    assert _values_on_disk(tmp_path / "copy.onnx") == {1.0}
    assert _values_on_disk(out) == {2.0}


def test_data_the_saved_model_reads_is_never_replaced(tmp_path):
    """The model was loaded from a file (not ``*.onnx``) whose data is ``out.onnx.data``."""
    source = tmp_path / "source.model"
    io.save_model(_model(1.0), tmp_path / "out.onnx", external_data=True)
    shutil.move(tmp_path / "out.onnx", source)
    saved = io.save_model_files(io.load_model(source), tmp_path / "out.onnx", external_data=True)
    assert saved is not None and saved.data != tmp_path / "out.onnx.data"
    assert "read from" in saved.note
    assert _values_on_disk(source) == {1.0} and _values_on_disk(tmp_path / "out.onnx") == {1.0}


def test_a_longer_name_ending_in_the_same_characters_is_not_a_reader(tmp_path):
    """ba.onnx names ba.onnx.data, whose bytes contain "a.onnx.data": not a.onnx's data."""
    io.save_model(_model(1.0), tmp_path / "ba.onnx", external_data=True)
    for value in (1.0, 2.0):
        saved = io.save_model_files(_model(value), tmp_path / "a.onnx", external_data=True)
        assert saved == io.SavedModel(tmp_path / "a.onnx", tmp_path / "a.onnx.data")


def test_without_hard_links_the_interim_name_is_the_output(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    io.save_model(_model(1.0), out, external_data=True)

    def no_links(*_args, **_kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(io.os, "link", no_links)
    saved = io.save_model_files(_model(2.0), out, external_data=True)
    assert saved is not None and saved.data is not None and "cannot hard-link" in saved.note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", saved.data.name]
    assert _values_on_disk(out) == {2.0}
    monkeypatch.undo()
    saved = io.save_model_files(_model(3.0), out, external_data=True)  # the stable name is free
    assert saved == io.SavedModel(out, tmp_path / "out.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_interim_files_a_killed_save_left_are_removed_unless_named(tmp_path):
    out = tmp_path / "out.onnx"
    left = tmp_path / "out.onnx.0123456789ab.data"
    left.write_bytes(b"from a killed save")
    named = tmp_path / "out.onnx.ba9876543210.data"
    io.save_model(_model(1.0), tmp_path / "keep.onnx", external_data=True)
    shutil.move(tmp_path / "keep.onnx.data", named)
    proto = onnx.load(str(tmp_path / "keep.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = named.name
    onnx.save(proto, str(tmp_path / "keep.onnx"))
    other = tmp_path / "other.onnx.0123456789ab.data"  # another output's form: not ours
    other.write_bytes(b"x")
    io.save_model(_model(2.0), out, external_data=True)
    assert not left.exists() and named.exists() and other.exists()
    assert _values_on_disk(tmp_path / "keep.onnx") == {1.0}


@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_resave_removes_the_previous_outputs_own_data(tmp_path, external):
    out = tmp_path / "out.onnx"
    io.save_model(_model(1.0), out, external_data=True)
    io.save_model(_model(2.0), out, external_data=external)
    expected = ["out.onnx", "out.onnx.data"] if external else ["out.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_report_may_not_replace_the_outputs_data_file(cli, tmp_path, samples):
    """The data name is predictable, so --report there would break the model just written."""
    out = tmp_path / "out.onnx"
    model = samples / "external_data" / "conv_bn_ext.onnx"
    result = cli(["fold", model, "-o", out, "--report", tmp_path / "out.onnx.data"])
    assert_one_line_error(result, contains="external data")
    assert list(tmp_path.iterdir()) == []


def test_json_lists_the_data_file_the_fold_wrote(cli, tmp_path, samples):
    out = tmp_path / "out.onnx"
    result = cli(["fold", samples / "external_data" / "conv_bn_ext.onnx", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["files"] == [str(out), str(tmp_path / "out.onnx.data")]
    assert body["notes"] == []
