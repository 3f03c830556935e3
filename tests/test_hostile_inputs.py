"""Hostile files and paths (issue 16): no code runs from a file, no input is overwritten.

Every payload here is harmless: it creates a marker file in tmp_path. A test
asserts the marker is NOT created, the command exits 2 with one line, and,
where the user may choose to trust the file, that ``--trust-pickle`` runs it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest

from bnfold.onnx_front import io as onnx_io
from tests.conftest import assert_one_line_error, conv_bn_model, snapshot

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402


class _TouchMarker:
    """Unpickling this creates ``path`` (an ``open(path, "w")`` call)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def program_file(tmp_path) -> Path:
    """A valid .pt2 of Conv -> BN."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    path = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the archive ``src`` to ``dst``, passing each member through ``edit(name, data)``.

    ``name`` is without the archive's top folder; ``edit`` returns the new bytes
    (None drops the member) and may add members by returning a dict.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        top = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            name = info.filename[len(top) + 1 :]
            out = edit(name, zin.read(info))
            for member, data in (out if isinstance(out, dict) else {name: out}).items():
                if data is not None:
                    zout.writestr(f"{top}/{member}", data)
    return dst


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _payload_in_sample_inputs(src: Path, marker: Path, raw: bool = False) -> Path:
    payload = (
        pickle.dumps(_TouchMarker(marker)) if raw else _torch_saved((_TouchMarker(marker), {}))
    )

    def edit(name, data):
        return payload if name == "data/sample_inputs/model.pt" else data

    return _rewrite(src, src.with_name("evil.pt2"), edit)


def _payload_as_pickled_weight(src: Path, marker: Path) -> Path:
    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return _torch_saved(_TouchMarker(marker))
        return data

    return _rewrite(src, src.with_name("evil.pt2"), edit)


def _payload_as_constant(src: Path, marker: Path, prefix: str) -> Path:
    """An extra constant entry (opaque object or torchbind object) holding the payload."""

    def edit(name, data):
        if name == "data/constants/model_constants_config.json":
            entry = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True}
            config = {"config": {"evil": {**entry, "tensor_meta": None}}}
            return {name: json.dumps(config).encode(),
                    f"data/constants/{prefix}0": pickle.dumps(_TouchMarker(marker))}  # fmt: skip
        return data

    return _rewrite(src, src.with_name("evil.pt2"), edit)


def _payload_in_shape_expression(src: Path, marker: Path) -> Path:
    """A tensor size given as a sympy expression that sympify would eval."""
    code = f"open({str(marker)!r}, 'w')"
    expression = "exec(" + "+".join(f"chr({ord(c)})" for c in code) + ")"

    def edit(name, data):
        if name == "models/model.json":
            size = {"as_expr": {"expr_str": expression, "hint": {"as_int": 1}}}
            text = data.decode().replace(
                '"sizes": [{"as_int": 1}', '"sizes": [' + json.dumps(size), 1
            )
            return text.encode()
        return data

    return _rewrite(src, src.with_name("evil.pt2"), edit)


def _payload_in_guards(src: Path, marker: Path) -> Path:
    """Guard code, which ``ExportedProgram.module()`` would exec."""

    def edit(name, data):
        if name == "models/model.json":
            program = json.loads(data)
            program["guards_code"] = [f"open({str(marker)!r}, 'w') is None"]
            return json.dumps(program).encode()
        return data

    return _rewrite(src, src.with_name("evil.pt2"), edit)


def _refused_everywhere(cli, tmp_path: Path, evil: Path, marker: Path, contains: str) -> None:
    """fold, inspect and verify refuse ``evil`` with one line; the payload never ran."""
    before = snapshot(tmp_path)
    out = tmp_path / "out.pt2"
    for args in (["fold", evil, "-o", out], ["inspect", evil], ["verify", evil, evil]):
        assert_one_line_error(cli(args), contains=contains)
        assert not marker.exists(), args
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("raw", [False, True], ids=["torch_save", "raw_pickle"])
def test_pickle_payload_in_sample_inputs_never_runs(cli, tmp_path, program_file, raw):
    marker = tmp_path / "MARKER"
    evil = _payload_in_sample_inputs(program_file, marker, raw)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="--trust-pickle")


def test_trust_pickle_runs_the_payload_as_the_user_chose(cli, tmp_path, program_file):
    marker = tmp_path / "MARKER"
    evil = _payload_in_sample_inputs(program_file, marker)
    cli(["inspect", evil, "--trust-pickle"])  # torch itself then fails on the payload's result
    assert marker.exists()


def test_pickle_payload_in_a_weight_never_runs(cli, tmp_path, program_file):
    marker = tmp_path / "MARKER"
    evil = _payload_as_pickled_weight(program_file, marker)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="--trust-pickle")
    cli(["inspect", evil, "--trust-pickle"])
    assert marker.exists()


@pytest.mark.parametrize("prefix", ["opaque_obj_", "custom_obj_"])
def test_pickled_constant_objects_are_refused(cli, tmp_path, program_file, prefix):
    marker = tmp_path / "MARKER"
    evil = _payload_as_constant(program_file, marker, prefix)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="--trust-pickle")


def test_shape_expression_that_is_code_never_runs(cli, tmp_path, program_file):
    marker = tmp_path / "MARKER"
    evil = _payload_in_shape_expression(program_file, marker)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="shape expression")


def test_guard_code_in_the_program_never_runs(cli, tmp_path, program_file):
    marker = tmp_path / "MARKER"
    evil = _payload_in_guards(program_file, marker)
    out = tmp_path / "out.pt2"
    result = cli(["fold", evil, "-o", out])
    assert not marker.exists()
    assert result.exit_code == 0, result.output  # guards are not run: the fold is fine
    assert cli(["inspect", evil]).exit_code == 0
    assert not marker.exists()


def test_aotinductor_package_is_refused(cli, tmp_path, program_file):
    marker = tmp_path / "MARKER"

    def edit(name, data):
        if name == "archive_format":
            return {name: data, "data/aotinductor/model/model.wrapper.so": b"\x7fELF"}
        return data

    evil = _rewrite(program_file, tmp_path / "aoti.pt2", edit)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="AOTInductor")


def test_plain_program_still_loads(cli, tmp_path, program_file):
    result = cli(["fold", program_file, "-o", tmp_path / "out.pt2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.pt2").is_file()


# --- outputs that would destroy an input or fail after another output was written ---


def _onnx_model(path: Path, external: str | None = None) -> Path:
    model = conv_bn_model()
    if external is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=external,
                  size_threshold=0)  # fmt: skip
    return path


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink", "hardlink"])
def test_report_over_the_input_is_refused(cli, tmp_path, spelling):
    model = _onnx_model(tmp_path / "m.onnx")
    report = {
        "same": model,
        "dot": tmp_path / "." / "m.onnx",
        "symlink": tmp_path / "link.json",
        "hardlink": tmp_path / "hard.json",
    }[spelling]
    if spelling == "symlink":
        report.symlink_to(model)
    if spelling == "hardlink":
        os.link(model, report)
    before = snapshot(tmp_path)
    result = cli(["fold", model, "-o", tmp_path / "out.onnx", "--report", report])
    assert_one_line_error(result, contains="--report")
    assert snapshot(tmp_path) == before


def test_report_over_the_output_or_the_inputs_data_is_refused(cli, tmp_path):
    model = _onnx_model(tmp_path / "m.onnx", external="m.onnx.data")
    out = tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    data = tmp_path / "m.onnx.data"
    for args in (["-o", out, "--report", out], ["-o", out, "--report", data],
                 ["--in-place", "--report", data]):  # fmt: skip
        assert_one_line_error(cli(["fold", model, *args]), contains="--report")
    assert snapshot(tmp_path) == before


def test_unwritable_report_is_refused_before_the_output_is_replaced(cli, tmp_path):
    model = _onnx_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    assert cli(["fold", model, "-o", out]).exit_code == 0
    before = snapshot(tmp_path)
    for report in (tmp_path / "no" / "r.json", tmp_path / "m.onnx" / "r.json", tmp_path):
        assert_one_line_error(cli(["fold", model, "-o", out, "--report", report]))
    assert snapshot(tmp_path) == before


def test_torch_outputs_are_checked_before_anything_is_written(cli, tmp_path, program_file):
    before = snapshot(tmp_path)
    out = tmp_path / "out.pt2"
    for args in (
        ["-o", tmp_path / "." / "good.pt2"],  # the input, spelled otherwise
        ["-o", out, "--to-onnx", tmp_path / "no" / "o.onnx"],  # unwritable --to-onnx
        ["-o", out, "--to-onnx", program_file],  # --to-onnx over the input
        ["-o", out, "--to-onnx", out],  # two outputs, one file
        ["-o", out, "--report", tmp_path / "no" / "r.json"],
        ["-o", out, "--report", program_file],
    ):
        assert_one_line_error(cli(["fold", program_file, *args]))
    assert snapshot(tmp_path) == before


def test_weights_file_is_never_the_output(cli, tmp_path, monkeypatch):
    (tmp_path / "tiny_net.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "sd.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), weights)
    before = snapshot(tmp_path)
    for out in (weights, tmp_path / "." / "sd.pt"):
        args = ["fold", "--module", "tiny_net:make", "--weights", weights, "--input-shape",
                "1x3x8x8", "-o", out]  # fmt: skip
        assert_one_line_error(cli(args), contains="--weights")
    assert snapshot(tmp_path) == before


def test_in_place_keeps_a_data_file_another_model_uses(cli, tmp_path):
    a = _onnx_model(tmp_path / "a.onnx", external="a.onnx.data")
    shutil.copy(a, tmp_path / "b.onnx")  # b.onnx reads a.onnx.data too
    assert cli(["fold", a, "--in-place"]).exit_code == 0
    assert (tmp_path / "a.onnx.data").exists()  # bnfold did not write it: never deleted
    assert cli(["verify", tmp_path / "b.onnx", a]).exit_code == 0


def test_own_data_file_a_copy_still_uses_is_kept(cli, tmp_path):
    model = _onnx_model(tmp_path / "m.onnx", external="m.onnx.data")
    out = tmp_path / "out.onnx"
    assert cli(["fold", model, "-o", out]).exit_code == 0
    (first,) = tmp_path.glob("out.onnx.*.data")
    shutil.copy(out, tmp_path / "copy.onnx")
    assert cli(["fold", model, "-o", out]).exit_code == 0
    assert first.exists()  # copy.onnx still names it
    assert cli(["verify", model, tmp_path / "copy.onnx"]).exit_code == 0
    (second,) = set(tmp_path.glob("out.onnx.*.data")) - {first}
    assert cli(["fold", model, "-o", out]).exit_code == 0
    assert first.exists() and not second.exists()  # no other model named the second
    assert len(list(tmp_path.glob("out.onnx.*.data"))) == 2


def test_a_save_overtaken_by_another_leaves_no_orphan_data(tmp_path):
    """Writer A is overtaken by writer B between staging and publishing (the race of
    two concurrent folds): whichever publishes last removes the other's data file."""
    model = onnx_io.load_model(_onnx_model(tmp_path / "m.onnx", external="m.onnx.data"))
    out = tmp_path / "folded.onnx"
    onnx_io.save_model(model, out, external_data=True)  # a previous output

    def overtaken(_staged: Path) -> bool:
        assert onnx_io.save_model(model, out, external_data=True)  # B publishes first
        return True

    assert onnx_io.save_model(model, out, external_data=True, accept=overtaken)
    data = list(tmp_path.glob("folded.onnx.*.data"))
    assert [p.name for p in data] == [
        loc.name for loc in onnx_io.external_data_files(out)
    ]  # exactly the one the published model names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnfold-")]


def test_concurrent_folds_into_one_output_leave_only_its_data(tmp_path):
    model = _onnx_model(tmp_path / "m.onnx", external="m.onnx.data")
    out = tmp_path / "folded.onnx"
    command = [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(out), "--no-verify"]
    for _ in range(3):
        runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(2)]
        assert [run.wait() for run in runs] == [0, 0]
        names = sorted(p.name for p in tmp_path.glob("folded.onnx.*.data"))
        assert names == [p.name for p in onnx_io.external_data_files(out)]
