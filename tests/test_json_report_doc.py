"""docs/json-report.md is the schema of every JSON object bnfold prints, checked on real output.

The document's tables are read as types (a field, its type, a meaning); each
command is run for real and its object must have exactly the documented fields
(optional ones may be absent), of the documented types, all the way down.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli.main import main
from bnfold.json_report import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DOC = ROOT / "docs" / "json-report.md"

Field = tuple[str, bool]  # (type expression, optional)


def documented_types(text: str) -> dict[str, dict[str, Field]]:
    """Every ``### Type`` section's table as {field: (type, optional)}, includes expanded."""
    raw: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            raw[current] = []
        elif current and line.startswith("| ") and not line.startswith("| field"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) >= 2 and not set(cells[0]) <= {"-"}:
                raw[current].append((cells[0], cells[1]))

    def fields(name: str) -> dict[str, Field]:
        out: dict[str, Field] = {}
        for cell, type_cell in raw[name]:
            if include := re.fullmatch(r"\*\(fields of (\w+)\)\*", cell):
                out.update(fields(include.group(1)))
                continue
            name_match = re.fullmatch(r"`(\w+)`", cell)
            assert name_match, f"{name}: cannot read the row {cell!r}"
            optional = type_cell.endswith(", optional")
            out[name_match.group(1)] = (type_cell.removesuffix(", optional"), optional)
        return out

    return {name: fields(name) for name in raw}


TYPES = documented_types(DOC.read_text())


def check(value: Any, type_expr: str, where: str) -> None:
    """Assert ``value`` is of the documented ``type_expr`` (recursively)."""
    if type_expr.endswith(" or null"):
        if value is None:
            return
        type_expr = type_expr.removesuffix(" or null")
    if type_expr.startswith("list of "):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check(item, type_expr.removeprefix("list of "), f"{where}[{i}]")
    elif type_expr.startswith("map of "):
        assert isinstance(value, dict), where
        for key, item in value.items():
            check(item, type_expr.removeprefix("map of "), f"{where}.{key}")
    elif type_expr == "int":
        assert isinstance(value, int) and not isinstance(value, bool), (where, value)
    elif type_expr == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        assert ok or value in ("inf", "-inf", "nan"), (where, value)
    elif type_expr == "str":
        assert isinstance(value, str), (where, value)
    elif type_expr == "bool":
        assert isinstance(value, bool), (where, value)
    else:
        assert type_expr in TYPES, f"{where}: undocumented type {type_expr!r}"
        check_object(value, type_expr, where)


def check_object(value: Any, type_name: str, where: str) -> None:
    assert isinstance(value, dict), (where, value)
    documented = TYPES[type_name]
    undocumented = set(value) - set(documented)
    assert not undocumented, f"{where} ({type_name}): fields missing from the doc: {undocumented}"
    missing = {k for k, (_, optional) in documented.items() if not optional} - set(value)
    assert not missing, f"{where} ({type_name}): documented fields not written: {missing}"
    for key, item in value.items():
        check(item, documented[key][0], f"{where}.{key}")


