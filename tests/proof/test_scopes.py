"""Where the proof reaches: If/Loop bodies, models no runtime loads, dynamic shapes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bnfold.proof import prove_onnx
from tests.builders import bn_node, bn_params, init
from tests.proof.folding import as_ir, fold, initializer, with_initializer

RNG = np.random.default_rng(7)


def _conv_bn_nodes(prefix: str, x: str, y: str, c: int = 3) -> tuple[list, list]:
    nodes = [
        helper.make_node(
            "Conv",
            [x, f"{prefix}.w", f"{prefix}.b"],
            [f"{prefix}_c"],
            name=f"{prefix}.conv",
            pads=[1, 1, 1, 1],
        ),
        bn_node(f"{prefix}.bn", f"{prefix}_c", y),
    ]
    inits = [
        init(f"{prefix}.w", RNG.normal(size=(c, c, 3, 3)).astype(np.float32)),
        init(f"{prefix}.b", RNG.normal(size=c).astype(np.float32)),
        *bn_params(f"{prefix}.bn", c),
    ]
    return nodes, inits


def _model(
    nodes: list, inits: list, inputs: list, outputs: list, domains: dict[str, int] | None = None
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid(d, v) for d, v in {"": 17, **(domains or {})}.items()]
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = 8
    return m


def _tensor(name: str, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _if_model() -> onnx.ModelProto:
    branches = {}
    for side in ("then", "else"):
        nodes, inits = _conv_bn_nodes(side, "input", f"{side}_out")
        branches[side] = helper.make_graph(
            nodes, side, [], [_tensor(f"{side}_out", None)], initializer=inits
        )
    node = helper.make_node(
        "If",
        ["cond"],
        ["output"],
        name="if",
        then_branch=branches["then"],
        else_branch=branches["else"],
    )
    inputs = [
        _tensor("input", [1, 3, 8, 8]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    return _model([node], [], inputs, [_tensor("output", None)])


def _loop_model() -> onnx.ModelProto:
    nodes, inits = _conv_bn_nodes("body", "v", "v_next")
    nodes.append(helper.make_node("Identity", ["cond"], ["cond_next"], name="keep"))
    flag = helper.make_tensor_value_info
    inputs = [flag("i", TensorProto.INT64, []), flag("cond", TensorProto.BOOL, [])]
    outputs = [flag("cond_next", TensorProto.BOOL, [])]
    body = helper.make_graph(
        nodes,
        "body",
        [*inputs, _tensor("v", [1, 3, 8, 8])],
        [*outputs, _tensor("v_next", [1, 3, 8, 8])],
        initializer=inits,
    )
    loop = helper.make_node("Loop", ["trips", "", "input"], ["output"], name="loop", body=body)
    trips = init("trips", np.array(2, dtype=np.int64))
    return _model([loop], [trips], [_tensor("input", [1, 3, 8, 8])], [_tensor("output", None)])


@pytest.mark.parametrize("build", [_if_model, _loop_model], ids=["if", "loop"])
def test_folds_inside_bodies_are_proven(build: object) -> None:
    original = build()  # type: ignore[operator]
    folded, report = fold(original)
    assert len(report.folded) >= 1
    certificate = prove_onnx(original, folded, report)
    assert certificate.holds, certificate.summary()
    assert len(certificate.sites) == len(report.folded)
    assert all(s.name.split(":")[0].startswith("0.") for s in certificate.sites)


def test_wrong_fold_inside_a_body_fails() -> None:
    original = _if_model()
    folded, report = fold(original)
    edited = as_ir(ir.serde.serialize_model(folded))
    body = edited.graph.node(0).attributes["then_branch"].value
    value = body.initializers["then.w"]
    w = np.array(value.const_value.numpy())  # type: ignore[union-attr]
    w[0, 0, 0, 0] *= 1.01
    value.const_value = ir.tensor(w, name="then.w")
    certificate = prove_onnx(original, edited, report)
    assert not certificate.holds
    (failed,) = [s for s in certificate.sites if not s.proven]
    assert failed.name.startswith("0.then_branch")


def test_model_no_runtime_can_load_is_proven() -> None:
    """A custom-domain op outside the fold site: nothing can run it, the fold is proven."""
    nodes, inits = _conv_bn_nodes("a", "input", "a_out")
    nodes.append(
        helper.make_node("Mystery", ["a_out"], ["output"], name="mystery", domain="vendor.ops")
    )
    original = _model(
        nodes, inits, [_tensor("input", [1, 3, 8, 8])], [_tensor("output", None)], {"vendor.ops": 1}
    )
    with pytest.raises(Exception, match="Mystery"):
        ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    folded, report = fold(original)
    certificate = prove_onnx(original, folded, report)
    assert certificate.holds, certificate.summary()
    assert certificate.unchanged_nodes == 1


def test_custom_op_inside_a_changed_region_is_not_proven() -> None:
    nodes, inits = _conv_bn_nodes("a", "input", "output")
    original = _model(
        nodes, inits, [_tensor("input", [1, 3, 8, 8])], [_tensor("output", None)], {"vendor.ops": 1}
    )
    folded, _ = fold(original)
    edited = as_ir(ir.serde.serialize_model(folded))
    conv = edited.graph.node(0)
    conv.domain = "vendor.ops"
    certificate = prove_onnx(original, edited)
    assert not certificate.holds
    assert "custom op vendor.ops::Conv" in certificate.summary()


def test_dynamic_shapes_are_proven_for_every_size() -> None:
    nodes, inits = _conv_bn_nodes("a", "input", "output")
    nodes[0].attribute.extend([helper.make_attribute("strides", [2, 2])])
    original = _model(
        nodes, inits, [_tensor("input", ["N", 3, "H", "W"])], [_tensor("output", None)]
    )
    folded, report = fold(original)
    certificate = prove_onnx(original, folded, report)
    assert certificate.holds, certificate.summary()
    w = initializer(folded, "a.w")
    w[1, 2, 0, 0] *= np.float32(1.001)
    assert not prove_onnx(original, with_initializer(folded, "a.w", w), report).holds


def test_certificate_renders_as_text_and_json() -> None:
    nodes, inits = _conv_bn_nodes("a", "input", "output")
    original = _model(nodes, inits, [_tensor("input", [1, 3, 8, 8])], [_tensor("output", None)])
    folded, report = fold(original)
    certificate = prove_onnx(original, folded, report)
    assert certificate.summary().startswith("proven for all inputs: 1 of 1 sites, worst ")
    data = json.loads(certificate.to_json())
    assert data["holds"] is True
    assert data["sites"][0]["proven"] is True
    assert data["sites"][0]["original_nodes"] == ["a.conv", "a.bn"]
    assert 0 <= data["worst_ulp"] <= 1
    assert data["headline"] == certificate.headline()
