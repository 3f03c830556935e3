"""Compare bnfold with other BatchNorm-folding tools, each run in its own process.

ONNX tools (file in, file out; fold time includes load and save, as a user sees it):
  bnfold         bnfold.fold on onnx_ir, saved with bnfold's atomic save
  bnfold-balanced  the same with rounding="balanced"
  onnxoptimizer  onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
  onnxscript     onnxscript.rewriter.rewrite(model) with its default rules
  onnxslim       onnxslim.slim(model) with its defaults
  ort-basic      onnxruntime's offline optimizer: ORT_ENABLE_BASIC, optimized model saved
  ir-load-save   onnx_ir load + save, no fold: the I/O floor
  ir-load-save-fsync  the same, then fsync as bnfold's atomic save does
PyTorch tools (in memory, on the generated ResNet-50 module):
  bnfold-torch   bnfold.fold(module, (x,))
  fx-fuse        torch.fx.experimental.optimization.fuse(module)
  nn-utils       torch.nn.utils.fusion.fuse_conv_bn_eval on every Conv2d -> BatchNorm2d pair

Models: the sample models, a generated ResNet-50 (fp32 and fp16, ~100 MB fp32) and,
with --big, a generated >2 GB model with external data. Generated models go into a
temporary folder that is removed at the end.

Columns: fold wall time, peak RSS of the tool's process, BN left, max relative error
against a float64 reference (``err f64``: the folded model evaluated in float64, so
only the fold's rounding counts; ``err ort``: the folded model run by onnxruntime at
ORT_DISABLE_ALL in its own dtype), and latency at ORT_DISABLE_ALL interleaved with the
model's no-BN twin (the same network generated without BN, weights from an exact
float64 fold: the physical limit). Sample models have no generated twin; theirs is the
original with every BatchNormalization removed (latency only).

Usage:
  python benchmarks/compare_tools.py [--only sample,resnet50,torch] [--big] [--runs N]
      [--out benchmarks/results/compare_tools]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ONNX_TOOLS = (
    "bnfold",
    "bnfold-balanced",
    "onnxoptimizer",
    "onnxscript",
    "onnxslim",
    "ort-basic",
    "ir-load-save",
)
ONNX_TOOLS += ("ir-load-save-fsync",)
TORCH_TOOLS = ("bnfold-torch", "fx-fuse", "nn-utils")
TOOL_IMPORTS = {
    "bnfold": ["bnfold", "bnfold.onnx_front.io", "onnx_ir"],
    "bnfold-balanced": ["bnfold", "bnfold.onnx_front.io", "onnx_ir"],
    "onnxoptimizer": ["onnx", "onnxoptimizer"],
    "onnxscript": ["onnx_ir", "onnxscript.rewriter"],
    "onnxslim": ["onnx", "onnxslim"],
    "ort-basic": ["onnxruntime"],
    "ir-load-save": ["onnx_ir"],
    "ir-load-save-fsync": ["onnx_ir"],
}
VERSIONED = ("bnfold", "onnx", "onnx_ir", "onnxruntime", "onnxscript", "onnxoptimizer", "onnxslim")
VERSIONED += ("numpy", "torch")
CHILD_TIMEOUT_S = 3600
REPEATS = 5  # fold runs per tool and model, median kept: single runs of ms are noise
REPEAT_BELOW_BYTES = 1 << 30
SIMD_FLAGS = (
    "fma",
    "f16c",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
)


@dataclass
class Case:
    """One model every tool folds."""

    name: str
    group: str  # "sample", "resnet50", "resnet50_fp16", "huge"
    path: Path
    twin: Path | None  # the no-BN twin, for the latency floor
    references: dict[str, Path] = field(default_factory=dict)  # hand-made folds, for errors
    errors: bool = True  # compute error columns (too slow in float64 for the >2 GB model)
    size_bytes: int = 0  # model file plus external data; read at creation (files are temporary)

    def __post_init__(self) -> None:
        data = self.path.with_name(self.path.name + ".data")
        self.size_bytes = self.path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@dataclass
class Row:
    """One tool on one model."""

    model: str
    group: str
    tool: str
    status: str = "ok"  # "ok", "failed" or "reference"
    detail: str = ""
    fold_s: float | None = None  # wall time, file in to file out
    inmem_fold_s: float | None = None  # the fold alone, model already in memory
    peak_rss_mb: float | None = None
    base_rss_mb: float | None = None  # after imports, before loading the model
    bn_left: int | None = None
    nodes: int | None = None
    err_f64: float | None = None
    err_ort: float | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    twin_ms: float | None = None
    latency_vs_twin: float | None = None  # medians
    latency_vs_twin_min: float | None = None  # fastest runs: less sensitive to a busy machine


# ---------------------------------------------------------------- child side


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _has_external_data(src: str) -> bool:
    return Path(src + ".data").exists() or Path(src).stat().st_size > (1 << 31)


class Phases:
    """Wall time of each phase (load, fold, save) of one tool run, where it has them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _ir_save(model: Any, dst: str, external: bool) -> None:
    import onnx_ir as ir

    ir.save(model, dst, external_data=Path(dst).name + ".data" if external else None)


