"""Planted wrong folds fail the proof; correct ones next to them pass.

Each wrong fold is built by editing a correctly folded model (or by folding by hand
what bnfold refuses), so the prover sees a plausible model that computes something
else.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bnfold.proof import Certificate, prove_onnx
from tests.builders import bn_node, bn_params, init
from tests.proof.folding import (
    as_ir,
    bn_affine,
    copy,
    fold,
    initializer,
    node,
    sample,
    with_initializer,
)

RNG = np.random.default_rng(22)


def _fails(certificate: Certificate, *words: str) -> None:
    """Not proven because the proof found a difference, not for want of a model."""
    assert not certificate.holds, certificate.summary()
    assert certificate.refuted, certificate.summary()
    text = certificate.summary()
    for word in words:
        assert word in text, text


def _ulps_off(array: np.ndarray, ulps: int) -> np.ndarray:
    """``array`` moved by ``ulps`` ulps (away from zero)."""
    out = array.copy()
    for _ in range(ulps):
        out = np.nextafter(out, np.sign(out) * np.inf).astype(array.dtype)
    return out


# -- adjacent folds ------------------------------------------------------------------------


def test_one_channel_scale_off_by_1000_ulp_fails() -> None:
    path = sample("conv2d_bn.onnx")
    folded, report = fold(path)
    original = ir.load(path)
    scale, _ = bn_affine(original, "bn1")
    w = initializer(folded, "conv1.weight")
    w[3] = (
        initializer(original, "conv1.weight")[3]
        * (scale[3] + 1000 * np.spacing(np.float32(scale[3])))
    ).astype(np.float32)
    certificate = prove_onnx(path, with_initializer(folded, "conv1.weight", w), report)
    _fails(certificate, "weights from input 'input'", "row 3")
    assert certificate.sites[0].worst_ulp > 100
    # What a user reads: the site that differs, by name, in the headline and its row.
    assert certificate.headline().endswith("1 differ (conv1 -> bn1)")
    assert "  DIFFERS     conv1 -> bn1" in certificate.summary()
    data = certificate.to_dict()
    assert data["refuted"] is True and data["holds"] is False
    assert data["sites"][0]["unsupported"] is False


@pytest.mark.parametrize(("ulps", "holds"), [(0, True), (3, False)])
def test_the_bound_is_one_ulp(ulps: int, holds: bool) -> None:
    path = sample("conv2d_bn.onnx")
    folded, report = fold(path)
    w = initializer(folded, "conv1.weight")
    w[0, 0, 0, 0] = _ulps_off(w[0, 0, 0, 0:1], ulps)[0]
    certificate = prove_onnx(path, with_initializer(folded, "conv1.weight", w), report)
    assert certificate.holds is holds, certificate.summary()


def test_shift_on_the_wrong_channel_fails() -> None:
    path = sample("conv2d_bn.onnx")
    folded, report = fold(path)
    name = node(folded, "conv1").inputs[2].name
    assert name is not None
    b = initializer(folded, name)
    b[[1, 2]] = b[[2, 1]]
    _fails(prove_onnx(path, with_initializer(folded, name, b), report), "constant term")


def test_wrong_group_layout_in_a_grouped_convtranspose_fails() -> None:
    """The BN scale applied to W[c, o] by o alone, as if there were one group."""
    path = sample("convtranspose_bn.onnx")
    original = ir.load(path)
    assert node(original, "deconv1").attributes["group"].value == 2
    folded, report = fold(path)
    scale, _ = bn_affine(original, "bn1")
    w = initializer(original, "deconv1.weight").astype(np.float64)  # [C_in, C_out/g, k, k]
    wrong = (w * scale[: w.shape[1]].reshape(1, -1, 1, 1)).astype(np.float32)
    certificate = prove_onnx(path, with_initializer(folded, "deconv1.weight", wrong), report)
    _fails(certificate, "weights from input 'input'", "group 1")


def test_wrong_gemm_axis_fails() -> None:
    """Gemm transB=1 scaled along its input axis instead of its output axis."""
    path = sample("gemm_bn.onnx")
    original = ir.load(path)
    folded, report = fold(path)
    scale, _ = bn_affine(original, "bn1")
    b = initializer(original, "gemm1.weight").astype(np.float64)  # [N, K]
    wrong = (b * np.resize(scale, b.shape[1]).reshape(1, -1)).astype(np.float32)
    _fails(prove_onnx(path, with_initializer(folded, "gemm1.weight", wrong), report))


# -- before a linear op ---------------------------------------------------------------------


def _bn_conv(pads: list[int], shift: bool, dims: list[int | str]) -> ir.Model:
    c = 3
    params = {} if shift else {"bias": np.zeros(c), "mean": np.zeros(c)}
    nodes = [
        bn_node("bn", "input", "n"),
        helper.make_node("Conv", ["n", "w", "b"], ["output"], name="conv", pads=pads),
    ]
    inits = [
        *bn_params("bn", c, **params),
        init("w", RNG.normal(size=(4, c, 3, 3)).astype(np.float32)),
        init("b", RNG.normal(size=4).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return as_ir(m)


def _folded_before_by_hand(original: ir.Model) -> ir.Model:
    """BN folded into the conv after it, the shift into the bias through the whole kernel
    (what is right in the interior; at a zero-padded border it is not)."""
    scale, shift = bn_affine(original, "bn")
    w = initializer(original, "w").astype(np.float64)
    b = initializer(original, "b").astype(np.float64)
    folded = copy(original)
    conv = node(folded, "conv")
    folded.graph.initializers["w"].const_value = ir.tensor(
        (w * scale.reshape(1, -1, 1, 1)).astype(np.float32), name="w"
    )
    folded.graph.initializers["b"].const_value = ir.tensor(
        (b + np.einsum("ocij,c->o", w, shift)).astype(np.float32), name="b"
    )
    conv.replace_input_with(0, folded.graph.inputs[0])
    bn = node(folded, "bn")
    folded.graph.remove(bn, safe=True)
    for name in ("bn.scale", "bn.bias", "bn.mean", "bn.var"):
        folded.graph.initializers.pop(name)
    return folded


@pytest.mark.parametrize("dims", [[1, 3, 8, 8], ["N", 3, "H", "W"]], ids=["static", "dynamic"])
def test_bn_folded_before_a_zero_padded_conv_with_a_shift_fails(dims: list[int | str]) -> None:
    original = _bn_conv([1, 1, 1, 1], shift=True, dims=dims)
    certificate = prove_onnx(original, _folded_before_by_hand(original))
    _fails(certificate, "constant term at a border")


@pytest.mark.parametrize(
    ("pads", "shift"),
    [([1, 1, 1, 1], False), ([0, 0, 0, 0], True)],
    ids=["padded-no-shift", "unpadded-shift"],
)
@pytest.mark.parametrize("dims", [[1, 3, 8, 8], ["N", 3, "H", "W"]], ids=["static", "dynamic"])
def test_bn_folded_before_a_conv_is_proven_where_exact(
    pads: list[int], shift: bool, dims: list[int | str]
) -> None:
    original = _bn_conv(pads, shift=shift, dims=dims)
    certificate = prove_onnx(original, _folded_before_by_hand(original))
    assert certificate.holds, certificate.summary()


# -- batch merge, branch sums, elsewhere --------------------------------------------------------


def test_wrong_batch_merge_axis_fails() -> None:
    """MatMul [B, N, K] -> Flatten(axis=1) -> BN over N*C features, folded by hand as if the
    BN's channels were the MatMul's C (they are (token, channel) pairs)."""
    c, n, k = 8, 5, 16
    bn_values = {"scale": RNG.uniform(0.5, 1.5, n * c)}
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["m"], name="fc"),
        helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=1),
        bn_node("bn", "f", "output"),
    ]
    inits = [
        init("w", RNG.normal(size=(k, c)).astype(np.float32)),
        *bn_params("bn", n * c, **bn_values),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, n, k])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    original = as_ir(m)
    scale, shift = bn_affine(original, "bn")
    w = initializer(original, "w").astype(np.float64)
    wrong_nodes = [
        helper.make_node("MatMul", ["input", "w"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "t"], ["a"], name="bn"),
        helper.make_node("Flatten", ["a"], ["output"], name="flatten", axis=1),
    ]
    wrong_inits = [
        init("w", (w * scale[:c]).astype(np.float32)),
        init("t", shift[:c].astype(np.float32)),
    ]
    graph = helper.make_graph(
        wrong_nodes, "g", list(m.graph.input), list(m.graph.output), initializer=wrong_inits
    )
    wrong = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    wrong.ir_version = 8
    # The prover cannot model a Flatten that merges tokens with channels: the site is not
    # proven (sampling decides), and not reported as a difference it did not find.
    certificate = prove_onnx(original, as_ir(wrong))
    assert not certificate.holds and not certificate.refuted, certificate.summary()
    (site,) = certificate.sites
    assert site.unsupported and "merges" in site.reason
    assert "NOT PROVEN" in certificate.summary() and "cannot model" in certificate.headline()


def test_correct_batch_merge_is_proven() -> None:
    path = sample("token_linear_bn.onnx")
    folded, report = fold(path)
    certificate = prove_onnx(path, folded, report)
    assert certificate.holds
    assert certificate.sites[0].kind == "batch_merge"


def _repvgg() -> tuple[ir.Model, ir.Model, object]:
    path = sample("repvgg_block.onnx")
    folded, report = fold(path)
    return ir.load(path), folded, report


def test_wrong_branch_in_a_merged_repvgg_kernel_fails() -> None:
    """The 1x1 branch placed at the kernel's corner instead of its centre."""
    original, folded, report = _repvgg()
    scale, _ = bn_affine(original, "bn_small")
    small = (
        initializer(original, "conv_small.weight")[:, :, 0, 0].astype(np.float64) * scale[:, None]
    )
    w = initializer(folded, "conv_kxk.weight").astype(np.float64)
    w[:, :, 1, 1] -= small
    w[:, :, 0, 0] += small
    edited = with_initializer(folded, "conv_kxk.weight", w.astype(np.float32))
    _fails(prove_onnx(sample("repvgg_block.onnx"), edited, report), "offset (0, 0)", "32 of 144")


