"""Whole-process times a user sees: ``bnfold --help``, and folding a model file
with and without verification against onnxruntime's offline optimizer.

Every run is a fresh process, so imports count: for the small models most CLI
users fold, they are most of the time. Each round runs every command once in
an order that rotates between rounds; per command the median wall time and CPU
time (user + system of the child, from ``wait4``; less sensitive than wall time
to other work on a shared machine) and their ranges are reported, and per model
bnfold's per-round ratio to onnxruntime's offline BASIC optimize-and-save
(``optimized_model_filepath``), the closest peer that does the same job as one
process.

Verification cost is put in units of what any comparison must do at least:
create an ``ORT_DISABLE_ALL`` session of each model and run each once per
sample, timed in this process (``floor``). ``verify / floor`` near 1 means
verification adds no work beyond that.

With ``--folder DIR``, folder mode (``bnfold fold DIR -o OUT --no-verify``: one
process, imports paid once) is also timed against one offline-optimizer process
per model of DIR, in alternating rounds.

Usage:
  python benchmarks/process_time.py MODEL.onnx|DIR ... [--rounds 5] [--samples 3]
      [--folder DIR] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ORT_BASIC = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""


def bnfold_cli() -> list[str]:
    """The installed console script's interpreter and module: ``python -m bnfold``."""
    return [sys.executable, "-m", "bnfold"]


def commands(model: Path, out: Path, samples: int) -> dict[str, list[str]]:
    """The per-model commands, each writing ``out``."""
    fold = [*bnfold_cli(), "fold", str(model), "-o", str(out)]
    return {
        "bnfold --no-verify": [*fold, "--no-verify"],
        "bnfold (verified)": [*fold, "--samples", str(samples)],
        "ort offline basic": [sys.executable, "-c", ORT_BASIC, str(model), str(out)],
    }


STARTUP = {
    "bnfold --help": [*bnfold_cli(), "--help"],
    "python -c 'import onnx_ir'": [sys.executable, "-c", "import onnx_ir"],
}


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, child CPU s) of one run of ``cmd``; a failing command stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed: {stderr.strip().splitlines()[-1:]}")
    return wall, usage.ru_utime + usage.ru_stime


