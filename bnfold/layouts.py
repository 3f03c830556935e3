"""Weight layouts under their first name; they live in :mod:`bnfold.core.layouts` now."""

from bnfold.core.layouts import (
    LayoutError,
    WeightLayout,
    channel_block,
    conv,
    conv_transpose,
    gemm,
    linear,
    matmul,
    merges_leading_axes,
)

__all__ = [
    "LayoutError",
    "WeightLayout",
    "channel_block",
    "conv",
    "conv_transpose",
    "gemm",
    "linear",
    "matmul",
    "merges_leading_axes",
]
