"""Peak memory of folding a model bigger than RAM budgets: external data, memory-mapped.

Generates a chain of 1x1 Conv(C -> C) blocks whose weights live in one external
data file (written tensor by tensor, so generating needs little memory either),
then runs ``bnfold fold`` on it in a child process, which reports its own peak
RSS (``VmHWM`` from /proc/self/status at exit: resident pages, file-backed mmap
pages included). Three layouts:

  depthwise  a depthwise Conv -> BN in front (C weights change), then convs with
          Relu: almost nothing changes, so peak RSS should stay near the baseline.
  mixed   only the first ``--bn-blocks`` convs are followed by a BatchNorm, the
          rest by Relu: most bytes do not change and must not be copied into memory.
  all_bn  every conv is followed by a BatchNorm: every weight changes (worst case).

Each layout is folded with ``--no-verify`` (the fold and the save) and, unless
``--skip-verify-run``, once more with verification (onnxruntime loads both models).

Usage:
  python benchmarks/big_model_rss.py [--size-gb 2.2] [--channels 8192] [--layouts mixed,all_bn]
      [--workdir /tmp] [--out benchmarks/results/big_model_rss.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ALIGN = 1 << 16  # 64 KiB: onnxruntime can memory-map aligned external tensors


@dataclass
class Run:
    """One measured child process."""

    layout: str
    verify: bool
    model_bytes: int
    blocks: int
    bn_blocks: int
    channels: int
    exit_code: int
    seconds: float
    peak_rss_bytes: int
    peak_rss_over_model: float
    folded: int
    written: bool
    verification: str


def _bn(
    rng: np.random.Generator, x: str, prefix: str, channels: int, nodes: list, inits: list
) -> str:
    params = {
        "scale": rng.uniform(0.5, 1.5, channels), "bias": rng.normal(0, 0.5, channels),
        "mean": rng.normal(0, 0.5, channels), "var": rng.uniform(0.5, 2, channels),
    }  # fmt: skip
    for key, value in params.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{prefix}.{key}"))
    ins = [x] + [f"{prefix}.{k}" for k in params]
    nodes.append(helper.make_node("BatchNormalization", ins, [f"{prefix}_out"], name=prefix))
    return f"{prefix}_out"


def make_model(
    folder: Path, *, channels: int, blocks: int, bn_blocks: int, depthwise_bn: bool = False,
    seed: int = 0,
) -> Path:  # fmt: skip
    """x[1,C,1,1] -> [depthwise Conv -> BN] -> (Conv 1x1 -> BN | Relu) x blocks.

    The 1x1 conv weights (C*C floats each) are in model.onnx.data; the first
    ``bn_blocks`` of them are followed by a BN, the others by Relu. The optional
    depthwise conv has C weights only: a fold that changes almost nothing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_path = folder / "model.onnx.data"
    nodes, inits = [], []
    x = "x"
    if depthwise_bn:
        weight = rng.uniform(0.5, 1.5, (channels, 1, 1, 1)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, "dw.weight"))
        nodes.append(helper.make_node("Conv", [x, "dw.weight"], ["dw_out"], name="dw",
                                      group=channels))  # fmt: skip
        x = _bn(rng, "dw_out", "dw_bn", channels, nodes, inits)
    offset = 0
    with open(data_path, "wb") as data:
        for i in range(blocks):
            name = f"conv{i}.weight"
            tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT,
                                      dims=[channels, channels, 1, 1])  # fmt: skip
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset = -(-offset // ALIGN) * ALIGN
            data.seek(offset)
            length = 0
            for rows in np.array_split(np.arange(channels), max(1, channels // 1024)):
                chunk = rng.standard_normal((len(rows), channels), dtype=np.float32)
                chunk *= 1 / math.sqrt(channels)
                data.write(chunk.tobytes())
                length += chunk.nbytes
            for key, value in (
                ("location", data_path.name),
                ("offset", offset),
                ("length", length),
            ):
                tensor.external_data.add(key=key, value=str(value))
            offset += length
            inits.append(tensor)
            nodes.append(helper.make_node("Conv", [x, name], [f"c{i}"], name=f"conv{i}"))
            x = f"c{i}"
            if i < bn_blocks:
                x = _bn(rng, x, f"bn{i}", channels, nodes, inits)
            else:
                nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
                x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, 1, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, channels, 1, 1])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


# The child reports its own VmHWM (peak RSS of its address space since exec) at
# exit. ru_maxrss from wait4 would also count the parent's pages the child had
# between fork and exec, so it over-reports by the parent's size.
_CHILD = """
import atexit, os, sys
def _report_peak():
    with open("/proc/self/status") as fh:
        peak = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["BNFOLD_PEAK_FILE"], "w") as out:
        out.write(peak)
atexit.register(_report_peak)
from bnfold.cli.main import main
sys.argv = ["bnfold", *sys.argv[1:]]
main()
"""


def measure_fold(model: Path, output: Path, *, verify: bool) -> tuple[int, float, int, dict]:
    """Run ``bnfold fold`` in a child; (exit code, seconds, peak RSS bytes, JSON payload).

    Peak RSS is the child's VmHWM: resident pages, file-backed mmap pages included.
    """
    cmd = [sys.executable, "-c", _CHILD, "fold", str(model), "-o", str(output), "--json"]
    if not verify:
        cmd.append("--no-verify")
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        env = {**os.environ, "BNFOLD_PEAK_FILE": str(peak_file)}
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else -1
    try:
        payload = json.loads(proc.stdout)
    except json.JSONDecodeError:
        payload = {"error": proc.stderr.strip()[-500:]}
    return proc.returncode, seconds, peak, payload


def baseline_rss() -> int:
    """Peak RSS of folding a tiny model: the interpreter, numpy, onnx, onnxruntime."""
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "conv2d_bn.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        _, _, rss, _ = measure_fold(sample, Path(tmp) / "o.onnx", verify=False)
    return rss


def layout_blocks(layout: str, blocks: int, bn_blocks: int) -> tuple[int, bool]:
    """(convs followed by a BN, depthwise conv + BN in front) for a layout name."""
    return {
        "depthwise": (0, True),
        "mixed": (min(bn_blocks, blocks), False),
        "all_bn": (blocks, False),
    }[layout]


def run_layout(workdir: Path, layout: str, channels: int, blocks: int, bn_blocks: int,
               verify_runs: list[bool]) -> list[Run]:  # fmt: skip
    folder = workdir / layout
    t0 = time.perf_counter()
    bn_blocks, depthwise = layout_blocks(layout, blocks, bn_blocks)
    model = make_model(
        folder, channels=channels, blocks=blocks, bn_blocks=bn_blocks, depthwise_bn=depthwise
    )
    size = model_bytes(model)
    print(
        f"[{layout}] generated {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", flush=True
    )
    runs = []
    for verify in verify_runs:
        out_dir = workdir / f"{layout}_out_{'verify' if verify else 'noverify'}"
        out_dir.mkdir()
        code, seconds, rss, payload = measure_fold(model, out_dir / "model.onnx", verify=verify)
        report = payload.get("report") or {}
        verification = (payload.get("verification") or {}).get("status", "skipped")
        run = Run(layout, verify, size, blocks, bn_blocks, channels, code, round(seconds, 2), rss,
                  round(rss / size, 3), len(report.get("folded", [])),
                  bool(payload.get("written")), verification)  # fmt: skip
        print(f"[{layout}] verify={verify}: exit {code}, {seconds:.1f}s, peak RSS "
              f"{rss / 1e9:.2f} GB = {rss / size:.2f} x model, folded {run.folded}, "
              f"verification {verification} {payload.get('error', '')}", flush=True)  # fmt: skip
        runs.append(run)
        shutil.rmtree(out_dir)
    shutil.rmtree(folder)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.2, help="minimum model size")
    parser.add_argument("--channels", type=int, default=8192)
    parser.add_argument("--bn-blocks", type=int, default=2, help="mixed layout: convs with a BN")
    parser.add_argument("--layouts", default="depthwise,mixed,all_bn")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--skip-verify-run", action="store_true")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()

    block_bytes = args.channels**2 * 4
    blocks = max(1, math.ceil(args.size_gb * 1e9 / block_bytes))
    verify_runs = [False] if args.skip_verify_run else [False, True]
    base = baseline_rss()
    print(f"baseline peak RSS (tiny model, no verify): {base / 1e6:.0f} MB", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bnfold-bigmodel-", dir=args.workdir))
    runs: list[Run] = []
    try:
        for layout in args.layouts.split(","):
            runs += run_layout(workdir, layout, args.channels, blocks, args.bn_blocks, verify_runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "big_model_rss",
        "how": "child running the bnfold CLI `fold MODEL -o OUT --json [--no-verify]`; peak "
        "RSS = the child's VmHWM at exit (includes resident file-backed mmap pages)",
        "baseline_peak_rss_bytes": base,
        "runs": [asdict(r) for r in runs],
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "onnx_ir": __import__("onnx_ir").__version__,
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
