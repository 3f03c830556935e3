"""Folding models for the prover's tests, and editing folded models to plant wrong folds.

The prover never imports bnfold's fold code; its tests do, to get folds to prove. One
place calls the fold API, so a change of that API is one edit here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"


def fold(model: Any, lower: str | None = None) -> tuple[ir.Model, Any]:
    """Fold with bnfold (no sampled verification): the folded model and its report."""
    import bnfold

    result = bnfold.fold(model, verify=False, lower_standalone=lower or False)
    return result.model, result.report


def copy(model: ir.Model) -> ir.Model:
    """An independent copy (serialised and read back: small models only)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def initializer(model: ir.Model, name: str) -> np.ndarray:
    value = model.graph.initializers[name].const_value
    assert value is not None
    return np.array(value.numpy())


def with_initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Model:
    """A copy of ``model`` whose initializer ``name`` holds ``array``."""
    edited = copy(model)
    edited.graph.initializers[name].const_value = ir.tensor(array, name=name)
    return edited


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def bn_affine(model: ir.Model, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of a BatchNormalization of ``model``, in float64 (test oracle)."""
    n = node(model, bn)
    gamma, beta, mean, var = (
        np.asarray(v.const_value.numpy(), dtype=np.float64)  # type: ignore[union-attr]
        for v in n.inputs[1:5]
    )
    eps = n.attributes["epsilon"].value if "epsilon" in n.attributes else 1e-5
    scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
    return scale, beta - mean * scale


def sample(name: str) -> Path:
    return SAMPLES / name


def as_ir(m: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(m)
