"""Compare an original and a folded ONNX model on the same inputs: outputs and fold sites.

Both run in onnxruntime with ``ORT_DISABLE_ALL``: at its default level
onnxruntime fuses Conv+BatchNorm itself, so the "original" would already be
folded and a wrong fold could pass unnoticed. When onnxruntime cannot run the
original at all (opsets below 7, say), both models run in ONNX's reference
evaluator instead, if they are small enough for it; otherwise the result is
"not_verified" with the reason. So is a model whose declared input shapes would
need more than ``VerifyOptions.max_input_bytes`` of random inputs per sample:
the sizes are checked before anything is allocated. An original that a runtime
loads but that fails on the inputs, or whose graph is malformed, is bad input
(:class:`OriginalFails`, :func:`require_well_formed`).

Inputs are random draws or the user's files (:mod:`bnfold.feeds`), made one
sample at a time. Besides the outputs, each fold site and each continuous
value feeding a discontinuous op is compared (extra graph outputs of both
copies, in memory); each tensor's bound comes from :mod:`bnfold.tolerance`.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError, first_line
from bnfold.feeds import InputFiles, expected_of
from bnfold.onnx_front.cones import Cones, analyse
from bnfold.onnx_front.io import quiet_ir_logs
from bnfold.options import MAX_INPUT_BYTES
from bnfold.report import NotVerified, OutputDiff, VerifyResult
from bnfold.tolerance import derived_rtol, describe_basis, dtype_name

# Default rtol per output dtype, applied to the output's scale (max |reference|).
# fp32 folds typically land near 1e-7; 1e-5 leaves room for deep nets while a
# 1e-3 planted error still fails.
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
# The reference evaluator is plain numpy: fine for small models, hours for big ones.
REFERENCE_MAX_BYTES = 64 << 20
# The original's results are held in memory up to this share of the input cap
# (the rest wait on disk): with one sample's inputs (at most the cap) and the
# runtime's own activations, verification's peak stays near the cap it prints.
HELD_SHARE = 4
# Elements drawn at a time: the float64/int64 draw behind a narrower input
# dtype then takes one block beside the result, not a second full-size array.
_DRAW_BLOCK = 1 << 20

ORT_LEVEL = "ORT_DISABLE_ALL"
REFERENCE_LEVEL = "onnx.reference (onnxruntime cannot run the original)"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(bfloat16)": ml_dtypes.bfloat16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}  # fmt: skip


@dataclass(frozen=True)
class InputSpec:
    """One input a caller must feed: name, numpy dtype (None if unsupported), dims."""

    name: str
    dtype: Any
    dims: list[int | None]
    type_name: str


class _RuntimeFailure(Exception):
    """A runtime could not load or run a model; the message is one line."""


class _OriginalFailed(_RuntimeFailure):
    """The original model failed on the inputs: nothing to compare against."""


class OriginalFails(BnfoldError):
    """The original runs in no runtime that loaded it: bad input, not a fold to judge.

    A model that onnxruntime (or the reference evaluator) loads but that fails
    on its inputs is broken (a Conv weight of the wrong rank, parameters of the
    wrong shape), or the random inputs are not ones it accepts; either way there
    is nothing to compare a fold with, and publishing it would pass a broken
    model on as checked.
    """

    def __init__(self, reason: str, random: bool) -> None:
        hint = " (if the random inputs are the cause, pass --inputs with ones it accepts)"
        text = reason.rstrip(".")
        super().__init__(f"{text}; nothing to compare the fold with{hint if random else ''}")


class _FoldedFailed(_RuntimeFailure):
    """The folded model failed where the original ran: the fold broke it."""


@dataclass(frozen=True)
class FeedPlan:
    """One random input array to be made: name, concrete shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class InputsTooLarge(BnfoldError):
    """One sample of random inputs would need more than the cap; nothing was allocated."""

    def __init__(self, largest: FeedPlan, total: int, limit: int) -> None:
        self.largest, self.total, self.limit = largest, total, limit
        super().__init__(self._describe())

    def _describe(self) -> str:
        big = self.largest
        dims = "x".join(str(d) for d in big.shape)
        text = f"input {big.name!r} of shape {dims} ({big.dtype}) needs {_size(big.nbytes)}"
        if self.total != big.nbytes:
            text += f", all inputs of one sample {_size(self.total)}"
        return (
            f"{text}, over the {_size(self.limit)} limit for random inputs; "
            f"pass a smaller --shape {big.name}:DIMS (or raise --max-input-mib)"
        )


