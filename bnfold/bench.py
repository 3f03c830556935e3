"""Latency harness: time an original and a folded model side by side.

Runs of the two models are interleaved (A B A B ...) after warm-up, in one
process with pinned thread counts, so that noise (frequency scaling, a busy
neighbour) hits both alike. Each ORT level gets fresh sessions.

Levels are ORT graph-optimisation levels plus ``all-minus-fusions``: ORT's
default level with its own BatchNorm/affine-into-linear fusions switched off, so
the speed-up that bnfold brings is not hidden by ORT doing the same fold at
session start.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnfold.bench_report import (
    BenchReport,
    Environment,
    LevelTiming,
)
from bnfold.errors import BnfoldError
from bnfold.options import DEFAULT_BENCH_LEVELS

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each timed or warm-up run."""


ORT_BN_FUSIONS: tuple[str, ...] = (
    "ConvBNFusion",
    "ConvAddFusion",
    "ConvMulFusion",
    "MatMul_BatchNormalization_Fusion",
)
"""onnxruntime's optimizer names (checked on 1.32) that fold BN, Mul or Add into a
Conv or MatMul. Disabled by the ``all-minus-fusions`` level."""


LEVELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "disable_all": ("ORT_DISABLE_ALL", ()),
    "basic": ("ORT_ENABLE_BASIC", ()),
    "extended": ("ORT_ENABLE_EXTENDED", ()),
    "all": ("ORT_ENABLE_ALL", ()),
    "all-minus-fusions": ("ORT_ENABLE_ALL", ORT_BN_FUSIONS),
}
"""Level name -> (GraphOptimizationLevel member, optimizers disabled)."""


DEFAULT_LEVELS: tuple[str, ...] = DEFAULT_BENCH_LEVELS
_PROTOBUF_SAFE_BYTES = 1 << 30


def bench_onnx(  # noqa: PLR0913 -- public API: keyword options, one per CLI flag
    original: Any,
    folded: Any = None,
    levels: Sequence[str] = DEFAULT_LEVELS,
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 100,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    max_input_bytes: int | None = None,
    progress: Progress | None = None,
    inputs: str | os.PathLike[str] | None = None,
) -> BenchReport:
    """Time an ONNX model and its folded version in onnxruntime (CPU), interleaved.

    Args:
        original: a path, serialized bytes, ``onnx_ir.Model`` or ``onnx.ModelProto``.
        folded: the same kinds; None folds ``original`` in memory first.
        levels: names from ``LEVELS``.
        threads: intra- and inter-op thread count of both sessions.
        warmup: untimed runs of each model per level.
        runs: timed runs of each model per level.
        seed: seed of the random inputs (dtypes and shapes from the session,
            dynamic dimensions set to 1 unless ``shapes`` names them).
        shapes: input name -> shape, for inputs with dynamic dimensions.
        max_input_bytes: cap on the random inputs, all together (None: the
            verifier's, ``bnfold.options.MAX_INPUT_BYTES``).
        progress: called as ``progress(done, total)`` after every run.
        inputs: time on the first sample of this input file or folder (see
            :mod:`bnfold.verification.files`) instead of random inputs.

    Raises:
        BnfoldError: an unknown level, bad counts, a model ORT cannot load, a
            shape naming no input, an input file that does not fit, or inputs
            over the cap (checked before any is allocated).
    """
    _check_args(levels, threads, warmup, runs)
    folds = None
    if folded is None:
        from bnfold import fold  # lazy: the fold front pulls in onnx_ir passes

        result = fold(_as_foldable(original))
        folded, folds = result.model, len(result.report.folded)
    report = BenchReport(
        original=_describe(original),
        folded=_describe(folded) if folds is None else "(folded in memory)",
        environment=Environment.capture(
            "onnxruntime", threads, warmup, runs, seed, ("onnxruntime", "onnx", "numpy")
        ),
        folds=folds,
    )
    ticker = _Ticker(progress, len(levels) * 2 * (warmup + runs))
    with _ort_source(original) as src_a, _ort_source(folded) as src_b:
        for level in levels:
            sess_a = make_session(src_a, level, threads)
            sess_b = make_session(src_b, level, threads)
            if inputs is None:
                feeds = random_feeds(sess_a, seed, shapes, max_input_bytes)
            else:
                feeds = file_feeds(sess_a, inputs)
            report.inputs = {name: list(array.shape) for name, array in feeds.items()}
            run_a = _runner(sess_a, feeds)
            run_b = _runner(sess_b, _feeds_for(sess_b, feeds))
            a_ms, b_ms = time_interleaved(run_a, run_b, warmup, runs, ticker)
            member, disabled = LEVELS[level]
            timing = LevelTiming.of(level, a_ms, b_ms, member, disabled)
            report.levels.append(timing)
    return report


