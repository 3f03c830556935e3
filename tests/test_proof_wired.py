"""The proof for all inputs inside fold and verify: what users see, and what it decides.

fold proves what it staged against the untouched original before the sampled check;
a difference keeps the output back, a proof that holds verifies what sampling cannot
run, a region the prover cannot model is left to sampling. verify --prove does the
same for two files, and --no-sample proves without running either model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import bnfold
from bnfold import api
from bnfold.cli.main import main
from bnfold.core.affine import Affine, bn_to_affine
from bnfold.options import FoldOptions
from tests.test_cli import unrunnable_model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
RESNET = SAMPLES / "resnet_tiny.onnx"
CONV_BN = SAMPLES / "conv2d_bn.onnx"


def invoke(*args: object) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args], env={"BNFOLD_DEBUG": ""})


def run_json(*args: object) -> tuple[int, dict[str, Any]]:
    result = invoke(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


# -- fold ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every sample model folded in folder mode, as ``bnfold fold sample_models -o OUT``."""
    out = tmp_path_factory.mktemp("folded") / "out"
    return api.fold_path(SAMPLES, out, FoldOptions())


def test_fold_proves_every_sample_model(folder: Any) -> None:
    assert folder.exit_code() == 0
    proven = 0
    for outcome in folder.outcomes:
        assert outcome.status == "ok" and outcome.written, outcome.source
        verification = outcome.result["verification"]
        if verification is None:  # nothing folded or lowered: nothing to prove
            assert not outcome.folded and not outcome.lowered, outcome.source
            continue
        proof = verification["proof"]
        assert proof["holds"] and not proof["refuted"], (outcome.source, proof["headline"])
        n = len(proof["sites"])
        assert proof["headline"].startswith(f"proven for all inputs: {n} of {n} sites, worst")
        assert proof["worst_ulp"] <= 1.0
        proven += 1
    assert proven >= 25


def test_fold_prints_the_proof_beside_the_sampled_check(tmp_path: Path) -> None:
    result = invoke("fold", RESNET, "-o", tmp_path / "f.onnx")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    headline = lines.index("proven for all inputs: 6 of 6 sites, worst 0.5 ulp")
    assert lines[headline + 1].startswith("verification PASSED")
    # The fold report lists every site already: proven rows are not repeated.
    assert not [line for line in lines if line.startswith("  proven ")]


def test_no_prove_skips_the_proof(tmp_path: Path) -> None:
    code, payload = run_json("fold", RESNET, "-o", tmp_path / "f.onnx", "--no-prove")
    assert code == 0
    assert payload["verification"]["status"] == "passed"
    assert payload["verification"]["proof"] is None
    text = invoke("fold", RESNET, "-o", tmp_path / "g.onnx", "--no-prove").output
    assert "proven for all inputs" not in text and "verification PASSED" in text
    assert bnfold.fold(RESNET, verify=True, prove=False).verification.proof is None


@pytest.mark.parametrize("as_object", [False, True], ids=["path", "onnx_ir.Model"])
def test_in_memory_fold_is_proven(as_object: bool) -> None:
    source = ir.load(RESNET) if as_object else RESNET
    result = bnfold.fold(source, verify=True)
    assert result.verification is not None and result.verification.passed
    proof = result.verification.proof
    assert proof is not None and proof.holds and len(proof.sites) == 6
    assert sorted(s.name for s in proof.sites) == sorted(f.site for f in result.report.folded)


def _off_by_a_few_ulp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plant a fold bug: channel 1's scale is 1e-6 relative too large (about 16 ulp).

    Sampled verification passes it: the error is below the rounding a float32 conv
    may show. The proof does not.
    """
    from bnfold.onnx_front.rules import base

    def buggy(*args: Any) -> Affine:
        affine = bn_to_affine(*args)
        scale = affine.scale.copy()
        scale[1] *= 1 + 1e-6
        return Affine(scale, affine.shift)

    monkeypatch.setattr(base, "bn_to_affine", buggy)


def test_a_fold_the_proof_refutes_is_kept_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _off_by_a_few_ulp(monkeypatch)
    out = tmp_path / "f.onnx"
    sampled_only = invoke("fold", CONV_BN, "-o", out, "--no-prove")
    assert sampled_only.exit_code == 0 and out.exists()  # sampling alone lets it through
    out.unlink()
    result = invoke("fold", CONV_BN, "-o", out)
    assert result.exit_code == 1, result.output
    assert "DIFFERS     conv1 -> bn1" in result.output
    assert "the proof found a difference at conv1 -> bn1: nothing written" in result.output
    assert not out.exists()
    code, payload = run_json("fold", CONV_BN, "-o", out)
    assert code == 1 and payload["written"] is False and payload["files"] == []
    verification = payload["verification"]
    assert verification["status"] == "failed"
    assert all(row["passed"] for row in verification["outputs"] + verification["sites"])
    assert verification["proof"]["refuted"] is True
    assert [s["name"] for s in verification["proof"]["sites"] if not s["proven"]] == [
        "conv1 -> bn1"
    ]


def test_a_refuted_fold_fails_its_model_in_folder_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _off_by_a_few_ulp(monkeypatch)
    models = tmp_path / "models"
    models.mkdir()
    (models / "conv2d_bn.onnx").write_bytes(CONV_BN.read_bytes())
    report = api.fold_path(models, tmp_path / "out", FoldOptions())
    (outcome,) = report.outcomes
    assert outcome.status == "verify_failed" and not outcome.written
    assert report.exit_code() == 1


def test_a_prover_failure_leaves_the_fold_to_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not proven is no failure: the reason is reported and the sampled check decides."""
    from bnfold.verification import proving

    def broken(*args: Any) -> Any:
        raise RuntimeError("a case the prover trips over")

    monkeypatch.setattr(proving, "prove_onnx", broken)
    out = tmp_path / "f.onnx"
    result = invoke("fold", RESNET, "-o", out)
    assert result.exit_code == 0, result.output
    assert "NOT proven for all inputs: 0 of 0 sites proven, 1 part(s) not covered" in result.output
    assert "the prover failed: RuntimeError: a case the prover trips over" in result.output
    assert "verification PASSED" in result.output and out.exists()


