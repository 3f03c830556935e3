"""Stand-ins for the BatchNorm kinds users have, rebuilt from ``torch.nn`` (the tests
need no torchvision, timm or detectron2), and helpers the torch front's tests share."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnfold.torch_front import recorded, trace

FINDERS = ["export", "fx", "recorded"]


def use(finder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the finders before ``finder`` fail, so ``finder`` is the one used."""

    def broken(*_args: object) -> None:
        raise RuntimeError("no trace")

    if finder in ("fx", "recorded", "sequential"):
        monkeypatch.setattr(trace, "_export_graph", broken)
    if finder in ("recorded", "sequential"):
        monkeypatch.setattr(trace, "_fx_graph", broken)
    if finder == "sequential":
        monkeypatch.setattr(recorded, "record_run", broken)


def randomize_bn(model: nn.Module, seed: int = 0, shift: bool = True) -> nn.Module:
    """Non-trivial statistics and affine in every BN and BN-like module (any with running
    statistics: frozen ones too), eval mode; ``shift=False`` makes each a pure scale
    (zero mean and bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is None:
                continue
            c = m.running_var.shape[0]
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            mean = torch.randn(c, generator=gen) * 0.5
            m.running_mean.copy_(mean if shift else torch.zeros(c))
            for name, low in (("weight", 0.5), ("bias", -0.5)):
                value = torch.rand(c, generator=gen) + low
                if getattr(m, name, None) is not None:
                    getattr(m, name).copy_(value if shift or name == "weight" else torch.zeros(c))
    return model.eval()


def conv_bn(
    c_in: int,
    c_out: int,
    k,
    stride: int = 1,
    groups: int = 1,
    norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    **conv,
) -> nn.Sequential:
    """Conv2d (no bias; padding ``k // 2`` times the dilation unless given) -> ``norm``
    (BatchNorm2d unless given) of its output channels."""
    padding = conv.pop("padding") if "padding" in conv else k // 2 * conv.get("dilation", 1)
    layers = nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False, **conv)
    return nn.Sequential(layers, norm(c_out))


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine in every BN-like module (frozen ones too); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                c = m.running_var.shape[0]
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: buffers, eps, ``x * scale + shift``."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((c,), value))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Detectron2FrozenBN(FrozenBatchNorm2d):
    """detectron2's FrozenBatchNorm2d: the same buffers, ``F.batch_norm`` at inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, eps=self.eps
        )


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that runs ``drop`` then ``act``."""

    def __init__(self, c: int, act: nn.Module | None = None, drop: float = 0.0) -> None:
        super().__init__(c)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training, 0.1, self.eps,
        )  # fmt: skip
        return self.act(self.drop(x))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's FrozenBatchNormAct2d: frozen buffers, then ``act(drop(x))``."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))
