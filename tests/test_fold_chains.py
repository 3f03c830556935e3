"""An op folded several times (Conv -> BN -> Mul -> Add, BN -> Conv -> BN) is rounded once:
its weight and bias equal the whole float64 product cast to the model's dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from bnfold import Code, affine, layouts
from bnfold.core import cast
from bnfold.report import FoldKind
from tests.builders import bn_node, bn_params, conv_bn, init, model

EPS = float(np.float32(1e-5))  # the BN attribute's default, as stored (float32)


def _bn_scale_shift(values: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (values[f"{prefix}.{k}"] for k in ("scale", "bias", "mean", "var"))
    scale = gamma / np.sqrt(var + EPS)
    return scale, beta - mean * scale


def _conv_bn_mul_add() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fp16 conv1 -> bn1 -> Mul -> Add, and its weight and bias folded exactly (float64)."""
    nodes, inits = conv_bn(c_in=16, c_out=8, dtype=np.float16)
    nodes[-1].output[0] = "normed"
    rng = np.random.default_rng(11)
    mul = rng.uniform(0.5, 2.0, (1, 8, 1, 1)).astype(np.float16)
    add = rng.normal(size=(1, 8, 1, 1)).astype(np.float16)
    nodes += [
        helper.make_node("Mul", ["normed", "gain"], ["scaled"], name="mul"),
        helper.make_node("Add", ["scaled", "offset"], ["output"], name="add"),
    ]
    inits += [init("gain", mul), init("offset", add)]
    proto = model(
        nodes, inits, [("input", [1, 16, 6, 6])], ["output"], dtype=onnx.TensorProto.FLOAT16
    )
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in inits}
    scale, shift = _bn_scale_shift(values, "bn1")
    gain, offset = values["gain"].reshape(8), values["offset"].reshape(8)
    weight = values["conv1.weight"] * scale[:, None, None, None] * gain[:, None, None, None]
    bias = (values["conv1.bias"] * scale + shift) * gain + offset
    return proto, weight, bias


