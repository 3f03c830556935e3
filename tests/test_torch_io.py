"""Torch file loaders for the CLI: module factories, .pt2 folding, ONNX export."""

from __future__ import annotations

import argparse
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.options import FoldOptions  # noqa: E402
from bnfold.report import Code  # noqa: E402
from bnfold.torch_front import aten_graph, io  # noqa: E402
from bnfold.torch_front.files import fold_torch_files  # noqa: E402
from tests.torch_standins import randomize_bn  # noqa: E402

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


class Zoo:
    @staticmethod
    def small():
        return make()


def not_a_module():
    return 42
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_factory"


def test_factory_builds_module_in_eval_mode(factory):
    module = io.load_module_factory(f"{factory}:make", None, trust_pickle=False)
    assert isinstance(module[1], nn.BatchNorm2d) and not module.training


def test_factory_accepts_dotted_callable(factory):
    module = io.load_module_factory(f"{factory}:Zoo.small", None, trust_pickle=False)
    assert isinstance(module, nn.Sequential)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "must look like"),
        ("nonexistent_pkg_xyz:make", "cannot import"),
        ("tiny_factory:missing", "has no attribute"),
        ("tiny_factory:not_a_module", "not a torch nn.Module"),
    ],
)
def test_bad_factory_spec_is_one_line_error(factory, spec, message):
    with pytest.raises(BnfoldError, match=message) as err:
        io.load_module_factory(spec, None, trust_pickle=False)
    assert "\n" not in str(err.value)


def test_weights_are_loaded_from_state_dict(factory, tmp_path):
    source = randomize_bn(io.load_module_factory(f"{factory}:make", None, trust_pickle=False))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    module = io.load_module_factory(f"{factory}:make", str(path), trust_pickle=False)
    assert torch.equal(module[1].running_var, source[1].running_var)


def test_checkpoint_needing_full_unpickling_asks_for_trust_pickle(factory, tmp_path):
    source = randomize_bn(io.load_module_factory(f"{factory}:make", None, trust_pickle=False))
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(BnfoldError, match="--trust-pickle") as err:
        io.load_module_factory(f"{factory}:make", str(path), trust_pickle=False)
    assert "\n" not in str(err.value)
    module = io.load_module_factory(f"{factory}:make", str(path), trust_pickle=True)
    assert torch.equal(module[1].running_mean, source[1].running_mean)


def test_weights_that_do_not_fit_are_reported(factory, tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(BnfoldError, match="does not fit"):
        io.load_module_factory(f"{factory}:make", str(path), trust_pickle=False)
    with pytest.raises(BnfoldError, match="does not exist"):
        io.load_module_factory(f"{factory}:make", str(tmp_path / "nope.pt"), trust_pickle=False)


def test_example_inputs_from_shapes():
    (x, y) = io.example_inputs_from_shapes([[1, 3, 4, 4], [2, 5]], dtype="float64")
    assert x.shape == (1, 3, 4, 4) and y.shape == (2, 5) and x.dtype == torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)
        self.relu_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn_up(self.up(self.bn(self.conv(x))))
        y = self.relu_bn(torch.relu(y))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def fold_pt2(src, dst, verify: bool = True):
    """What `bnfold fold IN.pt2 -o OUT.pt2` runs: fold, verify, write atomically."""
    result, _written = fold_torch_files(str(src), dst, FoldOptions(verify=verify))
    return result


def save_program(model: nn.Module, x: torch.Tensor, path) -> None:
    torch.export.save(torch.export.export(model, (x,), strict=False), path)


def test_fold_exported_program_file(tmp_path):
    model = randomize_bn(Net())
    x = torch.randn(2, 3, 8, 8)
    src, dst = tmp_path / "in.pt2", tmp_path / "out.pt2"
    save_program(model, x, src)
    before = src.read_bytes()
    result = fold_pt2(src, dst)
    assert [f.site for f in result.report.folded] == ["conv -> bn", "up -> bn_up", "fc -> bn_fc"]
    # After bn_up folds, relu_bn is seen behind up and a ReLU (folds run to a fixpoint).
    assert [(r.site, r.code) for r in result.report.refused] == [
        ("up -> relu_bn", Code.NONLINEAR_INPUT)
    ]
    assert result.verification.passed
    assert src.read_bytes() == before
    folded = torch.export.load(dst)
    targets = [str(n.target) for n in folded.graph.nodes]
    assert targets.count("aten.batch_norm.default") == 1
    assert "conv.bias" in folded.state_dict and "bn.running_mean" not in folded.state_dict
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded.module()(x2), model(x2), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt2", "out.pt2"]