def verify_floor(model: Path, folded: Path, samples: int) -> float:
    """Seconds to create an ORT_DISABLE_ALL session of each model and run each ``samples`` times."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    start = time.perf_counter()
    for path in (model, folded):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {
            i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()
        }
        for _ in range(samples):
            session.run(None, feeds)
    return time.perf_counter() - start


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def run_rounds(models: list[Path], rounds: int, samples: int) -> dict[str, Any]:
    """Every command once a round, order rotated; the startup commands ride along."""
    results: dict[str, Any] = {"startup": {k: [] for k in STARTUP}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bnfold-process-") as tmp:
        out = Path(tmp) / "out.onnx"
        for model in models:
            runs: dict[str, list[tuple[float, float]]] = {}
            cmds = commands(model, out, samples)
            names = list(cmds)
            for index in range(rounds):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    # A fresh output path each run: bnfold checks an existing
                    # output is a model before replacing it, ORT just overwrites.
                    out.unlink(missing_ok=True)
                    runs.setdefault(name, []).append(timed(cmds[name]))
                for name, cmd in STARTUP.items():
                    results["startup"][name].append(timed(cmd))
            out.unlink()
            timed(cmds["bnfold --no-verify"])  # the floor runs bnfold's own output
            floor = statistics.median(verify_floor(model, out, samples) for _ in range(3))
            results["models"][model.name] = summarize_model(model, runs, floor)
            print(json.dumps({model.name: results["models"][model.name]["summary"]}))
    results["startup"] = {
        name: {"wall_s": spread([w for w, _ in v]), "cpu_s": spread([c for _, c in v])}
        for name, v in results["startup"].items()
    }
    return results


def summarize_model(model: Path, runs: dict[str, list[tuple[float, float]]], floor: float) -> dict:
    ours, verified, peer = (runs[k] for k in commands(model, model, 1))
    verify_cost = [v[0] - o[0] for v, o in zip(verified, ours, strict=True)]
    verify_cpu = [v[1] - o[1] for v, o in zip(verified, ours, strict=True)]
    wall_ratio = [o[0] / p[0] for o, p in zip(ours, peer, strict=True)]
    cpu_ratio = [o[1] / p[1] for o, p in zip(ours, peer, strict=True)]
    return {
        "mb": round(model.stat().st_size / 1e6, 2),
        "wall_s": {k: spread([w for w, _ in v]) for k, v in runs.items()},
        "cpu_s": {k: spread([c for _, c in v]) for k, v in runs.items()},
        "summary": {
            "no_verify / ort (wall)": spread(wall_ratio),
            "no_verify / ort (cpu)": spread(cpu_ratio),
            "verify_s": spread(verify_cost),
            "verify_cpu_s": spread(verify_cpu),
            "verify_floor_s": round(floor, 4),
            "verify / floor": spread([c / floor for c in verify_cost]),
        },
    }


def folder_rounds(folder: Path, rounds: int) -> dict[str, Any]:
    """Folder mode, one process, against one ORT process per model; alternating order."""
    models = sorted(folder.glob("*.onnx"))
    runs: dict[str, list[tuple[float, float]]] = {
        "bnfold folder --no-verify": [],
        "ort per model": [],
    }
    with tempfile.TemporaryDirectory(prefix="bnfold-folder-") as tmp:
        out = Path(tmp)
        ours = [*bnfold_cli(), "fold", str(folder), "-o", str(out / "folded"), "--no-verify"]
        peer = [commands(m, out / m.name, 1)["ort offline basic"] for m in models]
        for index in range(rounds):
            for name in sorted(runs, reverse=bool(index % 2)):
                if name.startswith("bnfold"):
                    shutil.rmtree(out / "folded", ignore_errors=True)  # fresh outputs each run
                    runs[name].append(timed(ours))
                else:
                    each = [timed(cmd) for cmd in peer]
                    runs[name].append((sum(w for w, _ in each), sum(c for _, c in each)))
    ours_runs, peer_runs = runs.values()
    return {
        "models": len(models),
        "wall_s": {k: spread([w for w, _ in v]) for k, v in runs.items()},
        "cpu_s": {k: spread([c for _, c in v]) for k, v in runs.items()},
        "bnfold / ort (wall)": spread(
            [b[0] / o[0] for b, o in zip(ours_runs, peer_runs, strict=True)]
        ),
        "bnfold / ort (cpu)": spread(
            [b[1] / o[1] for b, o in zip(ours_runs, peer_runs, strict=True)]
        ),
    }


def markdown(report: dict[str, Any]) -> str:
    """The per-model table and the start-up and folder rows, for results/README.md."""

    def fmt(s: dict[str, float]) -> str:
        return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"

    lines = [
        "| model | MB | bnfold --no-verify s | ORT offline s | ratio (wall) | ratio (CPU) "
        "| verification s | floor s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        wall, summary = m["wall_s"], m["summary"]
        lines.append(
            f"| {name.removesuffix('.onnx')} | {m['mb']:.1f} "
            f"| {wall['bnfold --no-verify']['median']:.2f} "
            f"| {wall['ort offline basic']['median']:.2f} "
            f"| {fmt(summary['no_verify / ort (wall)'])} | {fmt(summary['no_verify / ort (cpu)'])} "
            f"| {summary['verify_s']['median']:.2f} | {summary['verify_floor_s']:.2f} |"
        )
    for name, s in report["startup"].items():
        lines.append(f"\n`{name}`: wall {fmt(s['wall_s'])} s, CPU {fmt(s['cpu_s'])} s")
    if "folder" in report:
        f = report["folder"]
        lines.append(
            f"\nfolder mode, {f['models']} models: bnfold / ORT per model "
            f"wall {fmt(f['bnfold / ort (wall)'])}, CPU {fmt(f['bnfold / ort (cpu)'])}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="also time folder mode on this folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    models = sorted(
        (m for p in args.paths for m in (sorted(p.glob("*.onnx")) if p.is_dir() else [p])),
        key=lambda m: m.stat().st_size,
    )
    report = run_rounds(models, args.rounds, args.samples)
    if args.folder:
        report["folder"] = folder_rounds(args.folder, args.rounds)
    report["environment"] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
