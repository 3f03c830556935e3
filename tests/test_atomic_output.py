"""Output is atomic: after a crash, the previous output is whole or absent, never partial.

Also: --in-place is atomic, external data is written beside the output with a
relative location, and concurrent runs into one folder cannot corrupt each other.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.api import verify as verify_models
from bnfold.onnx_front import io
from tests.builders import weight_add_model
from tests.conftest import snapshot

ROOT = Path(__file__).resolve().parent.parent
N = 10_000_000  # 40 MB of float32: the save takes long enough to be killed mid-way

_SAVER = """
import sys, numpy as np, onnx_ir as ir
from bnfold.onnx_front import io
path, value, external, n = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
x = ir.Value(name="x", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT))
w = ir.Value(name="w", shape=ir.Shape([n]), type=ir.TensorType(ir.DataType.FLOAT),
             const_value=ir.tensor(np.full(n, value, np.float32), name="w"))
node = ir.Node("", "Add", [x, w], name="add")
node.outputs[0].name = "y"
graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 17})
model = ir.Model(graph, ir_version=8)
print("ready", flush=True)
io.save_model(model, path, external_data=external)
print("saved", flush=True)
"""


def _save_in_child(path: Path, value: float, external: bool, n: int = N) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(path), str(value), "1" if external else "0", str(n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def _weight_values(path: Path) -> set[float]:
    model = io.load_model(path)
    return set(np.unique(model.graph.initializers["w"].const_value.numpy()).tolist())


@pytest.mark.parametrize("external", [False, True], ids=["single_file", "external_data"])
def test_sigkill_mid_save_leaves_previous_output_whole(tmp_path, external):
    target = tmp_path / "model.onnx"
    first = _save_in_child(target, 1.0, external)
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    assert _weight_values(target) == {1.0}
    # How long an uninterrupted save takes, to spread the kills across it.
    timing = _save_in_child(tmp_path / "timing.onnx", 3.0, external)
    start = time.perf_counter()
    assert timing.wait(timeout=120) == 0
    duration = time.perf_counter() - start
    for p in tmp_path.glob("timing.onnx*"):
        p.unlink()

    rng = random.Random(0)
    seen = set()
    delays = [0.0, 0.01] + [rng.uniform(0.0, duration * 1.2) for _ in range(8)]
    for delay in delays:
        proc = _save_in_child(target, 2.0, external)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        values = _weight_values(target)  # loads: no partial protobuf, data whole and in bounds
        assert values in ({1.0}, {2.0}), (delay, values)
        seen.add(min(values))
        # Nothing but the model, its data file(s) and hidden staging folders of the dead child.
        visible = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
        referenced = {str(t.location) for t in io.external_tensors(io.load_model(target))}
        assert visible - referenced - {"model.onnx"} <= _orphan_data(tmp_path, referenced), visible
        if values == {2.0}:
            _full_save(target, 1.0, external)  # back to the old version for the next kill
    print(f"kill delays {[round(d, 3) for d in delays]}: saw versions {sorted(seen)}")
    # No previous output: after a kill the target is absent or whole, never partial.
    fresh = tmp_path / "fresh.onnx"
    for delay in (0.0, duration * 0.3, duration * 0.7):
        proc = _save_in_child(fresh, 5.0, external)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        assert not fresh.exists() or _weight_values(fresh) == {5.0}
    # The next save cleans the dead children's staging folders and interim data files.
    _full_save(target, 4.0, external)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnfold-")]
    if external:
        assert {p.name for p in tmp_path.glob("model.onnx*")} == {"model.onnx", "model.onnx.data"}


def _orphan_data(folder: Path, referenced: set[str]) -> set[str]:
    """Data files a killed save may leave unreferenced, all removed by the next save.

    Interim ``model.onnx.<token>.data`` files whose model rename never happened,
    and ``model.onnx.data`` while the model in place reads an interim file (the
    save was killed between publishing the interim model and linking its data).
    """
    interim = {p.name for p in folder.glob("model.onnx.*.data")}
    return interim | ({"model.onnx.data"} if referenced & interim else set())


def _full_save(target: Path, value: float, external: bool) -> None:
    proc = _save_in_child(target, value, external)
    assert proc.wait(timeout=120) == 0
    assert _weight_values(target) == {value}


def test_rejected_save_leaves_previous_output_and_no_leftovers(tmp_path):
    target = tmp_path / "m.onnx"
    assert io.save_model(weight_add_model(1.0), target, external_data=True)
    before = snapshot(tmp_path)
    seen = []
    assert not io.save_model(weight_add_model(2.0), target, external_data=True, accept=seen.append)
    assert len(seen) == 1 and seen[0].parent != tmp_path  # staged beside, not in place
    assert snapshot(tmp_path) == before


def test_external_data_is_beside_the_output_with_a_relative_location(tmp_path):
    target = tmp_path / "out" / "m.onnx"
    target.parent.mkdir()
    io.save_model(weight_add_model(1.0), target, external_data=True)
    proto = onnx.load(str(target), load_external_data=False)
    (location,) = {e.value for e in proto.graph.initializer[0].external_data if e.key == "location"}
    assert "/" not in location and not os.path.isabs(location)
    assert (target.parent / location).is_file()
    moved = tmp_path / "moved"
    shutil.move(target.parent, moved)  # relative: the folder can move
    assert _weight_values(moved / "m.onnx") == {1.0}


def test_replacing_an_output_removes_its_own_old_data_but_not_shared_data(tmp_path):
    """The data file keeps the name torch's exporter gives it, ``<model>.data``, on every save."""
    target = tmp_path / "m.onnx"
    for value in (1.0, 2.0):
        io.save_model(weight_add_model(value), target, external_data=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
        assert io.external_data_files(target) == [tmp_path / "m.onnx.data"]
        assert _weight_values(target) == {value}
    # A data file not named after the model may be shared: never deleted.
    shared = tmp_path / "weights.bin"
    onnx.save_model(
        onnx.load(str(target)), str(target), save_as_external_data=True, location="weights.bin",
        size_threshold=0,
    )  # fmt: skip
    io.save_model(weight_add_model(3.0), target, external_data=True)
    assert shared.exists()
    assert _weight_values(target) == {3.0}


def test_a_previous_output_is_parsed_once(tmp_path, monkeypatch):
    """Checking it is a model and finding its data files share one parse."""
    target = tmp_path / "m.onnx"
    io.save_model(weight_add_model(1.0), target, external_data=True)
    parsed = []
    real_load = io.onnx.load

    def counting_load(f, *args, **kwargs):
        if Path(f) == target:
            parsed.append(f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(io.onnx, "load", counting_load)
    io.save_model(weight_add_model(2.0), target, external_data=True)
    assert len(parsed) == 1
    assert sorted(p.name for p in tmp_path.glob("m.onnx*.data")) == ["m.onnx.data"]


def test_in_place_is_atomic_and_verified(cli, tmp_path, samples):
    model = tmp_path / "model.onnx"
    shutil.copy(samples / "resnet_tiny.onnx", model)
    original = tmp_path / "original.onnx"
    shutil.copy(model, original)
    inode = model.stat().st_ino
    result = cli(["fold", model, "--in-place"])
    assert result.exit_code == 0, result.output
    assert model.stat().st_ino != inode
    assert verify_models(str(original), str(model)).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "original.onnx"]


def test_in_place_external_data_output_is_self_consistent(cli, tmp_path, samples):
    shutil.copytree(samples / "external_data", tmp_path / "m")
    model = tmp_path / "m" / "conv_bn_ext.onnx"
    result = cli(["fold", model, "--in-place"])
    assert result.exit_code == 0, result.output
    assert verify_models(str(samples / "external_data" / "conv_bn_ext.onnx"), str(model)).passed


def test_concurrent_saves_to_one_path_never_mix(tmp_path):
    """Four processes save different models to one path at once: one wins, whole."""
    target = tmp_path / "m.onnx"
    procs = [_save_in_child(target, float(v), True, n=2_000_000) for v in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    values = _weight_values(target)
    assert len(values) == 1 and values.pop() in {0.0, 1.0, 2.0, 3.0}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnfold-")]


def test_two_concurrent_folder_runs_into_one_outdir(tmp_path, samples):
    """`bnfold fold DIR -o OUT --jobs 2` twice at once: every output whole and verified."""
    models = tmp_path / "models"
    shutil.copytree(samples, models, ignore=shutil.ignore_patterns("*.py", "*.md"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bnfold", "fold", str(models), "-o", str(out), "--jobs", "2"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
        assert "Traceback" not in stdout + stderr
    sources = sorted(p.relative_to(models) for p in models.rglob("*.onnx"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.onnx")) == sources
    for rel in sources:
        assert verify_models(str(models / rel), str(out / rel)).status != "failed", rel
    assert not list(out.rglob(".bnfold-*"))


def test_folder_mode_continues_past_failures(cli, tmp_path, samples):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(samples / "conv2d_bn.onnx", models)
    shutil.copy(samples / "resnet_tiny.onnx", models / "zz_resnet.onnx")
    (models / "empty.onnx").write_bytes(b"")
    (models / "text.onnx").write_text("hello")
    before = snapshot(models)
    out = tmp_path / "out"
    result = cli(
        ["fold", models, "-o", out, "--jobs", "2", "--json", "--report", tmp_path / "r.json"]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    import json

    payload = json.loads(result.stdout)
    status = {o["source"]: o["status"] for o in payload["outcomes"]}
    assert status == {
        "conv2d_bn.onnx": "ok", "empty.onnx": "error", "text.onnx": "error",
        "zz_resnet.onnx": "ok",
    }  # fmt: skip
    assert all("\n" not in o["error"] for o in payload["outcomes"])
    assert sorted(p.name for p in out.iterdir()) == ["conv2d_bn.onnx", "zz_resnet.onnx"]
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["error"] == 2
    assert snapshot(models) == before


def test_folder_mode_table_and_exit_zero(cli, tmp_path, samples):
    out = tmp_path / "out"
    result = cli(["fold", samples, "-o", out])
    assert result.exit_code == 0, result.output
    assert "conv2d_bn.onnx" in result.stdout and "errors" in result.stdout
    assert (out / "external_data" / "conv_bn_ext.onnx").is_file()


def test_folder_mode_skips_outdir_inside_model_dir(cli, tmp_path, samples):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(samples / "conv2d_bn.onnx", models)
    for _ in range(2):  # the second run must not fold the first run's outputs
        result = cli(["fold", models, "-o", models / "folded", "--json"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (models / "folded").iterdir()) == ["conv2d_bn.onnx"]


@pytest.mark.parametrize("case", ["no_models", "outdir_is_input", "outdir_parent_missing"])
def test_folder_mode_usage_errors(cli, tmp_path, case):
    models = tmp_path / "models"
    models.mkdir()
    if case != "no_models":
        shutil.copy(ROOT / "sample_models" / "conv2d_bn.onnx", models)
    out = {
        "no_models": tmp_path / "out",
        "outdir_is_input": models,
        "outdir_parent_missing": tmp_path / "a" / "b",
    }[case]
    result = cli(["fold", models, "-o", out])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "a").exists()


def _big_model_bench():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "big_model_rss", ROOT / "benchmarks" / "big_model_rss.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_300mb_external_data_model_folds_without_loading_unchanged_weights(tmp_path):
    """CI-sized scale test (benchmarks/big_model_rss.py runs the > 2 GB version).

    A depthwise Conv -> BN (C weights change) in front of 5 Conv 4096x4096 with
    external data (335 MB): the unchanged weights are copied file to file, so the
    fold's peak RSS stays near that of folding a tiny model, far below the model.
    """
    bench = _big_model_bench()
    model = bench.make_model(
        tmp_path / "m", channels=4096, blocks=5, bn_blocks=0, depthwise_bn=True
    )
    size = bench.model_bytes(model)
    assert size > 300e6
    baseline = bench.baseline_rss()
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    code, seconds, rss, payload = bench.measure_fold(model, out, verify=False)
    assert code == 0, payload
    assert [f["site"] for f in payload["report"]["folded"]] == ["dw -> dw_bn"]
    print(f"model {size / 1e6:.0f} MB: fold {seconds:.1f}s, peak RSS {rss / 1e6:.0f} MB "
          f"(tiny-model baseline {baseline / 1e6:.0f} MB)")  # fmt: skip
    assert rss < size
    assert rss < baseline + size / 2  # copying the unchanged weights would add >= size
    (data,) = out.parent.glob("model.onnx*.data")
    assert data.name == "model.onnx.data" and data.stat().st_size >= size - (1 << 20)
    assert verify_models(str(model), str(out)).passed


def test_folder_mode_strict_skips_only_the_unverified_model(cli, tmp_path, samples):
    """--strict without the proof: the model onnxruntime cannot run is not written (exit 1);
    the others are. With the proof (the default) its fold is verified and written."""
    import json

    from tests.test_cli import unrunnable_model

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(samples / "conv2d_bn.onnx", models)
    unrunnable_model(models)
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "unrunnable.onnx"
    shutil.copy(samples / "resnet_tiny.onnx", previous)
    before = previous.read_bytes()
    result = cli(["fold", models, "-o", out, "--strict", "--json", "--no-prove"])
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    outcomes = {o["source"]: (o["status"], o["written"]) for o in payload["outcomes"]}
    assert outcomes == {
        "conv2d_bn.onnx": ("ok", True),
        "unrunnable.onnx": ("not_verified", False),
    }
    assert payload["exit_code"] == 1
    assert previous.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["conv2d_bn.onnx", "unrunnable.onnx"]
    proven = json.loads(cli(["fold", models, "-o", out, "--strict", "--json"]).stdout)
    assert [(o["status"], o["written"]) for o in proven["outcomes"]] == [("ok", True)] * 2
    assert previous.read_bytes() != before

    table = cli(["fold", models, "-o", tmp_path / "out_table", "--strict", "--no-prove"])
    assert table.exit_code == 1
    assert "nothing written (--strict)" in table.stdout
    assert sorted(p.name for p in (tmp_path / "out_table").iterdir()) == ["conv2d_bn.onnx"]

    lenient = cli(["fold", models, "-o", tmp_path / "out_lenient"])
    assert lenient.exit_code == 0, lenient.output
    written = sorted(p.name for p in (tmp_path / "out_lenient").iterdir())
    assert written == ["conv2d_bn.onnx", "unrunnable.onnx"]