def _tool_bnfold(src: str, dst: str, phase: Phases, rounding: str = "nearest") -> None:
    from bnfold import fold
    from bnfold.onnx_front.io import external_tensors, load_model, save_model

    with phase("load"):
        model = load_model(src)
        # As `bnfold fold` does: data stays external when the input had it, even
        # if every external tensor is folded (and so no longer external).
        external = any(True for _ in external_tensors(model))
    with phase("fold"):
        model = fold(model, inplace=True, rounding=rounding).model
    with phase("save"):
        save_model(model, dst, external_data=external)  # atomic: staged, fsync'd, renamed


def _tool_onnxoptimizer(src: str, dst: str, phase: Phases) -> None:
    import onnx
    import onnxoptimizer

    with phase("load"):
        model = onnx.load(src)
    with phase("fold"):
        model = onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    with phase("save"):
        onnx.save(model, dst, save_as_external_data=_has_external_data(src))


def _tool_onnxscript(src: str, dst: str, phase: Phases) -> None:
    import onnx_ir as ir
    from onnxscript import rewriter

    with phase("load"):
        model = ir.load(src)
    with phase("fold"):
        model = rewriter.rewrite(model)
    with phase("save"):
        _ir_save(model, dst, _has_external_data(src))


def _tool_onnxslim(src: str, dst: str, phase: Phases) -> None:
    import onnx
    import onnxslim

    with phase("load"):
        model = onnx.load(src)
    with phase("fold"):
        model = onnxslim.slim(model)
    with phase("save"):
        onnx.save(model, dst, save_as_external_data=_has_external_data(src))


def _tool_ort_basic(src: str, dst: str, phase: Phases) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = dst
    if _has_external_data(src):
        key = "session.optimized_model_external_initializers_file_name"
        opts.add_session_config_entry(key, Path(dst).name + ".data")
    with phase("all"):  # load, optimize and save happen in one call
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _tool_ir_load_save(src: str, dst: str, phase: Phases) -> None:
    import onnx_ir as ir

    with phase("load"):
        model = ir.load(src)
    with phase("save"):
        _ir_save(model, dst, _has_external_data(src))


def _tool_ir_load_save_fsync(src: str, dst: str, phase: Phases) -> None:
    import onnx_ir as ir

    with phase("load"):
        model = ir.load(src)
    with phase("save"):
        _ir_save(model, dst, _has_external_data(src))
        for path in (Path(dst), Path(dst + ".data")):
            if path.exists():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())