def _bn_conv_bn() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fp16 bn0 -> conv1 (no padding, no bias) -> bn1, and conv1 folded exactly (float64)."""
    rng = np.random.default_rng(12)
    weight = rng.normal(size=(8, 4, 3, 3)).astype(np.float16)
    nodes = [
        bn_node("bn0", "input", "pre"),
        helper.make_node("Conv", ["pre", "conv1.weight"], ["c1"], name="conv1"),
        bn_node("bn1", "c1", "output"),
    ]
    inits = [init("conv1.weight", weight), *bn_params("bn0", 4, np.float16)]
    inits += bn_params("bn1", 8, np.float16)
    proto = model(
        nodes, inits, [("input", [1, 4, 6, 6])], ["output"], dtype=onnx.TensorProto.FLOAT16
    )
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in inits}
    s0, t0 = _bn_scale_shift(values, "bn0")
    s1, t1 = _bn_scale_shift(values, "bn1")
    w64 = values["conv1.weight"]
    bias = (w64 * t0[None, :, None, None]).sum(axis=(1, 2, 3)) * s1 + t1
    exact = w64 * s0[None, :, None, None] * s1[:, None, None, None]
    return proto, exact, bias


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 30), balanced=st.booleans())
def test_several_factors_are_multiplied_in_float64_and_cast_once(
    seed: int, rows: int, balanced: bool
) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(rows, 5, 3)).astype(np.float16)
    per_row = rng.uniform(0.2, 5.0, (rows, 1, 1))
    per_column = rng.uniform(0.2, 5.0, (1, 5, 1))
    conv = layouts.conv() if balanced else None
    whole = affine.cast_weight(weight.astype(np.float64) * per_row * per_column, weight.dtype, conv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cast, "CHUNK_BYTES", 2 * 15 * 4)  # 4 rows a block
        assert np.array_equal(affine.scaled(weight, (per_row, per_column), conv), whole)
        blocks = affine.scaled_blocks(weight, (per_row, per_column), buffers=2, balance=conv)
        assert np.array_equal(np.concatenate([b.copy() for b in blocks]), whole)


def test_the_overflow_bound_multiplies_every_factor() -> None:
    weight = np.full((2, 2), 200.0, np.float16)
    half = np.full((2, 1), 17.0)  # 200 * 17 = 3400: fits; 200 * 17 * 17 = 57800: fits too
    assert affine.cannot_overflow(weight, (half, half))
    assert not affine.cannot_overflow(weight, (half, half, half))  # 982600 > 65504


CHAINS = {"conv-bn-mul-add": _conv_bn_mul_add, "bn-conv-bn": _bn_conv_bn}


@pytest.mark.parametrize("held_bytes", [1 << 30, 0], ids=["held", "recomputed"])
@pytest.mark.parametrize("chain", CHAINS)
def test_onnx_chain_rounds_each_value_once(chain: str, held_bytes: int) -> None:
    from bnfold.onnx_front.passes import FoldAffinePass

    proto, weight, bias = CHAINS[chain]()
    result = FoldAffinePass(held_bytes=held_bytes)(ir.serde.deserialize_model(proto))
    assert len(result.report.folded) == (3 if chain == "conv-bn-mul-add" else 2)
    assert not result.report.refused
    folded = result.model.graph.initializers
    assert np.array_equal(folded["conv1.weight"].const_value.numpy(), weight.astype(np.float16))
    (bias_value,) = [v for n, v in folded.items() if n != "conv1.weight"]
    assert np.array_equal(bias_value.const_value.numpy(), bias.astype(np.float16))


def test_onnx_chain_streamed_to_external_data_rounds_once(tmp_path: Path) -> None:
    from bnfold.onnx_front import io
    from bnfold.onnx_front.passes import FoldAffinePass

    proto, weight, _ = _conv_bn_mul_add()
    source = tmp_path / "model.onnx"
    onnx.save_model(proto, source, save_as_external_data=True, size_threshold=0)
    result = FoldAffinePass(held_bytes=0)(io.load_model(source))
    io.save_model(result.model, tmp_path / "out.onnx", external_data=True)
    saved = ir.load(tmp_path / "out.onnx").graph.initializers["conv1.weight"].const_value
    assert np.array_equal(saved.numpy(), weight.astype(np.float16))


def test_a_second_pass_over_a_folded_model_still_rounds_once() -> None:
    """The first pass can fold only the BN (the Mul's factor is a graph input);
    once the factor is made a constant, a second pass folds Mul and Add into the
    weight the first pass wrote, from its exact value."""
    from bnfold.onnx_front.passes import FoldAffinePass

    proto, weight, _ = _conv_bn_mul_add()
    gain = next(t for t in proto.graph.initializer if t.name == "gain")
    proto.graph.input.append(helper.make_tensor_value_info("gain", gain.data_type, gain.dims))
    proto.graph.initializer.remove(gain)
    first = FoldAffinePass()(ir.serde.deserialize_model(proto))
    assert [f.pattern for f in first.report.folded] == ["Conv+BatchNormalization"]
    folded = first.model
    gain_input = next(v for v in folded.graph.inputs if v.name == "gain")
    folded.graph.inputs.remove(gain_input)
    gain_input.const_value = ir.tensor(numpy_helper.to_array(gain), name="gain")
    folded.graph.register_initializer(gain_input)
    second = FoldAffinePass()(folded)
    assert [f.pattern for f in second.report.folded] == ["Conv+Mul", "Conv+Add"]
    got = second.model.graph.initializers["conv1.weight"].const_value.numpy()
    assert np.array_equal(got, weight.astype(np.float16))


@pytest.mark.parametrize("kind", ["module", "exported program"])
def test_torch_conv_bn_bn_rounds_each_parameter_once(kind: str) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from bnfold.api import fold

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8))
    with torch.no_grad():
        for bn in net[1:]:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.3, 3.0)
    net = net.eval().to(torch.bfloat16)
    x = torch.randn(2, 6, 5, 5, dtype=torch.bfloat16)
    source = net if kind == "module" else torch.export.export(net, (x,))
    result = fold(source, (x,) if kind == "module" else None)
    assert len(result.report.folded) == 2
    with torch.no_grad():
        weight, bias = net[0].weight.double().numpy(), net[0].bias.double().numpy()
        for bn in net[1:]:
            scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
            shift = bn.bias.double().numpy() - bn.running_mean.double().numpy() * scale
            weight, bias = weight * scale[:, None, None, None], bias * scale + shift
    folded = result.model.state_dict
    tensors = folded if kind == "exported program" else folded()
    (got_w,) = [t for t in tensors.values() if tuple(t.shape) == (8, 6, 3, 3)]
    assert torch.equal(got_w, torch.from_numpy(weight).to(torch.bfloat16))
    assert any(torch.equal(t, torch.from_numpy(bias).to(torch.bfloat16)) for t in tensors.values())


def _then_mul(nodes: list, inits: list, channels: int, shape: tuple[int, ...]) -> np.ndarray:
    """Append ``output = bn1's output * gain`` to a graph; return the gain in float64."""
    nodes[-1].output[0] = "normed"
    gain = np.random.default_rng(13).uniform(0.5, 2.0, shape).astype(np.float16)
    nodes.append(helper.make_node("Mul", ["normed", "gain"], ["output"], name="mul"))
    inits.append(init("gain", gain))
    return gain.astype(np.float64).reshape(channels)


def _bn_affine(inits: list) -> tuple[np.ndarray, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in inits}
    return _bn_scale_shift(values, "bn1")


def test_matmul_that_became_gemm_then_folds_a_mul_exactly() -> None:
    """The BN fold turns MatMul into Gemm with a new bias C; the Mul fold then
    reads that bias's exact value, not its fp16 rounding."""
    from bnfold.onnx_front.passes import FoldAffinePass

    weight = np.random.default_rng(14).normal(size=(16, 8)).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["input", "fc.weight"], ["m"], name="fc"),
        bn_node("bn1", "m", "output"),
    ]
    inits = [init("fc.weight", weight), *bn_params("bn1", 8, np.float16)]
    gain = _then_mul(nodes, inits, 8, (8,))
    proto = model(nodes, inits, [("input", [2, 16])], ["output"], dtype=onnx.TensorProto.FLOAT16)
    scale, shift = _bn_affine(inits)
    result = FoldAffinePass()(ir.serde.deserialize_model(proto))
    assert [f.pattern for f in result.report.folded] == ["MatMul+BatchNormalization", "Gemm+Mul"]
    folded = result.model.graph.initializers
    expected = (weight.astype(np.float64) * scale * gain).astype(np.float16)
    assert np.array_equal(folded["fc.weight"].const_value.numpy(), expected)
    (bias,) = [v for n, v in folded.items() if n != "fc.weight"]
    assert np.array_equal(bias.const_value.numpy(), (shift * gain).astype(np.float16))


