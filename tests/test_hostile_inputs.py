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
    bench = ["bench", evil, "--shape", "1,3,8,8", "--runs", "1", "--warmup", "0"]
    for args in (["fold", evil, "-o", out], ["inspect", evil], ["verify", evil, evil], bench):
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
    assert cli(["bench", evil, "--shape", "1,3,8,8", "--runs", "1", "--warmup", "0"]).exit_code == 0
    assert not marker.exists()


def test_pickle_payload_in_the_legacy_format_never_runs(cli, tmp_path, program_file):
    """torch.export.load falls back to the torch 2.7 zip layout, unpickling its .pt members."""
    from torch._export.serde.schema import SCHEMA_VERSION

    marker = tmp_path / "MARKER"
    with zipfile.ZipFile(program_file) as archive:
        (program_json,) = [archive.read(n) for n in archive.namelist() if n.endswith("model.json")]
    payload = _torch_saved((_TouchMarker(marker), {}))
    evil = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(evil, "w") as out:
        out.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        out.writestr("serialized_exported_program.json", program_json)
        for part in ("state_dict", "constants", "example_inputs"):
            out.writestr(f"serialized_{part}.pt", payload)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="--trust-pickle")
    cli(["inspect", evil, "--trust-pickle"])
    assert marker.exists()


def test_attribute_name_that_is_code_never_runs(cli, tmp_path, program_file):
    """torch.fx pastes a non-identifier attribute name between double quotes into
    the module's generated forward: a quote in a parameter's name is code."""
    marker = tmp_path / "MARKER"
    name = f'0"), open({str(marker)!r}, "w"), getattr(self, "0'

    def edit(member, data):
        if member.endswith(".json"):
            return data.decode().replace('"0.weight"', json.dumps(name)).encode()
        return data

    evil = _rewrite(program_file, tmp_path / "evil.pt2", edit)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="attribute name")
    cli(["fold", evil, "-o", tmp_path / "out.pt2", "--trust-pickle"])  # runs the forward
    assert marker.exists()


