"""What the proof inside ``bnfold fold`` costs: the command with and without ``--no-prove``.

Each run is a fresh ``bnfold fold ... --json`` process, the way a user meets it (imports,
load, fold, proof, sampled verification, atomic save), pinned to one CPU with one thread
per library. The two variants alternate, so drift of a shared machine hits both alike.
Reported per suite: the median and inter-quartile range of the wall time of each
variant, the median of the per-repeat ratio (with / without, the two runs of one repeat
side by side) and the prover's own seconds as the JSON report gives them.

Suites:
  samples   ``bnfold fold sample_models -o OUT`` (folder mode, one process for all).
  resnet50  the generated ResNet-50 (benchmarks/make_big_models.py, 25.5 M parameters,
            53 Conv+BN sites) at its declared 1x3x128x128 input.

Usage:
  python benchmarks/fold_prove_cost.py [--repeats 7] [--cpu 0]
      [--out benchmarks/results/fold_prove_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
PINNED_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
VARIANTS = {"prove": [], "no_prove": ["--no-prove"]}


def fold_once(source: Path, output: Path, flags: list[str], cpu: int) -> dict[str, Any]:
    """One ``bnfold fold`` process: its wall time and the proof seconds it reports."""
    cmd = [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(output), "--json"]
    env = {**os.environ, **PINNED_ENV}
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, *flags],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + flags)} exited {done.returncode}: {done.stderr[-400:]}")
    report = json.loads(done.stdout)
    return {"seconds": seconds, "proof_seconds": proof_seconds(report), "proven": proven(report)}


def _verifications(report: dict[str, Any]) -> list[dict[str, Any]]:
    if "outcomes" in report:  # folder mode
        results = [o["result"] for o in report["outcomes"] if o["result"]]
        return [r["verification"] for r in results if r["verification"]]
    return [report["verification"]] if report["verification"] else []


def proof_seconds(report: dict[str, Any]) -> float:
    return sum(v["proof"]["seconds"] for v in _verifications(report) if v["proof"])


def proven(report: dict[str, Any]) -> str:
    proofs = [v["proof"] for v in _verifications(report) if v["proof"]]
    if not proofs:
        return "no proof"
    holding = sum(p["holds"] for p in proofs)
    return f"{holding} of {len(proofs)} models proven"


def stats(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def run_suite(name: str, source: Path, work: Path, repeats: int, cpu: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    fold_once(source, work / "warmup", [], cpu)  # page cache and .pyc, for both alike
    for r in range(repeats):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            output = work / f"{variant}{'' if source.is_dir() else '.onnx'}"
            runs[variant].append(fold_once(source, output, VARIANTS[variant], cpu))
        print(f"  {name} repeat {r + 1}/{repeats} done", file=sys.stderr)
    ratios = [
        p["seconds"] / n["seconds"] for p, n in zip(runs["prove"], runs["no_prove"], strict=True)
    ]
    return {
        "source": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else source.name,
        "repeats": repeats,
        "seconds": {v: stats([m["seconds"] for m in ms]) for v, ms in runs.items()},
        "proof_seconds": stats([m["proof_seconds"] for m in runs["prove"]]),
        "ratio_prove_over_no_prove": stats(ratios),
        "proven": runs["prove"][0]["proven"],
    }


def resnet50(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_big_models import resnet50 as build
    from make_big_models import save

    return Path(save(build("bn"), work / "resnet50_bn.onnx", external=False))


def summary(name: str, suite: dict[str, Any]) -> str:
    def t(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} s [{s['q1']:.2f}-{s['q3']:.2f}]"

    s, r = suite["seconds"], suite["ratio_prove_over_no_prove"]
    return "\n".join(
        [
            f"{name} ({suite['proven']}, {suite['repeats']} repeats):",
            f"  bnfold fold              {t(s['prove'])}",
            f"  bnfold fold --no-prove   {t(s['no_prove'])}",
            f"  with / without: {r['median']:.3f}x [{r['q1']:.3f}-{r['q3']:.3f}]; "
            f"the proof itself {t(suite['proof_seconds'])}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU every run is pinned to")
    parser.add_argument("--suites", default="samples,resnet50")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/fold_prove_cost.json"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "pinned_cpu": args.cpu,
            "load_average_at_start": os.getloadavg(),
        },
        "suites": {},
    }
    with tempfile.TemporaryDirectory(prefix="fold_prove_cost_") as tmp:
        for name in args.suites.split(","):
            work = Path(tmp) / name
            work.mkdir()
            source = SAMPLES if name == "samples" else resnet50(work)
            suite = run_suite(name, source, work, args.repeats, args.cpu)
            results["suites"][name] = suite
            print(summary(name, suite))
    results["environment"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
