"""Operators the reference evaluator gets from bnfold: BatchNormalization as bnfold reads it.

onnx's reference BatchNormalization runs in training mode whenever the node has a
``momentum`` (opset 9-13: the schema's default fills one in) or, below opset 7,
without ``is_test=1``. So the evaluator computed batch statistics for inference
BatchNorms that old exporters wrote (``outputs: ["Y", ""]``, no momentum given),
and a correct fold of them failed. Here a BatchNorm uses batch statistics exactly
when bnfold refuses to fold it (:func:`bnfold.onnx_front.rules.base.require_inference`):
``training_mode=1``, an explicit ``is_test=0``, or a second output that is read.
Both the original and the fold run with this operator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_EPSILON = 1e-5
DEFAULT_MOMENTUM = 0.9


def batch_normalization(read_outputs: set[str]) -> type:
    """The reference evaluator's BatchNormalization; ``read_outputs`` are the values some
    node or graph output reads (a training output named but never read does not count)."""
    from onnx import helper
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):  # the class name is the op it replaces
        op_domain = ""

        def _run(
            self, x: Any, scale: Any, bias: Any, mean: Any, var: Any, **_: Any
        ) -> tuple[Any, ...]:
            given = {a.name: helper.get_attribute_value(a) for a in self.onnx_node.attribute}
            eps = float(given.get("epsilon", DEFAULT_EPSILON))
            extra = [name for name in self.onnx_node.output[1:] if name]
            training = (
                given.get("training_mode", 0) == 1
                or given.get("is_test", 1) == 0
                or any(name in read_outputs for name in extra)
            )
            if not training:
                return (_normalized(x, scale, bias, mean, var, eps),)
            momentum = float(given.get("momentum", DEFAULT_MOMENTUM))
            return _training(x, scale, bias, mean, var, eps, momentum)[: len(self.onnx_node.output)]

    return BatchNormalization


def _per_channel(v: Any, rank: int) -> Any:
    return np.asarray(v).reshape((1, -1) + (1,) * (rank - 2))


def _normalized(x: Any, scale: Any, bias: Any, mean: Any, var: Any, eps: float) -> Any:
    r = x.ndim
    y = (x - _per_channel(mean, r)) / np.sqrt(_per_channel(var, r) + eps)
    return (y * _per_channel(scale, r) + _per_channel(bias, r)).astype(x.dtype)


def _training(
    x: Any, scale: Any, bias: Any, mean: Any, var: Any, eps: float, momentum: float
) -> tuple[Any, ...]:
    """Y from the batch's statistics, then the running mean and variance (and the batch's)."""
    axes = tuple(a for a in range(x.ndim) if a != 1)
    batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
    y = _normalized(x, scale, bias, batch_mean, batch_var, eps)
    running_mean = (mean * momentum + batch_mean * (1 - momentum)).astype(x.dtype)
    running_var = (var * momentum + batch_var * (1 - momentum)).astype(x.dtype)
    return y, running_mean, running_var, batch_mean.astype(x.dtype), batch_var.astype(x.dtype)


def read_values(graph: Any) -> set[str]:
    """Names some node of ``graph`` (subgraphs included) or its outputs read."""
    out = {o.name for o in graph.output}
    for node in graph.node:
        out.update(name for name in node.input if name)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out |= read_values(sub)
    return out
