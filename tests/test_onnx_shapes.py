"""The ONNX rank and dtype reader: ranks proven through producers, never guessed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

import bnfold
from bnfold import Code
from bnfold.onnx_front.shapes import Shapes
from bnfold.report import FoldKind
from tests.builders import init, model, run


def _unannotated(nodes: list, inits: list, x_shape: list) -> ir.Model:
    """A model whose values other than its input carry no shapes (no shape inference):
    ``nodes`` end in ``z``, which an Identity passes to the graph's output."""
    nodes = [*nodes, helper.make_node("Identity", ["z"], ["y"])]
    proto = model(nodes, inits, [("x", x_shape)], ["y"], output_shapes=[[]])
    return ir.serde.deserialize_model(proto)


def _values(m: ir.Model) -> dict[str, ir.Value]:
    return {out.name: out for node in m.graph for out in node.outputs if out.name}


def test_a_rank_follows_rank_keeping_ops_and_a_gemm_is_two_d() -> None:
    w = init("w", np.ones((4, 4), np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Neg", ["r"], ["n"]),
        helper.make_node("Flatten", ["n"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["z"]),
    ]
    values = _values(_unannotated(nodes, [w], [2, 4, 1, 1]))
    shapes = Shapes(8)
    assert [shapes.rank(values[v]) for v in ("r", "n", "f", "z")] == [4, 4, 2, 2]


def test_a_broadcast_needs_every_input_rank_and_takes_the_largest() -> None:
    nodes = [
        helper.make_node("Add", ["x", "c"], ["known"]),
        helper.make_node("Mul", ["known", "mystery"], ["z"]),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["mystery"]),  # a Reshape's rank is not read
    ]
    c = init("c", np.ones((1, 1, 1, 3, 1), np.float32))
    values = _values(_unannotated(nodes, [c], [2, 3, 1]))
    shapes = Shapes(8)
    assert shapes.rank(values["known"]) == 5
    assert shapes.rank(values["mystery"]) is None and shapes.rank(values["z"]) is None


def test_a_conv_of_an_unknown_input_has_its_weights_rank() -> None:
    w = init("w", np.ones((2, 3, 1, 1), np.float32))
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["unknown"]),
        helper.make_node("Conv", ["unknown", "w"], ["z"]),
    ]
    values = _values(_unannotated(nodes, [w], [1, 3, 4, 4]))
    assert Shapes(8).rank(values["z"]) == 4


def test_a_matmul_is_as_deep_as_its_deepest_operand_and_at_least_two_d() -> None:
    w = init("w", np.ones((3, 5), np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"])]
    assert Shapes(8).rank(_values(_unannotated(nodes, [w], [3]))["z"]) == 2
    assert Shapes(8).rank(_values(_unannotated(nodes, [w], [2, 7, 3]))["z"]) == 3


def test_a_dtype_follows_casts_and_ops_that_keep_their_input_type() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=onnx.TensorProto.FLOAT16),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("CastLike", ["x", "r"], ["z"]),
    ]
    values = _values(_unannotated(nodes, [], [2, 3]))
    shapes = Shapes(8)
    assert shapes.dtype(values["r"]) == np.float16
    assert shapes.dtype(values["z"]) == np.float16


def test_a_matmul_after_a_residual_add_knows_its_rank_and_folds_a_token_scale() -> None:
    """A rank proven through a broadcasting Add lets a (1, 1, C) scale after a MatMul fold."""
    rng = np.random.default_rng(0)
    w = init("w", rng.normal(size=(4, 6)).astype(np.float32))
    scale = init("s", rng.uniform(0.5, 2, (1, 1, 6)).astype(np.float32))
    nodes = [
        helper.make_node("Add", ["x", "x"], ["res"]),
        helper.make_node("MatMul", ["res", "w"], ["mm"]),
        helper.make_node("Mul", ["mm", "s"], ["y"]),
    ]
    proto = model(nodes, [w, scale], [("x", [2, 5, 4])], ["y"], output_shapes=[[2, 5, 6]])
    result = bnfold.fold(proto)
    assert [f.kind for f in result.report.folded] == [FoldKind.ADJACENT]
    assert Code.NOT_PER_CHANNEL not in result.report.codes
    x = {"x": rng.normal(size=(2, 5, 4)).astype(np.float32)}
    folded = ir.serde.serialize_model(result.model)
    np.testing.assert_allclose(run(folded, x)[0], run(proto, x)[0], rtol=1e-5, atol=1e-5)
