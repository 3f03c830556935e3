"""The pre-commit hook bnfold defines: ``inspect --max-left`` over the committed ``.onnx`` files."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
RESNET = SAMPLES / "resnet_tiny.onnx"
BRANCHING = SAMPLES / "neg_branching.onnx"  # one BN left: its conv's output is read twice


def precommit_hooks() -> list[dict[str, Any]]:
    """``.pre-commit-hooks.yaml``: a list of mappings whose values are written as JSON."""
    hooks: list[dict[str, Any]] = []
    for line in (ROOT / ".pre-commit-hooks.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("- "):
            hooks.append({})
        key, sep, value = line[2:].partition(": ")
        assert line[:2] in ("- ", "  ") and sep and key.isidentifier(), line
        hooks[-1][key] = json.loads(value)
    return hooks


def test_precommit_hook_gates_committed_onnx_files(tmp_path: Path) -> None:
    (hook,) = precommit_hooks()
    assert hook["id"] == "bnfold-max-left" and hook["language"] == "python"
    assert hook["pass_filenames"] is True
    files = re.compile(hook["files"])
    assert files.search("models/a.onnx") and not files.search("a.onnx.data")
    command = shlex.split(hook["entry"]) + hook["args"]
    assert command[0] == "bnfold"
    exe = shutil.which("bnfold") or str(Path(sys.executable).parent / "bnfold")

    def commit(*paths: Path) -> subprocess.CompletedProcess[str]:
        argv = [exe, *command[1:], *map(str, paths)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    clean = commit(RESNET, SAMPLES / "conv2d_bn.onnx")
    assert clean.returncode == 0, clean.stderr
    dirty = commit(RESNET, BRANCHING)
    assert dirty.returncode == 1 and "more than --max-left 0" in dirty.stdout
    assert dirty.stderr == ""
