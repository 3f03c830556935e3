"""Where eager ``bnfold.fold(model, example_inputs)`` spends its time: a profile, not a timed test.

Two models, built here from ``torch.nn`` (torchvision does not import on this machine):

- ``resnet50``: torchvision's ResNet-50 layout (a ``conv1``/``bn1`` stem, bottlenecks
  3-4-6-3 with ``conv1..3``/``bn1..3`` attributes and a forward() of their own, a
  ``downsample`` Sequential), random weights and trained-like BN statistics. It
  traces whole: every BN folds with the ``export`` finder.
- ``untraceable``: the same backbone under a detector-like head whose forward()
  branches in Python on a value it computed and reads scores with ``.tolist()``.
  Neither export nor fx traces it whole; the ``recorded`` finder (one eager run,
  op by op) finds its pairs, as in the detectors of issue 24.

Each model is folded once under cProfile (after a warm-up fold of a tiny model,
so one-time imports and torch's lazy initialisation are not counted; they are
printed apart), and the fold's wall time is split by the cumulative time of the
functions that do the work: tracing attempts, the forward that counts module
calls, the reference and folded forwards of verification, the checks, the
folds, the deep copy. The run that counts module calls is the recorded run
(:mod:`bnfold.torch_front.recorded`) unless recording failed. Beside it, as
yardsticks from the same process: one fp32 forward (median of 3) and
``torch.fx.experimental.optimization.fuse`` on the same model (none for the
untraceable one: fx cannot trace it).

Threads are pinned (``--threads``, default 1). The machine is shared: read the
shares and ratios, not the absolute seconds.

Usage:
  python benchmarks/torch_fold_profile.py [--size 224] [--threads 1] [--models resnet50,untraceable]
      [--top 15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import math
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# (label, file suffix, function): cumulative time of each is one bucket. None of them
# calls another, so the buckets do not overlap.
BUCKETS = (
    ("trace: export attempts", "torch_front/trace.py", "_export_graph"),
    ("trace: fx attempts", "torch_front/trace.py", "_fx_graph"),
    ("match: traced graph", "torch_front/eager_match.py", "match_graph"),
    ("match: nn.Sequential", "torch_front/sequential.py", "match_sequential"),
    ("recorded run (counts calls)", "torch_front/recorded.py", "record_run"),
    ("plain run counting calls", "torch_front/modules.py", "observe"),
    ("checks (eager.checked)", "torch_front/eager.py", "checked"),
    ("apply folds", "torch_front/eager.py", "apply_fold"),
    ("verify: reference forwards", "torch_front/verify.py", "reference"),
    ("verify: folded forwards", "torch_front/verify.py", "compare"),
    ("deep copy of the model", "torch_front/run.py", "_copy"),
)
TOTAL = ("torch_front/run.py", "fold")


# --- models --------------------------------------------------------------------------


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine of the kind a trained net has; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_var is not None and m.running_mean is not None
                c = m.num_features
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block: 1x1, 3x3 (stride), 1x1 x4, a residual add."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != width * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Backbone(nn.Module):
    """ResNet-50 up to its last stage (2048 channels at 1/32), torchvision's attribute names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.backbone(x), 1), 1))


class Untraceable(nn.Module):
    """The backbone, a conv-BN head, then Python that neither tracer can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Sequential(
            nn.Conv2d(2048, 256, 3, 1, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU()
        )
        self.score = nn.Conv2d(256, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(self.head(self.backbone(x)))
        best = scores.flatten(2).amax(2)
        if bool((best.abs() > 0).any()):  # data-dependent control flow: export and fx stop here
            keep = [i for i, v in enumerate(best[0].tolist()) if v == v]  # and a .tolist()
            best = best[:, keep]
        return scores, best


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: trained_like(ResNet50()),
    "untraceable": lambda: trained_like(Untraceable()),
}


# --- measuring -----------------------------------------------------------------------


def forward_s(model: nn.Module, x: torch.Tensor, runs: int = 3) -> float:
    """Median wall time of one fp32 forward (after a warm-up run)."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def fx_fuse_s(model: nn.Module) -> float | str:
    """Wall time of torch.fx's Conv+BN fuse on a copy, or why it cannot run."""
    from torch.fx.experimental.optimization import fuse

    work = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        fuse(work)
    except Exception as e:  # fx cannot trace the module: there is no time to report
        return f"fails: {type(e).__name__}"
    return time.perf_counter() - start


def warm_up() -> float:
    """Fold a tiny Conv -> BN once: imports and torch's lazy set-up, paid once per process."""
    import bnfold

    tiny = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    start = time.perf_counter()
    bnfold.fold(tiny, (torch.randn(1, 3, 8, 8),))
    return time.perf_counter() - start


