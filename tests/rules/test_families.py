"""Every refusal code each family declares for the ONNX front is one it really reports.

``Family.codes_on("onnx")`` lists what the ONNX front refuses a site of that family
with; for each, one small model makes the front refuse a site of that family (its
label says which) with that code. A code declared without a case here, or a case
whose code the family no longer declares, fails. The eager and ``.pt2`` fronts'
cases are in ``test_families_eager.py`` and ``test_families_pt2.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold.report import Code, LowerForm
from bnfold.rules import FAMILIES
from tests.builders import bn_node, bn_params, init, model

SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
C = 4
F32 = np.float32


def conv(name: str, x: str, y: str, c_in: int = C, c_out: int = C, k: int = 1, **attrs: Any):
    """A Conv node and its weight (k x k, no bias)."""
    weight = init(
        f"{name}.w", np.random.default_rng(0).normal(size=(c_out, c_in, k, k)).astype(F32)
    )
    return helper.make_node("Conv", [x, f"{name}.w"], [y], name=name, **attrs), weight


def tiny(
    nodes: list, inits: list, shape: tuple[int, ...] = (1, C, 5, 5), valid: bool = True
) -> onnx.ModelProto:
    """x -> ``nodes`` -> y. Not ``valid``: a model no runtime runs (no shape inference),
    which planning alone refuses."""
    return model(nodes, inits, [("x", list(shape))], ["y"], output_shapes=None if valid else [None])


def conv_bn(**bn: np.ndarray) -> onnx.ModelProto:
    """x -> conv1 -> bn1 -> y."""
    node, weight = conv("conv1", "x", "c")
    return tiny([node, bn_node("bn1", "c", "y")], [weight, *bn_params("bn1", C, **bn)])


def relu_bn_then(node: onnx.NodeProto, *inits: Any, valid: bool = True) -> onnx.ModelProto:
    """x -> relu -> bn1 -> ``node`` (reading "b", writing "y"): a BN only a fold before takes."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn1", "r", "b"), node]
    return tiny(nodes, [*inits, *bn_params("bn1", C, bias=np.full(C, 0.5))], valid=valid)


def weight_is_an_input() -> onnx.ModelProto:
    """conv1's weight is a graph input: not a constant to fold into."""
    node = helper.make_node("Conv", ["x", "w"], ["c"], name="conv1")
    nodes = [node, bn_node("bn1", "c", "y")]
    return model(nodes, bn_params("bn1", C), [("x", [1, C, 5, 5]), ("w", [C, C, 1, 1])], ["y"])


def bad_groups() -> onnx.ModelProto:
    """4 weight rows in 3 groups."""
    node, weight = conv("conv1", "x", "c", c_in=1, group=3)
    return tiny([node, bn_node("bn1", "c", "y")], [weight, *bn_params("bn1", C)], valid=False)


def integer_weight() -> onnx.ModelProto:
    """An int32 weight: nothing a fold could write."""
    weight = init("conv1.w", np.ones((C, C, 1, 1), np.int32))
    node = helper.make_node("Conv", ["x", "conv1.w"], ["c"], name="conv1")
    return tiny([node, bn_node("bn1", "c", "y")], [weight, *bn_params("bn1", C)], valid=False)


