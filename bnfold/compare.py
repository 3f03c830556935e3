"""Compare an original and a folded ONNX model on the same random inputs.

Both run in onnxruntime with ``ORT_DISABLE_ALL``: at its default level
onnxruntime fuses Conv+BatchNorm itself, so the "original" would already be
folded and a wrong fold could pass unnoticed. When onnxruntime cannot run the
original at all (opsets below 7, say), both models run in ONNX's reference
evaluator instead, if they are small enough for it; otherwise the result is
"not_verified" with the reason. So is a model whose declared input shapes would
need more than ``VerifyOptions.max_input_bytes`` of random inputs per sample:
the sizes are checked before anything is allocated.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError, first_line
from bnfold.options import MAX_INPUT_BYTES
from bnfold.report import NotVerified, OutputDiff, VerifyResult

# Default rtol per output dtype, applied to the output's scale (max |reference|).
# fp32 folds typically land near 1e-7; 1e-5 leaves room for deep nets while a
# 1e-3 planted error still fails.
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
# The reference evaluator is plain numpy: fine for small models, hours for big ones.
REFERENCE_MAX_BYTES = 64 << 20
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
    """The original model failed on the random inputs: nothing to compare against."""


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
        rtol: relative tolerance (of max |original|); None picks one from the output dtype.
        samples: how many random input draws.
        seed: seed for the draws.
        shapes: concrete shapes for inputs with dynamic dimensions (others use 1).
        max_input_bytes: cap on one sample's random inputs, all inputs together;
            past it the result is "not_verified" (inputs_too_large).
    """

    atol: float = 0.0
    rtol: float | None = None
    samples: int = 3
    seed: int = 0
    shapes: Mapping[str, Sequence[int]] | None = None
    max_input_bytes: int = MAX_INPUT_BYTES


DEFAULT_VERIFY = VerifyOptions()


def verify_onnx(original: Any, folded: Any, options: VerifyOptions | None = None) -> VerifyResult:
    """Run both models on random inputs and compare every output.

    An output passes when ``max|folded - original| <= atol + rtol * max|original|``.

    Args:
        original: path or onnx_ir.Model of the unfolded model.
        folded: path or onnx_ir.Model of the folded model.
        options: tolerances, draws and input shapes.

    Returns:
        A VerifyResult; status "not_verified" (with ``reason_code``) when no
        runtime can run the original, the original fails on the random inputs,
        or one sample of inputs would exceed ``options.max_input_bytes``.

    Raises:
        BnfoldError: the folded model cannot be run, the models' inputs differ,
            or ``options.shapes`` names no input.
    """
    o = options or VerifyOptions()
    atol, rtol, samples = o.atol, o.rtol, o.samples
    with _as_path(original) as ref_path, _as_path(folded) as new_path:
        try:
            ref, runtime_kind, level = _original_runtime(ref_path)
            inputs, names = ref.inputs(), ref.output_names()
            rng = np.random.default_rng(o.seed)
            all_feeds = [
                random_feeds(inputs, rng, o.shapes or {}, max_bytes=o.max_input_bytes)
                for _ in range(samples)
            ]
            expected = [_run(ref, names, f, _OriginalFailed, "original") for f in all_feeds]
        except _OriginalFailed as err:
            return _not_verified(NotVerified.ORIGINAL_FAILED, str(err), o)
        except _RuntimeFailure as err:
            return _not_verified(NotVerified.ORIGINAL_NOT_RUNNABLE, str(err), o)
        except InputsTooLarge as err:
            return _not_verified(NotVerified.INPUTS_TOO_LARGE, str(err), o)
        # One model in memory at a time: a multi-GB model and its fold would need twice.
        del ref
        new = _folded_runtime(runtime_kind, new_path)
        _require_same_inputs(inputs, new.inputs())
        try:
            got = [_run(new, names, f, _FoldedFailed, "folded") for f in all_feeds]
        except _FoldedFailed as err:
            return VerifyResult("failed", atol, rtol or 0.0, samples, reason=str(err))
    worst: dict[str, tuple[float, float, str]] = {}
    for ref_outputs, new_outputs in zip(expected, got, strict=True):
        for name, r, n in zip(names, ref_outputs, new_outputs, strict=True):
            max_abs, scale = abs_error(np.asarray(r), np.asarray(n))
            prev = worst.get(name, (0.0, 0.0, ""))
            worst[name] = (max(prev[0], max_abs), max(prev[1], scale), str(np.asarray(r).dtype))
    return summarize(worst, atol, rtol, samples, level)