ONNX_RUNNERS: dict[str, Callable[[str, str, Phases], None]] = {
    "bnfold": _tool_bnfold,
    "bnfold-balanced": lambda src, dst, phase: _tool_bnfold(src, dst, phase, "balanced"),
    "onnxoptimizer": _tool_onnxoptimizer,
    "onnxscript": _tool_onnxscript,
    "onnxslim": _tool_onnxslim,
    "ort-basic": _tool_ort_basic,
    "ir-load-save": _tool_ir_load_save,
    "ir-load-save-fsync": _tool_ir_load_save_fsync,
}


def child_onnx(tool: str, src: str, dst: str, repeat: int = 1) -> dict[str, Any]:
    """Run one ONNX tool, file to file, ``repeat`` times; the run with the median total.

    Imports are done before the clock starts. Peak RSS is that of the first run: later
    runs can find garbage of the one before still resident.
    """
    for module in TOOL_IMPORTS[tool]:
        importlib.import_module(module)
    base = _rss_bytes()
    runs = []
    peak = 0
    for _ in range(repeat):
        phases = Phases()
        start = time.perf_counter()
        ONNX_RUNNERS[tool](src, dst, phases)
        runs.append((time.perf_counter() - start, phases.seconds))
        peak = peak or _peak_rss()
    total, seconds = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"fold_s": total, "phases": seconds, "base_rss": base, "peak_rss": peak}


def _peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so
    # a child would report the parent's resident set.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _fuse_nn_utils(module: Any) -> Any:
    import copy

    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    module = copy.deepcopy(module)
    for parent in module.modules():
        if not isinstance(parent, torch.nn.Sequential):
            continue
        kids = list(parent)
        for i in range(len(kids) - 1):
            conv, bn = kids[i], kids[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                parent[i] = fuse_conv_bn_eval(conv, bn)
                parent[i + 1] = torch.nn.Identity()
    return module


def child_torch(tool: str, runs: int, warmup: int, size: int) -> dict[str, Any]:
    """Fold the generated torch ResNet-50 with one tool, then measure it in this process."""
    import copy

    import make_big_models
    import torch

    from bnfold import bench

    module = make_big_models.torch_resnet50()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if tool == "bnfold-torch":
        from bnfold import fold

        run = lambda: fold(module, (x,)).model  # noqa: E731
    elif tool == "fx-fuse":
        from torch.fx.experimental.optimization import fuse

        run = lambda: fuse(module)  # noqa: E731
    else:
        run = lambda: _fuse_nn_utils(module)  # noqa: E731
    base = _rss_bytes()
    start = time.perf_counter()
    folded = run()
    fold_s, peak = time.perf_counter() - start, _peak_rss()
    with torch.inference_mode():
        ref = copy.deepcopy(module).double()(x.double()).numpy()
        twin = _fuse_nn_utils(copy.deepcopy(module).double()).float().eval()
        got, twin_out = folded(x).numpy(), twin(x).numpy()
    timing = bench.bench_torch(folded, twin, (x,), warmup=warmup, runs=runs).levels[0]
    bn_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return {
        "fold_s": fold_s,
        "base_rss": base,
        "peak_rss": peak,
        "bn_left": bn_left,
        "err": _rel(got, ref),
        "twin_err": _rel(twin_out, ref),
        "latency_ms": timing.original.median_ms,
        "latency_iqr_ms": timing.original.iqr_ms,
        "twin_ms": timing.folded.median_ms,
        "min_ms": timing.original.min_ms,
        "twin_min_ms": timing.folded.min_ms,
    }


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / (np.max(np.abs(ref)) or 1.0))


# ---------------------------------------------------------------- parent side


