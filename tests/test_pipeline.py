"""bnfold in a pipeline: one JSON object per run, one error line, a gate, a hook, quiet logs.

What CI scripts and pre-commit rely on: ``--json`` always prints exactly one
object on stdout (errors included) that lists every file written; errors are
one line on stderr; ``inspect --max-left`` is a gate; progress appears only on
a terminal; the folder table never breaks a name in a log.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from bnfold import quiet
from bnfold.cli import progress
from bnfold.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
BRANCHING = SAMPLES / "neg_branching.onnx"  # one BN left: its conv's output is read twice
RESNET = SAMPLES / "resnet_tiny.onnx"


def invoke(*args: object, columns: int = 100) -> Result:
    env = {"BNFOLD_DEBUG": "", "COLUMNS": str(columns)}
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_object(result: Result) -> dict[str, Any]:
    """The single JSON object a --json run printed (json.loads refuses anything more)."""
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict) and payload["schema"] == 1
    assert payload["exit_code"] == result.exit_code
    return payload


def error_lines(result: Result) -> list[str]:
    return result.stderr.strip().splitlines()


# --- --json: one object, errors included, every file written ---------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("fold", "missing.onnx", "-o", "out.onnx"),  # bad input
        ("fold", "--samples", "0", "m.onnx"),  # a usage error, found while parsing
        ("inspect", "--lower-form", "conv", str(RESNET)),  # a usage error of the command
        ("verify", str(RESNET)),  # one model where two are needed
        ("bench", "missing.onnx"),
    ],
)
def test_json_error_is_one_object_and_one_line_on_stderr(args: tuple[str, ...]) -> None:
    result = invoke(*args, "--json")
    assert result.exit_code == 2
    payload = one_object(result)
    assert payload["command"] == args[0] and set(payload) == {
        "schema", "command", "exit_code", "error",
    }  # fmt: skip
    (line,) = error_lines(result)
    assert line == f"bnfold: error: {payload['error']}"
    assert "Traceback" not in result.output


def test_without_json_an_error_prints_nothing_on_stdout() -> None:
    result = invoke("fold", "missing.onnx", "-o", "out.onnx")
    assert result.exit_code == 2 and result.stdout == ""
    assert len(error_lines(result)) == 1


def test_folder_errors_are_one_object_too(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("fold", tmp_path / "empty", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 2
    assert "no *.onnx models" in one_object(result)["error"]
    assert len(error_lines(result)) == 1


def test_json_lists_the_model_its_external_data_and_the_report(tmp_path: Path) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    source = SAMPLES / "external_data" / "conv_bn_ext.onnx"
    result = invoke("fold", source, "-o", out, "--report", report, "--json")
    assert result.exit_code == 0, result.output
    files = one_object(result)["files"]
    (data,) = [p for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert files == [str(out), str(data), str(report)]
    assert sorted(tmp_path.iterdir()) == sorted(Path(f) for f in files)


def test_json_of_a_kept_back_fold_lists_only_the_report(tmp_path: Path) -> None:
    from tests.test_cli import unrunnable_model

    src, report = unrunnable_model(tmp_path), tmp_path / "r.json"
    result = invoke(
        "fold", src, "-o", tmp_path / "o.onnx", "--strict", "--no-prove", "--report", report,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    payload = one_object(result)
    assert payload["written"] is False and payload["files"] == [str(report)]


def test_folder_json_lists_every_file_written(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(SAMPLES / "external_data", models / "ext")
    shutil.copy(RESNET, models)
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = invoke("fold", models, "-o", out, "--report", report, "--json")
    assert result.exit_code == 0, result.output
    payload = one_object(result)
    written = sorted(str(p) for p in out.rglob("*") if p.is_file())
    assert sorted(payload["files"]) == sorted([*written, str(report)])
    assert payload["files"][-1] == str(report) and payload["report_path"] == str(report)
    assert json.loads(report.read_text()) == payload


def test_text_output_names_every_file_written(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = invoke("fold", SAMPLES / "external_data" / "conv_bn_ext.onnx", "-o", out)
    assert result.exit_code == 0, result.output
    wrote = [line.removeprefix("wrote ") for line in result.stdout.splitlines()]
    assert {str(p) for p in tmp_path.iterdir()} <= set(wrote)


# --- inspect --max-left: a gate for CI ---------------------------------------------------


@pytest.mark.parametrize(("max_left", "code"), [(0, 1), (1, 0)])
def test_max_left_fails_when_more_batchnorms_would_be_left(max_left: int, code: int) -> None:
    result = invoke("inspect", BRANCHING, "--max-left", max_left)
    assert result.exit_code == code, result.output
    verdict = "more than" if code else "within"
    assert f"1 inference BatchNorm would be left: {verdict} --max-left {max_left}" in result.stdout


def test_max_left_counts_what_lowering_leaves() -> None:
    assert invoke("inspect", BRANCHING, "--max-left", 0, "--lower-standalone").exit_code == 0


def test_max_left_json_carries_the_gate() -> None:
    result = invoke("inspect", BRANCHING, "--max-left", 0, "--json")
    assert result.exit_code == 1
    payload = one_object(result)
    assert payload["gate"] == {"max_left": 0, "left": 1, "passed": False}
    assert payload["model"] == str(BRANCHING) and payload["dry_run"] is True


def test_inspect_goes_on_past_a_broken_model(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_text("not a model")
    args = ("inspect", RESNET, broken, BRANCHING, "--max-left", 0)
    text = invoke(*args)
    assert text.exit_code == 2
    assert f"== {RESNET}" in text.stdout and f"== {BRANCHING}" in text.stdout
    (line,) = error_lines(text)
    assert line.startswith("bnfold: error: ") and str(broken) in line
    models = one_object(invoke(*args, "--json"))["models"]
    assert [(m["exit_code"], bool(m["report"]), "error" in m) for m in models] == [
        (0, True, False), (2, False, True), (1, True, False),
    ]  # fmt: skip


# --- output a CI log can read --------------------------------------------------------------


def test_folder_table_keeps_every_name_on_one_line_in_a_log(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "a_rather_deep_folder_for_the_export").mkdir(parents=True)
    long_name = "a_rather_deep_folder_for_the_export/resnet_tiny_exported_with_opset_17_fp32.onnx"
    shutil.copy(RESNET, models / long_name)
    (models / "corrupt_model_with_a_long_name_too.onnx").write_text("not a model")
    result = invoke("fold", models, "-o", tmp_path / "out", columns=100)
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    (row,) = [line for line in lines if long_name in line]
    assert row.split()[:3] == [long_name, "ok", "6"]
    (bad,) = [line for line in lines if line.startswith("corrupt_model_with_a_long_name_too.onnx")]
    assert "error" in bad.split() and "not a readable ONNX model" in bad
    assert lines[-1].startswith("2 models in ")
    assert "━" not in result.stdout and "│" not in result.stdout  # no box drawing in a log


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """stderr as a terminal would be, recorded."""
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(
        progress, "_stderr_console", lambda: Console(file=screen, force_terminal=True, width=100)
    )
    return screen


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (("fold", RESNET, "-o", "{out}"), "verifying"),
        (("verify", RESNET, RESNET), "verifying"),
        (("inspect", RESNET, BRANCHING), "inspecting"),
        (("bench", SAMPLES / "conv2d_bn.onnx", "--runs", "20", "--warmup", "1"), "runs"),
    ],
)
def test_progress_shows_on_a_terminal_only(
    terminal: io.StringIO, tmp_path: Path, args: tuple[Any, ...], shown: str
) -> None:
    argv = [str(a).format(out=tmp_path / "o.onnx") for a in args]
    result = invoke(*argv)
    assert result.exit_code == 0, result.output
    assert shown in terminal.getvalue()
    assert result.stderr == ""  # CliRunner's own stderr is no terminal
    for flag in ("--quiet", "--json"):
        terminal.truncate(0)
        assert invoke(*argv, flag).exit_code == 0
        assert terminal.getvalue() == "", flag


def test_folder_progress_counts_the_models(terminal: io.StringIO, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(SAMPLES / "conv2d_bn.onnx", models / name)
    assert invoke("fold", models, "-o", tmp_path / "out").exit_code == 0
    assert "2/2" in terminal.getvalue()


def test_quiet_libraries_holds_back_warnings_and_log_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown: list[str] = []
    monkeypatch.setattr(
        warnings, "showwarning", lambda message, *a, **k: shown.append(str(message))
    )
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger().addHandler(handler)
    monkeypatch.delenv("BNFOLD_DEBUG", raising=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with quiet.quiet_libraries():
                assert quiet.for_worker() is not None  # workers of a quiet run are quiet
                warnings.warn("held back", UserWarning, stacklevel=1)
                logging.getLogger("a_library").warning("held back")
                logging.getLogger("a_library").error("an error still passes")
            assert quiet.for_worker() is None
            warnings.warn("shown", UserWarning, stacklevel=1)
            logging.getLogger("a_library").warning("shown")
    finally:
        logging.getLogger().removeHandler(handler)
    assert shown == ["shown"]
    assert [r.getMessage() for r in records] == ["an error still passes", "shown"]


_CHATTY_FOLD = """
import logging, sys, warnings
from bnfold import api
from bnfold.cli.main import main

fold_onnx = api._fold_onnx

def chatty(*args):
    warnings.warn("a library warns", UserWarning)
    logging.getLogger("onnxscript").warning("a library logs")
    return fold_onnx(*args)

api._fold_onnx = chatty
main(sys.argv[1:])
"""


@pytest.mark.parametrize("debug", ["", "1"])
def test_commands_run_quietly(tmp_path: Path, debug: str) -> None:
    """A library's warning or log line during a fold reaches stderr only with BNFOLD_DEBUG."""
    import os

    argv = ["fold", str(SAMPLES / "conv2d_bn.onnx"), "-o", str(tmp_path / "o.onnx")]
    env = {**os.environ, "BNFOLD_DEBUG": debug}
    run = subprocess.run(
        [sys.executable, "-c", _CHATTY_FOLD, *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    if debug:
        assert "a library warns" in run.stderr and "a library logs" in run.stderr
    else:
        assert run.stderr == ""
