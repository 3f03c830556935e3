"""Eager fold time against ``torch.fx``'s fuse, side by side in one process, per model.

Needs torch and torchvision (run it in a venv that has them); models have random
weights and trained-like BN statistics (running mean/var, weight and bias drawn
at random, frozen BNs' buffers too), inputs are random:

- ``resnet50``: torchvision's ResNet-50, 224x224.
- ``mobilenet_v3``: torchvision's MobileNetV3-Large, 224x224.
- ``fasterrcnn``: Faster R-CNN with a ResNet-50 FPN backbone built with
  ``FrozenBatchNorm2d``, as torchvision's pretrained builders make it
  (``box_score_thresh=0`` so random weights still give boxes), one 3x``--det-size``
  image, resized inside the model to ``min_size=max_size=--det-size``.
- ``ssdlite``: SSDlite320 with MobileNetV3-Large, one 320x320 image.

For each model, in rounds (the order of the tools rotates each round, so drift on
a shared machine hits them alike):

- ``fx fuse``: ``torch.fx.experimental.optimization.fuse`` on the model (it copies it);
  on detectors it fails (fx cannot trace their forward), and the failure is reported.
- ``fold``: ``bnfold.torch_front.fold_module(model, (x,), verify=False)``, the fold
  path alone: finding pairs (tracing, the recorded run), checks, folds, the deep copy.
- ``fold+verify``: ``bnfold.fold(model, (x,))`` as a user calls it, with verification:
  the proof for all inputs first (the original exported before the fold and the folded
  module after it; a detector that does not export is proven module by module), then
  example inputs and 3 random draws, each run through the original and the folded
  model, with rollback; ``verify`` below is ``fold+verify - fold``, the verification's
  share, proof included.
- ``fold, recorded``: the fold path with export and fx switched off, so the
  ``recorded`` finder decides (what the fold path would cost if it came first).

Beside them, one fp32 forward (median of 3). Ratios per round, then median [min, max]:
``fold / fuse``, and ``fold+verify / (fuse + samples x forward)``, the yardstick of
issue 24 ("a small multiple of torch.fx's fuse plus one fp32 forward per sample").
Threads are pinned (``--threads``, default 1); the first fold in the process (imports,
lazy set-up) is done on a tiny model and reported apart.

Usage:
  python benchmarks/torch_fold_vs_fx.py [--models resnet50,mobilenet_v3,fasterrcnn,ssdlite]
      [--rounds 3] [--threads 1] [--det-size 512] [--out FILE.json] [--md FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

SAMPLES = 3  # random draws verification compares besides the example inputs (the default)


# --- models --------------------------------------------------------------------------


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine, as a trained net has, in every BN-like module; eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            module: Any = m
            var = getattr(module, "running_var", None)
            if not isinstance(var, torch.Tensor):
                continue
            c = var.shape[0]
            var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.1)
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            for name, draw in (("weight", torch.rand(c, generator=gen) + 0.5),
                               ("bias", torch.randn(c, generator=gen) * 0.1)):  # fmt: skip
                if isinstance(getattr(module, name, None), torch.Tensor):
                    getattr(module, name).copy_(draw)
    return model.eval()


def build(name: str, det_size: int) -> tuple[nn.Module, Any]:
    """The model and its example input (a tensor, or a list of images for detectors)."""
    from torchvision import models
    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(1)
    if name == "resnet50":
        return models.resnet50(weights=None), torch.randn(1, 3, 224, 224, generator=gen)
    if name == "mobilenet_v3":
        return models.mobilenet_v3_large(weights=None), torch.randn(1, 3, 224, 224, generator=gen)
    if name == "fasterrcnn":
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
            trainable_layers=3,
        )  # fmt: skip
        model = detection.FasterRCNN(
            backbone, num_classes=91, min_size=det_size, max_size=det_size, box_score_thresh=0.0
        )
        return model, [torch.rand(3, det_size, det_size, generator=gen)]
    if name == "ssdlite":
        model = detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        return model, [torch.rand(3, 320, 320, generator=gen)]
    raise SystemExit(f"unknown model {name!r}")


def bn_count(model: nn.Module) -> int:
    from bnfold.torch_front.modules import is_bn_like

    return sum(is_bn_like(m) for m in model.modules())


# --- the tools -------------------------------------------------------------------------


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def fx_fuse(model: nn.Module) -> Any:
    from torch.fx.experimental.optimization import fuse

    return fuse(model)  # it deep-copies the model


def fold_path(model: nn.Module, x: Any) -> Any:
    from bnfold.torch_front import fold_module

    return fold_module(model, (x,), verify=False)


def fold_and_verify(model: nn.Module, x: Any) -> Any:
    import bnfold

    return bnfold.fold(model, (x,))


@contextlib.contextmanager
def recorded_finder_only() -> Iterator[None]:
    """Export and fx switched off: the ``recorded`` finder decides."""
    from bnfold.torch_front import trace

    def off(*_args: Any) -> Any:
        raise RuntimeError("switched off by the benchmark")

    tracers: Any = trace  # the module's two tracer functions, switched for the block
    saved = tracers._export_graph, tracers._fx_graph
    tracers._export_graph, tracers._fx_graph = off, off
    try:
        yield
    finally:
        tracers._export_graph, tracers._fx_graph = saved


def fold_recorded(model: nn.Module, x: Any) -> Any:
    with recorded_finder_only():
        return fold_path(model, x)


def forward_s(model: nn.Module, x: Any, runs: int = 3) -> float:
    with torch.no_grad():
        model(x)
        times = [timed(lambda: model(x))[0] for _ in range(runs)]
    return statistics.median(times)


def warm_up() -> float:
    """One tiny fold and fuse: imports and torch's lazy set-up, paid once per process."""
    tiny = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    seconds, _ = timed(lambda: fold_and_verify(tiny, x))
    fold_recorded(tiny, x)
    fx_fuse(tiny)
    return seconds