def run_child(args: list[str]) -> tuple[dict[str, Any] | None, str]:
    """Run this script as a child; its last stdout line is JSON. (result, error text)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=str(ROOT)
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {CHILD_TIMEOUT_S} s"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return None, (lines[-1] if lines else f"exit code {proc.returncode}")[:300]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def sample_cases(work: Path, match: str = "*") -> list[Case]:
    cases = []
    for path in sorted((ROOT / "sample_models").rglob(f"{match}.onnx")):
        twin = bn_removed_twin(path, work / "twins" / path.name)
        cases.append(Case(path.stem, "sample", path, twin))
    return cases


def bn_removed_twin(path: Path, out: Path) -> Path | None:
    """The model with every removable BatchNormalization dropped (input renamed to its output)."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        src, dst = node.input[0], node.output[0]
        if len(node.output) != 1 or src in inputs or src in {o.name for o in graph.output}:
            return None
        graph.node.remove(node)
        for other in graph.node:
            other.input[:] = [dst if name == src else name for name in other.input]
            other.output[:] = [dst if name == src else name for name in other.output]
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def generated_cases(folder: Path, big: bool, size: int) -> list[Case]:
    """Generate the ResNet-50 (and, if ``big``, the >2 GB) cases into ``folder``.

    A folder that already holds them (from --generated) is reused as is.
    """
    import make_big_models

    wanted = ["resnet50_bn_fp16.onnx"] + (["huge_nobn.onnx"] if big else [])
    if not all((folder / name).exists() for name in wanted):
        for path in make_big_models.generate(folder, size=size, fp16=True, big=big):
            print(f"  generated {path.name}", file=sys.stderr)
    cases = []
    for suffix, group in (("", "resnet50"), ("_fp16", "resnet50_fp16")):
        refs = {
            "exact-f64-fold": folder / f"resnet50_nobn{suffix}.onnx",
            f"naive-{'fp16' if suffix else 'fp32'}-fold": folder / f"resnet50_naive{suffix}.onnx",
        }
        bn = folder / f"resnet50_bn{suffix}.onnx"
        cases.append(Case(bn.stem, group, bn, refs["exact-f64-fold"], refs))
    if big:
        cases.append(
            Case("huge_bn", "huge", folder / "huge_bn.onnx", folder / "huge_nobn.onnx", {}, False)
        )
    return cases


class Evaluator:
    """Error and latency columns of one case, with its float64 reference cached."""

    def __init__(self, case: Case, runs: int, warmup: int) -> None:
        import onnx

        from bnfold import bench

        self.case, self.runs, self.warmup = case, runs, warmup
        session = bench.make_session(str(case.path), "disable_all")
        self.feeds = bench.random_feeds(session, seed=0)
        self.ref: list[np.ndarray] | None = None
        self.ref_error = ""
        if case.errors:
            from f64eval import run_f64

            try:
                self.ref = run_f64(onnx.load(case.path), self.feeds)
            except Exception as err:  # an op the interpreter lacks, a training BN...
                self.ref_error = f"no float64 reference: {type(err).__name__} {err}"

    def fill(self, row: Row, out: Path) -> None:
        import onnx

        graph = onnx.load(out, load_external_data=False).graph
        row.bn_left = sum(n.op_type == "BatchNormalization" for n in graph.node)
        row.nodes = len(graph.node)
        with _noting(row, "error"):
            self._errors(row, out)
        with _noting(row, "latency"):
            self._latency(row, out)

    def _errors(self, row: Row, out: Path) -> None:
        if self.ref is None:
            return
        import onnx
        from f64eval import max_rel_error, run_f64

        from bnfold import bench

        row.err_f64 = max_rel_error(run_f64(onnx.load(out), self.feeds), self.ref)
        session = bench.make_session(str(out), "disable_all")
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, {n: self.feeds[n] for n in names})
        row.err_ort = max_rel_error(got, self.ref)

    def _latency(self, row: Row, out: Path) -> None:
        from bnfold import bench

        if self.case.twin is None:
            return
        timing = bench.bench_onnx(
            str(out), str(self.case.twin), ["disable_all"], warmup=self.warmup, runs=self.runs
        ).levels[0]
        row.latency_ms, row.latency_iqr_ms = timing.original.median_ms, timing.original.iqr_ms
        row.twin_ms, row.latency_vs_twin = timing.folded.median_ms, timing.ratio
        row.latency_vs_twin_min = timing.original.min_ms / timing.folded.min_ms