# -- verify --prove ------------------------------------------------------------------------


def _planted(tmp_path: Path, relative: float) -> Path:
    """resnet_tiny folded, then channel 1 of layer1.2's folded weight scaled by 1 + relative."""
    folded = tmp_path / "folded.onnx"
    assert invoke("fold", RESNET, "-o", folded, "--no-verify").exit_code == 0
    m = onnx.load(folded)
    tensor = next(t for t in m.graph.initializer if t.name == "layer1.2.conv.weight")
    array = numpy_helper.to_array(tensor).copy()
    array[1] *= np.float32(1 + relative)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(m, wrong)
    return wrong


@pytest.mark.parametrize("sample", [True, False], ids=["sampled", "no_sample"])
def test_verify_prove_names_the_site_of_a_planted_wrong_fold(tmp_path: Path, sample: bool) -> None:
    wrong = _planted(tmp_path, 1e-3)
    flags = [] if sample else ["--no-sample"]
    result = invoke("verify", "--prove", *flags, RESNET, wrong)
    assert result.exit_code == 1, result.output
    assert "1 differ (layer1.2.conv -> layer1.2.bn -> layer1.add)" in result.output
    assert "DIFFERS     layer1.2.conv" in result.output
    code, payload = run_json("verify", "--prove", *flags, RESNET, wrong)
    assert code == 1 and payload["exit_code"] == 1 and payload["status"] == "failed"
    assert payload["proof"]["refuted"] is True
    assert payload["reason"].startswith("the proof found a difference at layer1.2.conv")


def test_verify_prove_catches_what_sampling_passes(tmp_path: Path) -> None:
    wrong = _planted(tmp_path, 2e-6)
    assert invoke("verify", RESNET, wrong).exit_code == 0
    assert invoke("verify", "--prove", RESNET, wrong).exit_code == 1


def test_no_sample_proves_a_model_no_runtime_can_load(tmp_path: Path) -> None:
    original, folded = unrunnable_model(tmp_path), tmp_path / "folded.onnx"
    assert invoke("fold", original, "-o", folded, "--no-verify").exit_code == 0
    code, payload = run_json("verify", "--prove", "--no-sample", original, folded)
    assert code == 0
    assert payload["status"] == "passed" and payload["samples"] == 0
    assert payload["reason_code"] == "not_sampled"
    assert payload["proof"]["holds"] and payload["proof"]["unchanged_nodes"] == 1
    text = invoke("verify", "--prove", "--no-sample", original, folded).output
    assert text.startswith("proven for all inputs: 1 of 1 sites, worst 0.5 ulp\n")
    # Sampling is tried and cannot run: the proof decides. Without it nothing is checked.
    code, payload = run_json("verify", "--prove", original, folded)
    assert code == 0 and payload["reason_code"] == "original_not_runnable"
    assert invoke("verify", original, folded).exit_code == 1


def test_no_sample_without_prove_is_a_usage_error() -> None:
    result = invoke("verify", "--no-sample", CONV_BN, CONV_BN)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "bnfold: error: not sampling checks nothing: --no-sample needs --prove"
    )


def test_verify_prove_of_an_unreadable_model_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_text("not a model")
    result = invoke("verify", "--prove", "--no-sample", CONV_BN, broken)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_api_verify_attaches_the_certificate(tmp_path: Path) -> None:
    folded = tmp_path / "f.onnx"
    api.fold_file(CONV_BN, folded)
    result = bnfold.verify(CONV_BN, folded, prove=True)
    assert result.passed and result.proof is not None and result.proof.holds
    assert result.to_dict()["proof"]["headline"] == result.proof.headline()
    alone = bnfold.verify(CONV_BN, folded, prove=True, sample=False)
    assert alone.passed and alone.samples == 0 and alone.proof is not None
    assert bnfold.verify(CONV_BN, folded).proof is None