@dataclass(frozen=True)
class VerifyOptions:
    """How two models are compared.

    Attributes:
        atol: absolute tolerance.
        rtol: relative tolerance (of max |original|) for every compared tensor;
            None derives one per tensor from its dtype and the reductions behind
            it (:mod:`bnfold.tolerance`).
        samples: how many random input draws (unused with ``inputs``).
        seed: seed for the draws.
        shapes: concrete shapes for inputs with dynamic dimensions (others use 1).
        max_input_bytes: cap on one sample's random inputs, all inputs together;
            past it the result is "not_verified" (inputs_too_large). A quarter
            of it is the memory the original's results are held in; past it
            they wait on disk.
        inputs: the user's input file or folder (see :mod:`bnfold.feeds`)
            instead of random inputs.
    """

    atol: float = 0.0
    rtol: float | None = None
    samples: int = 3
    seed: int = 0
    shapes: Mapping[str, Sequence[int]] | None = None
    max_input_bytes: int = MAX_INPUT_BYTES
    inputs: str | os.PathLike[str] | None = None


DEFAULT_VERIFY = VerifyOptions()


@dataclass(frozen=True)
class SiteValue:
    """One fold site to compare: the value that carries its result in both models."""

    value: str  # in the original the removed affine's output, in the fold the op's
    site: str  # "conv1 -> bn1"