@contextlib.contextmanager
def _noting(row: Row, what: str) -> Any:
    try:
        yield
    except Exception as err:
        text = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        row.detail = (row.detail + "; " if row.detail else "") + f"{what}: {text}"


def run_onnx_case(
    case: Case, tools: Iterable[str], work: Path, runs: int, warmup: int
) -> list[Row]:
    print(f"{case.name} ({case.size_bytes / 1e6:.1f} MB)", file=sys.stderr)
    evaluator = Evaluator(case, runs, warmup)
    rows = []
    for tool in tools:
        row = Row(case.name, case.group, tool, detail=evaluator.ref_error)
        out_dir = work / "out" / tool / case.name
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / case.path.name
        repeat = 1 if case.size_bytes > REPEAT_BELOW_BYTES else REPEATS
        result, error = run_child(["--child", tool, str(case.path), str(out), str(repeat)])
        if result is None:
            row.status, row.detail = "failed", error
        else:
            row.fold_s = result["fold_s"]
            row.inmem_fold_s = result["phases"].get("fold")
            row.peak_rss_mb = result["peak_rss"] / 1e6
            row.base_rss_mb = result["base_rss"] / 1e6
            evaluator.fill(row, out)
        _clean(out_dir)
        print(f"  {tool:<14} {row.status} {row.fold_s or 0:.3f}s {row.detail}", file=sys.stderr)
        rows.append(row)
    for name, path in case.references.items():
        row = Row(case.name, case.group, name, status="reference")
        evaluator.fill(row, path)
        rows.append(row)
    return rows


def _clean(folder: Path) -> None:
    for item in folder.iterdir():
        item.unlink()
    folder.rmdir()


def run_torch_tools(runs: int, warmup: int, size: int) -> list[Row]:
    rows = []
    print("resnet50 (torch eager)", file=sys.stderr)
    for tool in TORCH_TOOLS:
        row = Row("resnet50_torch", "torch", tool)
        args = ["--child-torch", tool, str(runs), str(warmup), str(size)]
        result, error = run_child(args)
        if result is None:
            row.status, row.detail = "failed", error
        else:
            row.fold_s, row.bn_left = result["fold_s"], result["bn_left"]
            row.inmem_fold_s = row.fold_s
            row.peak_rss_mb, row.base_rss_mb = result["peak_rss"] / 1e6, result["base_rss"] / 1e6
            row.err_f64 = result["err"]
            row.latency_ms, row.latency_iqr_ms = result["latency_ms"], result["latency_iqr_ms"]
            row.twin_ms = result["twin_ms"]
            row.latency_vs_twin = row.latency_ms / row.twin_ms
            row.latency_vs_twin_min = result["min_ms"] / result["twin_min_ms"]
            row.detail = f"exact-f64-fold error {result['twin_err']:.3g}"
        print(f"  {tool:<14} {row.status} {row.fold_s or 0:.3f}s {row.detail}", file=sys.stderr)
        rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    """The machine and versions, for the results file."""
    from bnfold.bench_report import cpu_model

    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
        except ImportError:
            versions[name] = "not installed"
    flags: list[str] = []
    with contextlib.suppress(OSError):
        line = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        )
        flags = [f for f in line.split(":", 1)[1].split() if f in SIMD_FLAGS]
    return {
        "cpu": cpu_model(),
        "simd": flags,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1e6, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": 1,
    }