def bench_torch(
    original: Any,
    folded: Any,
    example_inputs: Sequence[Any],
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 100,
    seed: int = 0,
    progress: Progress | None = None,
) -> BenchReport:
    """Time two ``nn.Module``s in eager mode, interleaved, under ``torch.inference_mode``.

    Both modules are put in eval mode. The report has one level, ``"eager"``.
    Torch's thread count is set to ``threads`` for the run and restored after.
    """
    import torch  # lazy: torch is an optional extra

    _check_args((), threads, warmup, runs)
    inputs = tuple(example_inputs)
    for module in (original, folded):
        _to_eval_mode(module)
    report = BenchReport(
        original=type(original).__name__,
        folded=type(folded).__name__,
        environment=Environment.capture("torch-eager", threads, warmup, runs, seed, ("torch",)),
        inputs={f"arg{i}": list(getattr(x, "shape", [])) for i, x in enumerate(inputs)},
    )
    ticker = _Ticker(progress, 2 * (warmup + runs))
    torch.manual_seed(seed)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            a_ms, b_ms = time_interleaved(
                lambda: original(*inputs), lambda: folded(*inputs), warmup, runs, ticker
            )
    finally:
        torch.set_num_threads(saved_threads)
    report.levels.append(LevelTiming.of("eager", a_ms, b_ms))
    return report


TORCH_SUFFIXES = (".pt2", ".pt", ".pth")


def _to_eval_mode(module: Any) -> None:
    # An ExportedProgram's module is traced for inference already and refuses eval().
    with contextlib.suppress(NotImplementedError):
        module.eval()


def bench_torch_files(
    original: str | os.PathLike[str],
    folded: str | os.PathLike[str] | None,
    shapes: Sequence[Sequence[int]],
    trust_pickle: bool = False,
    **kwargs: Any,
) -> BenchReport:
    """``bench_torch`` on ``.pt2`` programs (or trusted pickled modules), on random inputs.

    Args:
        original: the saved program or module.
        folded: the saved folded one; None folds ``original`` in memory.
        shapes: one shape per forward() argument; float32 ``randn`` inputs.
        trust_pickle: allow whole pickled modules, and .pt2 files that would run
            code (see :mod:`bnfold.torch_front.archive`).
        **kwargs: passed to ``bench_torch`` (threads, warmup, runs, seed, progress).
    """
    import torch

    module = load_torch_module(original, trust_pickle)
    torch.manual_seed(kwargs.get("seed", 0))
    inputs = [torch.randn(*shape) for shape in shapes]
    folds = None
    if folded is None:
        result = _fold_in_memory(original, module, tuple(inputs), trust_pickle)
        other, folds = result.model, len(result.report.folded)
    else:
        other = load_torch_module(folded, trust_pickle)
    report = bench_torch(module, other, inputs, **kwargs)
    report.original = os.fspath(original)
    report.folded = os.fspath(folded) if folded is not None else "(folded in memory)"
    report.folds = folds
    return report


def _fold_in_memory(
    path: str | os.PathLike[str], module: Any, inputs: tuple[Any, ...], trust_pickle: bool
) -> Any:
    """A .pt2 folds at the graph level (its module has no nn.Conv2d to fold into)."""
    if os.fspath(path).endswith(".pt2"):
        from bnfold.torch_front.io import load_exported_program
        from bnfold.torch_front.program.run import fold_graph_module

        program = load_exported_program(path, trust_pickle)
        return fold_graph_module(program.module, inputs)
    from bnfold import fold

    return fold(module, inputs)


def load_torch_module(path: str | os.PathLike[str], trust_pickle: bool = False) -> Any:
    """Load a ``.pt2`` exported program as its module, or, with ``trust_pickle``, a whole
    ``nn.Module`` saved with ``torch.save(module, path)``.

    Raises:
        BnfoldError: a pickled module without ``trust_pickle`` (unpickling can run
            code from the file), or the file does not hold an ``nn.Module``.
    """
    import torch

    if not os.fspath(path).endswith(".pt2") and not trust_pickle:
        raise BnfoldError(
            f"{os.fspath(path)}: a whole pickled module needs full unpickling, which can run "
            "code from the file; pass --trust-pickle if you trust it, or use a .pt2"
        )
    try:
        if os.fspath(path).endswith(".pt2"):
            from bnfold.torch_front.io import load_exported_program

            # Not torch.export.load: it can run code from the file (see torch_front.archive).
            return load_exported_program(path, trust_pickle).module()
        module = torch.load(path, weights_only=False, map_location="cpu")
    except BnfoldError:
        raise
    except Exception as err:
        raise BnfoldError(f"{os.fspath(path)}: cannot load a PyTorch module ({err})") from None
    if not isinstance(module, torch.nn.Module):
        raise BnfoldError(f"{os.fspath(path)}: holds a {type(module).__name__}, not an nn.Module")
    return module


