"""What the proof for all inputs costs, against sampled verification on the same models.

For each model pair (original, folded by ``bnfold fold --no-verify``) it times
``bnfold.proof.prove_onnx`` and sampled verification (``verify_onnx``, 3 random samples
at ORT_DISABLE_ALL, as ``bnfold verify`` runs it) in fresh child processes pinned to one
CPU (``sched_setaffinity`` before any import, so onnxruntime and numpy use one core),
alternating which tool runs first, and reports the median and inter-quartile range of
the call's wall time (imports excluded) and of the child's peak RSS (VmHWM).

Suites:
  samples   every bundled sample model (one child per tool and repeat runs them all;
            times per model, RSS for the whole child).
  resnet50  the generated ResNet-50 (benchmarks/make_big_models.py, 25.5 M parameters,
            102 MB, 53 Conv+BN sites).
  big       (--big) a 2.4 GB external-data chain of 1x1 Conv(8192) + BN blocks
            (benchmarks/big_model_rss.py): peak RSS against the model's size.

Usage:
  python benchmarks/prove_cost.py [--repeats 5] [--big [--big-repeats 3]] [--cpu 0]
      [--out benchmarks/results/prove_cost.json]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"

CHILD = r"""
import json, os, sys, time
os.sched_setaffinity(0, {{{cpu}}})
tool, pairs = sys.argv[1], json.loads(sys.argv[2])
if tool == "prove":
    from bnfold.proof import prove_onnx
    def run(original, folded):
        certificate = prove_onnx(original, folded)
        return "proven" if certificate.holds else "not proven: " + certificate.headline()
else:
    try:
        from bnfold.verify import verify_onnx
    except ImportError:
        from bnfold.compare import verify_onnx
    def run(original, folded):
        return verify_onnx(original, folded).status
times, statuses = {{}}, {{}}
for name, (original, folded) in pairs.items():
    start = time.perf_counter()
    statuses[name] = run(original, folded)
    times[name] = time.perf_counter() - start
with open("/proc/self/status") as fh:
    peak = int(next(line.split()[1] for line in fh if line.startswith("VmHWM:"))) * 1024
