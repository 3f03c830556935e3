"""Fold time of bnfold against other tools, file to file, in interleaved rounds.

`compare_tools.py` times each tool once on a > 2 GB model, one tool after the
other. On this machine one save of 2.4 GB takes anywhere from 3 to 9 s depending
on how much of the previous write the disk is still flushing, so a single run per
tool says little. Here every round runs each tool once, in a fresh process
(`compare_tools.py --child`), in an order that rotates between rounds; each
round gives a ratio of bnfold's time to each other tool's from the same round.
Reported: per tool the median time and its range, and per ratio the median and
its range over the rounds. Every run writes into an empty folder, deleted after
it (untimed): replacing a previous 2.4 GB output costs a tool seconds of block
freeing that have nothing to do with folding.

Without ``--settle`` a tool that does not fsync leaves its writes to the kernel,
and whichever tool runs next shares the disk with that writeback: the rounds
then measure a pipeline's sustained pace. With ``--settle`` every run starts
after ``sync`` (untimed), so each tool is timed from a quiet disk and one that
does not fsync is credited with the writes it left behind.

A tool spelled ``bnfold@DIR`` runs bnfold from another checkout (e.g. a
``git worktree`` of an older commit), to measure a change side by side.

Usage:
  python benchmarks/fold_time_rounds.py MODEL.onnx [--rounds 7] [--settle]
      [--tools bnfold,ir-load-save,ir-load-save-fsync,onnxscript] [--out FILE.json]
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COMPARE = HERE / "compare_tools.py"
TIMEOUT_S = 1800


def run_once(tool: str, model: Path, out: Path) -> float:
    """One file-to-file run of ``tool`` in a fresh process; its wall time in seconds."""
    name, _, tree = tool.partition("@")
    env = dict(os.environ)
    if tree:  # that checkout's bnfold first on the path, ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(COMPARE), "--child", name, str(model), str(out), "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise SystemExit(f"{tool} failed: {last[0]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["fold_s"])


def rounds(model: Path, tools: list[str], count: int, settle: bool) -> list[dict[str, float]]:
    """``count`` rounds, each tool once per round, the order rotated every round."""
    results = []
    with tempfile.TemporaryDirectory(prefix="bnfold-rounds-", dir=model.parent) as tmp:
        for index in range(count):
            shift = index % len(tools)
            order = tools[shift:] + tools[:shift]
            times = {}
            for tool in order:
                if settle:
                    os.sync()  # the previous run's writes reach the disk before the clock starts
                folder = Path(tmp) / "out"
                folder.mkdir()
                times[tool] = run_once(tool, model, folder / model.name)
                shutil.rmtree(folder)
            print(f"round {index + 1}: " + ", ".join(f"{t} {s:.2f}s" for t, s in times.items()))
            results.append(times)
    return results


def summary(results: list[dict[str, float]], tools: list[str]) -> dict[str, Any]:
    """Median and range per tool, and of bnfold's per-round ratio to each other tool."""
    ours = tools[0]
    timing = {t: _spread([r[t] for r in results]) for t in tools}
    ratios = {t: _spread([r[ours] / r[t] for r in results]) for t in tools[1:]}
    return {"rounds": len(results), "seconds": timing, f"{ours} / tool": ratios}


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--tools",
        default="bnfold,ir-load-save,ir-load-save-fsync,onnxscript",
        help="comma list, the first is the one the ratios are of",
    )
    parser.add_argument("--settle", action="store_true", help="sync before every run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    results = rounds(args.model.resolve(), tools, args.rounds, args.settle)
    report = summary(results, tools) | {
        "model": str(args.model),
        "settle": args.settle,
        "per_round": results,
    }
    for tool, s in report["seconds"].items():
        print(f"{tool:<28} {s['median']:.2f} s  [{s['min']:.2f}, {s['max']:.2f}]")
    for tool, s in report[f"{tools[0]} / tool"].items():
        print(f"{tools[0]} / {tool:<20} {s['median']:.2f}x  [{s['min']:.2f}, {s['max']:.2f}]")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