def time_interleaved(
    run_a: Callable[[], Any],
    run_b: Callable[[], Any],
    warmup: int,
    runs: int,
    ticker: Callable[[], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Warm up, then time ``run_a`` and ``run_b`` in pairs; milliseconds per run.

    Pairs alternate their order (AB, BA, AB, ...): whichever model runs second
    finds caches warm from the first, and alternating gives that edge to each
    model half of the time instead of always to the same one.
    """
    tick = ticker or (lambda: None)
    for _ in range(warmup):
        run_a()
        tick()
        run_b()
        tick()
    a_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(runs):
        order = ((run_a, a_ms), (run_b, b_ms)) if i % 2 == 0 else ((run_b, b_ms), (run_a, a_ms))
        for run, times in order:
            times.append(_timed(run))
            tick()
    return a_ms, b_ms


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


class _Ticker:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def make_session(
    source: str | bytes, level: str, threads: int = 1, optimized_path: str | None = None
) -> ort.InferenceSession:
    """A CPU session at ``level`` with pinned threads; optionally save ORT's optimized graph.

    Raises:
        BnfoldError: unknown level or ORT cannot load the model.
    """
    import onnxruntime as ort

    if level not in LEVELS:
        raise BnfoldError(f"unknown level {level!r}; choose from {', '.join(LEVELS)}")
    member, disabled = LEVELS[level]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, member)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # the NCHWc "hardware specific" warning on save is expected
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(
            source, opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
        )
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BnfoldError(f"onnxruntime cannot load the model: {first}") from None


def optimized_op_types(model: Any, level: str) -> list[str]:
    """Op types of the graph ORT runs at ``level`` (``domain:op`` outside the default domain)."""
    import onnx

    with _ort_source(model) as src, tempfile.TemporaryDirectory(prefix="bnfold-opt-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        make_session(src, level, optimized_path=path)
        graph = onnx.load(path, load_external_data=False).graph
    return [f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node]


def random_feeds(
    session: ort.InferenceSession,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for every session input, as verification makes them.

    Dynamic dimensions are 1 unless ``shapes`` gives the input's shape.

    Raises:
        BnfoldError: an input type the harness cannot make (strings, sequences),
            a shape naming no input, or inputs over ``max_bytes`` (default: the
            verifier's cap), checked before any is allocated.
    """
    from bnfold.options import MAX_INPUT_BYTES
    from bnfold.verification.inputs import random_feeds
    from bnfold.verification.runtimes import ort_input_specs

    specs = ort_input_specs(session)
    limit = MAX_INPUT_BYTES if max_bytes is None else max_bytes
    return random_feeds(specs, np.random.default_rng(seed), shapes or {}, limit)


def file_feeds(session: ort.InferenceSession, inputs: str | os.PathLike[str]) -> dict[str, Any]:
    """The first sample of the user's input files, checked against the session's inputs."""
    from bnfold.verification.files import InputFiles, expected_of
    from bnfold.verification.runtimes import ort_input_specs

    expected = expected_of(ort_input_specs(session))
    return next(InputFiles.open(inputs).samples(expected))


def _feeds_for(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    names = [arg.name for arg in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BnfoldError(f"the folded model has inputs the original lacks: {missing}")
    return {n: feeds[n] for n in names}


def _runner(session: ort.InferenceSession, feeds: dict[str, Any]) -> Callable[[], Any]:
    return lambda: session.run(None, feeds)


def _check_args(levels: Sequence[str], threads: int, warmup: int, runs: int) -> None:
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise BnfoldError(f"unknown level {unknown[0]!r}; choose from {', '.join(LEVELS)}")
    if threads < 1 or warmup < 0 or runs < 1:
        raise BnfoldError("need threads >= 1, warmup >= 0 and runs >= 1")


@contextlib.contextmanager
def _ort_source(model: Any) -> Iterator[str | bytes]:
    """What ``InferenceSession`` takes: a path or bytes. Big or external-data
    in-memory models go through a temporary folder (protobuf caps at 2 GB)."""
    if isinstance(model, str | os.PathLike):
        if not Path(model).is_file():
            raise BnfoldError(f"{model}: no such file")
        yield os.fspath(model)
        return
    if isinstance(model, bytes):
        yield model
        return
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    if not _needs_file(model):
        yield ir.serde.serialize_model(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir.save(model, path, external_data="model.onnx.data")
        yield path


def _needs_file(model: ir.Model) -> bool:
    import onnx_ir as ir

    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                return True
            total += tensor.nbytes if tensor is not None else 0
    return total > _PROTOBUF_SAFE_BYTES


def _as_foldable(model: Any) -> Any:
    if isinstance(model, bytes):
        import onnx
        import onnx_ir as ir

        return ir.serde.deserialize_model(onnx.load_from_string(model))
    if isinstance(model, os.PathLike):
        return os.fspath(model)
    if not isinstance(model, str) and type(model).__name__ == "ModelProto":
        import onnx_ir as ir

        return ir.serde.deserialize_model(model)
    return model


def _describe(model: Any) -> str:
    if isinstance(model, str | os.PathLike):
        return os.fspath(model)
    name = getattr(getattr(model, "graph", None), "name", None)
    return f"({type(model).__name__}{' ' + name if name else ''})"



