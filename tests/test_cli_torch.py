"""The command line on torch models: factory modules with weights, .pt2 files, --to-onnx."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.cli.main import main  # noqa: E402
from tests.test_torch_io import FACTORY, Net, save_program  # noqa: E402
from tests.torch_standins import randomize_bn  # noqa: E402

SHAPE = "1x3x8x8"


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module ``cli_factory`` with ``make()`` -> Conv2d, BatchNorm2d, ReLU."""
    (tmp_path / "cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_factory"


def invoke(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_factory_module_writes_a_state_dict_without_bn(factory, tmp_path: Path) -> None:
    weights, out = tmp_path / "w.pt", tmp_path / "folded.pt"
    original = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    torch.save(original.state_dict(), weights)
    result = invoke(
        "fold", "--module", f"{factory}:make", "--weights", weights, "--input-shape", SHAPE,
        "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert len(payload["report"]["folded"]) == 1
    assert payload["verification"]["status"] == "passed"
    state = torch.load(out, weights_only=True)
    assert set(state) == {"0.weight", "0.bias"}  # the BN's keys are gone, the conv's stay

    folded = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU()).eval()
    folded.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-5)


def test_pickled_weights_need_trust_pickle(factory, tmp_path: Path) -> None:
    weights = tmp_path / "whole_module.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), weights)
    args = ["fold", "--module", f"{factory}:make", "--weights", weights, "--input-shape", SHAPE]
    refused = invoke(*args, "-o", tmp_path / "a.pt")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    assert not (tmp_path / "a.pt").exists()
    trusted = invoke(*args, "--trust-pickle", "-o", tmp_path / "b.pt")
    assert trusted.exit_code == 0, trusted.output


def test_factory_to_pt2_and_onnx_then_verify(factory, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    pt2, onnx_path = tmp_path / "folded.pt2", tmp_path / "folded.onnx"
    common = ["--module", f"{factory}:make", "--input-shape", SHAPE]
    result = invoke("fold", *common, "-o", pt2, "--to-onnx", onnx_path)
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(onnx_path).graph.node}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.run(None, {session.get_inputs()[0].name: np.ones((1, 3, 8, 8), np.float32)})
    check = invoke("verify", *common, pt2, "--json")
    assert check.exit_code == 0, check.output
    assert json.loads(check.output)["status"] == "passed"


def test_pt2_fold_inspect_verify(tmp_path: Path) -> None:
    source, out = tmp_path / "net.pt2", tmp_path / "folded.pt2"
    save_program(randomize_bn(Net()), torch.randn(2, 3, 8, 8), source)
    inspected = invoke("inspect", source, "--json")
    assert inspected.exit_code == 0, inspected.output
    would = json.loads(inspected.output)
    assert would["dry_run"] and would["folded"]
    folded = invoke("fold", source, "-o", out)
    assert folded.exit_code == 0, folded.output
    assert "verification PASSED" in folded.output
    check = invoke("verify", source, out)
    assert check.exit_code == 0, check.output


def test_state_dict_without_module_is_a_usage_error(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save({"x": torch.ones(1)}, weights)
    result = invoke("fold", weights, "-o", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert "--module" in result.output


def test_torch_options_without_module_are_refused(tmp_path: Path) -> None:
    result = invoke("inspect", "x.onnx", "--input-shape", SHAPE)
    assert result.exit_code == 2 and "need --module" in result.output


@pytest.fixture
def unverifiable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every torch fold come back "not_verified", as the ONNX front reports.

    The torch front verifies on inputs the user gave, so today it never returns
    "not_verified"; --strict must still keep such a result back on both paths.
    """
    from bnfold.report import VerifyResult
    from bnfold.torch_front import files, run

    def unverified(fold: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = fold(*args, **kwargs)
            result.verification = VerifyResult("not_verified", 0.0, 0.0, 0, reason="no runtime")
            return result

        return wrapper

    monkeypatch.setattr(run, "fold", unverified(run.fold))
    monkeypatch.setattr(files, "fold_graph_module", unverified(files.fold_graph_module))


def test_strict_factory_fold_writes_nothing_when_not_verified(
    factory, tmp_path: Path, unverifiable
) -> None:
    out, onnx_path = tmp_path / "folded.pt", tmp_path / "folded.onnx"
    torch.save({"previous": torch.ones(1)}, out)
    before = out.read_bytes()
    common = ["fold", "--module", f"{factory}:make", "--input-shape", SHAPE, "-o", out]
    strict = invoke(*common, "--to-onnx", onnx_path, "--strict", "--json")
    assert strict.exit_code == 1, strict.output
    payload = json.loads(strict.output)
    assert payload["written"] is False and payload["verification"]["status"] == "not_verified"
    assert out.read_bytes() == before and not onnx_path.exists()
    lenient = invoke(*common)
    assert lenient.exit_code == 0, lenient.output
    assert set(torch.load(out, weights_only=True)) == {"0.weight", "0.bias"}


def test_strict_pt2_fold_writes_nothing_when_not_verified(tmp_path: Path, unverifiable) -> None:
    source, out = tmp_path / "net.pt2", tmp_path / "folded.pt2"
    save_program(randomize_bn(Net()), torch.randn(2, 3, 8, 8), source)
    strict = invoke("fold", source, "-o", out, "--strict")
    assert strict.exit_code == 1, strict.output
    assert "not verified (no runtime); --strict: nothing written" in strict.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2"]
    lenient = invoke("fold", source, "-o", out, "--no-prove")
    assert lenient.exit_code == 0, lenient.output
    assert "NOT VERIFIED" in lenient.output and out.is_file()


def test_max_input_mib_is_refused_for_torch_models(factory, tmp_path: Path) -> None:
    result = invoke(
        "fold", "--module", f"{factory}:make", "--input-shape", SHAPE, "-o", tmp_path / "o.pt",
        "--max-input-mib", "8",
    )  # fmt: skip
    assert result.exit_code == 2 and "--max-input-mib" in result.output


REUSED_FACTORY = '''
import torch
from torch import nn


class Reused(nn.Module):
    """conv runs twice: into bn, and on its own."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.running_mean.uniform_(-1.0, 1.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def make():
    torch.manual_seed(0)  # fold and verify each build the module: the same weights
    return Reused().eval()
'''


def test_factory_written_as_pt2_folds_a_conv_that_runs_twice(tmp_path: Path, monkeypatch) -> None:
    """Eagerly the conv has one weight for both calls; in the .pt2 the BN's call gets a copy."""
    (tmp_path / "reused_factory.py").write_text(REUSED_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--module", "reused_factory:make", "--input-shape", SHAPE]
    eager = json.loads(invoke("fold", *common, "-o", tmp_path / "f.pt", "--json").output)
    assert [r["code"] for r in eager["report"]["refused"]] == ["reused_module"]
    assert "-o x.pt2" in eager["report"]["refused"][0]["detail"]

    out = tmp_path / "folded.pt2"
    result = invoke("fold", *common, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    folded, merge = payload["report"]["folded"]
    assert folded["site"] == "conv -> bn" and folded["bytes_added"] == (27 * 3 + 3) * 4
    # then bn(conv(x)) + conv(x) is a sum of two convs of x: one conv (a branch merge)
    assert merge["kind"] == "reparam" and merge["site"].startswith("conv + conv -> ")
    assert payload["verification"]["status"] == "passed" and not payload["report"]["refused"]
    program = torch.export.load(out)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "aten.batch_norm.default" not in targets and targets.count("aten.conv2d.default") == 1
    check = invoke("verify", *common, out, "--json")
    assert check.exit_code == 0 and json.loads(check.output)["status"] == "passed"


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_rounding_reaches_both_torch_routes(factory, tmp_path: Path, suffix: str) -> None:
    """--rounding balanced goes to the eager fold (.pt) and the program fold (.pt2)."""
    common = ("fold", "--module", f"{factory}:make", "--input-shape", SHAPE, "--json")
    runs = {}
    for rounding in ("nearest", "balanced"):
        out = tmp_path / f"{rounding}{suffix}"
        result = invoke(*common, "-o", out, "--rounding", rounding)
        assert result.exit_code == 0, result.output
        runs[rounding] = json.loads(result.output)
    assert [r["report"]["rounding"] for r in runs.values()] == ["nearest", "balanced"]
    assert all(r["verification"]["status"] == "passed" for r in runs.values())


# --- --module as a newcomer writes it (issue 20) ----------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The working folder holds the factory's file; nothing puts it on sys.path."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("bnfold_cli_")]:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("file", "spec"),
    [
        ("bnfold_cli_here.py", "bnfold_cli_here:make"),
        ("bnfold_cli_dot.py", "./bnfold_cli_dot.py:make"),
        ("models/bnfold_cli_sub.py", "models/bnfold_cli_sub.py:Zoo.small"),
    ],
)
def test_module_spec_from_the_working_folder(workdir: Path, file: str, spec: str) -> None:
    (workdir / file).parent.mkdir(exist_ok=True)
    (workdir / file).write_text(FACTORY)
    result = invoke("fold", "--module", spec, "--input-shape", SHAPE, "-o", "out.pt", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == ["out.pt"]


@pytest.mark.parametrize("spec", ["./bnfold_cli_bad:make", "bnfold_cli_bad", "nope.py:make"])
def test_a_bad_module_spec_is_one_line(workdir: Path, spec: str) -> None:
    (workdir / "bnfold_cli_bad.py").write_text(FACTORY)
    result = invoke("fold", "--module", spec, "--input-shape", SHAPE, "-o", "out.pt")
    assert result.exit_code == 2
    assert "TypeError" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (workdir / "out.pt").exists()


def test_console_script_from_the_models_folder_is_quiet(tmp_path: Path) -> None:
    """`bnfold fold --module mynets:make ... --to-onnx` in mynets.py's folder, no PYTHONPATH.

    The run exports to ONNX, where torch warns and logs by itself: stderr stays empty,
    and the JSON lists both files.
    """
    import os
    import shutil
    import subprocess

    (tmp_path / "mynets.py").write_text(FACTORY)
    exe = shutil.which("bnfold") or str(Path(sys.executable).parent / "bnfold")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BNFOLD_DEBUG")}
    argv = [exe, "fold", "--module", "mynets:make", "--input-shape", SHAPE,
            "-o", "folded.pt2", "--to-onnx", "folded.onnx", "--json"]  # fmt: skip
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert json.loads(run.stdout)["files"] == ["folded.pt2", "folded.onnx"]


# -- the proof for all inputs, inside the fronts ----------------------------------------------


def test_torch_folds_carry_their_certificate(factory, tmp_path: Path) -> None:
    """An eager fold (.pt) is proven as modules on its example inputs, a .pt2 as programs."""
    common = ["fold", "--module", f"{factory}:make", "--input-shape", SHAPE]
    for suffix, front in ((".pt", "torch eager"), (".pt2", "torch program")):
        result = invoke(*common, "-o", tmp_path / f"folded{suffix}", "--json")
        assert result.exit_code == 0, result.output
        proof = json.loads(result.output)["verification"]["proof"]
        assert proof["front"] == front and proof["holds"], proof["headline"]
        assert [s["name"] for s in proof["sites"]] == ["0 -> 1"]
    skipped = invoke(*common, "-o", tmp_path / "skipped.pt", "--json", "--no-prove")
    assert json.loads(skipped.output)["verification"]["proof"] is None


def test_verify_prove_of_a_pt2_pair(factory, tmp_path: Path) -> None:
    source, out = tmp_path / "net.pt2", tmp_path / "folded.pt2"
    save_program(randomize_bn(Net()), torch.randn(2, 3, 8, 8), source)
    assert invoke("fold", source, "-o", out, "--no-verify").exit_code == 0
    for flags in ([], ["--no-sample"]):
        result = invoke("verify", "--prove", *flags, source, out, "--json")
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        assert payload["status"] == "passed" and payload["proof"]["holds"]
        assert payload["proof"]["front"] == "torch program"
    pt2 = tmp_path / "factory.pt2"
    assert (
        invoke("fold", "--module", f"{factory}:make", "--input-shape", SHAPE, "-o", pt2).exit_code
        == 0
    )
    check = invoke("verify", "--prove", "--module", f"{factory}:make", "--input-shape", SHAPE, pt2)
    assert check.exit_code == 0, check.output
    assert check.output.startswith("proven for all inputs: 1 of 1 sites")


def test_a_torch_fold_the_proof_refutes_is_not_written(
    factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof runs in memory before the sampled check: a refuted fold is rolled back
    with the proof's reason, and the file written is the original's (exit 0, reported)."""
    from bnfold.proof import Certificate, SiteProof
    from bnfold.verification import torch_proof

    def refuting(self: Any, folded: Any, report: Any) -> Certificate:
        sites = [
            SiteProof(e.site, "adjacent", False, float("inf"), reason="row 2 differs")
            for e in report.folded
        ]
        return Certificate(front="torch eager", sites=sites)

    monkeypatch.setattr(torch_proof.EagerProver, "prove", refuting)
    out = tmp_path / "folded.pt"
    result = invoke(
        "fold", "--module", f"{factory}:make", "--input-shape", SHAPE, "-o", out, "--json"
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["report"]["folded"] == []
    (refused,) = payload["report"]["refused"]
    assert refused["code"] == "verification_failed"
    assert refused["detail"] == "the proof found a difference: row 2 differs"
    assert set(torch.load(out, weights_only=True)) >= {"1.running_var", "0.weight"}
