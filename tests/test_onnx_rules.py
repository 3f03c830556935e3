"""The fold rules beyond adjacency (issue 13): batch merges, sums, concats, pooling.

Each rule: the fold happens (BN gone, op counts), the output matches the original
at ORT_DISABLE_ALL, and each refusal code leaves the model's outputs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import bnfold
from bnfold import Code
from bnfold.affine import Affine, centred_kernel, identity_kernel
from bnfold.core.affine import add_parts, concat_parts
from bnfold.layouts import LayoutError
from bnfold.report import FoldKind
from tests.builders import RNG, bn_node, bn_params, init, model, op_types, run
from tests.test_onnx_front import assert_same_function, fold_and_check, random_feeds, to_proto

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
F16 = np.float16


def fold_sample(name: str) -> bnfold.FoldResult:
    result = bnfold.fold(SAMPLES / name, verify=True)
    assert result.verification is not None and result.verification.passed
    return result


def assert_refused_unchanged(name: str, code: Code, site: str | None = None) -> None:
    """The refusal carries ``code``, its BN stays, and the model still computes the same."""
    original = onnx.load(str(SAMPLES / name))
    result = bnfold.fold(original)
    refused = [r for r in result.report.refused if r.code is code]
    assert refused, result.report.summary()
    if site is not None:
        assert [r.site for r in refused] == [site]
    bn_left = op_types(to_proto(result.model)).count("BatchNormalization")
    assert bn_left == len(result.report.refused)
    assert_same_function(original, to_proto(result.model))


# --- batch-merging reshape (LeViT's Linear -> BN1d) ------------------------------------


def test_token_linear_bn_folds_through_the_batch_merge() -> None:
    result = fold_sample("token_linear_bn.onnx")
    assert [f.site for f in result.report.folded] == ["fc1 -> flatten1 -> bn1"]
    after = result.report.ops_after
    assert "BatchNormalization" not in after and "Transpose" not in after
    assert after["Add"] == 1  # an N-d MatMul has no bias slot: the shift is one Add


def test_merge_that_moves_the_channel_is_refused() -> None:
    assert_refused_unchanged("neg_merge_moves_channel.onnx", Code.MERGE_MOVES_CHANNEL)


def token_mlp(merge: str, dtype: type = np.float32, c: int = 6) -> onnx.ModelProto:
    """input [2, 3, 5] -> MatMul(W [5, c]) -> ``merge`` to [6, c] -> BN(c) -> output."""
    nodes = [helper.make_node("MatMul", ["input", "w"], ["y"], name="fc")]
    inits = [init("w", RNG.normal(size=(5, c)).astype(dtype)), *bn_params("bn", c, dtype)]
    if merge == "reshape":
        inits.append(init("target", np.array([-1, c], dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", ["y", "target"], ["m"], name="merge"))
    else:
        nodes.append(helper.make_node("Flatten", ["y"], ["m"], name="merge", axis=int(merge)))
    nodes.append(bn_node("bn", "m", "output"))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model(nodes, inits, [("input", [2, 3, 5])], ["output"], dtype=elem)


@pytest.mark.parametrize("merge", ["reshape", "2", "-1"])
def test_batch_merge_by_reshape_or_flatten_folds(merge: str) -> None:
    result = fold_and_check(token_mlp(merge))
    assert len(result.report.folded) == 1
    assert "BatchNormalization" not in op_types(to_proto(result.model))


def test_batch_merge_folds_in_fp16_from_float64() -> None:
    m = token_mlp("2", F16)
    result = bnfold.fold(m)
    assert len(result.report.folded) == 1
    feeds = random_feeds(m)
    (ref,) = run(m, feeds)
    (new,) = run(to_proto(result.model), feeds)
    assert new.dtype == F16
    np.testing.assert_allclose(new, ref, rtol=0, atol=2e-2 * float(np.abs(ref).max()))


def test_a_shape_reader_does_not_block_an_adjacent_fold() -> None:
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "b"),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["b", "shape"], ["output"], name="reshape"),
    ]
    inits = [init("w", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)), *bn_params("bn", 4)]
    m = model(nodes, inits, [("input", [1, 3, 5, 5])], ["output"])
    assert len(fold_and_check(m).report.folded) == 1


# --- branch sums (RepVGG / MobileOne train-time blocks) --------------------------------


@pytest.mark.parametrize("name", ["repvgg_block.onnx", "mobileone_dw_block.onnx"])
def test_rep_block_merges_into_one_conv(name: str) -> None:
    result = fold_sample(name)
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * 2 + [FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    assert op_types(to_proto(result.model)) == ["Conv", "Relu"]
    assert result.report.refused == []
    assert result.to_dict()["report"]["folded"][-1]["kind"] == "reparam"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("repvgg_block.onnx", FoldKind.REPARAM),
        ("conv_add_bn.onnx", FoldKind.OVER_ADD),
        ("conv_concat_bn.onnx", FoldKind.OVER_CONCAT),
    ],
)
def test_merges_and_join_folds_are_compared_at_their_sites(name: str, kind: FoldKind) -> None:
    """The value a merged conv or a join now computes is a verification site, like an
    adjacent fold's: the sum's (or the BN's) output, under the same name in both models."""
    result = fold_sample(name)
    [entry] = [f for f in result.report.folded if f.kind is kind]
    assert entry.value
    assert result.verification is not None
    assert entry.site in [s.site for s in result.verification.sites]


def test_a_planted_error_in_a_merged_conv_fails_at_its_site() -> None:
    import onnx_ir as ir

    from bnfold.verification import site_values, verify_onnx

    original = SAMPLES / "repvgg_block.onnx"
    result = bnfold.fold(original)
    planted = to_proto(result.model)
    [conv] = [n for n in planted.graph.node if n.op_type == "Conv"]
    [weight] = [t for t in planted.graph.initializer if t.name == conv.input[1]]
    w = onnx.numpy_helper.to_array(weight).copy()
    w[1] *= 1 + 1e-3  # one output channel's scale off
    weight.CopyFrom(onnx.numpy_helper.from_array(w, weight.name))
    check = verify_onnx(original, ir.from_proto(planted), sites=site_values(result.report))
    [merge] = [f for f in result.report.folded if f.kind is FoldKind.REPARAM]
    assert not check.passed
    assert [s.site for s in check.sites if not s.passed] == [merge.site]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("neg_branch_groups.onnx", Code.BRANCH_MISMATCH),
        ("neg_branch_uncentred.onnx", Code.UNCENTRED_TAP),
        ("neg_branch_shared.onnx", Code.BRANCHING),
    ],
)
def test_branch_sum_refusals_keep_the_identity_bn(name: str, code: Code) -> None:
    assert_refused_unchanged(name, code, site="bn_identity -> add_identity")