def test_merged_repvgg_kernel_without_its_identity_tap_fails() -> None:
    original, folded, report = _repvgg()
    scale, _ = bn_affine(original, "bn_identity")
    w = initializer(folded, "conv_kxk.weight").astype(np.float64)
    for c in range(w.shape[0]):
        w[c, c, 1, 1] -= scale[c]
    edited = with_initializer(folded, "conv_kxk.weight", w.astype(np.float32))
    _fails(prove_onnx(sample("repvgg_block.onnx"), edited, report), "offset (0, 0)")


def test_changed_weight_elsewhere_in_the_graph_fails() -> None:
    """One bit of the unfolded fc layer of resnet_tiny."""
    path = sample("resnet_tiny.onnx")
    folded, report = fold(path)
    fc = node(folded, "fc")
    name = fc.inputs[1].name
    assert name is not None
    w = initializer(folded, name)
    w.reshape(-1)[5] = np.nextafter(w.reshape(-1)[5], np.float32(np.inf))
    certificate = prove_onnx(path, with_initializer(folded, name, w), report)
    _fails(certificate, "fc")
    assert sum(not s.proven for s in certificate.sites) == 1
    assert sum(s.proven for s in certificate.sites) == len(report.folded)


def test_wrong_fold_inside_a_residual_block_is_a_difference_at_its_site() -> None:
    """The BN's output meets the block's skip input in an Add: the region grows over it,
    and the skip input lines up with the conv's output, so the difference is found."""
    path = sample("resnet_tiny.onnx")
    folded, report = fold(path)
    w = initializer(folded, "layer1.2.conv.weight")
    w[1] *= np.float32(1.001)
    certificate = prove_onnx(path, with_initializer(folded, "layer1.2.conv.weight", w), report)
    _fails(certificate, "layer1.2.conv -> layer1.2.bn", "row 1")
    assert [s.name for s in certificate.differing] == ["layer1.2.conv -> layer1.2.bn"]
    assert certificate.proven == len(report.folded) - 1


