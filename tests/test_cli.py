"""The bnfold command line: output, exit codes, JSON, and a planted error that verify must catch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from bnfold.cli.main import main
from tests.builders import conv_bn, model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
RESNET = SAMPLES / "resnet_tiny.onnx"


def invoke(*args: str) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_writes_a_verified_model_and_prints_the_op_table(tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    result = invoke("fold", RESNET, "-o", out)
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.output
    assert "BatchNormalization       6      0" in result.output
    onnx.checker.check_model(str(out), full_check=True)
    assert not [n for n in onnx.load(out).graph.node if n.op_type == "BatchNormalization"]


def test_fold_json_is_parseable_and_report_file_matches(tmp_path: Path) -> None:
    out, report = tmp_path / "f.onnx", tmp_path / "report.json"
    result = invoke("fold", RESNET, "-o", out, "--json", "--report", report)
    assert result.exit_code == 0
    printed = json.loads(result.output)
    assert printed == json.loads(report.read_text())
    assert len(printed["report"]["folded"]) == 6
    assert printed["verification"]["status"] == "passed"
    assert printed["written"] is True


def test_inspect_lists_refusals_with_codes() -> None:
    result = invoke("inspect", SAMPLES / "neg_branching.onnx", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["dry_run"] is True
    assert [r["code"] for r in data["refused"]] == ["branching"]


def test_inspect_text_says_would_fold() -> None:
    result = invoke("inspect", SAMPLES / "conv2d_bn.onnx")
    assert "would fold  conv1 -> bn1" in result.output


def test_output_equal_to_input_is_refused_and_input_untouched(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    shutil.copy(RESNET, src)
    before = src.read_bytes()
    result = invoke("fold", src, "-o", src)
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--in-place" in result.output
    assert src.read_bytes() == before


def test_in_place_is_explicit_and_folds(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    shutil.copy(SAMPLES / "conv2d_bn.onnx", src)
    result = invoke("fold", src, "--in-place")
    assert result.exit_code == 0, result.output
    assert [n.op_type for n in onnx.load(src).graph.node] == ["Conv"]


def test_missing_output_option_is_a_usage_error() -> None:
    assert invoke("fold", RESNET).exit_code == 2


def test_external_data_stays_external_beside_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("fold", SAMPLES / "external_data" / "conv_bn_ext.onnx", "-o", out)
    assert result.exit_code == 0, result.output
    locations = {
        entry.value
        for t in onnx.load(out, load_external_data=False).graph.initializer
        for entry in t.external_data
        if entry.key == "location"
    }
    assert len(locations) == 1
    location = locations.pop()
    assert "/" not in location and location.startswith("out.onnx")
    assert (tmp_path / location).is_file()
    assert not list(tmp_path.glob(".bnfold-*")), "staging folder left behind"


def plant_error(folded: Path, target: Path, relative: float = 1e-3) -> None:
    """Scale one folded conv weight by (1 + relative): a fold that is slightly wrong."""
    m = onnx.load(folded)
    weight = next(t for t in m.graph.initializer if t.name.endswith("conv.weight"))
    array = numpy_helper.to_array(weight) * np.float32(1 + relative)
    weight.CopyFrom(numpy_helper.from_array(array.astype(np.float32), weight.name))
    onnx.save(m, target)


def test_verify_catches_a_planted_1e3_error(tmp_path: Path) -> None:
    folded, broken = tmp_path / "f.onnx", tmp_path / "broken.onnx"
    assert invoke("fold", RESNET, "-o", folded).exit_code == 0
    assert invoke("verify", RESNET, folded).exit_code == 0
    plant_error(folded, broken)
    result = invoke("verify", RESNET, broken)
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_verify_needs_a_shape_for_dynamic_dims(tmp_path: Path) -> None:
    nodes, inits = conv_bn()
    m = model(nodes, inits, [("input", ["N", 3, "H", "W"])], ["output"])
    path = tmp_path / "dyn.onnx"
    onnx.save(m, path)
    result = invoke("verify", path, path, "--shape", "input:2x3x5x7", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["status"] == "passed"
    assert invoke("verify", path, path, "--shape", "input=2x3").exit_code == 2
    wrong_channels = invoke("verify", path, path, "--shape", "input:2x4x5x7")
    assert wrong_channels.exit_code == 2
    assert "dimension 1 of the input is fixed at 3" in wrong_channels.output


def unrunnable_model(tmp_path: Path) -> Path:
    """Conv -> BN plus an op from a domain onnxruntime does not know."""
    nodes, inits = conv_bn()
    nodes[1].output[0] = "bn_out"
    nodes.append(helper.make_node("Mystery", ["bn_out"], ["output"], domain="com.example"))
    m = model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"], output_shapes=[[1, 4, 8, 8]])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "unrunnable.onnx"
    onnx.save(m, path)
    return path


def test_unrunnable_original_still_folds_but_says_not_verified(tmp_path: Path) -> None:
    src, out = unrunnable_model(tmp_path), tmp_path / "out.onnx"
    result = invoke("fold", src, "-o", out, "--json", "--no-prove")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["verification"]["status"] == "not_verified"
    assert payload["verification"]["reason_code"] == "original_not_runnable"
    assert payload["verification"]["proof"] is None
    assert payload["written"] is True and out.exists()


def test_unrunnable_original_is_verified_by_the_proof(tmp_path: Path) -> None:
    """No runtime loads it, but its fold site is standard: proven for all inputs, so the
    fold is verified (--strict writes it), and the JSON says why sampling did not run."""
    src, out = unrunnable_model(tmp_path), tmp_path / "out.onnx"
    result = invoke("fold", src, "-o", out, "--json", "--strict")
    assert result.exit_code == 0, result.output
    verification = json.loads(result.output)["verification"]
    assert verification["status"] == "passed" and verification["proven"] is True
    assert verification["reason_code"] == "original_not_runnable"
    assert verification["proof"]["holds"] is True
    assert verification["proof"]["headline"] == "proven for all inputs: 1 of 1 sites, worst 0.5 ulp"
    assert out.exists()
    text = invoke("fold", src, "-o", out)
    assert "proven for all inputs: 1 of 1 sites" in text.output
    assert "verification PASSED: proven for all inputs; sampling did not verify" in text.output


def test_strict_writes_nothing_when_not_verified(tmp_path: Path) -> None:
    src, out = unrunnable_model(tmp_path), tmp_path / "strict.onnx"
    result = invoke("fold", src, "-o", out, "--strict", "--no-prove")
    assert result.exit_code == 1, result.output
    assert "not verified (onnxruntime cannot run the original" in result.output
    assert "--strict: nothing written" in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrunnable.onnx"]  # no staging left
    as_json = invoke("fold", src, "-o", out, "--strict", "--json", "--no-prove")
    assert as_json.exit_code == 1
    payload = json.loads(as_json.output)
    assert payload["written"] is False and payload["verification"]["status"] == "not_verified"
    assert not out.exists()


def test_strict_leaves_an_existing_output_untouched(tmp_path: Path) -> None:
    src, out = unrunnable_model(tmp_path), tmp_path / "out.onnx"
    shutil.copy(RESNET, out)
    before = out.read_bytes()
    result = invoke("fold", src, "-o", out, "--strict", "--no-prove")
    assert result.exit_code == 1, result.output
    assert out.read_bytes() == before


def test_strict_in_place_leaves_the_input_untouched(tmp_path: Path) -> None:
    src = unrunnable_model(tmp_path)
    before, inode = src.read_bytes(), src.stat().st_ino
    result = invoke("fold", src, "--in-place", "--strict", "--no-prove")
    assert result.exit_code == 1, result.output
    assert src.read_bytes() == before and src.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrunnable.onnx"]


def test_strict_with_no_verify_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("fold", RESNET, "-o", out, "--strict", "--no-verify")
    assert result.exit_code == 2 and "--strict needs verification" in result.output
    assert not out.exists()


def huge_input_model(tmp_path: Path, shape: list[int]) -> Path:
    """Conv -> BN whose input is declared static and ``shape``: no weights are large."""
    nodes, inits = conv_bn()
    path = tmp_path / "huge_input.onnx"
    onnx.save(model(nodes, inits, [("input", shape)], ["output"]), path)
    return path


def test_inputs_over_the_cap_are_not_verified_and_not_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A declared 64x3x8192x8192 float input is 48 GiB: refused before any array exists."""
    from bnfold.verification import inputs as feeding

    def no_allocation(*args: object) -> None:
        raise AssertionError("random inputs were allocated")

    monkeypatch.setattr(feeding, "_random_array", no_allocation)
    src, out = huge_input_model(tmp_path, [64, 3, 8192, 8192]), tmp_path / "out.onnx"
    result = invoke("fold", src, "-o", out, "--json", "--no-prove")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    verification = payload["verification"]
    assert verification["status"] == "not_verified"
    assert verification["reason_code"] == "inputs_too_large"
    for part in ("'input'", "64x3x8192x8192", "48.0 GiB", "1.0 GiB", "--shape input:"):
        assert part in verification["reason"], part
    assert payload["written"] is True and out.exists()
    strict = invoke("fold", src, "-o", tmp_path / "strict.onnx", "--strict", "--no-prove")
    assert strict.exit_code == 1, strict.output
    assert "not verified (input 'input' of shape 64x3x8192x8192" in strict.output
    assert not (tmp_path / "strict.onnx").exists()
    check = invoke("verify", src, out)
    assert check.exit_code == 1 and "NOT VERIFIED" in check.output