@pytest.mark.parametrize("source", ["constant node", "shared initializer"])
def test_chain_on_a_weight_that_is_no_plain_initializer_rounds_once(source: str) -> None:
    """A weight from a Constant node (torch's dynamo exporter) is folded from its
    values; a weight another conv also reads is cloned for this one. Either way
    the second fold composes with the first."""
    from bnfold.onnx_front.passes import FoldAffinePass

    weight = np.random.default_rng(15).normal(size=(4, 3, 3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["input", "W"], ["c"], name="conv1", pads=[1] * 4),
        bn_node("bn1", "c", "output"),
    ]
    inits = [*bn_params("bn1", 4, np.float16)]
    gain = _then_mul(nodes, inits, 4, (1, 4, 1, 1))
    outputs = ["output"]
    if source == "constant node":
        constant = numpy_helper.from_array(weight, "W")
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=constant, name="const"))
    else:
        inits.append(init("W", weight))
        nodes.append(
            helper.make_node("Conv", ["input", "W"], ["other"], name="conv2", pads=[1] * 4)
        )
        outputs.append("other")
    proto = model(nodes, inits, [("input", [1, 3, 5, 5])], outputs, dtype=onnx.TensorProto.FLOAT16)
    scale, _ = _bn_affine(inits)
    result = FoldAffinePass()(ir.serde.deserialize_model(proto))
    assert [f.pattern for f in result.report.folded] == ["Conv+BatchNormalization", "Conv+Mul"]
    convs = {n.name: n for n in result.model.graph if n.op_type == "Conv"}
    expected = (weight.astype(np.float64) * (scale * gain)[:, None, None, None]).astype(np.float16)
    assert np.array_equal(convs["conv1"].inputs[1].const_value.numpy(), expected)
    if source == "shared initializer":
        assert np.array_equal(convs["conv2"].inputs[1].const_value.numpy(), weight)


def test_planning_a_chain_on_a_recomputed_weight_computes_no_weight(monkeypatch) -> None:
    """With no memory budget every folded weight is computed at the save; the
    second fold of a chain is planned from the first's original, not from its
    values (which would hold a weight the save streams)."""
    from bnfold.onnx_front import folded
    from bnfold.onnx_front.passes import FoldAffinePass

    computed: list[tuple[int, ...]] = []
    compute = folded.DeferredWeight.compute
    monkeypatch.setattr(
        folded.DeferredWeight, "compute", lambda self: computed.append(self.shape) or compute(self)
    )
    proto, weight, _ = _conv_bn_mul_add()
    result = FoldAffinePass(held_bytes=0)(ir.serde.deserialize_model(proto))
    assert len(result.report.folded) == 3 and computed == []
    got = result.model.graph.initializers["conv1.weight"].const_value.numpy()
    assert np.array_equal(got, weight.astype(np.float16)) and computed == [weight.shape]


