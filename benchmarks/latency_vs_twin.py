"""Is a folded model as fast as the same network generated without BN? (issue 5: within 1 %)

A ratio of medians on a shared machine moves by a few percent between runs, so
this script measures what can be resolved instead of hoping:

  A/A    the twin against a byte-identical copy of itself: the same model twice,
         so any departure of its interval from 1.0 is the noise floor of the run;
  fold   bnfold's folded ResNet-50 against the no-BN twin.

Both at ORT_DISABLE_ALL, one thread, runs interleaved in pairs (AB, BA, ...), with
the median per-pair ratio and its distribution-free 95 % confidence interval
(:class:`bnfold.bench_report.PairedRatio`). The target is met when the interval's upper
end is at most 1.01 (the twin is the floor: faster can only be noise); it is
unresolved when the A/A interval itself is wider than +-1 %.

Usage:
  python benchmarks/latency_vs_twin.py [--runs 400] [--size 128] [--fp16]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bnfold import bench, fold
from bnfold.bench_report import LevelTiming, format_paired
from bnfold.onnx_front.io import save_model

TARGET = 0.01


def compare(a: Path, b: Path, runs: int, warmup: int) -> LevelTiming:
    """``a`` against ``b`` at disable_all; ``.paired`` is b over a per pair."""
    return bench.bench_onnx(str(a), str(b), ["disable_all"], warmup=warmup, runs=runs).levels[0]


def describe(label: str, timing: LevelTiming) -> str:
    p = timing.paired
    return (
        f"{label:<26} {timing.original.median_ms:8.3f} ms  {timing.folded.median_ms:8.3f} ms  "
        f"{format_paired(p)}  (interval width {p.high - p.low:.3f})"
    )


def verdict(fold_timing: LevelTiming, control: LevelTiming) -> str:
    """One-sided: the twin is the floor, so only "slower by more than 1 %" misses.

    A folded model with the twin's graph can only look faster through noise,
    such as the few tenths of a percent that separate two sessions of one model
    (the A/A row).
    """
    p, noise = fold_timing.paired, control.paired
    if p.high <= 1 + TARGET:
        slower = max(p.high - 1, 0.0)
        return f"met: with 95 % confidence the fold is at most {slower:.1%} slower than the twin"
    if noise.high - noise.low > 2 * TARGET:
        return "unresolved: the A/A interval alone is wider than +-1 %; use more --runs"
    return f"missed: the fold may be up to {p.high - 1:+.1%} slower than the twin"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400, help="interleaved pairs per comparison")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--size", type=int, default=128, help="ResNet-50 input height/width")
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args()

    from make_big_models import resnet50

    dtype = np.float16 if args.fp16 else np.float32
    with tempfile.TemporaryDirectory(prefix="bnfold-latency-") as tmp:
        work = Path(tmp)
        twin, copy, folded = work / "twin.onnx", work / "twin_copy.onnx", work / "folded.onnx"
        save_model(resnet50("nobn", dtype, args.size), twin)
        shutil.copyfile(twin, copy)
        save_model(fold(resnet50("bn", dtype, args.size)).model, folded)
        control = compare(twin, copy, args.runs, args.warmup)
        result = compare(twin, folded, args.runs, args.warmup)
    print(
        f"ResNet-50 {np.dtype(dtype).name}, {args.size}x{args.size}, 1 thread, disable_all, "
        f"{args.runs} pairs"
    )
    print(f"{'':<26} {'twin':>11}  {'other':>11}  other/twin per pair")
    print(describe("A/A: twin vs its copy", control))
    print(describe("bnfold folded vs twin", result))
    print(verdict(result, control))


if __name__ == "__main__":
    main()
