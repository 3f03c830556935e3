"""Shared fixtures and hypothesis profiles.

Profiles: "default" (100 examples, for a local run) and "ci" (1000 examples,
derandomized so a CI failure reproduces). "ci" is loaded when HYPOTHESIS_PROFILE=ci
or CI=true; HYPOTHESIS_PROFILE picks any registered profile by name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, settings
from onnx import helper, numpy_helper

settings.register_profile(
    "default",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=1000,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
_profile = os.environ.get("HYPOTHESIS_PROFILE") or (
    "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "default"
)
settings.load_profile(_profile)

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def samples() -> Path:
    return SAMPLE_DIR


@pytest.fixture
def cli() -> Callable[[Sequence[str]], Result]:
    """Run the bnfold CLI in-process; exceptions are left to the CLI, never re-raised."""
    from bnfold.cli.main import main

    runner = CliRunner()

    def invoke(args: Sequence[str]) -> Result:
        env = {"BNFOLD_DEBUG": "", "COLUMNS": "120"}
        return runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=True)

    return invoke


def assert_one_line_error(result: Result, *, contains: str = "") -> str:
    """Exit code 2, exactly one line on stderr starting "bnfold: error:", no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnfold: error: "), lines[0]
    assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``folder`` (hidden ones too): digest, size, mtime."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            state[rel] = ("symlink:" + os.readlink(path), 0, 0)
        elif path.is_file():
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[rel] = (digest, info.st_size, info.st_mtime_ns)
        else:
            state[rel] = ("dir", 0, 0)
    return state


def conv_bn_model(
    c_in: int = 3,
    c_out: int = 4,
    *,
    seed: int = 0,
    opset: int = 17,
    ir_version: int = 8,
    hw: int = 6,
    **bn: np.ndarray,
) -> onnx.ModelProto:
    """input -> conv1 -> bn1 -> output, with random weights and BN statistics."""
    rng = np.random.default_rng(seed)
    params = {
        "scale": rng.uniform(0.5, 1.5, c_out),
        "bias": rng.normal(0, 0.5, c_out),
        "mean": rng.normal(0, 0.5, c_out),
        "var": rng.uniform(0.5, 2.0, c_out),
    }
    params.update(bn)
    inits = [
        numpy_helper.from_array(rng.normal(size=(c_out, c_in, 3, 3)).astype(np.float32), "conv1.w"),
        numpy_helper.from_array(rng.normal(size=c_out).astype(np.float32), "conv1.b"),
    ]
    inits += [
        numpy_helper.from_array(np.asarray(v, dtype=np.float32), f"bn1.{k}")
        for k, v in params.items()
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1] * 4
        ),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"],
            ["output"],
            name="bn1",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, c_in, hw, hw])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model