def verify_onnx(
    original: Any,
    folded: Any,
    options: VerifyOptions | None = None,
    sites: Sequence[SiteValue] | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output and every fold site.

    A tensor passes when ``max|folded - original| <= atol + rtol * max|original|``,
    rtol derived per tensor unless given (:mod:`bnfold.tolerance`). An output
    downstream of a discontinuous op (NonMaxSuppression, TopK, ...) that differs
    beyond its bound passes when every fold site was compared and lies within its
    own bound, and so does every continuous value feeding such an op: a box kept
    or dropped by a rounding error says nothing about the fold (see :func:`judge`);
    a site beyond its bound fails.

    Args:
        original: path or onnx_ir.Model of the unfolded model.
        folded: path or onnx_ir.Model of the folded model.
        options: tolerances, inputs (random draws or the user's files), shapes.
        sites: the fold sites to compare (from the fold report); None finds
            them: BatchNormalization outputs of the original that the folded
            model still names.

    Returns:
        A VerifyResult; status "not_verified" (with ``reason_code``) when no
        runtime can load the original (a custom op, an opset neither knows),
        or one sample of random inputs would exceed ``options.max_input_bytes``.

    Raises:
        OriginalFails: a runtime loaded the original but it failed on the inputs.
        BnfoldError: the original is malformed (no outputs, an undefined input,
            a cycle), the folded model cannot be run, the models' inputs differ,
            ``options.shapes`` names no input, or an input file does not fit.
    """
    o = options or VerifyOptions()
    with _as_path(original) as ref_path, _as_path(folded) as new_path:
        plan = _Plan.of(ref_path, new_path, sites)
        try:
            ref, runtime_kind, level = _original_runtime(ref_path, plan.extra)
            inputs = ref.inputs()
            feeds = FeedSource.of(inputs, o)
        except _RuntimeFailure as err:
            return _not_verified(NotVerified.ORIGINAL_NOT_RUNNABLE, str(err), o)
        except InputsTooLarge as err:
            return _not_verified(NotVerified.INPUTS_TOO_LARGE, str(err), o)
        names = ref.output_names()
        wanted = names + [v for v in dict.fromkeys(plan.extra) if v not in names]
        with _Held(o.max_input_bytes // HELD_SHARE) as expected:
            _run_original(ref, wanted, feeds, expected)
            # One model in memory at a time: a multi-GB model and its fold would need twice.
            del ref
            new = _folded_runtime(runtime_kind, new_path, plan.extra)
            _require_same_inputs(inputs, new.inputs())
            try:
                diffs = _compare_folded(new, wanted, feeds, expected)
            except _FoldedFailed as err:
                return VerifyResult(
                    "failed", o.atol, o.rtol or 0.0, feeds.count, reason=str(err),
                    inputs=feeds.describe(),
                )  # fmt: skip
    plan.rescale(diffs)
    return judge(
        [(n, diffs[n]) for n in names], [(s, diffs[s.value]) for s in plan.sites], plan.cones,
        o, feeds.count, level, feeds.describe(), every_site=plan.every_site,
        frontier=[(n, diffs[n]) for n in plan.frontier],
    )  # fmt: skip


@dataclass(frozen=True)
class _Plan:
    """What the two graphs say is worth comparing, read before anything runs."""

    sites: list[SiteValue]
    cones: Cones
    frontier: list[str]  # continuous values feeding a jump (see Cones.frontier)
    every_site: bool  # every fold site is among ``sites``
    # A compared tensor computed as a sum or difference -> its computed operands.
    operands: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, ref_path: Path, new_path: Path, sites: Sequence[SiteValue] | None) -> _Plan:
        """Read both models once; refuse a malformed original (see require_well_formed)."""
        ref_model, new_model = _load_or_none(ref_path), _load_or_none(new_path)
        if ref_model is not None:
            require_well_formed(ref_model.graph)
        compared = _comparable_sites(ref_model, new_model, sites)
        cones = analyse(ref_model) if ref_model is not None else Cones()
        # A value the fold removed (a BN parameter the exporter passed through
        # an Identity) has nothing to be compared with.
        in_fold = _producers(new_model.graph) if new_model is not None else {}
        frontier = sorted(v for v in cones.frontier if v in in_fold)
        # Without a fold report, every BN of the original gone from the fold is a
        # site; one whose value the fold no longer names (a fold before a Conv,
        # an identity tap) cannot be compared, and then the sites do not vouch.
        expected = len(sites) if sites is not None else _removed_batchnorms(ref_model, new_model)
        every = len(compared) == expected
        operands = {}
        if ref_model is not None:
            compared_names = [v.name for v in ref_model.graph.outputs if v.name] + frontier
            operands = _sum_operands(ref_model.graph, compared_names, set(in_fold))
        return cls(compared, cones, frontier, every, operands)

    @property
    def extra(self) -> list[str]:
        """The values both models must output besides their own outputs."""
        summed = [v for values in self.operands.values() for v in values]
        return [s.value for s in self.sites] + self.frontier + summed

    def rescale(self, diffs: dict[str, TensorDiff]) -> None:
        """Scale each sum or difference by its largest operand, not by itself.

        ``a - b`` of two large, nearly equal values carries the rounding errors
        of ``a`` and ``b``, which are relative to ``max|a|, max|b|``; measured
        against the small ``max|a - b|`` a correct fold would fail.
        """
        for name, values in self.operands.items():
            diff = diffs[name]
            largest = max(diffs[v].scale for v in values)
            if largest > diff.scale:
                diff.scale = largest
                diff.scaled_by = values


_SUM_OPS = frozenset({"Add", "Sub", "Sum"})


def _sum_operands(graph: ir.Graph, names: Sequence[str], in_fold: set[str]) -> dict[str, list[str]]:
    """For each of ``names`` made by Add/Sub/Sum: the operands both models compute."""
    wanted = set(names)
    out = {}
    for node in graph:
        if node.op_type not in _SUM_OPS or not node.outputs or node.outputs[0].name not in wanted:
            continue
        values = [
            v.name
            for v in node.inputs
            if v is not None and v.name in in_fold and v.producer() is not None
        ]
        if len(values) >= 2:
            out[node.outputs[0].name] = values  # type: ignore[index]
    return out


def _run_original(ref: Any, wanted: list[str], feeds: FeedSource, expected: _Held) -> None:
    """Run the original on every sample, keeping its results in ``expected``."""
    try:
        for feed in feeds.samples():
            expected.append(_run(ref, wanted, feed, _OriginalFailed, "original"))
            del feed  # before the next sample is made
    except _OriginalFailed as err:
        raise OriginalFails(str(err), random=feeds.files is None) from None


def _compare_folded(
    new: Any, wanted: list[str], feeds: FeedSource, expected: _Held
) -> dict[str, TensorDiff]:
    """Run the fold on every sample and compare each result with the original's, then drop both."""
    diffs = {name: TensorDiff() for name in wanted}
    for i, feed in enumerate(feeds.samples()):
        got = _run(new, wanted, feed, _FoldedFailed, "folded")
        del feed
        for name, r, n in zip(wanted, expected.pop(i), got, strict=True):
            diffs[name].add(r, n)
        del got
    return diffs


def require_well_formed(graph: ir.Graph) -> None:
    """Refuse an original whose main graph cannot be evaluated as written.

    Raises:
        BnfoldError: the graph has no outputs (nothing to compute or compare), a
            node reads a value nothing defines, or reads one a later node computes
            (a cycle, or nodes out of order).
    """
    if not graph.outputs:
        raise BnfoldError("the original model has no graph outputs: nothing to compute")
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    later = {v.name for node in graph for v in node.outputs if v.name}
    for node in graph:
        for value in node.inputs:
            if value is None or not value.name or value.name in defined:
                continue
            where = f"node {node.name or node.op_type!r} reads {value.name!r}"
            if value.name in later:
                raise BnfoldError(
                    f"the original model is malformed: {where} before it is computed "
                    "(a cycle, or nodes out of order)"
                )
            raise BnfoldError(f"the original model is malformed: {where}, which nothing defines")
        defined.update(v.name for v in node.outputs if v.name)


def _load_or_none(path: Path) -> ir.Model | None:
    """The model at ``path`` (external data mapped), or None: the runtimes will say why."""
    try:
        with quiet_ir_logs():
            return ir.load(path)
    except Exception:  # onnx/protobuf raise assorted types
        return None


def _not_verified(code: NotVerified, reason: str, o: VerifyOptions) -> VerifyResult:
    return VerifyResult("not_verified", o.atol, o.rtol or 0.0, 0, reason=reason, reason_code=code)


def _original_runtime(path: Path, extra: Sequence[str] = ()) -> tuple[Any, type, str]:
    """onnxruntime at ORT_DISABLE_ALL, else the reference evaluator for small models."""
    try:
        return _OrtRuntime(path, extra), _OrtRuntime, ORT_LEVEL
    except _RuntimeFailure as ort_error:
        reason = f"onnxruntime cannot run the original model: {ort_error}"
        if _model_bytes(path) > REFERENCE_MAX_BYTES:
            raise _RuntimeFailure(f"{reason}; too large for the reference evaluator") from None
        try:
            return _ReferenceRuntime(path, extra), _ReferenceRuntime, REFERENCE_LEVEL
        except _RuntimeFailure as ref_error:
            raise _RuntimeFailure(f"{reason}; reference evaluator: {ref_error}") from None


def _folded_runtime(kind: type, path: Path, extra: Sequence[str] = ()) -> Any:
    """The folded model in the runtime that ran the original: the same kernels."""
    try:
        return kind(path, extra)
    except _RuntimeFailure as err:
        raise BnfoldError(f"the runtime cannot load the folded model: {err}") from None


def _with_outputs(path: Path, extra: Sequence[str]) -> tuple[Any, list[str]]:
    """The model at ``path`` as a proto (external data left on disk) that also outputs
    ``extra``, and the names of its own outputs.

    The values get no declared type: both runtimes infer it, and a wrong
    declaration would be one more way to fail. Read once: parsing a 100 MB model
    costs about 0.1 s.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises assorted types
        raise _RuntimeFailure(first_line(err)) from None
    declared = [o.name for o in proto.graph.output]
    present = set(declared)
    for name in extra:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto, declared


class _OrtRuntime:
    """onnxruntime on CPU with every graph optimization off (and no memory arena).

    The arena would keep the peak of every run reserved for the session's life;
    verification runs a few large samples, not many small ones, so it gains
    nothing from it and would hold several copies of the largest activation.
    """

    def __init__(self, path: Path, extra: Sequence[str] = ()) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False
        source: str | bytes = str(path)
        self.declared: list[str] | None = None
        if extra:
            proto, self.declared = _with_outputs(path, extra)
            source = proto.SerializeToString()
            # Loaded from bytes, external data resolves against the model's folder only if told.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise _RuntimeFailure(first_line(err)) from None

    def inputs(self) -> list[InputSpec]:
        return ort_input_specs(self.session)

    def output_names(self) -> list[str]:
        """The model's own outputs, without the sites added for verification."""
        names = [o.name for o in self.session.get_outputs()]
        return names if self.declared is None else [n for n in names if n in self.declared]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        return self.session.run(names, feeds)  # type: ignore[no-any-return]


class _ReferenceRuntime:
    """onnx's reference evaluator: slow, but it implements every opset."""

    def __init__(self, path: Path, extra: Sequence[str] = ()) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.proto = onnx.load(str(path))
        except Exception as err:
            raise _RuntimeFailure(first_line(err)) from None
        self.outputs = [o.name for o in self.proto.graph.output]
        newest = onnx.defs.onnx_opset_version()
        for opset in self.proto.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version > newest:
                # Unknown future semantics: running it with today's kernels proves nothing.
                raise _RuntimeFailure(f"opset {opset.version} is newer than onnx knows ({newest})")
        try:
            self.evaluator = ReferenceEvaluator(self.proto)
        except Exception as err:  # the evaluator raises assorted types
            raise _RuntimeFailure(first_line(err)) from None

    def inputs(self) -> list[InputSpec]:
        import onnx

        graph = self.proto.graph
        initializers = {t.name for t in graph.initializer}
        specs = []
        for value in graph.input:
            if value.name in initializers:
                continue  # IR < 4 lists initializers as inputs: not for callers to feed
            tensor = value.type.tensor_type
            dtype = (
                onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
            )
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            specs.append(InputSpec(value.name, dtype, dims, str(tensor.elem_type)))
        return specs

    def output_names(self) -> list[str]:
        return list(self.outputs)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        # The evaluator keeps every intermediate result: a site is asked for by name.
        return list(self.evaluator.run(names, feeds))


def ort_input_specs(session: Any) -> list[InputSpec]:
    """What an onnxruntime session wants fed: name, numpy dtype, dims (None if dynamic)."""
    return [
        InputSpec(i.name, _ORT_TYPES.get(i.type), _dims(i.shape), i.type)
        for i in session.get_inputs()
    ]


def _dims(shape: Sequence[Any]) -> list[int | None]:
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _model_bytes(path: Path) -> int:
    folder = path.parent
    return path.stat().st_size + sum(p.stat().st_size for p in folder.glob(f"{path.name}*.data"))


class FeedSource:
    """The inputs each sample feeds: random draws, or the user's files.

    Samples are made (or read) one at a time, and again for the second model,
    so only one sample is in memory at a time; random draws restart from the
    seed and come out the same.
    """

    def __init__(self, inputs: list[InputSpec], options: VerifyOptions) -> None:
        self.options = options
        self.files: InputFiles | None = None
        if options.inputs is not None:
            if options.shapes:
                raise BnfoldError("--shape sets the shapes of random inputs; --inputs has its own")
            self.files = InputFiles.open(options.inputs)
            self.expected = expected_of(inputs)
        else:
            self.plans = plan_feeds(inputs, options.shapes or {})
            require_within(self.plans, options.max_input_bytes)

    @classmethod
    def of(cls, inputs: list[InputSpec], options: VerifyOptions) -> FeedSource:
        return cls(inputs, options)

    @property
    def count(self) -> int:
        return len(self.files.files) if self.files is not None else self.options.samples

    def describe(self) -> str:
        """``"3 random samples (seed 0)"`` or ``"1 sample from file x.npz"``."""
        if self.files is not None:
            return self.files.describe()
        n = self.options.samples
        return f"{n} random sample{'s' if n != 1 else ''} (seed {self.options.seed})"

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        if self.files is not None:
            yield from self.files.samples(self.expected)
            return
        rng = np.random.default_rng(self.options.seed)
        for _ in range(self.options.samples):
            yield {p.name: _random_array(rng, p.shape, p.dtype) for p in self.plans}


class _Held:
    """The original's results per sample: in memory up to a byte budget, on disk past it.

    Verification would otherwise hold every sample's outputs (and sites) at once;
    past the budget each array waits in a temporary .npy file and is read back
    memory-mapped, one sample at a time.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.samples: list[list[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.samples.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def append(self, results: list[Any]) -> None:
        kept = []
        for j, value in enumerate(results):
            if _spillable(value) and value.nbytes <= self.budget:
                self.budget -= value.nbytes
                kept.append(value)
            elif _spillable(value):
                kept.append(self._spill(value, f"{len(self.samples)}_{j}.npy"))
            else:
                kept.append(value)  # a sequence or map output: small, kept as is
        self.samples.append(kept)

    def pop(self, i: int) -> list[Any]:
        """Sample ``i``'s results (spilled ones memory-mapped), no longer held here."""
        values, self.samples[i] = self.samples[i], []
        return [np.load(v, mmap_mode="r") if isinstance(v, Path) else v for v in values]

    def _spill(self, value: np.ndarray, name: str) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bnfold-verify-")
        path = Path(self._tmp.name) / name
        np.save(path, value, allow_pickle=False)
        return path


def _spillable(value: Any) -> bool:
    # bfloat16 (ml_dtypes) would come back from .npy as raw bytes: kept in memory.
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"


@dataclass
class TensorDiff:
    """The worst difference of one compared tensor over every sample."""

    max_abs: float = 0.0
    scale: float = 0.0  # max |original| over finite values (of the operands: see _Plan.rescale)
    dtype: str = ""
    elements: int = 0
    scaled_by: list[str] = field(default_factory=list)

    def add(self, ref: Any, new: Any) -> None:
        ref, new = np.asarray(ref), np.asarray(new)
        max_abs, scale = abs_error(ref, new)
        self.max_abs, self.scale = max(self.max_abs, max_abs), max(self.scale, scale)
        self.dtype = dtype_name(ref.dtype)
        self.elements = max(self.elements, ref.size)


def judge(
    outputs: Sequence[tuple[str, TensorDiff]],
    sites: Sequence[tuple[SiteValue, TensorDiff]],
    cones: Cones,
    options: VerifyOptions,
    samples: int,
    level: str,
    inputs: str,
    every_site: bool = True,
    frontier: Sequence[tuple[str, TensorDiff]] = (),
) -> VerifyResult:
    """The verdict: each output and site against its bound; discontinuous outputs by the evidence.

    A discontinuous output that differs beyond its bound passes only when every
    fold site and every frontier value (each continuous tensor that feeds a
    discontinuous op: the scores and boxes going into NonMaxSuppression) lies
    within its own bound: then nothing before the jump moved more than a
    correct fold's rounding. Frontier values judge nothing else: a difference
    there fails only the outputs it would have vouched for.

    Args:
        every_site: every fold site was compared (a site inside a subgraph
            cannot be); only then can sites vouch for a discontinuous output.
        frontier: the continuous values feeding discontinuous ops.
    """
    site_rows = [_row(s.value, d, cones, options, site=s.site) for s, d in sites]
    edge_rows = [_row(n, d, cones, options, site="feeds a discontinuous op") for n, d in frontier]
    sites_hold = bool(site_rows) and every_site and all(r.passed for r in site_rows)
    sites_hold = sites_hold and all(r.passed for r in edge_rows)
    rows = []
    for name, diff in outputs:
        row = _row(name, diff, cones, options)
        if not row.passed and sites_hold and name in cones.discontinuous:
            row = replace(row, passed=True, judged_by="sites")
        rows.append(row)
    passed = all(r.passed for r in rows) and all(r.passed for r in site_rows)
    used = options.rtol if options.rtol is not None else max((r.rtol for r in rows), default=0.0)
    return VerifyResult(
        "passed" if passed else "failed", options.atol, used, samples, rows,
        optimization_level=level, inputs=inputs, sites=site_rows,
        derived=options.rtol is None, frontier=edge_rows,
    )  # fmt: skip


def _row(
    name: str, diff: TensorDiff, cones: Cones, options: VerifyOptions, site: str = ""
) -> OutputDiff:
    reductions = cones.of(name)
    if options.rtol is None:
        rtol = derived_rtol(diff.dtype, reductions, diff.elements)
        basis = describe_basis(diff.dtype, reductions, diff.elements)
    else:
        rtol, basis = options.rtol, "--rtol"
    if diff.scaled_by:
        basis += f"; scale max|{', '.join(diff.scaled_by)}|"
    return measured(name, diff.max_abs, diff.scale, options.atol, rtol, basis, site)


def measured(
    name: str, max_abs: float, scale: float, atol: float, rtol: float, basis: str, site: str = ""
) -> OutputDiff:
    """One compared tensor's row: passes when ``max_abs <= atol + rtol * scale``."""
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    needed = max(0.0, (max_abs - atol) / scale) if scale > 0 else rel
    passed = bool(max_abs <= atol + rtol * scale)
    return OutputDiff(name, max_abs, rel, needed, passed, rtol=rtol, basis=basis, site=site)


def summarize(
    worst: dict[str, tuple[float, float, str]],
    atol: float,
    rtol: float | None,
    samples: int,
    level: str,
) -> VerifyResult:
    """The verdict from each output's (max abs error, max |reference|, dtype name).

    An output passes when ``max_abs <= atol + rtol * scale``; rtol None takes
    :data:`DEFAULT_RTOL` of the output's dtype. Used by the torch front, which
    does not know the reductions behind an output.
    """
    outputs = []
    for name, (max_abs, scale, dtype) in worst.items():
        tol = DEFAULT_RTOL.get(dtype, 0.0) if rtol is None else rtol
        basis = f"{dtype} default" if rtol is None else "--rtol"
        outputs.append(measured(name, max_abs, scale, atol, tol, basis))
    status = "passed" if all(o.passed for o in outputs) else "failed"
    used_rtol = rtol if rtol is not None else max((o.rtol for o in outputs), default=0.0)
    return VerifyResult(status, atol, used_rtol, samples, outputs, optimization_level=level)


# Elements compared at a time: the float64 views of one chunk, never of a whole output.
_COMPARE_CHUNK = 1 << 18


def abs_error(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(max |new - ref|, max |ref| over finite values); NaN where ref is not NaN counts as inf.

    Compared a chunk at a time, in float64: a 1 GB output costs a few MB more,
    not five float64 copies of itself.
    """
    floating = ref.dtype.kind in "fc" or ref.dtype == ml_dtypes.bfloat16
    if ref.shape != new.shape:
        return float("inf"), (_max_finite(ref) if floating else 1.0)
    if not floating:
        return float(np.any(ref != new)), 1.0
    r_flat, n_flat = ref.reshape(-1), new.reshape(-1)
    max_abs = scale = 0.0
    for start in range(0, r_flat.size, _COMPARE_CHUNK):
        r = r_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        n = n_flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        agree = (r == n) | (np.isnan(r) & np.isnan(n))  # also equal infinities
        with np.errstate(invalid="ignore"):  # inf - inf: handled by `agree`
            diff = np.where(agree, 0.0, np.abs(r - n))
        diff[np.isnan(diff)] = np.inf
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        scale = max(scale, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    return max_abs, scale


def _max_finite(a: np.ndarray) -> float:
    flat = a.reshape(-1)
    best = 0.0
    for start in range(0, flat.size, _COMPARE_CHUNK):
        r = flat[start : start + _COMPARE_CHUNK].astype(np.float64)
        best = max(best, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    return best


def _comparable_sites(
    ref: ir.Model | None, new: ir.Model | None, sites: Sequence[SiteValue] | None
) -> list[SiteValue]:
    """The sites whose value both main graphs compute (a later fold may have renamed one).

    Without a fold report (``sites`` None), a site is a BatchNormalization output
    of the original that the folded model computes with another op.
    """
    if ref is None or new is None:
        return []
    original, folded = _producers(ref.graph), _producers(new.graph)
    if sites is None:
        sites = [
            SiteValue(value, f"{node} (BatchNormalization)")
            for value, (op, node) in original.items()
            if op == "BatchNormalization" and folded.get(value, (op, ""))[0] != op
        ]
    return [s for s in sites if s.value in original and s.value in folded]


def _removed_batchnorms(ref: ir.Model | None, new: ir.Model | None) -> int:
    """How many BatchNormalization outputs of the original no BN computes in the fold."""
    if ref is None or new is None:
        return 0
    folded = _producers(new.graph)
    return sum(
        1
        for value, (op, _) in _producers(ref.graph).items()
        if op == "BatchNormalization" and folded.get(value, ("", ""))[0] != op
    )


def _producers(graph: ir.Graph) -> dict[str, tuple[str, str]]:
    """Each value of the main graph, by name -> (op type, node name) computing it."""
    out = {v.name: ("", "") for v in graph.inputs if v.name}
    for node in graph:
        out.update({v.name: (node.op_type, node.name or "") for v in node.outputs if v.name})
    return out


@contextlib.contextmanager
def _as_path(source: Any) -> Iterator[Path]:
    """A file path for the runtimes; in-memory models are saved to a temp folder."""
    if isinstance(source, str | os.PathLike):
        yield Path(source)
        return
    if not isinstance(source, ir.Model):
        raise BnfoldError(f"cannot verify a {type(source).__name__}; pass a path or onnx_ir.Model")
    from bnfold.onnx_front.io import save_model

    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(source, path)
        yield path


def _require_same_inputs(a: list[InputSpec], b: list[InputSpec]) -> None:
    names_a, names_b = sorted(i.name for i in a), sorted(i.name for i in b)
    if names_a != names_b:
        raise BnfoldError(f"the models have different inputs: {names_a} vs {names_b}")


def random_feeds(
    inputs: list[InputSpec],
    rng: np.random.Generator,
    shapes: Mapping[str, Sequence[int]],
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """One random array per input: right dtype, dynamic dims from ``shapes`` or 1.

    Raises:
        InputsTooLarge: the arrays together would exceed ``max_bytes`` (None: no
            cap); checked before any is allocated.
        BnfoldError: ``shapes`` names no input, or an input type cannot be made.
    """
    plans = plan_feeds(inputs, shapes)
    if max_bytes is not None:
        require_within(plans, max_bytes)
    return {p.name: _random_array(rng, p.shape, p.dtype) for p in plans}


def plan_feeds(inputs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[FeedPlan]:
    """The array each input needs, without allocating it: ``shapes`` override, dynamic dims 1.

    Raises:
        BnfoldError: ``shapes`` names no input or gives one a shape it cannot
            take (see :func:`require_fits`), or an input type cannot be made.
    """
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise BnfoldError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    plans = []
    for spec in inputs:
        if spec.dtype is None:
            raise BnfoldError(
                f"input {spec.name!r} has type {spec.type_name}; verify cannot make it"
            )
        if spec.name in shapes:
            shape = tuple(shapes[spec.name])
            require_fits(spec, shape)
        else:
            shape = tuple(1 if d is None else d for d in spec.dims)
        plans.append(FeedPlan(spec.name, shape, np.dtype(spec.dtype)))
    return plans


def require_fits(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """Refuse a ``--shape`` the input cannot take, before onnxruntime does less clearly.

    Every dimension must be positive (a zero-size input compares nothing); the
    rank and every fixed dimension must be the model's.

    Raises:
        BnfoldError: naming the input, the dimension and both values.
    """
    if any(d < 1 for d in shape):
        text = "x".join(map(str, shape))
        raise BnfoldError(f"--shape {spec.name}: every dimension must be positive, got {text}")
    if not spec.dims:  # onnxruntime reports an unknown rank and a scalar alike, as []
        return
    declared = "x".join("?" if d is None else str(d) for d in spec.dims)
    if len(shape) != len(spec.dims):
        raise BnfoldError(
            f"--shape {spec.name}: the input has {len(spec.dims)} dimensions ({declared}), "
            f"the shape gives {len(shape)}"
        )
    for axis, (fixed, given) in enumerate(zip(spec.dims, shape, strict=True)):
        if fixed is not None and fixed != given:
            raise BnfoldError(
                f"--shape {spec.name}: dimension {axis} of the input is fixed at {fixed} "
                f"({declared}), the shape gives {given}"
            )


def require_within(plans: Sequence[FeedPlan], max_bytes: int) -> None:
    """Raise InputsTooLarge, naming the largest input, if ``plans`` need over ``max_bytes``."""
    total = sum(p.nbytes for p in plans)
    if total > max_bytes:
        raise InputsTooLarge(max(plans, key=lambda p: p.nbytes), total, max_bytes)


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Standard normal floats, 0/1 integers and bools, drawn block by block.

    Drawing in blocks gives the same values as one draw of the whole shape.
    """
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)  # a view: np.empty is contiguous
    for start in range(0, flat.size, _DRAW_BLOCK):
        n = min(_DRAW_BLOCK, flat.size - start)
        flat[start : start + n] = _draw(rng, n, dtype)
    return out


def _draw(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f" or dtype == ml_dtypes.bfloat16:
        return rng.standard_normal(n).astype(dtype)
    # Integer inputs are usually indices or sizes, bools are masks: keep them 0/1.
    return rng.integers(0, 2, n).astype(dtype)


def _size(nbytes: int) -> str:
    """``51539607552`` -> ``"48.0 GiB"``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _run(
    runtime: Any,
    names: list[str],
    feeds: dict[str, np.ndarray],
    failure: type[_RuntimeFailure],
    which: str,
) -> list[Any]:
    try:
        return runtime.run(names, feeds)  # type: ignore[no-any-return]
    except Exception as err:  # runtimes raise their own exception types
        raise failure(f"the {which} model failed to run: {first_line(err)}") from None


def parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["input:1x3x224x224"]`` -> ``{"input": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise BnfoldError(f"bad --shape {spec!r}; expected name:1x3x224x224") from None
    return shapes
