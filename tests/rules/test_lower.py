"""The lower family: when a BN can become a 1x1 depthwise conv, and the note when not."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold.rules.lower import ONNX_TERMS, TORCH_TERMS, conv_form_note


@pytest.mark.parametrize(
    ("ranks", "terms", "dtype", "opset", "note"),
    [
        ({4}, ONNX_TERMS, np.dtype(np.float32), 17, ""),
        ({6}, ONNX_TERMS, np.dtype(np.float16), 17, ""),  # ONNX Conv takes any rank
        ({2}, ONNX_TERMS, np.dtype(np.float32), 17,
         "rank-2 input has no spatial axis for a Conv: lowered to mul-add"),
        ({4}, ONNX_TERMS, np.dtype(np.float64), 17,
         "onnxruntime has no float64 Conv: lowered to mul-add"),
        ({4}, ONNX_TERMS, np.dtype(ml_dtypes.bfloat16), 21,
         "Conv takes no bfloat16 at opset 21: lowered to mul-add"),
        ({4}, ONNX_TERMS, np.dtype(ml_dtypes.bfloat16), 22, ""),
        ({3}, TORCH_TERMS, None, None, ""),
        ({6}, TORCH_TERMS, None, None, "rank-6 input has no spatial axis for a conv: mul-add"),
        (set(), TORCH_TERMS, None, None,
         "the BatchNorm was not called on the example inputs: mul-add"),
        ({3, 4}, TORCH_TERMS, None, None, "called with inputs of ranks [3, 4]: mul-add"),
    ],
)  # fmt: skip
def test_a_conv_form_needs_one_spatial_rank_and_a_dtype_conv_takes(
    ranks: set[int],
    terms,
    dtype: np.dtype | None,
    opset: int | None,
    note: str,  # type: ignore[no-untyped-def]
) -> None:
    assert conv_form_note(ranks, terms, dtype, opset) == note