def branch_sum(
    dtype: type = np.float32, stride: int = 1, identity: bool = True, dilation: int = 1
) -> onnx.ModelProto:
    """input -> Conv 3x3 + Conv 1x1 (+ BN(input)) -> output, every term reading input."""
    c = 4
    attrs = {"strides": [stride] * 2, "dilations": [dilation] * 2}
    nodes = [
        helper.make_node("Conv", ["input", "wk", "bk"], ["k"], name="conv_k",
                         pads=[dilation] * 4, **attrs),
        helper.make_node("Conv", ["input", "w1"], ["one"], name="conv_1", **attrs),
        helper.make_node("Add", ["k", "one"], ["s" if identity else "output"], name="add"),
    ]  # fmt: skip
    inits = [
        init("wk", RNG.normal(size=(c, c, 3, 3)).astype(dtype)),
        init("bk", RNG.normal(size=c).astype(dtype)),
        init("w1", RNG.normal(size=(c, c, 1, 1)).astype(dtype)),
    ]
    if identity:
        nodes += [bn_node("bn", "input", "i"), helper.make_node("Add", ["s", "i"], ["output"])]
        inits += bn_params("bn", c, dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model(nodes, inits, [("input", [1, c, 7, 7])], ["output"], dtype=elem)


def test_conv_only_sum_merges_without_an_identity() -> None:
    # RepVGG's first block of a stage: stride 2, no identity branch.
    result = fold_and_check(branch_sum(stride=2, identity=False))
    assert [f.kind for f in result.report.folded] == [FoldKind.REPARAM]
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_dilated_branch_sum_merges() -> None:
    result = fold_and_check(branch_sum(dilation=2))
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_branch_sum_merges_in_fp16_from_float64() -> None:
    m = branch_sum(F16)
    result = bnfold.fold(m)
    assert op_types(to_proto(result.model)) == ["Conv"]
    feeds = random_feeds(m)
    (ref,) = run(m, feeds)
    (new,) = run(to_proto(result.model), feeds)
    assert new.dtype == F16
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))


