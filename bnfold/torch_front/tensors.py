"""Moving values between torch tensors and the float64 numpy arrays of the math core."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import nn

from bnfold.affine import Unfoldable, cast_weight
from bnfold.layouts import WeightLayout

# numpy's spelling of each float dtype a foldable weight can have.
_NUMPY_DTYPES = {
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


def to_float64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of ``t`` (any device, any float dtype, bfloat16 included)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def as_parameter(
    values: np.ndarray, like: torch.Tensor, balance: WeightLayout | None = None
) -> nn.Parameter:
    """The one cast from float64 to ``like``'s dtype, as a Parameter on its device.

    The rounding happens in numpy, straight from float64: torch's float64 ->
    half conversions may round twice (through float32). With ``balance`` (a
    weight's layout) it is :func:`bnfold.affine.balanced_cast` over that
    layout's output channels.

    Raises:
        Unfoldable: a value overflows the dtype.
    """
    if balance is not None:
        values = cast_weight(values, _NUMPY_DTYPES[like.dtype], balance)
    out = _rounded(values, like.dtype).to(device=like.device)
    if not bool(torch.isfinite(out).all()):
        raise Unfoldable(f"folded values overflow {like.dtype}")
    return nn.Parameter(out, requires_grad=like.requires_grad)


def _rounded(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with np.errstate(over="ignore"):  # an overflow is reported by the caller
        if dtype == torch.bfloat16:
            bits = np.ascontiguousarray(values.astype(ml_dtypes.bfloat16)).view(np.uint16)
            return torch.from_numpy(bits).view(torch.bfloat16)
        if dtype == torch.float16:
            return torch.from_numpy(np.ascontiguousarray(values.astype(np.float16)))
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