print(json.dumps({{"times": times, "statuses": statuses, "peak_rss": peak}}))
"""

PINNED_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def fold_cli(source: Path, output: Path) -> None:
    """``bnfold fold SOURCE -o OUTPUT --no-verify`` (a file or a folder of models)."""
    cmd = [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(output), "--no-verify"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"folding {source} failed: {done.stderr.strip()[-400:]}")


def sample_pairs(work: Path) -> dict[str, tuple[str, str]]:
    out = work / "samples_folded"
    fold_cli(SAMPLES, out)
    pairs = {}
    for folded in sorted(out.rglob("*.onnx")):
        original = SAMPLES / folded.relative_to(out)
        pairs[folded.relative_to(out).as_posix()] = (str(original), str(folded))
    return pairs


def resnet50_pair(work: Path) -> dict[str, tuple[str, str]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_big_models import resnet50, save

    original = save(resnet50("bn"), work / "resnet50_bn.onnx", external=False)
    folded = work / "resnet50_folded.onnx"
    fold_cli(original, folded)
    return {"resnet50": (str(original), str(folded))}


def big_pair(work: Path) -> dict[str, tuple[str, str]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from big_model_rss import make_model

    original = make_model(work / "big", channels=8192, blocks=9, bn_blocks=9)
    (work / "big_folded").mkdir()
    folded = work / "big_folded" / "model.onnx"
    fold_cli(original, folded)
    return {"big_all_bn": (str(original), str(folded))}


def measure(tool: str, pairs: dict[str, tuple[str, str]], cpu: int) -> dict:
    env = {**os.environ, **PINNED_ENV}
    code = CHILD.format(cpu=cpu)
    done = subprocess.run(
        [sys.executable, "-c", code, tool, json.dumps(pairs)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tool} child failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def run_suite(name: str, pairs: dict[str, tuple[str, str]], repeats: int, cpu: int) -> dict:
    runs: dict[str, list[dict]] = {"prove": [], "verify": []}
    for r in range(repeats):
        order = ("prove", "verify") if r % 2 == 0 else ("verify", "prove")
        for tool in order:
            runs[tool].append(measure(tool, pairs, cpu))
            print(f"  {name} repeat {r + 1}/{repeats} {tool} done", file=sys.stderr)
    result: dict = {"models": len(pairs), "tools": {}}
    for tool, measured in runs.items():
        totals = [sum(m["times"].values()) for m in measured]
        per_model = {k: _stats([m["times"][k] for m in measured]) for k in pairs}
        result["tools"][tool] = {
            "seconds": _stats(totals),
            "peak_rss_bytes": _stats([float(m["peak_rss"]) for m in measured]),
            "per_model": per_model,
            "statuses": measured[0]["statuses"],
        }
    prove, verify = result["tools"]["prove"], result["tools"]["verify"]
    result["time_ratio"] = prove["seconds"]["median"] / verify["seconds"]["median"]
    result["rss_ratio"] = prove["peak_rss_bytes"]["median"] / verify["peak_rss_bytes"]["median"]
    ratios = [
        prove["per_model"][k]["median"] / verify["per_model"][k]["median"]
        for k in pairs
        if verify["per_model"][k]["median"] > 0
    ]
    result["per_model_time_ratio"] = _stats(ratios) if ratios else None
    return result


def model_bytes(pairs: dict[str, tuple[str, str]]) -> int:
    original = Path(next(iter(pairs.values()))[0])
    return sum(
        p.stat().st_size for p in original.parent.iterdir() if p.name.startswith(original.name)
    )


def report(name: str, suite: dict) -> str:
    p, v = suite["tools"]["prove"], suite["tools"]["verify"]

    def t(s: dict) -> str:
        return f"{s['median']:.3f} s [{s['q1']:.3f}-{s['q3']:.3f}]"

    def m(s: dict) -> str:
        return f"{s['median'] / 2**20:.0f} MiB [{s['q1'] / 2**20:.0f}-{s['q3'] / 2**20:.0f}]"

    lines = [
        f"{name} ({suite['models']} model pair(s)):",
        f"  prove   {t(p['seconds'])}  peak RSS {m(p['peak_rss_bytes'])}",
        f"  verify  {t(v['seconds'])}  peak RSS {m(v['peak_rss_bytes'])}",
        f"  prove / verify: time {suite['time_ratio']:.3f}x, peak RSS {suite['rss_ratio']:.2f}x",
    ]
    if suite.get("per_model_time_ratio") and suite["models"] > 1:
        r = suite["per_model_time_ratio"]
        lines.append(
            f"  per model time ratio: median {r['median']:.3f}x [{r['q1']:.3f}-{r['q3']:.3f}]"
        )
    if "model_bytes" in suite:
        lines.append(
            f"  model {suite['model_bytes'] / 2**30:.2f} GiB; prove peak RSS / model size "
            f"{p['peak_rss_bytes']['median'] / suite['model_bytes']:.2f}"
        )
    bad = {k: s for k, s in p["statuses"].items() if s != "proven"}
    if bad:
        lines.append(f"  NOT PROVEN: {bad}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big", action="store_true", help="also the 2.4 GB external-data model")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU every child is pinned to")
    parser.add_argument("--big-repeats", type=int, default=3, help="repeats of the big suite")
    parser.add_argument("--suites", default="samples,resnet50")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/prove_cost.json")
    args = parser.parse_args()
    suites = list(dict.fromkeys(args.suites.split(",") + (["big"] if args.big else [])))
    builders = {"samples": sample_pairs, "resnet50": resnet50_pair, "big": big_pair}
    results: dict = {
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "pinned_cpu": args.cpu,
            "repeats": args.repeats,
        },
        "suites": {},
    }
    with tempfile.TemporaryDirectory(prefix="prove_cost_") as tmp:
        for name in suites:
            work = Path(tmp) / name
            work.mkdir()
            pairs = builders[name](work)
            repeats = min(args.repeats, args.big_repeats) if name == "big" else args.repeats
            suite = run_suite(name, pairs, repeats, args.cpu)
            if name == "big":
                suite["model_bytes"] = model_bytes(pairs)
            results["suites"][name] = suite
            print(report(name, suite))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