# --- folds that land on a merged or joined op ------------------------------------------
# A branch merge (rules.branch_sum) writes a kernel computed in float64; a fold that
# lands on the merged conv afterwards (a Mul, a BN through a pool, another pass) must
# start from that float64 kernel, not from its fp16 rounding. Likewise for the ops a
# BN folded into through an Add or a Concat (rules.add_concat).

C = 4  # channels of the blocks below


def _fp16_model(nodes: list, inits: list, inputs: tuple[str, ...] = ("input",)) -> onnx.ModelProto:
    shapes = [(name, [1, C, 6, 6]) for name in inputs]
    return model(nodes, inits, shapes, ["output"], dtype=onnx.TensorProto.FLOAT16)


def _values(inits: list) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in inits}


def _per_out(vector: np.ndarray) -> np.ndarray:
    return vector[:, None, None, None]


def _repvgg_block(out: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """fp16 ``Add(Add(bn_k(conv_k3x3(x)), bn_1(conv_1x1(x))), bn_id(x))`` into ``out``,
    and the merged conv's kernel and bias in float64."""
    rng = np.random.default_rng(21)
    nodes = [
        helper.make_node("Conv", ["input", "wk", "bk"], ["k"], name="conv_k", pads=[1] * 4),
        bn_node("bn_k", "k", "kn"),
        helper.make_node("Conv", ["input", "w1"], ["one"], name="conv_1"),
        bn_node("bn_1", "one", "onen"),
        bn_node("bn_id", "input", "idn"),
        helper.make_node("Add", ["kn", "onen"], ["s"], name="add"),
        helper.make_node("Add", ["s", "idn"], [out], name="add_id"),
    ]
    inits = [
        init("wk", rng.normal(size=(C, C, 3, 3)).astype(np.float16)),
        init("bk", rng.normal(size=C).astype(np.float16)),
        init("w1", rng.normal(size=(C, C, 1, 1)).astype(np.float16)),
    ]
    for bn in ("bn_k", "bn_1", "bn_id"):
        inits += bn_params(bn, C, np.float16)
    values = _values(inits)
    (sk, tk), (s1, t1), (si, ti) = (_bn_scale_shift(values, bn) for bn in ("bn_k", "bn_1", "bn_id"))
    kernel = values["wk"] * _per_out(sk)
    kernel[:, :, 1:2, 1:2] += values["w1"] * _per_out(s1)
    kernel[np.arange(C), np.arange(C), 1, 1] += si
    bias = values["bk"] * sk + tk + t1 + ti
    return nodes, inits, kernel, bias


def _repvgg_then_mul_add() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The RepVGG block, then a per-channel Mul and Add of constants."""
    nodes, inits, kernel, bias = _repvgg_block("block")
    rng = np.random.default_rng(22)
    gain = rng.uniform(0.5, 2.0, (1, C, 1, 1)).astype(np.float16)
    offset = rng.normal(size=(1, C, 1, 1)).astype(np.float16)
    nodes += [
        helper.make_node("Mul", ["block", "gain"], ["scaled"], name="mul"),
        helper.make_node("Add", ["scaled", "offset"], ["output"], name="offset_add"),
    ]
    inits += [init("gain", gain), init("offset", offset)]
    g, o = gain.astype(np.float64).reshape(C), offset.astype(np.float64).reshape(C)
    return _fp16_model(nodes, inits), kernel * _per_out(g), bias * g + o


def _repvgg_then_pool_bn() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The RepVGG block, then MaxPool, then a BN (it folds through the pool)."""
    nodes, inits, kernel, bias = _repvgg_block("block")
    nodes += [
        helper.make_node("MaxPool", ["block"], ["pooled"], name="pool", kernel_shape=[2, 2]),
        bn_node("bn_after", "pooled", "output"),
    ]
    inits += bn_params("bn_after", C, np.float16)
    scale, shift = _bn_scale_shift(_values(inits), "bn_after")
    return _fp16_model(nodes, inits), kernel * _per_out(scale), bias * scale + shift


def _repvgg_plus_conv_then_bn() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Add(RepVGG block(x), conv_c(y)) -> BN: the BN folds through the Add into the merged
    conv (the first term, so it takes the shift too) and into conv_c."""
    nodes, inits, kernel, bias = _repvgg_block("block")
    rng = np.random.default_rng(24)
    nodes += [
        helper.make_node("Conv", ["other", "wc"], ["c"], name="conv_c", pads=[1] * 4),
        helper.make_node("Add", ["block", "c"], ["joined"], name="join"),
        bn_node("bn_after", "joined", "output"),
    ]
    inits += [init("wc", rng.normal(size=(C, C, 3, 3)).astype(np.float16))]
    inits += bn_params("bn_after", C, np.float16)
    scale, shift = _bn_scale_shift(_values(inits), "bn_after")
    proto = _fp16_model(nodes, inits, inputs=("input", "other"))
    return proto, kernel * _per_out(scale), bias * scale + shift


def _concat_bn_bn() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fp16 Concat(conv_a(x), conv_b(x)) -> bn1 -> bn2: two folds through the Concat.
    Returns conv_a's kernel and bias in float64."""
    rng = np.random.default_rng(23)
    nodes = [
        helper.make_node("Conv", ["input", "wa", "ba"], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("Conv", ["input", "wb", "bb"], ["b"], name="conv_b", pads=[1] * 4),
        helper.make_node("Concat", ["a", "b"], ["joined"], name="concat", axis=1),
        bn_node("bn1", "joined", "normed"),
        bn_node("bn2", "normed", "output"),
    ]
    inits = [
        init(name, rng.normal(size=shape).astype(np.float16))
        for name, shape in (("wa", (C, C, 3, 3)), ("ba", C), ("wb", (C, C, 3, 3)), ("bb", C))
    ]
    inits += [*bn_params("bn1", 2 * C, np.float16), *bn_params("bn2", 2 * C, np.float16)]
    values = _values(inits)
    (s1, t1), (s2, t2) = (_bn_scale_shift(values, bn) for bn in ("bn1", "bn2"))
    s1, t1, s2, t2 = (v[:C] for v in (s1, t1, s2, t2))
    kernel = values["wa"] * _per_out(s1 * s2)
    return _fp16_model(nodes, inits), kernel, (values["ba"] * s1 + t1) * s2 + t2


def _conv_bn_pool_bn() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fp16 conv1 -> bn1 -> MaxPool -> bn2: an adjacent fold, then one through the pool."""
    nodes, inits = conv_bn(c_in=C, c_out=C, dtype=np.float16)
    nodes[-1].output[0] = "normed"
    nodes += [
        helper.make_node("MaxPool", ["normed"], ["pooled"], name="pool", kernel_shape=[2, 2]),
        bn_node("bn2", "pooled", "output"),
    ]
    inits += bn_params("bn2", C, np.float16)
    values = _values(inits)
    (s1, t1), (s2, t2) = (_bn_scale_shift(values, bn) for bn in ("bn1", "bn2"))
    kernel = values["conv1.weight"] * _per_out(s1 * s2)
    return _fp16_model(nodes, inits), kernel, (values["conv1.bias"] * s1 + t1) * s2 + t2


# name: (model and exact kernel/bias, the conv they belong to, folds reported)
LANDING_CHAINS = {
    "repvgg-mul-add": (_repvgg_then_mul_add, "conv_k", 6),
    "repvgg-maxpool-bn": (_repvgg_then_pool_bn, "conv_k", 5),
    "repvgg-add-conv-bn": (_repvgg_plus_conv_then_bn, "conv_k", 5),
    "concat-bn-bn": (_concat_bn_bn, "conv_a", 2),
    "conv-bn-maxpool-bn": (_conv_bn_pool_bn, "conv1", 2),
}


def _conv_weight_and_bias(folded: ir.Model, conv: str) -> tuple[np.ndarray, np.ndarray]:
    (node,) = [n for n in folded.graph if n.name == conv]
    return node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()


def _saved_and_reloaded(folded: ir.Model, tmp_path: Path) -> ir.Model:
    from bnfold.onnx_front import io

    io.save_model(folded, tmp_path / "out.onnx", external_data=True)
    return ir.load(tmp_path / "out.onnx")


@pytest.mark.parametrize("held_bytes", [1 << 30, 0], ids=["held", "recomputed"])
@pytest.mark.parametrize("chain", LANDING_CHAINS)
def test_a_fold_landing_on_a_merged_or_joined_op_rounds_once(
    chain: str, held_bytes: int, tmp_path: Path
) -> None:
    from bnfold.onnx_front.passes import FoldAffinePass

    make, conv, folds = LANDING_CHAINS[chain]
    proto, weight, bias = make()
    result = FoldAffinePass(held_bytes=held_bytes)(ir.serde.deserialize_model(proto))
    assert len(result.report.folded) == folds and not result.report.refused
    for folded in (result.model, _saved_and_reloaded(result.model, tmp_path)):
        got_weight, got_bias = _conv_weight_and_bias(folded, conv)
        assert np.array_equal(got_weight, weight.astype(np.float16))
        assert np.array_equal(got_bias, bias.astype(np.float16))


def _constant_later(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """Make the initializer ``name`` a graph input (so a first pass cannot fold it)."""
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    proto.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, tensor.dims))
    proto.graph.initializer.remove(tensor)
    return tensor


def _make_constant(folded: ir.Model, tensor: onnx.TensorProto) -> None:
    """Turn the graph input back into the initializer ``tensor``."""
    value = next(v for v in folded.graph.inputs if v.name == tensor.name)
    folded.graph.inputs.remove(value)
    value.const_value = ir.tensor(numpy_helper.to_array(tensor), name=tensor.name)
    folded.graph.register_initializer(value)


@pytest.mark.parametrize(
    ("chain", "late", "second"),
    [
        ("repvgg-mul-add", "gain", ["Conv+Mul", "Conv+Add"]),
        ("concat-bn-bn", "bn2.scale", ["Conv+Conv+Concat+BatchNormalization"]),
    ],
)
def test_a_second_pass_over_a_merged_or_joined_op_still_rounds_once(
    chain: str, late: str, second: list[str]
) -> None:
    """The first pass merges (or folds bn1 through the Concat) but cannot fold the
    op whose constant is a graph input; once it is a constant, a second pass over
    the folded model folds it from the exact value the first pass wrote."""
    from bnfold.onnx_front.passes import FoldAffinePass

    make, conv, _ = LANDING_CHAINS[chain]
    proto, weight, bias = make()
    tensor = _constant_later(proto, late)
    first = FoldAffinePass()(ir.serde.deserialize_model(proto))
    assert first.report.folded
    _make_constant(first.model, tensor)
    result = FoldAffinePass()(first.model)
    assert [f.pattern for f in result.report.folded] == second
    got_weight, got_bias = _conv_weight_and_bias(result.model, conv)
    assert np.array_equal(got_weight, weight.astype(np.float16))
    assert np.array_equal(got_bias, bias.astype(np.float16))


@pytest.mark.parametrize("then", ["nothing", "mul-add"])
def test_balanced_rounding_casts_a_merged_kernel_once_and_balanced(then: str) -> None:
    from bnfold.onnx_front.passes import FoldAffinePass
    from bnfold.onnx_front.rules.base import MatchOptions
    from bnfold.options import Rounding

    if then == "nothing":
        nodes, inits, weight, _ = _repvgg_block("output")
        proto = _fp16_model(nodes, inits)
    else:
        proto, weight, _ = _repvgg_then_mul_add()
    options = MatchOptions(rounding=Rounding.BALANCED)
    result = FoldAffinePass(options)(ir.serde.deserialize_model(proto))
    got, _ = _conv_weight_and_bias(result.model, "conv_k")
    balanced = affine.cast_weight(weight, np.dtype(np.float16), layouts.conv())
    assert not np.array_equal(balanced, weight.astype(np.float16))  # the test tells them apart
    assert np.array_equal(got, balanced)


@pytest.mark.parametrize("held_bytes", [1 << 30, 0], ids=["held", "recomputed"])
def test_a_fold_that_overflows_a_merged_kernel_is_refused_alone(held_bytes: int) -> None:
    """The merge folds; a Mul after it whose products overflow fp16 refuses with
    BAD_VALUES (checked from the float64 kernel) and stays, the Add after it too."""
    from bnfold.onnx_front.passes import FoldAffinePass

    proto, _, _ = _repvgg_then_mul_add()
    gain = next(t for t in proto.graph.initializer if t.name == "gain")
    gain.CopyFrom(init("gain", np.full((1, C, 1, 1), 60000.0, np.float16)))
    result = FoldAffinePass(held_bytes=held_bytes)(ir.serde.deserialize_model(proto))
    assert [r.code for r in result.report.refused] == [Code.BAD_VALUES]
    assert [f.kind for f in result.report.folded][-1] is FoldKind.REPARAM
    assert [n.op_type for n in result.model.graph] == ["Conv", "Mul", "Add"]
