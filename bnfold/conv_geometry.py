"""Conv geometry under its first name; it lives in :mod:`bnfold.core.geometry` now."""

from bnfold.core.geometry import (
    ConvGeometry,
    first_mismatch,
    off_centre_axis,
    per_axis,
    same_pads,
    symmetric_pads,
    torch_pads,
)

__all__ = [
    "ConvGeometry",
    "first_mismatch",
    "off_centre_axis",
    "per_axis",
    "same_pads",
    "symmetric_pads",
    "torch_pads",
]
