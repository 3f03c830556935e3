"""The committed sample models are valid, runnable and exactly what make.py generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"
MODELS = sorted(p.relative_to(SAMPLE_DIR).as_posix() for p in SAMPLE_DIR.rglob("*.onnx"))
# Not written by make.py, so not compared byte for byte.
NOT_GENERATED = {"make.py"}


def load_make():
    spec = importlib.util.spec_from_file_location("sample_models_make", SAMPLE_DIR / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in NOT_GENERATED
    }


def test_every_sample_is_committed():
    make = load_make()
    assert sorted(s.file for s in make.SAMPLES) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_checker_and_onnxruntime(name: str):
    path = SAMPLE_DIR / name
    assert path.stat().st_size < 1_000_000
    onnx.checker.check_model(str(path), full_check=True)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    assert len(outputs) == len(session.get_outputs())
    for out in outputs:
        assert np.isfinite(out).all()


def test_node_names_are_unique():
    for name in MODELS:
        model = onnx.load(str(SAMPLE_DIR / name), load_external_data=False)
        names = [n.name for n in model.graph.node]
        assert all(names) and len(set(names)) == len(names), name


def test_make_is_deterministic(tmp_path: Path):
    load_make().main([str(tmp_path)])
    assert generated_files(tmp_path) == generated_files(SAMPLE_DIR)
