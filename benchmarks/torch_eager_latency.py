"""Eager latency of a ResNet-18-shaped module before and after bnfold's torch fold.

Runs interleaved (original, folded, original, ...) after warm-up with torch's
thread count pinned, and prints median and inter-quartile range per model.
Uses random weights and BN statistics (no torchvision, no downloads).

    python benchmarks/torch_eager_latency.py [--runs 100] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from bnfold.bench import bench_torch
from bnfold.torch_front import fold_module


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Like(nn.Module):
    """ResNet-18 layout: 20 BatchNorms, 1000 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layers = nn.Sequential(
            *[
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
                for cin, cout, stride in widths
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.layers(x)), 1))


def random_stats(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c, mean, var = m.num_features, m.running_mean, m.running_var
            assert mean is not None and var is not None
            mean.copy_(torch.randn(c, generator=gen) * 0.1)
            var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the bench report here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = random_stats(ResNet18Like(), args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size)
    result = fold_module(model, (x,))
    print(result.report.summary().splitlines()[0])
    if result.verification is not None:
        print(result.verification.summary())
    report = bench_torch(
        model, result.model, (x,), threads=args.threads, warmup=args.warmup, runs=args.runs,
        seed=args.seed,
    )  # fmt: skip
    report.original = f"ResNet18Like {tuple(x.shape)}"
    report.folded = "ResNet18Like folded"
    report.folds = len(result.report.folded)
    print(report.summary())
    if args.json:
        args.json.write_text(report.to_json())


if __name__ == "__main__":
    main()