def targets(rows: list[Row], cases: list[Case]) -> list[dict[str, Any]]:
    """The issue's targets, each as measured value, limit and pass/fail."""
    by = {(r.model, r.tool): r for r in rows}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, how: str) -> None:
        ok = value is not None and value <= limit
        out.append({"target": name, "value": value, "limit": limit, "met": ok, "how": how})

    for group in sorted({c.group for c in cases}):
        models = [c.name for c in cases if c.group == group]
        for col, what in (("fold_s", "file to file"), ("inmem_fold_s", "in memory")):
            ours = _total(by, models, "bnfold", col)
            theirs = _total(by, models, "onnxscript", col)
            add(
                f"fold time vs onnxscript rewriter, {what} ({group})",
                ours / theirs if ours and theirs else None,
                0.5,
                f"sum over {len(models)} model(s): bnfold {_f(ours, '.4f')} s / "
                f"onnxscript {_f(theirs, '.4f')} s",
            )
    for case in cases:
        bn = by.get((case.name, "bnfold"))
        if case.group == "huge" and bn and bn.fold_s:
            floor = by.get((case.name, "ir-load-save"))
            synced = by.get((case.name, "ir-load-save-fsync"))
            how = f"bnfold {bn.fold_s:.2f} s / ir load+save {_f(floor and floor.fold_s, '.2f')} s"
            if synced and synced.fold_s:
                # bnfold's save ends with fsync; this is the floor with the same durability.
                how += f"; with fsync {synced.fold_s:.2f} s: {bn.fold_s / synced.fold_s:.2f}x"
            add(
                "fold time vs onnx-ir load+save (>2 GB)",
                bn.fold_s / floor.fold_s if floor and floor.fold_s else None,
                1.2,
                how,
            )
            add(
                "peak RSS vs model size (>2 GB)",
                bn.peak_rss_mb * 1e6 / case.size_bytes if bn.peak_rss_mb else None,
                1.0,
                f"bnfold peak RSS {bn.peak_rss_mb:.0f} MB / model {case.size_bytes / 1e6:.0f} MB",
            )
        if bn and case.group != "sample":
            add(
                f"latency vs no-BN twin at DISABLE_ALL ({case.name})",
                bn.latency_vs_twin,
                1.01,
                f"median folded / median twin, interleaved runs (fastest runs: "
                f"{_f(bn.latency_vs_twin_min, '.3f')})",
            )
        exact = by.get((case.name, "exact-f64-fold"))
        naive = by.get((case.name, "naive-fp16-fold"))
        if bn and exact and case.group == "resnet50":
            for col in ("err_f64", "err_ort"):
                a, b = getattr(bn, col), getattr(exact, col)
                add(
                    f"fp32 error vs exact float64 fold ({col})",
                    a / b if a and b else None,
                    1.5,
                    f"bnfold {_f(a, '.3e')} / exact {_f(b, '.3e')}",
                )
        for tool in ("bnfold", "bnfold-balanced"):
            ours = by.get((case.name, tool))
            if not (ours and naive and case.group == "resnet50_fp16"):
                continue
            for col in ("err_f64", "err_ort"):
                a, b = getattr(ours, col), getattr(naive, col)
                add(
                    f"fp16 error vs fold computed in fp16 ({tool}, {col})",
                    a / b if a and b else None,
                    0.6,
                    f"{tool} {_f(a, '.3e')} / naive fp16 fold {_f(b, '.3e')}",
                )
    torch_rows = {r.tool: r for r in rows if r.group == "torch"}
    if "bnfold-torch" in torch_rows and torch_rows["bnfold-torch"].latency_vs_twin:
        add(
            "latency vs no-BN twin, torch eager",
            torch_rows["bnfold-torch"].latency_vs_twin,
            1.01,
            f"median folded / median twin, interleaved runs (fastest runs: "
            f"{_f(torch_rows['bnfold-torch'].latency_vs_twin_min, '.3f')})",
        )
    return out