def test_decomposed_exported_program_folds_convolutions(tmp_path):
    model = randomize_bn(Net())
    x = torch.randn(2, 3, 8, 8)
    src = tmp_path / "in.pt2"
    ep = torch.export.export(model, (x,), strict=False).run_decompositions()
    torch.export.save(ep, src)
    result = fold_pt2(src, tmp_path / "out.pt2")
    folded = [(f.site, f.pattern) for f in result.report.folded]
    assert folded == [
        ("conv -> bn", "Conv+batch_norm"),
        ("up -> bn_up", "ConvTranspose+batch_norm"),
    ]
    assert result.verification.passed
    with torch.no_grad():
        y = torch.export.load(tmp_path / "out.pt2").module()(x)
    assert torch.allclose(y, model(x), atol=1e-5)


def test_exported_program_refusals(tmp_path):
    class Refusing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.bn = nn.BatchNorm1d(6)
            self.conv = nn.Conv1d(6, 6, 1)
            self.bn2 = nn.BatchNorm1d(6)

        def forward(self, x):  # x: (N, 6, 6); BN normalizes axis 1, not fc's features
            y = self.conv(x)
            return self.bn(self.fc(x)) + self.bn2(y) + y

    src = tmp_path / "in.pt2"
    save_program(randomize_bn(Refusing()), torch.randn(2, 6, 6), src)
    result = fold_pt2(src, tmp_path / "out.pt2")
    codes = {r.site: r.code for r in result.report.refused}
    assert codes == {"fc -> bn": Code.NOT_PER_CHANNEL, "conv -> bn2": Code.BRANCHING}
    assert not result.report.folded


def test_exported_program_in_training_mode_is_refused(tmp_path):
    model = Net().train()
    src = tmp_path / "in.pt2"
    save_program(model, torch.randn(2, 3, 8, 8), src)
    result = fold_pt2(src, tmp_path / "out.pt2", verify=False)
    assert Code.TRAINING_MODE in result.report.codes
    assert not result.report.folded


def test_exported_program_corrupted_fold_is_rolled_back(tmp_path, monkeypatch):
    real = aten_graph.bn_to_affine

    def corrupt_four_channels(gamma, beta, mean, var, eps):
        affine = real(gamma, beta, mean, var, eps)
        if len(mean) == 4:  # only bn_up has 4 channels among the folded sites
            return type(affine)(affine.scale * 2.0, affine.shift)
        return affine

    monkeypatch.setattr(aten_graph, "bn_to_affine", corrupt_four_channels)
    model = randomize_bn(Net())
    src, dst = tmp_path / "in.pt2", tmp_path / "out.pt2"
    save_program(model, torch.randn(2, 3, 8, 8), src)
    result = fold_pt2(src, dst)
    assert [f.site for f in result.report.folded] == ["conv -> bn", "fc -> bn_fc"]
    assert ("up -> bn_up", Code.VERIFICATION_FAILED) in [
        (r.site, r.code) for r in result.report.refused
    ]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(dst).module()(x), model(x), atol=1e-5)


def test_bad_pt2_paths_are_one_line_errors(tmp_path):
    with pytest.raises(BnfoldError, match="does not exist"):
        fold_pt2(tmp_path / "missing.pt2", tmp_path / "o.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BnfoldError, match="ExportedProgram"):
        fold_pt2(junk, tmp_path / "o.pt2")
    src = tmp_path / "in.pt2"
    save_program(randomize_bn(Net()), torch.randn(1, 3, 8, 8), src)
    with pytest.raises(BnfoldError, match="does not exist"):
        fold_pt2(src, tmp_path / "no_dir" / "o.pt2")


def test_export_onnx_of_folded_module(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from bnfold.torch_front import fold_module

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(1, 3, 8, 8)
    folded = fold_module(model, (x,)).model
    path = tmp_path / "m.onnx"
    io.export_onnx(folded, (x,), path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_pt2_whose_outputs_never_match_is_not_written(tmp_path):
    class Noisy(Net):
        def forward(self, x):
            return super().forward(x) + torch.rand(1)

    src, dst = tmp_path / "in.pt2", tmp_path / "out.pt2"
    save_program(randomize_bn(Noisy()), torch.randn(2, 3, 8, 8), src)
    result = fold_pt2(src, dst)
    assert result.verification.status == "failed"
    assert not dst.exists()
    assert {r.code for r in result.report.refused} >= {Code.VERIFICATION_FAILED}
