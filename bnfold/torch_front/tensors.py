"""Moving values between torch tensors and the float64 numpy arrays of the math core."""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator

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


# Inside :func:`exact_values`: the float64 value behind each Parameter that
# :func:`as_parameter` or :func:`rounded_parameter` made, by id (checked through
# a weak reference, so a recycled id never matches), or how to compute it. None outside.
_Exact = np.ndarray | Callable[[], np.ndarray]
_EXACT: contextvars.ContextVar[dict[int, tuple[weakref.ref[torch.Tensor], _Exact]] | None] = (
    contextvars.ContextVar("bnfold_exact_values", default=None)
)


@contextlib.contextmanager
def exact_values() -> Iterator[None]:
    """Within this block, a Parameter a fold wrote reads back as its float64 value.

    A fold of an already folded module (Conv -> BN -> BN, BN -> Conv -> BN)
    then starts from the exact values, not the rounded ones, so each parameter
    is still rounded once. Nothing is kept after the block.
    """
    token = _EXACT.set({})
    try:
        yield
    finally:
        _EXACT.reset(token)


def to_float64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of ``t`` (any device, any float dtype, bfloat16 included).

    Inside :func:`exact_values`, a Parameter a fold wrote gives its value before
    the cast (read-only).
    """
    remembered = _EXACT.get()
    entry = None if remembered is None else remembered.get(id(t))
    if entry is None or entry[0]() is not t:
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()
    exact = entry[1]
    if callable(exact):  # computed when first asked (a second fold of the same module)
        exact = _read_only(exact())
        remembered[id(t)] = (entry[0], exact)  # type: ignore[index]
    return exact


# Float dtypes whose numpy twin torch.from_numpy shares memory with (not bfloat16).
_SHARED_DTYPES = (torch.float16, torch.float32, torch.float64)


def stored_values(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s values as they are stored, in its own dtype, or None when that is not the
    value to fold from.

    None inside :func:`exact_values` for a Parameter a fold wrote (its float64
    value is the one to fold from, :func:`to_float64`) and for a dtype numpy does
    not share with torch (bfloat16).
    """
    remembered = _EXACT.get()
    entry = None if remembered is None else remembered.get(id(t))
    if (entry is not None and entry[0]() is t) or t.dtype not in _SHARED_DTYPES:
        return None
    return t.detach().cpu().numpy()


def rounded_parameter(
    values: np.ndarray, like: torch.Tensor, exact: Callable[[], np.ndarray]
) -> nn.Parameter:
    """A Parameter of ``values``, already rounded to ``like``'s dtype, on its device.

    Inside :func:`exact_values` it reads back (:func:`to_float64`) as ``exact()``,
    computed only if something asks: most folded weights are never folded again.
    """
    parameter = nn.Parameter(
        torch.from_numpy(values).to(device=like.device), requires_grad=like.requires_grad
    )
    _remember(parameter, exact)
    return parameter


def as_parameter(
    values: np.ndarray, like: torch.Tensor, balance: WeightLayout | None = None
) -> nn.Parameter:
    """The one cast from float64 to ``like``'s dtype, as a Parameter on its device.

    The rounding happens in numpy, straight from float64: torch's float64 ->
    half conversions may round twice (through float32). With ``balance`` (a
    weight's layout) it is :func:`bnfold.affine.balanced_cast` over that
    layout's output channels.

    Inside :func:`exact_values` the Parameter reads back (:func:`to_float64`)
    as ``values``.

    Raises:
        Unfoldable: a value overflows the dtype.
    """
    exact = values
    if balance is not None:
        values = cast_weight(values, _NUMPY_DTYPES[like.dtype], balance)
    out = _rounded(values, like.dtype).to(device=like.device)
    if not bool(torch.isfinite(out).all()):
        raise Unfoldable(f"folded values overflow {like.dtype}")
    parameter = nn.Parameter(out, requires_grad=like.requires_grad)
    _remember(parameter, exact)
    return parameter


def _remember(parameter: torch.Tensor, exact: _Exact) -> None:
    remembered = _EXACT.get()
    if remembered is not None:
        kept = exact if callable(exact) else _read_only(exact)
        remembered[id(parameter)] = (weakref.ref(parameter), kept)


def _read_only(exact: np.ndarray) -> np.ndarray:
    view = exact.view()
    view.flags.writeable = False
    return view


def _rounded(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with np.errstate(over="ignore"):  # an overflow is reported by the caller
        if dtype == torch.bfloat16:
            bits = np.ascontiguousarray(values.astype(ml_dtypes.bfloat16)).view(np.uint16)
            return torch.from_numpy(bits).view(torch.bfloat16)
        if dtype == torch.float16:
            return torch.from_numpy(np.ascontiguousarray(values.astype(np.float16)))
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
