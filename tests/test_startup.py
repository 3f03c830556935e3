"""Start-up: help and usage errors must not import the heavy libraries.

``bnfold --help`` used to take as long as importing onnx and onnx_ir (sympy
among them). The commands import those inside their bodies; these tests check
in a fresh interpreter which modules a command-line run actually loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "onnx", "onnx_ir", "onnxruntime", "sympy", "ml_dtypes", "torch", "rich")

_PROBE = """
import json, sys
from bnfold.cli.main import main
try:
    main(sys.argv[1:], standalone_mode=True)
except SystemExit as done:
    code = done.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def _loaded_by(*args: str) -> dict[str, object]:
    probe = _PROBE.format(heavy=HEAVY)
    run = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    return json.loads(run.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("fold", "--help"),
        ("verify", "--help"),
        ("inspect", "--help"),
        ("bench", "--help"),
        ("--version",),
    ],
)
def test_help_loads_no_heavy_library(args: tuple[str, ...]) -> None:
    loaded = _loaded_by(*args)
    assert loaded == {"code": 0, "heavy": []}


def test_a_usage_error_loads_no_heavy_library() -> None:
    loaded = _loaded_by("fold", "--samples", "0", "m.onnx")
    assert loaded == {"code": 2, "heavy": []}


def test_the_package_loads_its_api_on_first_use() -> None:
    probe = (
        "import sys, bnfold; before = 'onnx_ir' in sys.modules; "
        "fold = bnfold.fold; print(before, 'onnx_ir' in sys.modules, fold.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "bnfold.api"]


def test_unknown_package_attribute_is_an_attribute_error() -> None:
    import bnfold

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = bnfold.nonexistent  # type: ignore[attr-defined]


def test_submodules_are_attributes_of_the_package_as_when_it_loaded_eagerly() -> None:
    probe = "import bnfold; print(bnfold.api.__name__, bnfold.compare.__name__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["bnfold.api", "bnfold.compare"]


def test_a_usage_error_under_json_loads_no_heavy_library() -> None:
    """The JSON error object is built from the standard library alone."""
    loaded = _loaded_by("fold", "--json", "--samples", "0", "m.onnx")
    assert loaded == {"code": 2, "heavy": []}
