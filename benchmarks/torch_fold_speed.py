"""Eager fold time on torch nets against torch.fx fuse and one fp32 forward (issue 24).

Builds ResNet-like nets with trained-like BN statistics (no torchvision: it does
not import here) and times, in one child process per checkout, interleaved
rounds of: one fp32 forward of the example input, ``torch.fx`` ``fuse``,
``bnfold.fold`` (which verifies) and the same fold unverified, one thread. Prints
per model the medians, the spread of the fold (min-max), fold/fuse, and what
verification costs in forwards ((verified - unverified) / forward); with
``--checkout`` twice, both checkouts side by side (before/after a change).

    python benchmarks/torch_fold_speed.py [--rounds 5] [--checkout DIR ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from torch import nn
import bnfold
assert bnfold.__file__.startswith({root!r}), bnfold.__file__
torch.set_num_threads(1)
torch.manual_seed(0)
exec({builders!r})
from torch.fx.experimental.optimization import fuse
from bnfold.torch_front import fold_module

def timed(fn):
    start = time.perf_counter(); fn(); return time.perf_counter() - start

out = {{}}
for name, make, shape in MODELS:
    model = trained_like(make()).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        model(x)  # warm-up
    times = {{"forward": [], "fx_fuse": [], "bnfold": [], "unverified": []}}
    for _ in range({rounds}):
        with torch.no_grad():
            times["forward"].append(timed(lambda: model(x)))
        times["fx_fuse"].append(timed(lambda: fuse(model)))
        result = []
        fold = lambda: result.append(bnfold.fold(model, example_inputs=(x,)))  # noqa: E731
        times["bnfold"].append(timed(fold))
        times["unverified"].append(timed(lambda: fold_module(model, (x,), verify=False)))
    r = result[0]
    out[name] = {{k: sorted(v) for k, v in times.items()}}
    out[name]["folded"] = len(r.report.folded)
    out[name]["status"] = r.verification.status
print(json.dumps(out))
"""

BUILDERS = r'''
def trained_like(model):
    """BN statistics and affine like a trained net's, so folds change real values."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.2)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.down = nn.Sequential(conv, nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """ResNet-50's layout ([3, 4, 6, 3] bottlenecks), ``base`` channels in the stem."""

    def __init__(self, base=64, blocks=(3, 4, 6, 3), classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(base), nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], base
        for i, n in enumerate(blocks):
            width = base * 2**i
            for j in range(n):
                layers.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS = [
    ("resnet50-like 1x3x224x224", lambda: ResNet(), (1, 3, 224, 224)),
    ("resnet-small 2x3x64x64", lambda: ResNet(16, (1, 1, 1, 1), 10), (2, 3, 64, 64)),
]
'''


def measure(root: str, rounds: int) -> dict[str, dict]:
    code = CHILD.format(root=root, rounds=rounds, builders=BUILDERS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkout", action="append", default=[])
    args = parser.parse_args()
    roots = args.checkout or [str(Path(__file__).resolve().parent.parent)]
    for root in roots:
        print(f"== {root}")
        for name, row in measure(root, args.rounds).items():
            keys = ("forward", "fx_fuse", "bnfold", "unverified")
            fwd, fuse, fold, bare = (median(row[k]) for k in keys)
            spread = f"{min(row['bnfold']):.2f}-{max(row['bnfold']):.2f}"
            print(
                f"  {name}: forward {fwd:.3f}s  fx fuse {fuse:.3f}s  bnfold.fold {fold:.2f}s "
                f"[{spread}], unverified {bare:.2f}s  fold/fuse {fold / fuse:.1f}x  "
                f"verification/forward {(fold - bare) / fwd:.1f}x  "
                f"(folded {row['folded']}, verification {row['status']})"
            )


if __name__ == "__main__":
    main()