def run_json(*args: object) -> tuple[int, dict[str, Any]]:
    """Run a command with --json: its exit code and the one object it printed."""
    argv = [str(a) for a in (*args, "--json")]
    result = CliRunner().invoke(main, argv, env={"BNFOLD_DEBUG": ""})
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, Any]]]:
    """Real output of every command, by the documented type it must have."""
    tmp = tmp_path_factory.mktemp("json")
    models = tmp / "models"
    models.mkdir()
    for name in ("resnet_tiny.onnx", "neg_standalone_bn.onnx", "neg_branching.onnx"):
        shutil.copy(SAMPLES / name, models)
    (models / "broken.onnx").write_text("not a model")
    ext = SAMPLES / "external_data" / "conv_bn_ext.onnx"
    bad = models / "broken.onnx"
    runs = {
        "FoldOutcome": [
            ("fold", ext, "-o", tmp / "e.onnx", "--report", tmp / "r.json", "--bench"),
            ("fold", SAMPLES / "neg_branching.onnx", "-o", tmp / "b.onnx", "--no-verify"),
        ],
        "BatchReport": [("fold", models, "-o", tmp / "out", "--lower-standalone")],
        "Inspection": [("inspect", SAMPLES / "neg_branching.onnx", "--max-left", "0")],
        "InspectRun": [("inspect", SAMPLES / "resnet_tiny.onnx", bad, "--max-left", "0")],
        "Verification": [
            ("verify", SAMPLES / "conv2d_bn.onnx", SAMPLES / "conv2d_bn.onnx"),
            ("verify", "--prove", ext, tmp / "e.onnx"),  # the fold above wrote it
            ("verify", "--prove", "--no-sample", ext, tmp / "e.onnx"),
        ],
        "BenchRun": [("bench", SAMPLES / "conv2d_bn.onnx", "--runs", "3", "--warmup", "1")],
        "Error": [("fold", tmp / "missing.onnx", "-o", tmp / "x.onnx"), ("fold", "--samples", "0")],
    }
    return {kind: [(str(args), run_json(*args)[1]) for args in arg_lists]
            for kind, arg_lists in runs.items()}  # fmt: skip


def test_every_section_table_is_readable() -> None:
    top = {"FoldOutcome", "BatchReport", "Inspection", "InspectRun", "Verification", "BenchRun"}
    assert top | {"Error", "Head"} <= set(TYPES)
    assert all(set(TYPES["Head"]) <= set(TYPES[name]) for name in top | {"Error"})


@pytest.mark.parametrize(
    "kind",
    ["FoldOutcome", "BatchReport", "Inspection", "InspectRun", "Verification", "BenchRun", "Error"],
)
def test_output_matches_the_documented_fields(objects: dict[str, Any], kind: str) -> None:
    for args, payload in objects[kind]:
        assert payload["schema"] == SCHEMA_VERSION, args
        check_object(payload, kind, args)


def test_the_check_catches_an_undocumented_and_a_missing_field() -> None:
    head = {"schema": 1, "command": "fold", "exit_code": 2, "error": "x"}
    check_object(head, "Error", "error")
    with pytest.raises(AssertionError, match="missing from the doc"):
        check_object({**head, "new_field": 1}, "Error", "error")
    with pytest.raises(AssertionError, match="not written"):
        check_object({k: v for k, v in head.items() if k != "error"}, "Error", "error")


def test_the_samples_exercise_the_nested_parts(objects: dict[str, Any]) -> None:
    """The run above reaches refusals, lowerings, a gate and a per-model error."""
    ((_, folder),) = objects["BatchReport"]
    results = [o["result"] for o in folder["outcomes"] if o["result"]]
    assert any(r["report"]["lowered"] for r in results)
    assert any(o["status"] == "error" for o in folder["outcomes"])
    ((_, inspected),) = objects["Inspection"]
    assert inspected["refused"] and inspected["gate"]["passed"] is False
    ((_, many),) = objects["InspectRun"]
    assert [m["exit_code"] for m in many["models"]] == [0, 2]
    # The proof rides with every verification that folds, and with verify --prove.
    (_, folded), _ = objects["FoldOutcome"]
    assert folded["verification"]["proof"]["holds"] is True
    assert all(r["verification"]["proof"]["sites"] for r in results if r["verification"])
    _, (_, proven), (_, not_sampled) = objects["Verification"]
    assert proven["proof"]["holds"] and proven["status"] == "passed"
    assert not_sampled["reason_code"] == "not_sampled" and not_sampled["samples"] == 0


def test_the_report_file_is_the_printed_object(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, printed = run_json("fold", SAMPLES / "conv2d_bn.onnx", "-o", tmp_path / "f.onnx",
                             "--report", report)  # fmt: skip
    assert code == 0
    assert json.loads(report.read_text()) == printed
    assert printed["files"] == [str(tmp_path / "f.onnx"), str(report)]
    assert onnx.load(tmp_path / "f.onnx").graph.node