def test_changed_op_elsewhere_in_the_graph_fails() -> None:
    path = sample("resnet_tiny.onnx")
    folded, report = fold(path)
    edited = copy(folded)
    relu = next(n for n in edited.graph if n.op_type == "Relu")
    relu.op_type = "Sigmoid"
    _fails(prove_onnx(path, edited, report), "Relu became Sigmoid")


def test_renamed_graph_output_is_a_difference() -> None:
    path = sample("conv2d_bn.onnx")
    folded, report = fold(path)
    edited = copy(folded)
    edited.graph.outputs[0].name = "renamed"
    certificate = prove_onnx(path, edited, report)
    assert not certificate.holds
    assert not certificate.rest_unchanged
    assert any("graph outputs differ" in d for d in certificate.differences)


def test_max_pool_with_a_negative_scale_after_it_fails() -> None:
    """BN folded through a MaxPool although one channel's scale is negative."""
    path = sample("neg_maxpool_negative_bn.onnx")
    original = ir.load(path)
    scale, shift = bn_affine(original, "bn1")
    assert (scale < 0).any()
    conv = node(original, "conv1")
    w = initializer(original, conv.inputs[1].name).astype(np.float64)  # type: ignore[arg-type]
    b = initializer(original, conv.inputs[2].name).astype(np.float64)  # type: ignore[arg-type]
    folded = copy(original)
    folded.graph.initializers[conv.inputs[1].name].const_value = ir.tensor(  # type: ignore[index]
        (w * scale.reshape(-1, 1, 1, 1)).astype(np.float32), name=conv.inputs[1].name
    )
    folded.graph.initializers[conv.inputs[2].name].const_value = ir.tensor(  # type: ignore[index]
        (b * scale + shift).astype(np.float32), name=conv.inputs[2].name
    )
    bn = node(folded, "bn1")
    pool = node(folded, "pool1")
    bn.outputs[0].name = "unused"
    pool.outputs[0].name = "output"
    folded.graph.outputs[0] = pool.outputs[0]
    folded.graph.remove(bn, safe=False)
    _fails(prove_onnx(path, folded), "a max commutes only with a scale >= 0")


def test_max_pool_fold_states_why_it_commutes() -> None:
    path = sample("conv_maxpool_bn.onnx")
    folded, report = fold(path)
    certificate = prove_onnx(path, folded, report)
    assert certificate.holds
    assert any("scale after it is >= 0" in n for n in certificate.sites[0].notes)


def test_changed_default_of_an_overridable_input_is_a_difference() -> None:
    """IR >= 4: an initializer that is also a graph input is a default the caller may
    override; folding must not change it."""
    nodes = [helper.make_node("Add", ["input", "k"], ["output"], name="add")]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2])],
        initializer=[init("k", np.array([1.0, 2.0], dtype=np.float32))],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    original = as_ir(m)
    assert prove_onnx(original, copy(original)).holds
    changed = with_initializer(original, "k", np.array([1.0, 3.0], dtype=np.float32))
    certificate = prove_onnx(original, changed)
    assert not certificate.holds
    assert any("default value of input 'k'" in d for d in certificate.differences)