# --- linear trees: Sub, Mul by a constant, constants added (FastViT's RepMixer) --------


def test_repmixer_block_merges_into_one_conv() -> None:
    result = fold_sample("repmixer_block.onnx")
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * 2 + [FoldKind.IDENTITY_TAP] * 2 + [FoldKind.REPARAM]
    assert result.report.folded[-1].site == (
        "conv_kxk + conv_small + bn_mixer - bn_norm + x -> add_residual"
    )
    assert op_types(to_proto(result.model)) == ["Conv"]
    assert result.report.refused == []


def _bn(inits: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    eps = float(np.float32(1e-5))
    scale = inits[f"{name}.scale"] / np.sqrt(inits[f"{name}.var"] + eps)
    return scale, inits[f"{name}.bias"] - inits[f"{name}.mean"] * scale


def test_repmixer_kernel_is_timms_reparameterisation_rounded_once() -> None:
    """kernel = gamma * (K_mixer + tap(s_mixer) - tap(s_norm)) + tap(1), bias likewise,
    each weight the float32 nearest its float64 value."""
    original = onnx.load(str(SAMPLES / "repmixer_block.onnx"))
    inits = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer
    }
    s_k, t_k = _bn(inits, "bn_kxk")
    s_1, t_1 = _bn(inits, "bn_small")
    s_m, t_m = _bn(inits, "bn_mixer")
    s_n, t_n = _bn(inits, "bn_norm")
    gamma = inits["layer_scale.gamma"].reshape(4)
    mixer = inits["conv_kxk.weight"] * s_k[:, None, None, None]
    mixer[:, :, 1, 1] += inits["conv_small.weight"][:, :, 0, 0] * s_1[:, None]
    mixer[:, 0, 1, 1] += s_m - s_n
    kernel = gamma[:, None, None, None] * mixer
    kernel[:, 0, 1, 1] += 1.0
    bias = gamma * (t_k + t_1 + t_m - t_n)

    folded = to_proto(bnfold.fold(original).model)
    [conv] = folded.graph.node
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    for got, exact in ((weights[conv.input[1]], kernel), (weights[conv.input[2]], bias)):
        assert got.dtype == np.float32
        error = np.abs(got.astype(np.float64) - exact)
        assert (error <= np.spacing(np.abs(got)) / 2).all()  # nearest: one rounding


def test_constant_added_in_a_tree_goes_to_the_bias() -> None:
    result = fold_sample("mobileone_1x1_block.onnx")
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT, FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_shared_term_under_a_sub_is_refused_and_the_mixer_merges_alone() -> None:
    assert_refused_unchanged(
        "neg_repmixer_shared.onnx", Code.BRANCHING, site="bn_norm -> add_residual"
    )
    result = fold_sample("neg_repmixer_shared.onnx")
    assert [f.kind for f in result.report.folded][-1] is FoldKind.REPARAM
    ops = op_types(to_proto(result.model))
    assert sorted(ops) == ["Add", "BatchNormalization", "Conv", "Identity", "Mul", "Sub"]


def test_mul_by_a_runtime_value_stays_and_the_sub_below_it_keeps_its_bn() -> None:
    """Only an Add tops a tree: a Sub merged at the top would leave verification no
    operands to scale a difference of large values by. The mixer's own sum merges."""
    original = onnx.load(str(SAMPLES / "neg_repmixer_dynamic_scale.onnx"))
    result = fold_sample("neg_repmixer_dynamic_scale.onnx")
    [merge] = [f for f in result.report.folded if f.kind is FoldKind.REPARAM]
    assert merge.site.endswith("-> add_mixer")
    assert [r.site for r in result.report.refused] == ["bn_norm"]
    assert sorted(op_types(to_proto(result.model))) == [
        "Add", "BatchNormalization", "Conv", "Mul", "Sub"
    ]  # fmt: skip
    assert_same_function(original, to_proto(result.model))