def matmul_pool_bn() -> onnx.ModelProto:
    """A MatMul's channels are its last axis; a pool keeps axis 1."""
    w = init("w", np.ones((16, C), F32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul1"),
        helper.make_node("MaxPool", ["m"], ["p"], name="pool1", kernel_shape=[1]),
        bn_node("bn1", "p", "y"),
    ]
    return tiny(nodes, [w, *bn_params("bn1", C)], shape=(2, 3, 16), valid=False)


def maxpool_indices_read() -> onnx.ModelProto:
    """conv1 -> MaxPool whose Indices are a graph output -> bn1."""
    node, weight = conv("conv1", "x", "c")
    nodes = [
        node,
        helper.make_node("MaxPool", ["c"], ["p", "i"], name="pool1", kernel_shape=[2, 2]),
        bn_node("bn1", "p", "y"),
    ]
    m = tiny(nodes, [weight, *bn_params("bn1", C)])
    m.graph.output.append(helper.make_tensor_value_info("i", onnx.TensorProto.INT64, None))
    return m


def layer_scale_of_three_channels() -> onnx.ModelProto:
    """x + g * (conv_k(x) - bn(x)), g of 3 channels for 4: not a model a runtime runs."""
    node, weight = conv("conv_k", "x", "k", k=3, pads=[1, 1, 1, 1])
    nodes = [
        node,
        bn_node("bn", "x", "i"),
        helper.make_node("Sub", ["k", "i"], ["d"], name="sub_d"),
        helper.make_node("Mul", ["d", "g"], ["m"], name="mul_m"),
        helper.make_node("Add", ["x", "m"], ["y"], name="add_y"),
    ]
    g = init("g", np.ones((3, 1, 1), F32))
    return tiny(nodes, [weight, g, *bn_params("bn", C)], valid=False)


def join_of(op: str, widths: tuple[int, int] = (C, C), **attrs: Any) -> onnx.ModelProto:
    """BN(``op``(conv_a(x), conv_b(x))), the convs of ``widths`` output channels."""
    a, wa = conv("conv_a", "x", "a", c_out=widths[0])
    b, wb = conv("conv_b", "x", "b", c_out=widths[1])
    join = helper.make_node(op, ["a", "b"], ["j"], name="join1", **attrs)
    bn_c = widths[0] if op == "Add" else sum(widths)
    return tiny([a, b, join, bn_node("bn1", "j", "y")], [wa, wb, *bn_params("bn1", bn_c)])


def flatten_axis_two() -> onnx.ModelProto:
    """relu -> bn1 -> Flatten(axis=2) -> gemm1: the flatten keeps no (N, C*R) layout."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        bn_node("bn1", "r", "b"),
        helper.make_node("Flatten", ["b"], ["f"], name="flat", axis=2),
        helper.make_node("Gemm", ["f", "w"], ["y"], name="gemm1"),
    ]
    w = init("w", np.ones((25, 3), F32))
    return tiny(nodes, [w, *bn_params("bn1", C, bias=np.full(C, 0.5))])


def standalone_lowering(shape: tuple[int, ...], **bn: Any) -> onnx.ModelProto:
    """x -> relu -> bn1 -> y, nothing to fold into: only a lowering could remove it."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn1", "r", "y")]
    return model(
        nodes, bn_params("bn1", C, **bn), [("x", list(shape))], ["y"], output_shapes=[None]
    )


def unknown_rank() -> onnx.ModelProto:
    """A BN of a Reshape to a computed shape, unannotated: its rank is not known."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape"),
        bn_node("bn1", "r", "y"),
    ]
    return model(nodes, bn_params("bn1", C), [("x", [1, C, 5, 5])], ["y"], output_shapes=[None])


def spatial_zero() -> onnx.ModelProto:
    """An opset-7 BN with spatial=0: statistics per activation."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("bn1", "r", "y", spatial=0)]
    return model(nodes, bn_params("bn1", C), [("x", [1, C, 5, 5])], ["y"], opset=7)


