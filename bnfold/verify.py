"""Compare an original and a folded ONNX model on the same random inputs.

Both run in onnxruntime with ``ORT_DISABLE_ALL``: at its default level
onnxruntime fuses Conv+BatchNorm itself, so the "original" would already be
folded and a wrong fold could pass unnoticed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.report import OutputDiff, VerifyResult

ModelSource = "str | os.PathLike[str] | ir.Model"

# Default rtol per output dtype, applied to the output's scale (max |reference|).
# fp32 folds typically land near 1e-7; 1e-5 leaves room for deep nets while a
# 1e-3 planted error still fails.
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}  # fmt: skip


def verify_onnx(
    original: Any,
    folded: Any,
    *,
    atol: float = 0.0,
    rtol: float | None = None,
    samples: int = 3,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> VerifyResult:
    """Run both models on ``samples`` random inputs and compare every output.

    An output passes when ``max|folded - original| <= atol + rtol * max|original|``.

    Args:
        original: path or onnx_ir.Model of the unfolded model.
        folded: path or onnx_ir.Model of the folded model.
        atol: absolute tolerance.
        rtol: relative tolerance; None picks one from the output dtype.
        samples: how many random input draws.
        seed: seed for the draws.
        shapes: concrete shapes for inputs with dynamic dimensions (others use 1).

    Returns:
        A VerifyResult; status "not_verified" when onnxruntime cannot run the original.

    Raises:
        BnfoldError: the folded model cannot be run, or the models' inputs differ.
    """
    try:
        ref_session = _session(original)
    except _OrtFailure as err:
        return VerifyResult(
            "not_verified",
            atol,
            rtol or 0.0,
            0,
            reason=f"onnxruntime cannot run the original model: {err}",
        )
    try:
        new_session = _session(folded)
    except _OrtFailure as err:
        raise BnfoldError(f"onnxruntime cannot run the folded model: {err}") from None
    _require_same_inputs(ref_session, new_session)
    rng = np.random.default_rng(seed)
    worst: dict[str, tuple[float, float, str]] = {}
    for _ in range(samples):
        feeds = random_feeds(ref_session, rng, shapes or {})
        for name, ref, new in _run_pair(ref_session, new_session, feeds):
            max_abs, scale = _abs_error(ref, new)
            prev = worst.get(name, (0.0, 0.0, ""))
            worst[name] = (max(prev[0], max_abs), max(prev[1], scale), str(ref.dtype))
    return _result(worst, atol, rtol, samples)


def _result(
    worst: dict[str, tuple[float, float, str]], atol: float, rtol: float | None, samples: int
) -> VerifyResult:
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
    return VerifyResult(status, atol, used_rtol, samples, outputs)


def _abs_error(ref: np.ndarray, new: np.ndarray) -> tuple[float, float]:
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


class _OrtFailure(Exception):
    pass


def _session(source: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        with _as_path(source) as path:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise _OrtFailure(_first_line(err)) from None


@contextlib.contextmanager
def _as_path(source: Any) -> Iterator[Path]:
    """A file path for onnxruntime; in-memory models are saved to a temp folder."""
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


def _require_same_inputs(a: Any, b: Any) -> None:
    names_a = sorted(i.name for i in a.get_inputs())
    names_b = sorted(i.name for i in b.get_inputs())
    if names_a != names_b:
        raise BnfoldError(f"the models have different inputs: {names_a} vs {names_b}")


def random_feeds(
    session: Any, rng: np.random.Generator, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """One random array per session input: right dtype, dynamic dims from ``shapes`` or 1."""
    feeds = {}
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise BnfoldError(
                f"input {inp.name!r} has type {inp.type}, which verify cannot generate"
            )
        shape = (
            list(shapes[inp.name])
            if inp.name in shapes
            else [d if isinstance(d, int) and d >= 0 else 1 for d in inp.shape]
        )
        feeds[inp.name] = _random_array(rng, shape, np.dtype(dtype))
    return feeds


def _random_array(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    # Integer inputs are usually indices or sizes: keep them small and valid.
    return rng.integers(0, 2, shape).astype(dtype)


def _run_pair(
    ref: Any, new: Any, feeds: dict[str, np.ndarray]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    names = [o.name for o in ref.get_outputs()]
    ref_out = _run(ref, names, feeds, "original")
    new_out = _run(new, names, feeds, "folded")
    for name, r, n in zip(names, ref_out, new_out, strict=True):
        yield name, np.asarray(r), np.asarray(n)


def _run(session: Any, names: list[str], feeds: dict[str, np.ndarray], which: str) -> list[Any]:
    try:
        return session.run(names, feeds)  # type: ignore[no-any-return]
    except Exception as err:  # onnxruntime raises its own exception types
        raise BnfoldError(
            f"onnxruntime failed running the {which} model: {_first_line(err)}"
        ) from None


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


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__