def _not_verified(code: NotVerified, reason: str, o: VerifyOptions) -> VerifyResult:
    return VerifyResult("not_verified", o.atol, o.rtol or 0.0, 0, reason=reason, reason_code=code)


def _original_runtime(path: Path) -> tuple[Any, type, str]:
    """onnxruntime at ORT_DISABLE_ALL, else the reference evaluator for small models."""
    try:
        return _OrtRuntime(path), _OrtRuntime, ORT_LEVEL
    except _RuntimeFailure as ort_error:
        reason = f"onnxruntime cannot run the original model: {ort_error}"
        if _model_bytes(path) > REFERENCE_MAX_BYTES:
            raise _RuntimeFailure(f"{reason}; too large for the reference evaluator") from None
        try:
            return _ReferenceRuntime(path), _ReferenceRuntime, REFERENCE_LEVEL
        except _RuntimeFailure as ref_error:
            raise _RuntimeFailure(f"{reason}; reference evaluator: {ref_error}") from None


def _folded_runtime(kind: type, path: Path) -> Any:
    """The folded model in the runtime that ran the original: the same kernels."""
    try:
        return kind(path)
    except _RuntimeFailure as err:
        raise BnfoldError(f"the runtime cannot load the folded model: {err}") from None


class _OrtRuntime:
    """onnxruntime on CPU with every graph optimization off."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise _RuntimeFailure(first_line(err)) from None

    def inputs(self) -> list[InputSpec]:
        return ort_input_specs(self.session)

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        return self.session.run(names, feeds)  # type: ignore[no-any-return]


class _ReferenceRuntime:
    """onnx's reference evaluator: slow, but it implements every opset."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.proto = onnx.load(str(path))
        except Exception as err:
            raise _RuntimeFailure(first_line(err)) from None
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
        return [o.name for o in self.proto.graph.output]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
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


def summarize(
    worst: dict[str, tuple[float, float, str]],
    atol: float,
    rtol: float | None,
    samples: int,
    level: str,
) -> VerifyResult:
    """The verdict from each output's (max abs error, max |reference|, dtype name).

    An output passes when ``max_abs <= atol + rtol * scale``; rtol None takes
    :data:`DEFAULT_RTOL` of the output's dtype. Shared by both fronts.
    """
    outputs = []
    rtols = []
    for name, (max_abs, scale, dtype) in worst.items():
        tol = DEFAULT_RTOL.get(dtype, 0.0) if rtol is None else rtol
        rtols.append(tol)
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        needed = max(0.0, (max_abs - atol) / scale) if scale > 0 else rel
        passed = bool(max_abs <= atol + tol * scale)
        outputs.append(OutputDiff(name, max_abs, rel, needed, passed))
    status = "passed" if all(o.passed for o in outputs) else "failed"
    used_rtol = rtol if rtol is not None else max(rtols, default=0.0)
    return VerifyResult(status, atol, used_rtol, samples, outputs, optimization_level=level)


def abs_error(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """(max |new - ref|, max |ref| over finite values); NaN where ref is not NaN counts as inf."""
    if ref.shape != new.shape:
        return float("inf"), 1.0
    if ref.dtype.kind not in "fc":
        return float(np.any(ref != new)), 1.0
    r, n = ref.astype(np.float64), new.astype(np.float64)
    agree = (r == n) | (np.isnan(r) & np.isnan(n))  # also equal infinities
    with np.errstate(invalid="ignore"):  # inf - inf: handled by `agree`
        diff = np.where(agree, 0.0, np.abs(r - n))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(r[np.isfinite(r)])
    return float(diff.max(initial=0.0)), float(finite.max(initial=0.0))


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
