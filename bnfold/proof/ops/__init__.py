"""ONNX operator semantics over the prover's values (:mod:`bnfold.proof.values`).

Each function here implements one operator from its ONNX definition, on affine
values: what the operator does to every tap matrix and to the bias of its input. They
are written from the operator specification (onnx.ai/onnx/operators), not from
bnfold's fold code, and tests check each against onnxruntime on random inputs: a bug in
the fold math cannot hide behind the same bug here.

Supported in a changed region: Conv, ConvTranspose, Gemm, MatMul (constant 2-D right
operand), BatchNormalization (inference), Add, Sub, Mul, Div, Neg, Sum, Identity,
Dropout (inference), Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat (channel
axes), AveragePool, MaxPool, GlobalAveragePool, GlobalMaxPool and Shape. Anything else
in a changed region raises :class:`~bnfold.proof.values.Unsupported`.

One module per family: :mod:`~bnfold.proof.ops.elementwise`,
:mod:`~bnfold.proof.ops.windows` (Conv, ConvTranspose, pools),
:mod:`~bnfold.proof.ops.matrices` (Gemm, MatMul), :mod:`~bnfold.proof.ops.shapes`;
what they share is in :mod:`~bnfold.proof.ops.base`. :data:`OPS` maps each op_type to
its transfer function.
"""

from bnfold.proof.ops.base import Arg, Opaque, OpContext, Transfer, same_layout, scaled, shifted
from bnfold.proof.ops.elementwise import (
    op_add,
    op_batchnorm,
    op_div,
    op_dropout,
    op_identity,
    op_mul,
    op_neg,
    op_sub,
    op_sum,
)
from bnfold.proof.ops.matrices import op_gemm, op_matmul
from bnfold.proof.ops.shapes import (
    op_concat,
    op_flatten,
    op_reshape,
    op_shape,
    op_squeeze,
    op_transpose,
    op_unsqueeze,
)
from bnfold.proof.ops.windows import ONES_PREFIX, op_conv, op_convtranspose, op_pool

OPS: dict[str, Transfer] = {
    "Add": op_add,
    "Sub": op_sub,
    "Mul": op_mul,
    "Div": op_div,
    "Neg": op_neg,
    "Sum": op_sum,
    "Identity": op_identity,
    "Dropout": op_dropout,
    "BatchNormalization": op_batchnorm,
    "Conv": op_conv,
    "ConvTranspose": op_convtranspose,
    "Gemm": op_gemm,
    "MatMul": op_matmul,
    "Reshape": op_reshape,
    "Flatten": op_flatten,
    "Squeeze": op_squeeze,
    "Unsqueeze": op_unsqueeze,
    "Transpose": op_transpose,
    "Concat": op_concat,
    "AveragePool": op_pool,
    "MaxPool": op_pool,
    "GlobalAveragePool": op_pool,
    "GlobalMaxPool": op_pool,
    "Shape": op_shape,
}
"""The operators a changed region may contain, by op_type (default domain)."""

__all__ = [
    "ONES_PREFIX",
    "OPS",
    "Arg",
    "OpContext",
    "Opaque",
    "Transfer",
    "same_layout",
    "scaled",
    "shifted",
]
