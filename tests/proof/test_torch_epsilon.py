"""The prover's BatchNorm epsilon on torch is the float the module stores.

torch stores ``eps`` as a Python float and adds it to the running variance in the
input's compute type (float64 for a float64 input, float32 otherwise), rounding there
at run time. The map the stored parameters define adds the stored float64: with a
variance near zero, ``1e-5`` and ``float32(1e-5)`` differ by millions of float64 ulps,
so a prover holding it in a float32 (an ONNX attribute, as the module-level proof did)
refutes a correct float64 fold (the ONNX side's bug: commit 3f618a7); in float32 the
cast is below the rounding of ``var + eps`` and must not refute a fold either.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnfold.proof import prove_eager  # noqa: E402
from bnfold.proof.torch_graph import program_model  # noqa: E402

EPS = 1e-5


def _conv_bn(dtype: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=EPS)).to(dtype).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e-9)  # var + eps is all eps: its rounding shows
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 2)
    return model


def _folded(model: Any, eps: float) -> Any:
    """The exact fold with ``eps`` added to the variance, in float64, as a Conv."""
    conv, bn = model[0], model[1]
    var = bn.running_var.double() + eps
    scale = bn.weight.double() / var.sqrt()
    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded[0].weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight))
        shift = bn.bias.double() + (conv.bias.double() - bn.running_mean.double()) * scale
        folded[0].bias.copy_(shift.to(conv.bias))
    folded[1] = nn.Identity()
    return folded


def _inputs(dtype: Any) -> tuple[Any]:
    return (torch.randn(1, 3, 8, 8, dtype=dtype),)


@pytest.mark.parametrize("traced", [True, False], ids=["program", "module_level"])
def test_a_float64_fold_is_proven_with_the_float64_epsilon(traced: bool) -> None:
    model = _conv_bn(torch.float64)
    args = _inputs(torch.float64) if traced else None
    right = prove_eager(model, _folded(model, EPS), _report(), example_inputs=args)
    assert right.holds, right.summary()
    assert right.worst_ulp < 10
    rounded = float(np.float32(EPS))  # what a float32 kernel would have added
    wrong = prove_eager(model, _folded(model, rounded), _report(), example_inputs=args)
    assert wrong.refuted, wrong.summary()


@pytest.mark.parametrize("traced", [True, False], ids=["program", "module_level"])
def test_a_float32_fold_is_proven_with_the_stored_epsilon(traced: bool) -> None:
    model = _conv_bn(torch.float32)
    args = _inputs(torch.float32) if traced else None
    certificate = prove_eager(model, _folded(model, EPS), _report(), example_inputs=args)
    assert certificate.holds, certificate.summary()


def test_a_program_bn_carries_the_stored_epsilon() -> None:
    for dtype in (torch.float32, torch.float64):
        program = torch.export.export(_conv_bn(dtype), _inputs(dtype), strict=False)
        (bn,) = [n for n in program_model(program).graph if n.op_type == "BatchNormalization"]
        assert bn.attributes["epsilon"].value == EPS


def _report() -> Any:
    from bnfold.report import Folded, FoldReport

    report = FoldReport(front="torch")
    report.folded = [Folded("0 -> 1", "Conv2d+BatchNorm2d", "0", "1")]
    return report


class Residual(nn.Module):
    """torchvision's ``out += identity``: an in-place add of a temporary."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: Any) -> Any:
        out = self.bn(self.conv(torch.relu(x)))
        out += x
        return out


def test_an_in_place_add_of_a_temporary_is_modelled() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    folded = copy.deepcopy(model)
    conv, bn = model.conv, model.bn
    scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    with torch.no_grad():
        folded.conv.weight.copy_((conv.weight.double() * scale[:, None, None, None]).float())
        folded.conv.bias.copy_(
            (bn.bias.double() + (conv.bias.double() - bn.running_mean.double()) * scale).float()
        )
    folded.bn = nn.Identity()
    report = _report()
    report.folded = [type(report.folded[0])("conv -> bn", "Conv2d+BatchNorm2d", "conv", "bn")]
    certificate = prove_eager(model, folded, report, example_inputs=(torch.randn(1, 4, 6, 6),))
    assert certificate.holds, certificate.summary()
