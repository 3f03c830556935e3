"""Real torch 2.13 exports that keep BatchNorm fold completely and verify.

Both torch exporters fold BN by default; these settings keep it, as users who
export for training-aware tooling do: the TorchScript exporter with
``training=PRESERVE, do_constant_folding=False``, and the dynamo exporter with
``optimize=False`` (which writes a missing conv bias as Expand(CastLike(...))).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import bnfold  # noqa: E402


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)
        self.bn1d = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.bn1d(self.fc(y.mean((2, 3))))


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.5)
    return model.eval()


class Generator(torch.nn.Module):
    """A DCGAN generator's head: Linear -> view(N, C, 4, 4) -> BatchNorm2d -> ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8 * 4 * 4)
        self.bn0 = torch.nn.BatchNorm2d(8)
        self.up = torch.nn.ConvTranspose2d(8, 4, 4, 2, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.fc(z).view(-1, 8, 4, 4)))
        return torch.tanh(self.bn1(self.up(x)))


def export(
    path: Path, dynamo: bool, net: type[torch.nn.Module] = ConvNet, shape: tuple = (2, 3, 8, 8)
) -> None:
    model, x = trained_looking(net()), torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), dynamo=True, optimize=False).save(str(path))
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_export_with_bn_folds_completely(tmp_path: Path, dynamo: bool) -> None:
    path = tmp_path / "net.onnx"
    export(path, dynamo)
    result = bnfold.fold(path, verify=True)
    assert result.report.ops_before.get("BatchNormalization") == 3
    assert "BatchNormalization" not in result.report.ops_after
    assert result.report.refused == []
    assert result.verification is not None and result.verification.passed
    if dynamo:  # the Expand/CastLike/Shape that built the zero conv bias are gone too
        assert not {"Expand", "CastLike", "Shape"} & set(result.report.ops_after)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_dcgan_generator_export_folds_through_the_view(tmp_path: Path, dynamo: bool) -> None:
    # TorchScript writes Reshape(-1, 8, 4, 4) with no intermediate shapes; dynamo a
    # static Reshape(2, 8, 4, 4) with shapes: both keep the batch axis provably.
    path = tmp_path / "generator.onnx"
    export(path, dynamo, Generator, (2, 16))
    result = bnfold.fold(path, verify=True)
    assert [f.pattern for f in result.report.folded] == [
        "Gemm+Reshape+BatchNormalization",
        "ConvTranspose+BatchNormalization",
    ]
    assert result.report.refused == [] and result.verification.passed