TOOLS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "fx fuse": lambda m, x: fx_fuse(m),
    "fold": fold_path,
    "fold+verify": fold_and_verify,
    "fold, recorded": fold_recorded,
}


# --- one model ---------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(name: str, rounds: int, det_size: int) -> dict[str, Any]:
    model, x = build(name, det_size)
    model = trained_like(model)
    forward = forward_s(model, x)
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    failures: dict[str, str] = {}
    outcome: dict[str, Any] = {}
    order = list(TOOLS)
    for r in range(rounds):
        for tool in order[r % len(order) :] + order[: r % len(order)]:
            if tool in failures:
                continue
            try:
                seconds, result = timed(lambda t=tool: TOOLS[t](model, x))  # type: ignore[misc]
            except Exception as e:  # fx cannot trace a detector: that is the measurement
                failures[tool] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            times[tool].append(seconds)
            outcome.setdefault(tool, result)
    row: dict[str, Any] = {
        "model": name,
        "bn": bn_count(model),
        "fp32_forward_s": forward,
        "seconds": {tool: summary(ts) for tool, ts in times.items() if ts},
        "failures": failures,
    }
    row.update(describe(outcome))
    row["ratios"] = ratios(times, forward)
    return row


def describe(outcome: dict[str, Any]) -> dict[str, Any]:
    """What the folds did: BNs folded, by which finder, what was refused, verification."""
    out: dict[str, Any] = {}
    for tool in ("fold", "fold+verify", "fold, recorded"):
        result = outcome.get(tool)
        if result is None:
            continue
        report = result.report
        entry = {
            "folded": len(report.folded),
            "finders": dict(Counter(f.finder for f in report.folded)),
            "refused": dict(Counter(r.code.value for r in report.refused)),
        }
        if result.verification is not None:
            entry["verification"] = result.verification.status
            entry["samples"] = result.verification.samples
            if (proof := result.verification.proof) is not None:
                entry["proof"] = f"{proof.proven}/{len(proof.sites)}" + (
                    " module level" if any("fold report" in a for a in proof.assumptions) else ""
                )
        out[tool] = entry
    return {"outcome": out}