def linear_tree(combine: str, scale_shape: tuple[int, ...] = (4, 1, 1)) -> onnx.ModelProto:
    """input [1, 4, 7, 7] -> conv_k (3x3 pad 1, bias), conv_1 (1x1) and bn of it,
    combined by ``combine`` with constants ``g`` (of ``scale_shape``), ``c`` and ``half``."""
    c = 4
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["input", "wk", "bk"], ["k"], name="conv_k", pads=[1] * 4),
        helper.make_node("Conv", ["input", "w1"], ["one"], name="conv_1"),
        bn_node("bn", "input", "i"),
    ]
    inits = [
        init("wk", rng.normal(size=(c, c, 3, 3)).astype(np.float32)),
        init("bk", rng.normal(size=c).astype(np.float32)),
        init("w1", rng.normal(size=(c, c, 1, 1)).astype(np.float32)),
        init("g", rng.uniform(-1.5, 1.5, size=scale_shape).astype(np.float32)),
        init("c", rng.normal(size=(c, 1, 1)).astype(np.float32)),
        init("half", np.array(0.5, dtype=np.float32)),
        *bn_params("bn", c),
    ]
    steps = {
        # g * (conv_1(x) - conv_k(x)) + BN(x): a Mul over a Sub negating a conv
        "scaled_difference_plus_bn": [("Sub", "one", "k", "s"), ("Mul", "s", "g", "m"),
                                      ("Add", "m", "i", "output")],
        # (c - conv_k(x)) + BN(x) + conv_1(x): a constant minuend goes to the bias
        "constant_minus_conv": [("Sub", "c", "k", "d"), ("Add", "d", "i", "e"),
                                ("Add", "e", "one", "output")],
        # x + 0.5 * (conv_k(x) - BN(x)) + conv_1(x): a scalar, the constant first
        "scalar_layer_scale": [("Sub", "k", "i", "d"), ("Mul", "half", "d", "m"),
                               ("Add", "input", "m", "t"), ("Add", "t", "one", "output")],
        # x + g * (conv_k(x) + conv_1(x)): no BN, so a plain residual around a conv sum
        "residual_of_scaled_convs": [("Add", "k", "one", "s"), ("Mul", "s", "g", "m"),
                                     ("Add", "input", "m", "output")],
        # x + g * (conv_k(x) - BN(x)): RepMixer's shape, with any g
        "layer_scale": [("Sub", "k", "i", "d"), ("Mul", "d", "g", "m"),
                        ("Add", "input", "m", "output")],
    }[combine]  # fmt: skip
    for op, a, b, out in steps:
        nodes.append(helper.make_node(op, [a, b], [out], name=f"{op.lower()}_{out}"))
    read = {name for node in nodes for name in node.input}
    nodes = [n for n in nodes if n.output[0] in read | {"output"}]
    read = {name for node in nodes for name in node.input}
    inits = [t for t in inits if t.name in read]
    return model(nodes, inits, [("input", [1, c, 7, 7])], ["output"])


@pytest.mark.parametrize(
    "combine", ["scaled_difference_plus_bn", "constant_minus_conv", "scalar_layer_scale"]
)
def test_linear_trees_merge_into_one_conv(combine: str) -> None:
    result = fold_and_check(linear_tree(combine))
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    assert op_types(to_proto(result.model)) == ["Conv"]


@pytest.mark.parametrize("scale_shape", [(4, 1, 1), (1, 4, 1, 1), (1,), ()])
def test_per_channel_and_scalar_layer_scales_merge(scale_shape: tuple[int, ...]) -> None:
    result = fold_and_check(linear_tree("layer_scale", scale_shape))
    assert op_types(to_proto(result.model)) == ["Conv"]


@pytest.mark.parametrize("scale_shape", [(1, 1, 7), (1, 1, 1, 1, 1)])
def test_scale_not_per_channel_stays_and_nothing_below_it_merges(
    scale_shape: tuple[int, ...],
) -> None:
    """A Mul over a spatial axis, or one that broadcasts to rank 5, is no tree node,
    and the Sub below it is no tree's top (only an Add is)."""
    result = fold_and_check(linear_tree("layer_scale", scale_shape))
    assert result.report.folded == [] and [r.site for r in result.report.refused] == ["bn"]
    assert "Sub" in op_types(to_proto(result.model))