def plain_fold_s(model: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one fold without the profiler (which slows Python-heavy tracing most)."""
    import bnfold

    start = time.perf_counter()
    bnfold.fold(model, (x,))
    return time.perf_counter() - start


def profiled_fold(model: nn.Module, x: torch.Tensor) -> tuple[Any, float, pstats.Stats]:
    import bnfold

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    result = bnfold.fold(model, (x,))
    profile.disable()
    wall = time.perf_counter() - start
    return result, wall, pstats.Stats(profile)


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, calls) of one function, summed over matching entries."""
    seconds, calls = 0.0, 0
    for (path, _line, func), (_cc, nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and path.replace("\\", "/").endswith(suffix):
            seconds, calls = seconds + ct, calls + nc
    return seconds, calls


def buckets(stats: pstats.Stats) -> tuple[float, list[dict[str, Any]]]:
    total, _ = cumulative(stats, *TOTAL)
    rows: list[dict[str, Any]] = []
    for label, suffix, name in BUCKETS:
        seconds, calls = cumulative(stats, suffix, name)
        rows.append({"bucket": label, "s": seconds, "calls": calls})
    rows.append({"bucket": "other", "s": total - sum(r["s"] for r in rows), "calls": 0})
    return total, rows


def top_functions(stats: pstats.Stats, count: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(count)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(lines[start:])


def profile_model(name: str, size: int, top: int) -> dict[str, Any]:
    model = MODELS[name]()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    forward = forward_s(model, x)
    fuse = fx_fuse_s(model)
    plain = plain_fold_s(model, x)
    result, wall, stats = profiled_fold(model, x)
    total, rows = buckets(stats)
    report = result.report
    finders = sorted({f.finder for f in report.folded})
    codes: dict[str, int] = {}
    for r in report.refused:
        codes[r.code.value] = codes.get(r.code.value, 0) + 1
    return {
        "model": name,
        "input": [1, 3, size, size],
        "bn": len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]),
        "folded": len(report.folded),
        "finders": finders,
        "refused": codes,
        "verification": None if result.verification is None else result.verification.status,
        "searches": cumulative(stats, "torch_front/run.py", "_checked_pairs")[1],
        "fold_s": plain,
        "fold_profiled_wall_s": wall,
        "fold_profiled_s": total,
        "buckets": rows,
        "fp32_forward_s": forward,
        "fx_fuse_s": fuse,
        "top": top_functions(stats, top),
    }


def show(row: dict[str, Any]) -> None:
    total = row["fold_profiled_s"]
    fuse = row["fx_fuse_s"]
    fuse_text = f"{fuse:.2f} s" if isinstance(fuse, float) else fuse
    print(f"\n== {row['model']} (input {row['input']}): {row['folded']}/{row['bn']} BN folded "
          f"by {', '.join(row['finders']) or 'no finder'}; refused {row['refused']}; "
          f"verification {row['verification']}; searches for pairs: {row['searches']}")  # fmt: skip
    print(f"fold {row['fold_s']:.2f} s ({row['fold_profiled_wall_s']:.2f} s under the profiler), "
          f"one fp32 forward {row['fp32_forward_s']:.3f} s, torch.fx fuse {fuse_text}")  # fmt: skip
    ratio = row["fold_s"] / row["fp32_forward_s"]
    extra = f", {row['fold_s'] / fuse:.0f}x fx fuse" if isinstance(fuse, float) else ""
    print(f"fold = {ratio:.0f} fp32 forwards{extra}; shares below are of the profiled run")
    print(f"{'bucket':<30}{'s':>9}{'share':>8}{'calls':>7}")
    for b in row["buckets"]:
        share = b["s"] / total if total > 0 else math.nan
        calls = b["calls"] or ""
        print(f"{b['bucket']:<30}{b['s']:>9.2f}{share:>8.0%}{calls:>7}")
    print(f"{'total (run.fold)':<30}{total:>9.2f}")
    print("\ntop functions by cumulative time:")
    print(row["top"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--top", type=int, default=15, help="functions listed per model")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    first = warm_up()
    print(f"torch {torch.__version__}, {args.threads} thread(s); first fold in this process "
          f"(tiny Conv -> BN, imports and lazy set-up): {first:.2f} s")  # fmt: skip
    rows = []
    for name in args.models.split(","):
        row = profile_model(name, args.size, args.top)
        show(row)
        rows.append(row)
    if args.out:
        meta = {"torch": torch.__version__, "threads": args.threads, "first_fold_s": first}
        with open(args.out, "w") as f:
            json.dump({"environment": meta, "models": rows}, f, indent=2)


if __name__ == "__main__":
    main()