def scale_is_an_input() -> onnx.ModelProto:
    """The BN's scale is a graph input."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("bn1", "r", "y")]
    params = bn_params("bn1", C)[1:]
    inputs = [("x", [1, C, 5, 5]), ("bn1.scale", [C])]
    return model(nodes, params, inputs, ["y"])


def sample(name: str) -> Callable[[], Path]:
    return lambda: SAMPLES / name


Case = tuple[Callable[[], Any], str, dict[str, Any]]  # the model, the site, fold options
LOWER = {"lower_standalone": LowerForm.MUL_ADD}

CASES: dict[tuple[str, Code], Case] = {
    ("adjacent", Code.TRAINING_MODE): (sample("neg_training_bn.onnx"), "conv1 -> bn1", {}),
    ("adjacent", Code.NOT_CONSTANT): (weight_is_an_input, "conv1 -> bn1", {}),
    ("adjacent", Code.BRANCHING): (sample("neg_branching.onnx"), "conv1 -> bn1", {}),
    ("adjacent", Code.SHARED_WEIGHT): (
        sample("neg_shared_weight.onnx"),
        "conv_a -> bn_a",
        {"clone_shared": False},
    ),
    ("adjacent", Code.NOT_PER_CHANNEL): (sample("neg_matmul_3d_bn.onnx"), "matmul1 -> bn1", {}),
    ("adjacent", Code.BAD_VALUES): (lambda: conv_bn(var=-np.ones(C)), "conv1 -> bn1", {}),
    ("adjacent", Code.BAD_SHAPE): (lambda: conv_bn(mean=np.zeros(C + 1)), "conv1 -> bn1", {}),
    ("adjacent", Code.BAD_GROUPS): (bad_groups, "conv1 -> bn1", {}),
    ("adjacent", Code.UNSUPPORTED_DTYPE): (integer_weight, "conv1 -> bn1", {}),
    ("adjacent", Code.NONLINEAR_INPUT): (sample("neg_bn_after_relu.onnx"), "bn1", {}),
    ("adjacent", Code.STANDALONE): (sample("neg_standalone_bn.onnx"), "bn1", {}),
    ("batch_merge", Code.MERGE_MOVES_CHANNEL): (
        sample("neg_merge_moves_channel.onnx"),
        "matmul1 -> reshape1 -> bn1",
        {},
    ),
    ("pool", Code.POOL_PADDING): (sample("neg_avgpool_pad_bn.onnx"), "conv1 -> pool1 -> bn1", {}),
    ("pool", Code.NEGATIVE_SCALE): (
        sample("neg_maxpool_negative_bn.onnx"),
        "conv1 -> pool1 -> bn1",
        {},
    ),
    ("pool", Code.TRAINING_MODE): (maxpool_indices_read, "conv1 -> pool1 -> bn1", {}),
    ("pool", Code.NOT_PER_CHANNEL): (matmul_pool_bn, "matmul1 -> pool1 -> bn1", {}),
    ("branch_sum", Code.BRANCH_MISMATCH): (
        sample("neg_branch_groups.onnx"),
        "bn_identity -> add_identity",
        {},
    ),
    ("branch_sum", Code.UNCENTRED_TAP): (
        sample("neg_branch_uncentred.onnx"),
        "bn_identity -> add_identity",
        {},
    ),
    ("branch_sum", Code.BRANCHING): (
        sample("neg_branch_shared.onnx"),
        "bn_identity -> add_identity",
        {},
    ),
    ("branch_sum", Code.BAD_SHAPE): (layer_scale_of_three_channels, "bn -> add_y", {}),
    ("join", Code.NOT_LINEAR_TERM): (sample("neg_concat_pool_bn.onnx"), "concat1 -> bn1", {}),
    ("join", Code.BRANCHING): (sample("neg_add_branching_bn.onnx"), "add1 -> bn1", {}),
    ("join", Code.NOT_PER_CHANNEL): (lambda: join_of("Concat", axis=2), "join1 -> bn1", {}),
    ("join", Code.BAD_SHAPE): (lambda: join_of("Add", (C, 2 * C)), "join1 -> bn1", {}),
    ("before", Code.ZERO_PADDING): (
        lambda: relu_bn_then(*conv("conv2", "b", "y", k=3, pads=[1, 1, 1, 1])),
        "bn1 -> conv2",
        {},
    ),
    ("before", Code.NOT_PER_CHANNEL): (flatten_axis_two, "bn1 -> flat -> gemm1", {}),
    ("before", Code.BAD_SHAPE): (
        lambda: relu_bn_then(*conv("conv2", "b", "y", c_in=C + 1), valid=False),
        "bn1 -> conv2",
        {},
    ),
    ("lower", Code.UNKNOWN_RANK): (unknown_rank, "bn1", LOWER),
    ("lower", Code.BAD_SHAPE): (lambda: standalone_lowering((C,)), "bn1", LOWER),
    ("lower", Code.BAD_VALUES): (
        lambda: standalone_lowering((1, C, 5, 5), var=-np.ones(C)),
        "bn1",
        LOWER,
    ),
    ("lower", Code.NOT_CONSTANT): (scale_is_an_input, "bn1", LOWER),
    ("lower", Code.NOT_PER_CHANNEL): (spatial_zero, "bn1", LOWER),
}


DECLARED = sorted(
    ((family.name, code) for family in FAMILIES for code in family.codes_on("onnx")),
    key=lambda pair: (pair[0], pair[1].value),
)


@pytest.mark.parametrize(("family", "code"), DECLARED, ids=[f"{f}-{c.value}" for f, c in DECLARED])
def test_each_declared_code_is_reported_by_the_onnx_front(family: str, code: Code) -> None:
    assert (family, code) in CASES, f"no ONNX case makes the {family} family refuse {code.value}"
    make, site, options = CASES[(family, code)]
    report = bnfold.fold(make(), **options).report
    refusals = [(r.site, r.code) for r in report.refused]
    assert (site, code) in refusals, report.summary()


def test_every_case_is_a_declared_code() -> None:
    assert sorted(CASES, key=lambda pair: (pair[0], pair[1].value)) == DECLARED
