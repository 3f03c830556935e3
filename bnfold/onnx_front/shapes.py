"""The rank and element type of ONNX values, read through their producers where shapes are missing.

Exported models often carry no shapes for intermediate values. A value's rank
still follows from what produced it, exactly, for many ops: a Relu keeps its
input's, a Gemm's is 2, a broadcasting op's is the largest of its inputs' (all
must be known: one unknown could be the largest), a Conv's is its weight's. Its
element type likewise follows through ops that keep their input's, and a Cast
says it. :class:`Shapes` follows one table of these rules and nothing else: a
rank it cannot prove is None, never a guess, because a wrong rank could let a
BN fold, or a lowered BN broadcast, over the wrong axis.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bnfold.onnx_front.constants import constant_array

# Ops that commonly sit between a linear op and a BatchNorm and make a fold
# impossible; named in the refusal so users see why nothing folded.
NONLINEAR_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Clip", "Softmax", "LogSoftmax",
        "Abs", "Exp", "Log", "Sqrt", "Pow", "Max", "Min", "ThresholdedRelu", "Swish",
    }
)  # fmt: skip

# Ops whose output rank is the largest of their inputs' (numpy broadcasting).
BROADCASTING_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu"}
)

# Ops whose output has the rank of their first input (no broadcasting binary ops:
# those need every input's rank; PRelu's slope broadcasts to its input, one way).
RANK_PRESERVING_OPS = (NONLINEAR_OPS - {"Max", "Min", "Pow"}) | {
    "BatchNormalization", "Dropout", "Identity", "Neg", "Reciprocal", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Cast", "CastLike", "Softmax", "LRN", "InstanceNormalization",
    "LayerNormalization", "Conv", "ConvTranspose", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Pad", "Resize", "Upsample", "Slice",
}  # fmt: skip

_TWO_D_OPS = frozenset({"Gemm", "Flatten"})

# Ops whose output has the element type of their first input.
_SAME_TYPE_OPS = (
    (RANK_PRESERVING_OPS - {"Cast", "CastLike"})
    | (BROADCASTING_OPS - {"Where"})
    | {"Concat", "Gemm", "MatMul", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
)

# Producers are followed this many steps back at most.
MAX_DEPTH = 256


class Shapes:
    """The rank and element type of values of one model, remembered once found.

    An instance remembers its answers: keep one across edits that keep every
    value's rank and type (lowering a BN), create another after edits that may
    make more known (a fold may turn a MatMul into a Gemm, whose rank is then
    known). Planning a fold asks a new one each time.
    """

    def __init__(self, ir_version: int) -> None:
        self._ir_version = ir_version
        self._ranks: dict[ir.Value, int | None] = {}
        self._dtypes: dict[ir.Value, np.dtype | None] = {}

    def rank(self, value: ir.Value | None, depth: int = 0) -> int | None:
        """The rank of ``value``: from its shape or, unannotated, from what produced it."""
        if value is None or depth > MAX_DEPTH:
            return None
        if value not in self._ranks:
            self._ranks[value] = self._rank_of(value, depth)
        return self._ranks[value]

    def dtype(self, value: ir.Value | None, depth: int = 0) -> np.dtype | None:
        """The element type of ``value``, followed back through ops that keep their input's."""
        if value is None or depth > MAX_DEPTH:
            return None
        if value not in self._dtypes:
            self._dtypes[value] = self._dtype_of(value, depth)
        return self._dtypes[value]

    def _rank_of(self, value: ir.Value, depth: int) -> int | None:
        if value.shape is not None:
            return len(value.shape)
        if value.const_value is not None:  # an initializer
            return len(value.const_value.shape)
        producer = value.producer()
        if producer is None:
            return None
        op, inputs = producer.op_type, [v for v in producer.inputs if v is not None]
        found = self._rank_by_op(op, inputs, depth + 1)
        if found is not None:
            return found
        array = constant_array(value, self._ir_version)
        return None if array is None else array.ndim

    def _rank_by_op(self, op: str, inputs: list[ir.Value], depth: int) -> int | None:
        """The rank an op's output has, from its inputs' (None if they do not tell)."""
        if not inputs:
            return None
        if op in _TWO_D_OPS:
            return 2
        if op == "MatMul" and len(inputs) == 2:
            ranks = [self.rank(v, depth) for v in inputs]
            return None if None in ranks else max(2, *ranks)  # type: ignore[type-var]
        if op in RANK_PRESERVING_OPS:
            found = self.rank(inputs[0], depth)
            if found is None and op in ("Conv", "ConvTranspose") and len(inputs) > 1:
                found = self.rank(inputs[1], depth)  # the weight's rank is the output's
            return found
        if op == "Concat":
            return next((r for v in inputs if (r := self.rank(v, depth)) is not None), None)
        if op in BROADCASTING_OPS:
            ranks = [self.rank(v, depth) for v in inputs]
            return None if None in ranks else max(ranks)  # type: ignore[type-var]
        return None

    def _dtype_of(self, value: ir.Value, depth: int) -> np.dtype | None:
        if value.type is not None:
            return np.dtype(value.type.dtype.numpy())
        array = constant_array(value, self._ir_version)
        if array is not None:
            return array.dtype
        producer = value.producer()
        if producer is None or not producer.inputs:
            return None
        if producer.op_type == "Cast":
            return np.dtype(ir.DataType(producer.attributes.get_int("to", 0)).numpy())
        if producer.op_type == "CastLike" and len(producer.inputs) > 1:
            return self.dtype(producer.inputs[1], depth + 1)
        if producer.op_type in _SAME_TYPE_OPS:
            return self.dtype(producer.inputs[0], depth + 1)
        return None
