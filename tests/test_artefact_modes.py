"""Every file bnfold writes gets the mode a new file gets under the umask (0644 under 022).

Outputs are staged in a temp file and renamed into place; the temp file must
not carry ``mkstemp``'s 0600 into the published artefact, which another user
or container reading it would be refused.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from bnfold import paths
from bnfold.errors import BnfoldError
from bnfold.onnx_front import io
from tests.conftest import conv_bn_model, snapshot


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_onnx_output_and_report_follow_the_umask(cli, tmp_path, samples, umask):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = cli(["fold", samples / "conv2d_bn.onnx", "-o", out, "--report", report])
    assert result.exit_code == 0, result.output
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
        "out.onnx": 0o666 & ~umask,
        "report.json": 0o666 & ~umask,
    }


def test_external_data_follows_the_umask(tmp_path, umask):
    source = tmp_path / "in" / "m.onnx"
    source.parent.mkdir()
    onnx.save_model(conv_bn_model(), source, save_as_external_data=True, size_threshold=0)
    out = tmp_path / "out.onnx"
    io.save_model(io.load_model(source), out, external_data=True)
    written = [out, *io.external_data_files(out)]
    assert len(written) == 2
    assert [_mode(p) for p in written] == [0o666 & ~umask] * 2


def test_staged_file_replaces_a_0600_file_with_the_umask_mode(tmp_path, umask):
    target = tmp_path / "r.json"
    target.write_text("old")
    target.chmod(0o600)
    paths.write_text_atomic(target, "new")
    assert target.read_text() == "new" and _mode(target) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_staged_file_leaves_nothing_when_the_writer_fails(tmp_path):
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), paths.staged_file(tmp_path / "o.pt") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("the writer failed")
    assert snapshot(tmp_path) == before


def test_staged_file_error_is_one_line(tmp_path):
    with (
        pytest.raises(BnfoldError, match=r"(?i)cannot write report .*no such file or directory"),
        paths.staged_file(tmp_path / "missing" / "r.json", "report"),
    ):
        pass


def test_torch_artefacts_follow_the_umask(cli, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from tests.test_torch_io import FACTORY

    (tmp_path / "modes_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["fold", "--module", "modes_factory:make", "--input-shape", "1x3x8x8"]
    old = os.umask(0o022)
    try:
        with torch.random.fork_rng():  # the factory seeds torch's global generator
            for args in (
                ["-o", tmp_path / "f.pt"],
                ["-o", tmp_path / "f.pt2", "--to-onnx", tmp_path / "f.onnx"],
            ):
                result = cli([*common, *args])
                assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    modes = {p.name: _mode(p) for p in tmp_path.iterdir() if p.suffix != ".py"}
    modes.pop("__pycache__", None)
    assert modes == {"f.pt": 0o644, "f.pt2": 0o644, "f.onnx": 0o644}