def test_keyword_name_that_is_code_is_refused(cli, tmp_path, program_file):
    """A higher-order op's keyword names come from the file and torch.fx writes them
    unquoted (``name = value``) into generated code: refused as the graph is built."""
    marker = tmp_path / "MARKER"

    def edit(member, data):
        if member == "models/model.json":
            program = json.loads(data)
            node = program["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.ops.higher_order.wrap_with_set_grad_enabled"
            name = f"x=open({str(marker)!r}, 'w'), y"
            node["inputs"].append({"name": name, "arg": {"as_int": 1}, "kind": 2})
            return json.dumps(program).encode()
        return data

    evil = _rewrite(program_file, tmp_path / "evil.pt2", edit)
    _refused_everywhere(cli, tmp_path, evil, marker, contains="keyword argument")


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


def test_folder_mode_report_over_a_model_is_refused(cli, tmp_path):
    src, out = tmp_path / "models", tmp_path / "out"
    src.mkdir()
    model = _onnx_model(src / "a.onnx")
    before = snapshot(tmp_path)
    for report in (model, out / "a.onnx", tmp_path / "no" / "r.json"):
        assert_one_line_error(cli(["fold", src, "-o", out, "--report", report]))
    assert snapshot(tmp_path) == before
    assert cli(["fold", src, "-o", out, "--report", out / "r.json"]).exit_code == 0


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


def test_the_factory_source_file_is_never_the_output(cli, tmp_path, monkeypatch):
    """`--module tiny_net:make -o tiny_net.py` would replace the model's own code."""
    source = tmp_path / "tiny_net2.py"
    source.write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    before = snapshot(tmp_path)
    for out in ("tiny_net2.py", "./tiny_net2.py"):
        monkeypatch.chdir(tmp_path)
        args = ["fold", "--module", "tiny_net2:make", "--input-shape", "1x3x8x8", "-o", out]
        assert_one_line_error(cli(args), contains="--module source")
    assert snapshot(tmp_path) == before


def test_in_place_keeps_a_data_file_another_model_uses(cli, tmp_path):
    a = _onnx_model(tmp_path / "a.onnx", external="a.onnx.data")
    shutil.copy(a, tmp_path / "b.onnx")  # b.onnx reads a.onnx.data too
    assert cli(["fold", a, "--in-place"]).exit_code == 0
    assert (tmp_path / "a.onnx.data").exists()  # bnfold did not write it: never deleted
    assert cli(["verify", tmp_path / "b.onnx", a]).exit_code == 0


def test_own_data_file_a_copy_still_uses_is_kept(cli, tmp_path):
    """A copy of the output reads out.onnx.data: refolds leave it and use an interim name."""
    model = _onnx_model(tmp_path / "m.onnx", external="m.onnx.data")
    out = tmp_path / "out.onnx"
    assert cli(["fold", model, "-o", out]).exit_code == 0
    first = tmp_path / "out.onnx.data"
    assert onnx_io.external_data_files(out) == [first]
    shutil.copy(out, tmp_path / "copy.onnx")
    assert cli(["fold", model, "-o", out]).exit_code == 0
    assert first.exists()  # copy.onnx still names it
    assert cli(["verify", model, tmp_path / "copy.onnx"]).exit_code == 0
    (second,) = onnx_io.external_data_files(out)
    assert second != first and second.exists()
    assert cli(["fold", model, "-o", out]).exit_code == 0
    assert first.exists() and not second.exists()  # no other model named the second
    assert len(list(tmp_path.glob("out.onnx*.data"))) == 2
    (tmp_path / "copy.onnx").unlink()
    assert cli(["fold", model, "-o", out]).exit_code == 0  # nothing else reads out.onnx.data
    assert sorted(p.name for p in tmp_path.glob("out.onnx*")) == ["out.onnx", "out.onnx.data"]
    assert cli(["verify", model, out]).exit_code == 0


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
    data = list(tmp_path.glob("folded.onnx*.data"))
    assert data == onnx_io.external_data_files(out) == [tmp_path / "folded.onnx.data"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnfold-")]


def test_concurrent_folds_into_one_output_leave_only_its_data(tmp_path):
    model = _onnx_model(tmp_path / "m.onnx", external="m.onnx.data")
    out = tmp_path / "folded.onnx"
    command = [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(out), "--no-verify"]
    for _ in range(3):
        runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(2)]
        assert [run.wait() for run in runs] == [0, 0]
        data = sorted(tmp_path.glob("folded.onnx*.data"))
        assert data == onnx_io.external_data_files(out) == [tmp_path / "folded.onnx.data"]


# --- one-line errors ---------------------------------------------------------------


def _zip_slip(src: Path, dst: Path, whole: bool = False) -> Path:
    """An extra member ``../../escaped.txt``, or (``whole``) every member under ``../../``."""
    if whole:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
            for info in zin.infolist():
                zout.writestr("../../" + info.filename, zin.read(info))
        return dst

    def edit(name, data):
        return {name: data, "../../escaped.txt": b"x"} if name == "archive_format" else data

    return _rewrite(src, dst, edit)


def test_broken_pt2_files_are_one_line_on_the_real_stderr(tmp_path, program_file):
    """torch logs a traceback to the process's stderr (not click's): run a real process."""
    data = program_file.read_bytes()
    broken = {
        "garbage.pt2": b"not a zip at all" * 10,
        "truncated.pt2": data[: len(data) // 2],
        "empty.pt2": b"",
    }
    files = [tmp_path / name for name in broken]
    for path in files:
        path.write_bytes(broken[path.name])
    files.append(_zip_slip(program_file, tmp_path / "slip.pt2"))
    files.append(_zip_slip(program_file, tmp_path / "slip_all.pt2", whole=True))
    for path in files:
        for command in (["inspect", path], ["fold", path, "-o", tmp_path / "out.pt2"]):
            run = subprocess.run(
                [sys.executable, "-m", "bnfold", *map(str, command)],
                capture_output=True, text=True, env={**os.environ, "BNFOLD_DEBUG": ""},
            )  # fmt: skip
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(lines) == 1, (path.name, run.stderr)
            assert lines[0].startswith("bnfold: error: ")
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["fold", "--no-such-option"],
        ["fold", "m.onnx", "-o", "o.onnx", "--samples", "0"],
        ["verify", "a.onnx", "b.onnx", "--atol", "lots"],
        ["no-such-command"],
        ["--no-such-option"],
        ["bench", "m.onnx", "--level", "nope"],
    ],
)
def test_usage_errors_are_one_line(cli, args):
    assert_one_line_error(cli(args), contains="--help")


def test_help_still_shows_usage(cli):
    for args in (["--help"], ["fold", "--help"], ["fold", "-h"]):
        result = cli(args)
        assert result.exit_code == 0 and "Usage:" in result.output