def ratios(times: dict[str, list[float]], forward: float) -> dict[str, dict[str, float]]:
    """Per round: fold / fuse, fold+verify / (fuse + samples x forward), and verify's share."""
    fuse, fold, full = times["fx fuse"], times["fold"], times["fold+verify"]
    out: dict[str, dict[str, float]] = {}
    if fuse and fold:
        out["fold / fuse"] = summary([f / u for f, u in zip(fold, fuse, strict=False)])
    if fuse and full:
        budget = [u + (1 + SAMPLES) * forward for u in fuse]
        out["fold+verify / (fuse + forward per sample)"] = summary(
            [f / b for f, b in zip(full, budget, strict=False)]
        )
    if fold and full:
        out["verify share of fold+verify"] = summary(
            [(v - f) / v for f, v in zip(fold, full, strict=False)]
        )
    recorded = times["fold, recorded"]
    if fuse and recorded:
        out["fold, recorded / fuse"] = summary(
            [f / u for f, u in zip(recorded, fuse, strict=False)]
        )
    if not fuse and fold:
        out["fold / forward"] = summary([f / forward for f in fold])
        out["fold+verify / forward"] = summary([f / forward for f in full])
    return out


# --- output ------------------------------------------------------------------------------


def cell(row: dict[str, Any], tool: str) -> str:
    s = row["seconds"].get(tool)
    if s is None:
        return f"fails ({row['failures'].get(tool, '?').split(':')[0]})"
    return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def ratio_cell(row: dict[str, Any], key: str) -> str:
    r = row["ratios"].get(key)
    if r is None:
        return "-"
    if "share" in key:
        return f"{r['median']:.0%} [{r['min']:.0%}, {r['max']:.0%}]"
    return f"{r['median']:.2f}x [{r['min']:.2f}, {r['max']:.2f}]"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Eager fold time against torch.fx fuse ({meta['date']})",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, torchvision {meta['torchvision']}, "
        f"{meta['threads']} thread(s), {meta['rounds']} rounds (median [min, max], seconds); "
        f"first fold in the process {meta['first_fold_s']:.2f} s, not counted.",
        "",
        "| model | BN | folded (finder) | fp32 forward | fx fuse | fold | fold+verify | "
        "fold, recorded finder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        full = row["outcome"].get("fold+verify", {})
        finders = ", ".join(f"{k} {v}" for k, v in full.get("finders", {}).items())
        refused = ", ".join(f"{k} {v}" for k, v in full.get("refused", {}).items())
        folded = f"{full.get('folded', '?')} ({finders or '-'})" + (
            f"; refused {refused}" if refused else ""
        )
        if "proof" in full:
            folded += f"; proven {full['proof']}"
        lines.append(
            f"| {row['model']} | {row['bn']} | {folded} | {row['fp32_forward_s']:.2f} | "
            f"{cell(row, 'fx fuse')} | {cell(row, 'fold')} | {cell(row, 'fold+verify')} | "
            f"{cell(row, 'fold, recorded')} |"
        )
    keys = ["fold / fuse", "fold+verify / (fuse + forward per sample)",
            "verify share of fold+verify", "fold, recorded / fuse", "fold / forward",
            "fold+verify / forward"]  # fmt: skip
    lines += ["", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(ratio_cell(row, k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3,fasterrcnn,ssdlite")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--det-size", type=int, default=512, help="Faster R-CNN image side")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--md", help="write the tables as Markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import torchvision

    first = warm_up()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/torch_fold_vs_fx.py "
        f"--models {args.models} --rounds {args.rounds} --threads {args.threads} "
        f"--det-size {args.det_size}",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "rounds": args.rounds,
        "first_fold_s": first,
    }
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.rounds, args.det_size)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    text = markdown(rows, meta)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": meta, "models": rows}, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
