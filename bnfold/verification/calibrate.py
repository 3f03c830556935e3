"""How far rounding alone moves each compared tensor: the original against a nudged copy.

A correct fold changes a model's arithmetic only by rounding: each folded weight
and bias is rounded once, to within half an ulp, where the original rounds the
BatchNorm's products and sums instead. The derived bound
(:mod:`bnfold.verification.tolerance`) counts the reductions behind a tensor but
not how the layers after a rounding error amplify it; on a deep detector a
correct fold goes past it (SSDlite's scores and boxes before NonMaxSuppression
by up to 3.7 times).

The original shows how much it amplifies. Move each of its parameters by one
ulp, up or down at random (:func:`nudged`), and round each result it computes
from the inputs another way too (a ``Mul`` by a random factor within an ulp of
1 after every node), run that copy on the same samples, and see how far each
compared tensor moves: rounding-level noise carried through this very network.
Both kinds matter: where the largest output hangs on one value (an ``exp`` of
it, say), that value's own rounding decides the difference, and nudging the
parameters alone moved it a twentieth of what a correct fold did. A correct
fold's roundings are of the same size and pass through the same layers, so the
verdict holds a tensor that went
past its derived bound to :data:`~bnfold.verification.verdict.CALIBRATED_MARGIN`
times the move instead. A wrong fold (a scale off by 1e-3) moves its site a
thousand times more than an ulp does and still fails.

What is nudged: floating-point parameters (initializers and Constant tensors)
that only linear, normalization and elementwise ops read, so shapes, Resize
scales and thresholds stay exact.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.verification.runtimes import Held, RuntimeFailure, run_model
from bnfold.verification.verdict import measure

# Ops whose floating constant inputs are parameters: weights, biases, statistics, factors.
PARAMETER_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
        "InstanceNormalization", "LayerNormalization", "GroupNormalization",
        "Mul", "Add", "Sub", "Div", "PRelu",
    }
)  # fmt: skip
SEED = 0x5EED
# Results rounded another way: onnxruntime draws random factors for these dtypes.
_ROUNDED_AGAIN = {ir.DataType.FLOAT: 2.0**-23, ir.DataType.DOUBLE: 2.0**-52}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def nudged(values: np.ndarray, rng: np.random.Generator, ulps: int = 1) -> np.ndarray:
    """``values`` with every nonzero finite element moved ``ulps`` ulps up or down at random.

    Works on the bit pattern (one step of the integer view is one ulp of the
    magnitude), so it serves float16, bfloat16, float32 and float64 alike.
    Zeros, non-finite values, values fewer than ``ulps`` steps from zero (the step
    would cross it) and a step that would overflow stay as they are.
    """
    unsigned = np.ascontiguousarray(values).view(_UNSIGNED[values.dtype.itemsize])
    magnitude = unsigned & ~_sign_bit(unsigned.dtype)
    step = (rng.integers(0, 2, unsigned.shape, dtype=np.int64) * 2 - 1) * ulps
    moved = (unsigned.astype(np.int64) + step).astype(unsigned.dtype).view(values.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        keep = ~np.isfinite(values) | ~np.isfinite(moved) | (values == 0) | (magnitude < ulps)
    return np.where(keep, values, moved).astype(values.dtype)


def _sign_bit(dtype: np.dtype) -> Any:
    return dtype.type(1 << (8 * dtype.itemsize - 1))


def shadow_model(source: Path, folder: Path, seed: int = SEED) -> Path:
    """A copy of the model at ``source`` with every parameter nudged, saved in ``folder``."""
    from bnfold.onnx_front.io import quiet_ir_logs, save_model

    with quiet_ir_logs():
        model = ir.load(source)
    rng = np.random.default_rng(seed)
    for value in _parameters(model):
        tensor = value.const_value
        assert tensor is not None
        value.const_value = ir.tensor(nudged(tensor.numpy(), rng), name=value.name)
    for node in _parameter_constants(model):
        attr = node.attributes["value"]
        node.attributes["value"] = ir.AttrTensor(
            "value",
            ir.tensor(nudged(attr.as_tensor().numpy(), rng), name=attr.as_tensor().name),
        )
    _round_results_again(model, seed)
    path = folder / "shadow.onnx"
    save_model(model, path)
    return path


def _round_results_again(model: ir.Model, seed: int) -> None:
    """After each node of the main graph computing floats from the inputs, a ``Mul`` by a
    random factor within one ulp of 1: its result rounded another way, under its name."""
    from bnfold.verification.cones import analyse

    data = analyse(model).data  # shape inference first: dtypes of the values
    graph = model.graph
    for k, node in enumerate(list(graph)):
        for value in node.outputs:
            eps = _ROUNDED_AGAIN.get(value.dtype) if value.dtype is not None else None
            if eps is not None and value.name in data:
                _rounded_again(graph, node, value, eps, seed + k)


def _rounded_again(graph: ir.Graph, node: ir.Node, value: ir.Value, eps: float, seed: int) -> None:
    name = value.name
    value.name = f"{name}__exact"
    attributes = {"low": 1.0 - eps, "high": 1.0 + eps, "seed": float(seed)}
    factor = ir.node("RandomUniformLike", [value], attributes=attributes, name=f"{name}__factor")
    moved = ir.node("Mul", [value, factor.outputs[0]], name=f"{name}__again")
    result = moved.outputs[0]
    result.name, result.shape = name, value.shape
    if value.dtype is not None:
        result.dtype = value.dtype
    for use in list(value.uses()):
        if use.node is not factor and use.node is not moved:
            use.node.replace_input_with(use.idx, result)
    for i, output in enumerate(graph.outputs):
        if output is value:
            graph.outputs[i] = result
    graph.insert_after(node, [factor, moved])


def rounding_noise(
    source: Path,
    kind: type,
    extra: Sequence[str],
    wanted: Sequence[str],
    samples: Iterator[dict[str, np.ndarray]],
    expected: Held,
) -> dict[str, float]:
    """How far the nudged original moves each of ``wanted`` from ``expected`` (absolute).

    ``kind`` is the runtime that ran the original; ``samples`` the same inputs.
    Empty when the nudged copy cannot be made or run: the derived bounds stand.
    """
    moved = dict.fromkeys(wanted, 0.0)
    with tempfile.TemporaryDirectory(prefix="bnfold-calibrate-") as tmp:
        try:
            runtime = kind(shadow_model(source, Path(tmp)), extra)
            for i, feed in enumerate(samples):
                got = run_model(runtime, list(wanted), feed, RuntimeFailure, "nudged original")
                for name, ref, new in zip(wanted, expected.get(i), got, strict=True):
                    moved[name] = max(
                        moved[name], measure(np.asarray(ref), np.asarray(new)).max_abs
                    )
        except Exception:  # calibration only widens bounds; without it they stay derived
            return {}
    return moved


def _parameters(model: ir.Model) -> Iterator[ir.Value]:
    """Floating initializers of every graph that only parameter ops read."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if _is_float(value.const_value) and _read_by_parameter_ops(value):
                yield value


def _parameter_constants(model: ir.Model) -> Iterator[ir.Node]:
    """Constant nodes holding a floating tensor that only parameter ops read."""
    for graph in model.graphs():
        for node in graph:
            if node.op_type != "Constant" or "value" not in node.attributes:
                continue
            tensor = node.attributes["value"].as_tensor()
            if _is_float(tensor) and _read_by_parameter_ops(node.outputs[0]):
                yield node


def _is_float(tensor: Any) -> bool:
    return tensor is not None and tensor.dtype.is_floating_point()


def _read_by_parameter_ops(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and all(use.node.op_type in PARAMETER_OPS for use in uses)
