"""Constant subexpressions of elementwise arithmetic are evaluated, so their affine folds.

torch's TorchScript exporter with constant folding off writes torchvision's
FrozenBatchNorm2d as its forward's arithmetic (Add/Sqrt/Div/Mul/Sub of buffers,
then Reshape); a weight may be Sub(A, B) of two initializers. Both fold.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper

import bnfold
from bnfold.onnx_front.constants import constant_array
from tests.builders import bn_node, bn_params, init, model, op_types
from tests.test_onnx_front import fold_and_check, to_proto


def _frozen_bn_export(tmp_path) -> tuple[onnx.ModelProto, object]:
    """A conv and a FrozenBatchNorm2d look-alike, exported as its arithmetic."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class FrozenBN(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.eps = 1e-5
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("weight", torch.rand(c, generator=gen) + 0.5)
            self.register_buffer("bias", torch.randn(c, generator=gen))
            self.register_buffer("running_mean", torch.randn(c, generator=gen))
            self.register_buffer("running_var", torch.rand(c, generator=gen) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    with torch.random.fork_rng():  # the other tests' draws stay as they were
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN(4)).eval()
    path = tmp_path / "frozen.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net, (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )  # fmt: skip
    return onnx.load(str(path)), net


def test_frozen_batchnorm_exported_as_arithmetic_folds_into_the_conv(tmp_path):
    exported, net = _frozen_bn_export(tmp_path)
    assert {"Sqrt", "Div", "Sub", "Reshape"} <= set(op_types(exported))  # no BN node at all
    result = fold_and_check(exported)
    assert [f.pattern for f in result.report.folded] == ["Conv+Mul", "Conv+Add"]
    assert result.report.refused == []
    assert op_types(to_proto(result.model)) == ["Conv"]  # the constant arithmetic went too
    assert set(result.model.graph.initializers) == {"0.weight", "0.bias"}
    # As the torch front folds the module itself.
    import torch

    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # exported shape
    session = ort.InferenceSession(to_proto(result.model).SerializeToString())
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch_fold = bnfold.fold(net, (x,))
    assert [f.affine for f in torch_fold.report.folded] == ["1"]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, torch_fold.model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_weight_computed_as_sub_of_two_constants_folds():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4, 3, 3, 3))
    nodes = [
        helper.make_node("Sub", ["A", "B"], ["W"], name="w_sub"),
        helper.make_node("Conv", ["input", "W", "bias"], ["c"], name="conv"),
        bn_node("bn", "c", "output"),
    ]
    inits = [
        init("A", a.astype(np.float32)),
        init("B", b.astype(np.float32)),
        init("bias", rng.normal(size=4).astype(np.float32)),
        *bn_params("bn", 4, rng=rng),
    ]
    result = fold_and_check(model(nodes, inits, [("input", [1, 3, 6, 6])], ["output"]))
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    assert op_types(to_proto(result.model)) == ["Conv"]
    assert "A" not in result.model.graph.initializers  # the dead Sub and its operands are gone


def test_mul_add_whose_constants_are_arithmetic_of_a_constant_node_fold():
    """scale = 1 / Sqrt(var + eps) * gamma with eps and 1 as Constant nodes, shift = Neg(m)."""
    c, rng = 4, np.random.default_rng(2)
    nodes = [
        helper.make_node("Constant", [], ["eps"], value=init("e", np.array(1e-5, np.float32))),
        helper.make_node("Constant", [], ["one"], value=init("o", np.array(1.0, np.float32))),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["one", "std"], ["inv"]),
        helper.make_node("Mul", ["gamma", "inv"], ["scale"]),
        helper.make_node("Neg", ["mean"], ["shift"]),
        helper.make_node("Gemm", ["input", "w"], ["g"], name="gemm", transB=1),
        helper.make_node("Mul", ["g", "scale"], ["scaled"], name="mul"),
        helper.make_node("Add", ["scaled", "shift"], ["output"], name="add"),
    ]
    inits = [
        init("w", rng.normal(size=(c, 5)).astype(np.float32)),
        init("var", rng.uniform(0.5, 2, c).astype(np.float32)),
        init("gamma", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        init("mean", rng.normal(size=c).astype(np.float32)),
    ]
    result = fold_and_check(model(nodes, inits, [("input", [3, 5])], ["output"]))
    assert [f.site for f in result.report.folded] == ["gemm -> mul", "gemm -> add"]
    assert op_types(to_proto(result.model)) == ["Gemm"]


def _value(op: str, *arrays: np.ndarray) -> np.ndarray | None:
    """constant_array of ``op`` over initializers ``arrays``."""
    inputs = [
        ir.Value(name=f"c{i}", const_value=ir.tensor(a, name=f"c{i}")) for i, a in enumerate(arrays)
    ]
    node = ir.Node("", op, inputs)
    return constant_array(node.outputs[0], ir_version=8)


def test_integer_division_and_mixed_dtypes_are_not_evaluated():
    """ONNX's integer Div truncates and operands must share a dtype: left to the runtime."""
    assert _value("Div", np.array([-7], np.int64), np.array([2], np.int64)) is None
    assert _value("Add", np.array([1.0], np.float32), np.array([1.0], np.float64)) is None
    assert _value("Sqrt", np.array([4], np.int64)) is None
    np.testing.assert_array_equal(
        _value("Sub", np.array([5], np.int64), np.array([7], np.int64)), [-2]
    )


def test_a_result_past_the_size_cap_is_not_evaluated(monkeypatch):
    from bnfold.onnx_front import constants

    monkeypatch.setattr(constants, "MAX_ELEMENTS", 100)
    assert _value("Add", np.ones((10, 1), np.float32), np.ones((1, 11), np.float32)) is None
    assert _value("Add", np.ones((10, 1), np.float32), np.ones((1, 10), np.float32)) is not None


_BINARY = ["Add", "Sub", "Mul", "Div"]
_UNARY = ["Neg", "Sqrt", "Reciprocal"]
_FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
_FLOATS = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=_FLOAT32
)


def _runtime(op: str, *arrays: np.ndarray) -> np.ndarray:
    names = [f"x{i}" for i in range(len(arrays))]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"])],
        "g",
        [
            helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(a.shape))
            for n, a in zip(names, arrays, strict=True)
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        m.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(zip(names, arrays, strict=True)))[0]


@given(op=st.sampled_from(_BINARY + _UNARY), data=st.data())
def test_evaluated_arithmetic_has_the_runtimes_bits(op, data):
    """What the fold reads from a constant subexpression is what onnxruntime computes."""
    first = data.draw(_FLOATS)
    arrays = [first]
    if op in _BINARY:
        shape = data.draw(hnp.broadcastable_shapes(first.shape, max_side=4))
        arrays.append(data.draw(hnp.arrays(np.float32, shape, elements=_FLOAT32)))
    evaluated = _value(op, *arrays)
    assert evaluated is not None and evaluated.dtype == np.float32
    np.testing.assert_array_equal(evaluated, _runtime(op, *arrays))
