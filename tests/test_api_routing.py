"""The API's one entry point: FoldOptions, and fold_path routing each source to its front."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from bnfold import api
from bnfold.errors import BnfoldError
from bnfold.options import FoldOptions, LowerForm, Rounding
from bnfold.sources import SourceKind, importable_factory, kind_of

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
CONV_BN = SAMPLES / "conv2d_bn.onnx"


def test_fold_options_take_names_as_users_spell_them() -> None:
    options = FoldOptions(rounding="balanced", lower="conv")  # type: ignore[arg-type]
    assert options.rounding is Rounding.BALANCED and options.lower is LowerForm.CONV
    assert FoldOptions(lower=True).lower is LowerForm.MUL_ADD  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"require_verified": True, "verify": False}, "--strict needs verification"),
        ({"rounding": "up"}, "choose from nearest, balanced"),
        ({"lower": "depthwise"}, "choose from mul-add, conv"),
        ({"jobs": 0}, "jobs must be at least 1"),
        ({"bench_levels": ("fast",)}, "unknown bench level 'fast'"),
    ],
)
def test_fold_options_refuse_what_cannot_run(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BnfoldError, match=message):
        FoldOptions(**kwargs)  # type: ignore[arg-type]


def test_kind_of_paths_and_objects(tmp_path: Path) -> None:
    assert kind_of(CONV_BN) is SourceKind.ONNX_FILE
    assert kind_of(str(tmp_path)) is SourceKind.FOLDER
    assert kind_of(tmp_path / "net.pt2") is SourceKind.TORCH_FILE
    assert kind_of(onnx.load(CONV_BN)) is SourceKind.ONNX_MODEL
    assert kind_of(ir.load(CONV_BN)) is SourceKind.ONNX_MODEL
    with pytest.raises(BnfoldError, match="cannot fold a dict"):
        kind_of({})


@pytest.mark.parametrize("load", [ir.load, onnx.load], ids=["ir.Model", "ModelProto"])
def test_fold_path_writes_an_onnx_object_verified(tmp_path: Path, load: object) -> None:
    model = load(CONV_BN)  # type: ignore[operator]
    out = tmp_path / "out.onnx"
    outcome = api.fold_path(model, out)
    assert isinstance(outcome, api.FoldOutcome)
    assert outcome.written and outcome.files == [str(out)] and outcome.exit_code() == 0
    assert outcome.result.verification is not None and outcome.result.verification.passed
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv"]
    if isinstance(model, ir.Model):
        assert [n.op_type for n in model.graph] == ["Conv", "BatchNormalization"]  # untouched


def test_fold_path_of_a_folder_returns_the_batch_report(tmp_path: Path) -> None:
    from bnfold.batch import BatchReport

    models = tmp_path / "models"
    models.mkdir()
    onnx.save(onnx.load(CONV_BN), models / "a.onnx")
    report = api.fold_path(models, tmp_path / "out", FoldOptions(report_path=tmp_path / "r.json"))
    assert isinstance(report, BatchReport) and report.exit_code() == 0
    assert report.files() == [str(tmp_path / "out" / "a.onnx"), str(tmp_path / "r.json")]


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        (CONV_BN, FoldOptions(to_onnx="x.onnx"), "--to-onnx is for torch models"),
        (SAMPLES, FoldOptions(in_place=True), "--in-place folds one ONNX file"),
        (SAMPLES, FoldOptions(bench_levels=("all",)), "--bench times one ONNX model"),
        (CONV_BN, FoldOptions(in_place=True, bench_levels=("all",)), "which --in-place replaces"),
        (CONV_BN, FoldOptions(), "missing -o/--output"),
        (SAMPLES, FoldOptions(), "folder mode needs -o/--output"),
    ],
)
def test_fold_path_refuses_options_the_source_cannot_take(
    source: Path, options: FoldOptions, message: str
) -> None:
    with pytest.raises(BnfoldError, match=message):
        api.fold_path(source, None, options)


def test_fold_path_in_place_writes_the_source(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(onnx.load(CONV_BN), model)
    outcome = api.fold_path(model, None, FoldOptions(in_place=True))
    assert isinstance(outcome, api.FoldOutcome) and outcome.files == [str(model)]
    assert [n.op_type for n in onnx.load(model).graph.node] == ["Conv"]
    with pytest.raises(BnfoldError, match="exclusive"):
        api.fold_path(model, tmp_path / "other.onnx", FoldOptions(in_place=True))


def test_model_source_maps_the_command_line() -> None:
    assert api.model_source("m.onnx") == "m.onnx"
    with pytest.raises(BnfoldError, match="need --module"):
        api.model_source("m.onnx", input_shapes=[(1, 3)])
    with pytest.raises(BnfoldError, match="missing MODEL"):
        api.model_source(None)
    with pytest.raises(BnfoldError, match="not both"):
        api.model_source("m.onnx", module="pkg:make")


@pytest.fixture
def clean_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Work in ``tmp_path``; sys.path is restored and the test's modules forgotten afterwards."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("bnfold_spec_")]:
        del sys.modules[name]


def test_a_factory_beside_the_working_folder_imports(clean_path: Path) -> None:
    (clean_path / "bnfold_spec_here.py").write_text("def make():\n    return 1\n")
    assert importable_factory("bnfold_spec_here:make") == "bnfold_spec_here:make"
    assert __import__("bnfold_spec_here").make() == 1


def test_a_factory_file_path_imports_by_its_name(clean_path: Path) -> None:
    (clean_path / "nets").mkdir()
    (clean_path / "nets" / "bnfold_spec_file.py").write_text("def make():\n    return 2\n")
    for spec in ("nets/bnfold_spec_file.py:make", "./nets/bnfold_spec_file.py:make"):
        assert importable_factory(spec) == "bnfold_spec_file:make"
    assert __import__("bnfold_spec_file").make() == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("./mynets:make", "must look like 'package.module:factory'"),
        ("mynets", "must look like"),
        ("mynets:", "must look like"),
        ("my nets:make", "must look like"),
        ("missing.py:make", "'missing.py' does not exist"),
        ("my-nets.py:make", "'my-nets' is no module name"),
        ("json.py:make", "another module is called 'json'"),
    ],
)
def test_a_bad_factory_spec_is_one_clear_error(clean_path: Path, spec: str, message: str) -> None:
    for name in ("my-nets.py", "json.py"):
        (clean_path / name).write_text("def make():\n    return 0\n")
    with pytest.raises(BnfoldError, match=message):
        importable_factory(spec)


class TestTorchObjects:
    """fold_path writes nn.Module and ExportedProgram objects like the files they come from."""

    torch = pytest.importorskip("torch")

    def net(self) -> object:
        from tests.test_torch_io import Net
        from tests.torch_standins import randomize_bn

        return randomize_bn(Net()).eval()

    @pytest.mark.parametrize("suffix", [".pt", ".pt2"])
    def test_module(self, tmp_path: Path, suffix: str) -> None:
        out = tmp_path / f"folded{suffix}"
        x = self.torch.randn(2, 3, 8, 8)
        outcome = api.fold_path(self.net(), out, example_inputs=(x,))
        assert isinstance(outcome, api.FoldOutcome) and outcome.written, outcome
        assert outcome.files == [str(out)] and outcome.result.report.folded
        with pytest.raises(BnfoldError, match="needs example_inputs"):
            api.fold_path(self.net(), out)

    def test_exported_program(self, tmp_path: Path) -> None:
        x = self.torch.randn(2, 3, 8, 8)
        program = self.torch.export.export(self.net(), (x,), strict=False)
        out = tmp_path / "folded.pt2"
        outcome = api.fold_path(program, out)
        assert isinstance(outcome, api.FoldOutcome) and outcome.written
        counts = outcome.result.report.batchnorm
        assert counts is not None and counts.folded == 3 and counts.left == 1  # relu_bn stays
        folded = self.torch.export.load(out)
        targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
        assert targets.count("aten.batch_norm.default") == 1
        with pytest.raises(BnfoldError, match=r"written as \.pt2"):
            api.fold_path(program, tmp_path / "folded.pt")