def _total(by: dict[tuple[str, str], Row], models: list[str], tool: str, col: str) -> float | None:
    times = [getattr(by[(m, tool)], col) if (m, tool) in by else None for m in models]
    return None if any(t is None for t in times) else round(sum(times), 4)  # type: ignore[misc]


def markdown(rows: list[Row], info: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    v = info["versions"]
    lines = [
        "# BatchNorm folding: bnfold against other tools",
        "",
        f"Machine: {info['cpu']} ({' '.join(info.get('simd', []))}), "
        f"{info['cores']} cores, {info['ram_gb']} GB RAM, "
        f"{info['platform']}, Python {info['python']}; {info['date']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "Latency: ORT_DISABLE_ALL, 1 thread, runs of the folded model interleaved with "
        "its no-BN twin; fold time is wall time of load + fold + save in a fresh process "
        "(imports excluded); peak RSS is the process's maximum resident set.",
        "",
        "## Targets",
        "",
        "| target | measured | limit | met | how |",
        "|---|---|---|---|---|",
    ]
    for g in goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(
            f"| {g['target']} | {value} | {g['limit']} | "
            f"{'yes' if g['met'] else 'NO'} | {g['how']} |"
        )
    lines += ["", "## Results", ""]
    head = (
        "model",
        "tool",
        "fold s",
        "in-mem fold s",
        "peak RSS MB",
        "BN left",
        "err f64",
        "err ort",
        "latency ms",
        "twin ms",
        "vs twin",
        "vs twin (min)",
        "note",
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (
            r.model,
            r.tool,
            _f(r.fold_s, ".3f"),
            _f(r.inmem_fold_s, ".4f"),
            _f(r.peak_rss_mb, ".0f"),
            _f(r.bn_left, "d"),
            _f(r.err_f64, ".2e"),
            _f(r.err_ort, ".2e"),
            _f(r.latency_ms, ".3f")
            + ("" if r.latency_iqr_ms is None else f" ±{r.latency_iqr_ms:.3f}"),
            _f(r.twin_ms, ".3f"),
            _f(r.latency_vs_twin, ".3f"),
            _f(r.latency_vs_twin_min, ".3f"),
            (r.status if r.status != "ok" else "")
            + (": " if r.status != "ok" and r.detail else "")
            + r.detail.replace("|", "/"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tool, src, dst, repeat = sys.argv[2:6]
        print(json.dumps(child_onnx(tool, src, dst, int(repeat))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-torch":
        tool, runs, warmup, size = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(child_torch(tool, runs, warmup, size)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="sample,resnet50,torch", help="comma list of: sample, resnet50, torch"
    )
    parser.add_argument("--big", action="store_true", help="also the >2 GB external-data model")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model (big: /5)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="ResNet-50 input height/width")
    parser.add_argument("--tools", default=",".join(ONNX_TOOLS))
    parser.add_argument("--match", default="*", help="glob on sample model names, e.g. conv2d_*")
    parser.add_argument(
        "--generated", type=Path, help="keep generated models in this folder (reused if present)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare_tools")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else set()
    tools = [t for t in args.tools.split(",") if t]
    rows: list[Row] = []
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="bnfold-compare-") as tmp:
        work = Path(tmp)
        if "sample" in only:
            cases += sample_cases(work, args.match)
        if "resnet50" in only or args.big:
            folder = args.generated or work / "generated"
            generated = generated_cases(folder, args.big, args.size)
            cases += [c for c in generated if c.group != "huge" or args.big]
            if "resnet50" not in only:
                cases = [c for c in cases if c.group not in ("resnet50", "resnet50_fp16")]
        for case in cases:
            runs = max(3, args.runs // 5) if case.group == "huge" else args.runs
            rows += run_onnx_case(case, tools, work, runs, args.warmup)
    if "torch" in only:
        rows += run_torch_tools(args.runs, args.warmup, args.size)
    info = machine()
    goals = targets(rows, cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "targets": goals, "rows": [asdict(r) for r in rows]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(rows, info, goals)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