def test_a_difference_at_the_top_is_not_merged() -> None:
    """BN(conv_a(x) - conv_b(x)): exact as one conv, but merged at the top the
    difference would leave verification no operands to scale its bound by."""
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "wb"], ["b"], name="conv_b"),
        helper.make_node("Sub", ["a", "b"], ["s"], name="sub"),
        bn_node("bn", "s", "output"),
    ]
    inits = [
        init("wa", RNG.normal(size=(4, 4, 3, 3)).astype(np.float32)),
        init("wb", RNG.normal(size=(4, 4, 1, 1)).astype(np.float32)),
        *bn_params("bn", 4),
    ]
    result = fold_and_check(model(nodes, inits, [("input", [1, 4, 5, 5])], ["output"]))
    assert not any(f.kind is FoldKind.REPARAM for f in result.report.folded)
    assert "Sub" in op_types(to_proto(result.model))


def test_plain_residual_over_a_scaled_conv_sum_keeps_its_add_and_merges_the_sum() -> None:
    result = fold_and_check(linear_tree("residual_of_scaled_convs"))
    assert [f.kind for f in result.report.folded] == [FoldKind.REPARAM, FoldKind.ADJACENT]
    assert sorted(op_types(to_proto(result.model))) == ["Add", "Conv"]


def test_layer_scale_of_the_wrong_channel_count_is_refused() -> None:
    # Not a model a runtime runs (a [3] scale on 4 channels): planning alone refuses it.
    m = linear_tree("layer_scale", (3, 1, 1))
    result = bnfold.fold(m, verify=False)
    assert [(r.site, r.code) for r in result.report.refused] == [
        ("bn -> add_output", Code.BAD_SHAPE)
    ]
    assert op_types(to_proto(result.model)) == op_types(m)