def test_max_input_mib_sets_the_cap(tmp_path: Path) -> None:
    src = huge_input_model(tmp_path, [1, 3, 512, 512])  # 3 MiB of float32
    capped = invoke("verify", src, src, "--max-input-mib", "2", "--json")
    assert capped.exit_code == 1
    assert json.loads(capped.output)["reason_code"] == "inputs_too_large"
    roomy = invoke("verify", src, src, "--max-input-mib", "4", "--json")
    assert roomy.exit_code == 0, roomy.output
    assert json.loads(roomy.output)["status"] == "passed"


@pytest.mark.parametrize("argv0", [["bnfold"], [sys.executable, "-m", "bnfold"]])
def test_installed_entry_points_run(tmp_path: Path, argv0: list[str]) -> None:
    if argv0 == ["bnfold"]:
        exe = shutil.which("bnfold") or str(Path(sys.executable).parent / "bnfold")
        argv0 = [exe]
    out = tmp_path / "f.onnx"
    proc = subprocess.run(
        [*argv0, "fold", str(SAMPLES / "conv2d_bn.onnx"), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.exists()
    bad = subprocess.run([*argv0, "inspect", "/nonexistent.onnx"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_opset6_model_is_verified_by_the_reference_evaluator(tmp_path: Path) -> None:
    """onnxruntime has no opset-6 kernels; the reference evaluator still checks the fold."""
    from tests.builders import bn_node

    nodes, inits = conv_bn()
    nodes[1] = bn_node("bn1", "c1", "output", is_test=1)
    inputs = [("input", [1, 3, 8, 8])] + [(i.name, list(i.dims)) for i in inits]
    m = model(nodes, inits, inputs, ["output"], opset=6, ir_version=3, output_shapes=[[1, 4, 8, 8]])
    src, out = tmp_path / "op6.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    result = invoke("fold", src, "-o", out, "--json", "--strict")
    assert result.exit_code == 0, result.output
    verification = json.loads(result.output)["verification"]
    assert verification["status"] == "passed"
    assert verification["optimization_level"].startswith("onnx.reference")


def test_fold_bench_feeds_the_shapes_verification_used(tmp_path: Path) -> None:
    nodes, inits = conv_bn()
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model(nodes, inits, [("input", ["N", 3, 8, 8])], ["output"]), dynamic)
    args = ["--shape", "input:5x3x8x8", "--bench", "--json"]
    result = invoke("fold", dynamic, "-o", tmp_path / "f.onnx", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["bench"]["inputs"] == {"input": [5, 3, 8, 8]}


def test_fold_bench_in_place_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    shutil.copy(SAMPLES / "conv2d_bn.onnx", target)
    before = target.read_bytes()
    result = invoke("fold", target, "--in-place", "--bench")
    assert result.exit_code == 2
    assert "--in-place" in result.output and result.output.strip().count("\n") == 0
    assert target.read_bytes() == before


def test_fold_bench_reports_the_three_levels(tmp_path: Path) -> None:
    result = invoke(
        "fold", SAMPLES / "conv2d_bn.onnx", "-o", tmp_path / "f.onnx", "--bench", "--json"
    )
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)["bench"]
    assert [level["level"] for level in bench["levels"]] == [
        "disable_all",
        "all",
        "all-minus-fusions",
    ]
    assert all(level["original"]["runs"] == 100 for level in bench["levels"])


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_lower_standalone_is_a_flag_and_lower_form_picks_the_form(
    tmp_path: Path, command: str
) -> None:
    """`--lower-standalone MODEL` read MODEL as its value; the form is now its own option."""
    model = SAMPLES / "neg_standalone_bn.onnx"
    out = ["-o", tmp_path / "o.onnx"] if command == "fold" else []
    forms = {}
    for extra in ([], ["--lower-form", "conv"], ["--lower-form", "mul-add"]):
        result = invoke(command, "--lower-standalone", *extra, model, *out, "--json")
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        report = payload["report"] if command == "fold" else payload
        forms[tuple(extra)] = [lowered["form"] for lowered in report["lowered"]]
    assert list(forms.values()) == [["mul-add"], ["conv"], ["mul-add"]]


def test_lower_form_alone_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    result = invoke("fold", SAMPLES / "neg_standalone_bn.onnx", "-o", out, "--lower-form", "conv")
    assert result.exit_code == 2
    assert "--lower-form chooses what --lower-standalone writes" in result.output
    assert not out.exists()


def test_the_old_lower_spelling_still_works(tmp_path: Path) -> None:
    """`--lower-standalone=conv`, documented before --lower-form, reads as both flags."""
    out = tmp_path / "o.onnx"
    model = SAMPLES / "neg_standalone_bn.onnx"
    result = invoke("fold", "--lower-standalone=conv", model, "-o", out)
    assert result.exit_code == 0, result.output
    assert next(n.op_type for n in onnx.load(out).graph.node) == "Conv"
    after_dashes = invoke("inspect", "--", "--lower-standalone=conv")
    assert after_dashes.exit_code == 2  # after --, a file name, not the option
    assert "--lower-standalone=conv: no such file" in after_dashes.output