def test_control_characters_in_paths_are_escaped(cli, tmp_path):
    for name in ("a\nb.onnx", "a\rb.pt2", "a\x1b[31mb.onnx"):
        line = assert_one_line_error(cli(["fold", tmp_path / name, "-o", tmp_path / "o.onnx"]))
        assert "\x1b" not in line and "\r" not in line
    model = _onnx_model(tmp_path / "m.onnx")
    line = assert_one_line_error(cli(["fold", model, "-o", tmp_path / "no\ndir" / "o.onnx"]))
    assert "\\n" in line


@pytest.mark.parametrize("where", ["factory", "import"])
def test_factory_calling_sys_exit_is_an_error(cli, tmp_path, monkeypatch, where):
    body = "import sys\nfrom torch import nn\n\n"
    body += "sys.exit(0)\n" if where == "import" else "def make():\n    sys.exit(0)\n"
    (tmp_path / f"quits_{where}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.pt2"
    for command in ("fold", "inspect"):
        args = [command, "--module", f"quits_{where}:make", "--input-shape", "1x3x8x8"]
        args += ["-o", out] if command == "fold" else []
        assert_one_line_error(cli(args), contains="sys.exit(0)")
    assert not out.exists()


def test_forward_calling_sys_exit_is_an_error(cli, tmp_path, monkeypatch):
    (tmp_path / "quits_forward.py").write_text(
        "import sys\nfrom torch import nn\n\n"
        "class Quits(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)\n\n"
        "    def forward(self, x):\n"
        "        sys.exit(0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.pt"
    args = ["fold", "--module", "quits_forward:Quits", "--input-shape", "1x3x8x8", "-o", out]
    assert_one_line_error(cli(args), contains="sys.exit(0)")
    assert not out.exists()


def test_a_program_with_dynamic_shapes_still_loads(tmp_path):
    """Its shape expressions are srepr (Symbol('s0', ...)): plain, not refused."""
    from torch.export import Dim

    from bnfold.torch_front.archive import load_untrusted

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batch = Dim("batch", min=2, max=64)
    path = tmp_path / "dynamic.pt2"
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    loaded = load_untrusted(str(path))
    assert loaded.module()(torch.randn(5, 3, 8, 8)).shape == (5, 4, 6, 6)


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("Symbol('s0', positive=True, integer=True)", True),
        ("Mul(Integer(3), Max(Integer(1), Add(Symbol('s0'), Integer(-2))))", True),
        ("FloorDiv(s0, 2) >= 1", True),
        ("Float('1.5', precision=53)", True),
        ("exec(chr(112))", False),
        ("Symbol('s0').__class__", False),
        ("Symbol('a b')", False),
        ("Symbol('x', positive=exec)", False),
        ("Integer('1')", False),
        ("(lambda: 1)()", False),
        ("s0[0]", False),
        ("__import__", False),
    ],
)
def test_only_plain_shape_expressions_reach_sympify(text, plain):
    from bnfold.torch_front.archive import _is_plain_expression

    assert _is_plain_expression(text) is plain


def test_report_over_the_module_source_file_is_refused(cli, tmp_path, monkeypatch):
    """--report tiny_net3.py would replace the factory's own code with JSON."""
    (tmp_path / "tiny_net3.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args = ["fold", "--module", "tiny_net3:make", "--input-shape", "1x3x8x8", "-o", "out.pt",
            "--report", "tiny_net3.py"]  # fmt: skip
    assert_one_line_error(cli(args), contains="tiny_net3.py")
    assert snapshot(tmp_path) == before


def test_folder_report_over_a_models_external_data_is_refused(cli, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    _onnx_model(models / "m.onnx", external="w.bin")
    before = snapshot(tmp_path)
    result = cli(["fold", models, "-o", tmp_path / "out", "--report", models / "w.bin"])
    assert_one_line_error(result, contains="external data")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("extra", [["-o", "other.onnx"], []])
def test_in_place_takes_no_output_and_no_folder(cli, tmp_path, monkeypatch, extra):
    """-o with --in-place used to be ignored (MODEL replaced, -o never written); a folder
    or a torch model with --in-place was folded to -o as if the flag were not there."""
    monkeypatch.chdir(tmp_path)
    model = _onnx_model(tmp_path / "a.onnx")
    folder = tmp_path / "d"
    folder.mkdir()
    before = snapshot(tmp_path)
    target = model if extra else folder
    result = cli(["fold", target, "--in-place", *extra])
    assert_one_line_error(result, contains="--in-place")
    assert snapshot(tmp_path) == before