def conv2d(x: np.ndarray, w: np.ndarray, pad: int, groups: int = 1) -> np.ndarray:
    """Reference stride-1 Conv in float64: x (C, H, W), w (C_out, C/g, k, k)."""
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad)])
    k = w.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
    c_in, c_out = w.shape[1], w.shape[0]
    out = []
    for g in range(groups):
        part = windows[g * c_in : (g + 1) * c_in]
        rows = w[g * (c_out // groups) : (g + 1) * (c_out // groups)]
        out.append(np.einsum("chwij,ocij->ohw", part, rows))
    return np.concatenate(out)


@settings(max_examples=40, deadline=None)
@given(
    small=st.sampled_from([1, 3]),
    grow=st.sampled_from([0, 1, 2]),
    groups=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_centred_kernel_reads_the_same_taps(small: int, grow: int, groups: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c, large = 4, small + 2 * grow
    x = rng.normal(size=(c, 6, 6))
    w = rng.normal(size=(c, c // groups, small, small))
    padded = centred_kernel(w, (large, large))
    np.testing.assert_allclose(
        conv2d(x, padded, small // 2 + grow, groups), conv2d(x, w, small // 2, groups)
    )


@settings(max_examples=40, deadline=None)
@given(k=st.sampled_from([1, 3, 5]), groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_identity_kernel_scales_each_channel(k: int, groups: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, scale = rng.normal(size=(4, 5, 5)), rng.normal(size=4)
    w = identity_kernel(scale, 4 // groups, (k, k))
    np.testing.assert_allclose(conv2d(x, w, k // 2, groups), scale[:, None, None] * x)


def test_kernels_that_cannot_centre_raise() -> None:
    with pytest.raises(LayoutError):
        centred_kernel(np.ones((1, 1, 2, 2)), (3, 3))
    with pytest.raises(LayoutError):
        identity_kernel(np.ones(2), 2, (2, 2))


# --- pooling between the linear op and the BN ------------------------------------------


@pytest.mark.parametrize("name", ["conv_avgpool_bn.onnx", "conv_maxpool_bn.onnx"])
def test_bn_after_pool_folds_into_the_conv_before_it(name: str) -> None:
    result = fold_sample(name)
    assert [f.site for f in result.report.folded] == ["conv1 -> pool1 -> bn1"]
    assert "BatchNormalization" not in result.report.ops_after


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("neg_avgpool_pad_bn.onnx", Code.POOL_PADDING),
        ("neg_maxpool_negative_bn.onnx", Code.NEGATIVE_SCALE),
    ],
)
def test_pool_refusals_leave_the_bn(name: str, code: Code) -> None:
    assert_refused_unchanged(name, code, site="conv1 -> pool1 -> bn1")


def conv_pool_bn(pool: str, order: str = "pool_bn", **attrs: object) -> onnx.ModelProto:
    """input -> conv -> pool -> bn (or conv -> bn -> pool) -> output, same parameters."""
    conv = helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])
    first, second = ("p", "output") if order == "pool_bn" else ("output", "p")
    pool_in, bn_in = ("c", "p") if order == "pool_bn" else ("n", "c")
    nodes = [
        conv,
        helper.make_node(pool, [pool_in], [first if order == "pool_bn" else "output"],
                         name="pool", **attrs),
        bn_node("bn", bn_in, second if order == "pool_bn" else "n"),
    ]  # fmt: skip
    inits = [
        init("w", np.random.default_rng(5).normal(size=(4, 3, 3, 3)).astype(np.float32)),
        init("b", np.random.default_rng(6).normal(size=4).astype(np.float32)),
        *bn_params("bn", 4, **fixed_bn(4)),
    ]
    return model(nodes, inits, [("input", [1, 3, 7, 7])], ["output"])


def fixed_bn(c: int) -> dict[str, np.ndarray]:
    """BN parameters that are the same on every call, for models compared side by side."""
    rng = np.random.default_rng(7)
    return {
        "scale": rng.uniform(0.5, 1.5, c),
        "bias": rng.normal(0, 0.5, c),
        "mean": rng.normal(0, 0.5, c),
        "var": rng.uniform(0.5, 2.0, c),
    }


@pytest.mark.parametrize(
    ("pool", "attrs"),
    [
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
        ("AveragePool", {"kernel_shape": [3, 3], "ceil_mode": 1, "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [2, 2], "count_include_pad": 1}),  # no padding
        ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2]}),
    ],
)
def test_pools_that_commute_with_the_bn_fold(pool: str, attrs: dict) -> None:
    assert len(fold_and_check(conv_pool_bn(pool, **attrs)).report.folded) == 1


def test_padded_average_counting_zeros_really_does_not_commute() -> None:
    # Why POOL_PADDING exists: BN before the pool differs at the borders when the
    # padded zeros count in the divisor, and agrees when they do not.
    feeds = random_feeds(conv_pool_bn("GlobalAveragePool"))
    for include, equal in ((1, False), (0, True)):
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": include}
        (a,) = run(conv_pool_bn("AveragePool", "pool_bn", **attrs), feeds)
        (b,) = run(conv_pool_bn("AveragePool", "bn_pool", **attrs), feeds)
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5) is equal


def test_padded_average_counting_zeros_folds_a_zero_shift() -> None:
    m = conv_pool_bn("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    for t in m.graph.initializer:
        if t.name in ("bn.bias", "bn.mean"):
            t.CopyFrom(init(t.name, np.zeros(4, np.float32)))
    assert len(fold_and_check(m).report.folded) == 1


# --- BN after an Add or a Concat of linear ops -----------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("conv_add_bn.onnx", FoldKind.OVER_ADD), ("conv_concat_bn.onnx", FoldKind.OVER_CONCAT)],
)
def test_bn_after_a_join_folds_into_every_op(name: str, kind: FoldKind) -> None:
    result = fold_sample(name)
    assert [f.kind for f in result.report.folded] == [kind]
    assert result.report.folded[0].linear == "conv_a, conv_b"
    assert "BatchNormalization" not in result.report.ops_after


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("neg_concat_pool_bn.onnx", Code.NOT_LINEAR_TERM),
        ("neg_add_branching_bn.onnx", Code.BRANCHING),
    ],
)
def test_join_refusals_leave_the_bn(name: str, code: Code) -> None:
    assert_refused_unchanged(name, code)


def gemm_join(join: str, dtype: type = np.float32, axis: int = 1) -> onnx.ModelProto:
    """Two Gemms (alpha, beta, transB) of different inputs -> ``join`` -> BN -> output."""
    c_a, c_b = (4, 4) if join == "Add" else (3, 5)
    nodes = [
        helper.make_node("Gemm", ["input", "wa", "ba"], ["a"], name="gemm_a", alpha=0.5, beta=2.0,
                         transB=1),
        helper.make_node("Relu", ["input"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "wb"], ["b"], name="gemm_b"),
        helper.make_node(join, ["a", "b"], ["j"], name="join",
                         **({"axis": axis} if join == "Concat" else {})),
        bn_node("bn", "j", "output"),
    ]  # fmt: skip
    inits = [
        init("wa", RNG.normal(size=(c_a, 6)).astype(dtype)),
        init("ba", RNG.normal(size=c_a).astype(dtype)),
        init("wb", RNG.normal(size=(6, c_b)).astype(dtype)),
        *bn_params("bn", c_a + c_b if join == "Concat" else c_a, dtype),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model(nodes, inits, [("input", [2, 6])], ["output"], dtype=elem)


@pytest.mark.parametrize("join", ["Add", "Concat"])
def test_bn_after_a_join_of_gemms_folds(join: str) -> None:
    result = fold_and_check(gemm_join(join))
    assert op_types(to_proto(result.model)) == ["Gemm", "Relu", "Gemm", join]


def test_bn_after_a_concat_over_another_axis_is_not_per_channel() -> None:
    m = gemm_join("Add")  # two [2, 4] Gemms, then joined on the batch axis: [4, 4]
    m.graph.node[3].CopyFrom(helper.make_node("Concat", ["a", "b"], ["j"], name="join", axis=0))
    assert bnfold.fold(m).report.codes == [Code.NOT_PER_CHANNEL]


@pytest.mark.parametrize("join", ["Add", "Concat"])
def test_bn_after_a_join_folds_in_fp16(join: str) -> None:
    m = gemm_join(join, F16)
    result = bnfold.fold(m)
    assert len(result.report.folded) == 1
    feeds = random_feeds(m)
    (ref,) = run(m, feeds)
    (new,) = run(to_proto(result.model), feeds)
    assert new.dtype == F16
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))


@settings(max_examples=50, deadline=None)
@given(channels=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_concat_split_gives_each_op_its_own_channels(channels: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = sum(channels)
    affine = Affine(rng.normal(size=total), rng.normal(size=total))
    parts = concat_parts(affine, channels)
    assert [p.scale.shape[0] for p in parts] == channels
    np.testing.assert_array_equal(np.concatenate([p.scale for p in parts]), affine.scale)
    np.testing.assert_array_equal(np.concatenate([p.shift for p in parts]), affine.shift)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 4), seed=st.integers(0, 99))
def testadd_parts_sum_to_the_affine(count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    affine = Affine(rng.normal(size=3), rng.normal(size=3))
    terms = rng.normal(size=(count, 3))
    parts = add_parts(affine, count)
    folded = sum(p.scale * t + p.shift for p, t in zip(parts, terms, strict=True))
    np.testing.assert_allclose(folded, affine.scale * terms.sum(axis=0) + affine.shift)


def test_bn_after_a_sum_of_convs_on_one_input_folds_into_the_merge() -> None:
    m = branch_sum(identity=False)
    nodes = list(m.graph.node)
    nodes[-1].output[0] = "s"
    m.graph.node.append(bn_node("bn", "s", "output"))
    m.graph.initializer.extend(bn_params("bn", 4))
    result = fold_and_check(m)
    assert [f.kind for f in result.report.folded] == [FoldKind.ADJACENT, FoldKind.REPARAM]
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_training_mode_identity_bn_is_never_merged() -> None:
    m = branch_sum()
    for node in m.graph.node:
        if node.name == "bn":
            node.attribute.append(helper.make_attribute("training_mode", 1))
    result = bnfold.fold(m)
    assert result.report.codes == [Code.TRAINING_MODE]
    assert op_types(to_proto(result.model)) == op_types(m)


def test_repvit_sum_with_a_bare_identity_then_bn_becomes_one_conv() -> None:
    # RepViT's RepVGGDW: BN(conv3x3(x) + conv1x1(x) + x), depthwise.
    c = 4
    nodes = [
        helper.make_node("Conv", ["input", "wk"], ["k"], name="conv_k", pads=[1] * 4, group=c),
        helper.make_node("Conv", ["input", "w1", "b1"], ["one"], name="conv_1", group=c),
        helper.make_node("Add", ["k", "one"], ["s"], name="add"),
        helper.make_node("Add", ["s", "input"], ["t"], name="add_x"),
        bn_node("bn", "t", "output"),
    ]
    inits = [
        init("wk", RNG.normal(size=(c, 1, 3, 3)).astype(np.float32)),
        init("w1", RNG.normal(size=(c, 1, 1, 1)).astype(np.float32)),
        init("b1", RNG.normal(size=c).astype(np.float32)),
        *bn_params("bn", c),
    ]
    m = model(nodes, inits, [("input", [1, c, 6, 6])], ["output"])
    result = fold_and_check(m)
    assert op_types(to_proto(result.model)) == ["Conv"]
    assert result.report.folded[-1].site == "conv_k + conv_1 + x -> add_x"


def test_a_residual_around_an_uncentred_conv_is_left_alone() -> None:
    # Add(conv(x), x) with pads (2, 2, 0, 0): same output size, but x's tap is not the
    # kernel's centre: no merge (and, with no BN involved, nothing to report).
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[2, 2, 0, 0]),
        helper.make_node("Add", ["c", "input"], ["output"], name="add"),
    ]
    m = model(nodes, [init("w", RNG.normal(size=(3, 3, 3, 3)).astype(np.float32))],
              [("input", [1, 3, 5, 5])], ["output"])  # fmt: skip
    result = bnfold.fold(m)
    assert result.report.folded == [] and result.report.refused == []
    assert op_types(to_proto(result.model)) == ["Conv", "Add"]


def test_repvit_sample_becomes_one_conv() -> None:
    result = fold_sample("repvit_dw_block.onnx")
    assert [f.kind for f in result.report.folded] == [
        FoldKind.ADJACENT, FoldKind.ADJACENT, FoldKind.REPARAM
    ]  # fmt: skip
    assert op_types(to_proto(result.model)) == ["Conv"]


def test_crossed_kernels_do_not_merge() -> None:
    # 3x1 and 1x3 with pads that would line up if a kernel could shrink: no merge.
    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], name="conv_a", pads=[1, 0, 1, 0]),
        helper.make_node("Conv", ["input", "wb"], ["b"], name="conv_b", pads=[0, 1, 0, 1]),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        bn_node("bn", "input", "i"),
        helper.make_node("Add", ["s", "i"], ["output"], name="add_identity"),
    ]
    inits = [
        init("wa", RNG.normal(size=(3, 3, 3, 1)).astype(np.float32)),
        init("wb", RNG.normal(size=(3, 3, 1, 3)).astype(np.float32)),
        *bn_params("bn", 3),
    ]
    m = model(nodes, inits, [("input", [1, 3, 5, 5])], ["output"])
    result = bnfold.fold(m)
    assert result.report.codes == [Code.UNCENTRED_TAP]
    assert_same_function(m, to_proto(result.model))


def test_adds_reading_each_other_in_a_cycle_are_no_branch_sum() -> None:
    """A damaged graph where two Adds read each other's outputs: the branch-sum rule
    must answer (the CLI refuses such a graph before folding; the rule must not loop
    when handed one)."""
    import onnx_ir as ir

    from bnfold.onnx_front import match

    nodes = [
        bn_node("bn", "input", "b"),
        helper.make_node("Add", ["b", "s2"], ["s1"], name="add1"),
        helper.make_node("Add", ["s1", "input"], ["s2"], name="add2"),
        helper.make_node("Relu", ["input"], ["output"], name="relu"),
    ]  # each Add's output is the other's only reader
    m = model(nodes, bn_params("bn", 3), [("input", [1, 3, 4, 4])], ["output"])
    graph = ir.from_proto(m).graph
    outcomes = [match.plan(node, m.ir_version) for node in graph]
    assert all(not isinstance(o, match.FoldPlan) for o in outcomes)
    with pytest.raises(bnfold.BnfoldError, match="before it is computed"):
        bnfold.inspect(m)
