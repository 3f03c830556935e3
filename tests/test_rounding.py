"""Balanced rounding: every folded weight one of its exact value's two neighbours,
each output channel's rounding errors cancelling, on every path a weight takes."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnfold import affine, layouts
from bnfold.affine import Affine, Rounding, Unfoldable, balanced_cast, cast_weight, fold_after
from bnfold.core import cast
from tests.builders import bn_node, bn_params, conv_bn, init, model

HALF_FLOATS = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)]


def _bits(values: np.ndarray) -> np.ndarray:
    return values.view(np.dtype(f"u{values.dtype.itemsize}")).astype(np.int64)


def _row_error_sums(rounded: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs((rounded.astype(np.float64) - exact).sum(axis=1))


def _assert_neighbours(balanced: np.ndarray, exact: np.ndarray) -> None:
    """Each value is the nearest one or the neighbour on the other side of ``exact``."""
    nearest = exact.astype(balanced.dtype)
    moved = balanced != nearest
    assert np.all(np.abs(_bits(balanced) - _bits(nearest)) <= 1)
    near_side = nearest.astype(np.float64)[moved] - exact[moved]
    far_side = balanced.astype(np.float64)[moved] - exact[moved]
    assert np.all(near_side * far_side <= 0)  # crossed (or reached) the exact value


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(HALF_FLOATS),
    rows=st.integers(1, 12),
    fan_in=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_balanced_cast_keeps_neighbours_and_never_grows_a_row_sum(
    dtype: np.dtype, rows: int, fan_in: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # Rows of very different scales, as folded weights are.
    exact = rng.normal(size=(rows, fan_in)) * 10.0 ** rng.uniform(-4, 3, (rows, 1))
    balanced = balanced_cast(exact, dtype)
    assert balanced.dtype == dtype and balanced.shape == exact.shape
    _assert_neighbours(balanced, exact)
    nearest_sums = _row_error_sums(exact.astype(dtype), exact)
    # Sums taken in another order differ in their last float64 bits only.
    slack = 1e-9 * np.abs(exact).sum(axis=1) * float(np.finfo(np.float32).eps)
    assert np.all(_row_error_sums(balanced, exact) <= nearest_sums + slack)


@pytest.mark.parametrize("dtype", HALF_FLOATS, ids=str)
def test_balanced_cast_cancels_most_of_each_rows_error(dtype: np.dtype) -> None:
    exact = np.random.default_rng(3).normal(size=(64, 576)) * 0.05
    nearest, balanced = exact.astype(dtype), balanced_cast(exact, dtype)
    # sqrt(576 / 12) ~ 7 ulps of error per row fall to well under one.
    assert _row_error_sums(balanced, exact).mean() < _row_error_sums(nearest, exact).mean() / 5
    # Only weights near a tie move, so no weight's error grows much past half an ulp.
    worst = np.abs(balanced.astype(np.float64) - exact).max()
    assert worst <= 1.1 * np.abs(nearest.astype(np.float64) - exact).max()
    assert np.mean(balanced != nearest) < 0.05


def test_representable_values_are_unchanged() -> None:
    exact = np.random.default_rng(4).normal(size=(5, 40)).astype(np.float16).astype(np.float64)
    assert np.array_equal(balanced_cast(exact, np.dtype(np.float16)), exact.astype(np.float16))


def test_balanced_cast_never_reaches_infinity_and_never_leaves_zero() -> None:
    largest = float(np.finfo(np.float16).max)
    # 65510 rounds down to the largest fp16; its other neighbour is inf. The tiny
    # values round to zero, whose neighbours have either sign.
    exact = np.array([[65510.0] * 8 + [1e-12] * 8 + [0.3] * 8])
    balanced = balanced_cast(exact, np.dtype(np.float16))
    assert np.all(np.isfinite(balanced))
    assert np.all(balanced[0, :8] == largest) and np.all(balanced[0, 8:16] == 0)


def test_balanced_cast_refuses_an_overflow_like_nearest() -> None:
    with pytest.raises(Unfoldable, match="overflows float16"):
        balanced_cast(np.array([[1.0, 70000.0]]), np.dtype(np.float16))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_balanced_cast_of_nothing_keeps_the_shape(shape: tuple[int, int]) -> None:
    assert balanced_cast(np.zeros(shape), np.dtype(np.float16)).shape == shape


def test_rows_needing_many_flips_are_searched_whole() -> None:
    """A row whose errors all lean one way needs more flips than the first search
    looks at; the second search over the whole row still cancels them."""
    fan_in = 400
    ulp = float(np.spacing(np.float16(1.0)))
    # Every value sits 0.45 ulp above a representable one: nearest rounds all down.
    exact = np.full((2, fan_in), 1.0 + 0.45 * ulp)
    balanced = balanced_cast(exact, np.dtype(np.float16))
    assert _row_error_sums(balanced, exact).max() <= ulp  # from 180 ulps
    assert (balanced != exact.astype(np.float16)).sum(axis=1).min() > 4 * np.sqrt(fan_in) + 16


LAYOUTS = {
    "conv": (layouts.conv(1), (6, 4, 3, 3)),
    "grouped conv": (layouts.conv(2), (6, 2, 3, 3)),
    "conv_transpose": (layouts.conv_transpose(1), (4, 6, 3, 3)),
    "grouped conv_transpose": (layouts.conv_transpose(3), (6, 2, 2, 2)),
    "gemm transB": (layouts.gemm(True), (7, 5)),
    "gemm": (layouts.gemm(False), (5, 7)),
    "matmul": (layouts.matmul(), (5, 7)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_out_channel_rows_are_the_groups_of_sum_to_out(name: str) -> None:
    layout, shape = LAYOUTS[name]
    values = np.random.default_rng(5).normal(size=shape)
    rows = layout.out_channel_rows(values)
    assert rows.shape[0] == layout.out_channels(shape)
    np.testing.assert_allclose(rows.sum(axis=1), layout.sum_to_out(values))
    assert np.array_equal(layout.from_out_channel_rows(rows, shape), values)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(LAYOUTS)), seed=st.integers(0, 2**16))
def test_balanced_fold_cancels_per_output_channel_of_every_layout(name: str, seed: int) -> None:
    layout, shape = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=shape).astype(np.float16)
    channels = layout.out_channels(shape)
    fold = Affine.of(rng.uniform(0.3, 3.0, channels), rng.normal(size=channels), channels)
    nearest, _ = fold_after(weight, None, fold, layout)
    balanced, _ = fold_after(weight, None, fold, layout, Rounding.BALANCED)
    exact = weight.astype(np.float64) * layout.expand(fold.scale, shape)
    _assert_neighbours(balanced.reshape(1, -1), exact.reshape(1, -1))
    nearest_sums = np.abs(layout.sum_to_out(nearest.astype(np.float64) - exact))
    balanced_sums = np.abs(layout.sum_to_out(balanced.astype(np.float64) - exact))
    assert np.all(balanced_sums <= nearest_sums + 1e-12)


def test_blocks_whole_and_streamed_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    weight = rng.normal(size=(40, 8, 3, 3)).astype(np.float16)
    factor = rng.uniform(0.5, 2.0, (40, 1, 1, 1))
    conv = layouts.conv()
    whole = cast_weight(weight.astype(np.float64) * factor, weight.dtype, conv)
    monkeypatch.setattr(cast, "CHUNK_BYTES", 2 * 72 * 3)  # 3 rows a block
    assert np.array_equal(affine.scaled(weight, factor, conv), whole)
    streamed = np.concatenate(
        [b.copy() for b in affine.scaled_blocks(weight, factor, buffers=2, balance=conv)]
    )
    assert np.array_equal(streamed, whole)


def test_streaming_a_weight_whose_channels_are_columns_is_refused() -> None:
    weight = np.ones((4, 3), np.float16)
    with pytest.raises(ValueError, match="needs whole weights"):
        next(affine.scaled_blocks(weight, np.ones((1, 3)), balance=layouts.matmul()))


def _matmul_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("MatMul", ["input", "fc.weight"], ["m"], name="fc"),
        bn_node("bn1", "m", "output"),
    ]
    inits = [init("fc.weight", rng.normal(size=(64, 32)).astype(np.float16))]
    inits += bn_params("bn1", 32, np.float16)
    return model(nodes, inits, [("input", [2, 64])], ["output"], dtype=onnx.TensorProto.FLOAT16)


def _conv_bn_model() -> onnx.ModelProto:
    nodes, inits = conv_bn(c_in=16, c_out=8, dtype=np.float16)
    return model(
        nodes, inits, [("input", [1, 16, 6, 6])], ["output"], dtype=onnx.TensorProto.FLOAT16
    )


def _folded_weights(path: Path) -> dict[str, np.ndarray]:
    saved = ir.load(path)
    return {n: v.const_value.numpy() for n, v in saved.graph.initializers.items()}


@pytest.mark.parametrize("make", [_conv_bn_model, _matmul_bn_model], ids=["conv", "matmul"])
def test_a_streamed_save_writes_the_held_folds_bytes(make, tmp_path: Path) -> None:
    """External data with no memory budget: the conv weight is streamed a block
    at a time, the MatMul one (channels are columns) computed whole at the save;
    both equal the fold held in memory."""
    from bnfold.onnx_front import io
    from bnfold.onnx_front.match import MatchOptions
    from bnfold.onnx_front.passes import FoldAffinePass

    source = tmp_path / "model.onnx"
    onnx.save_model(make(), source, save_as_external_data=True, size_threshold=0)
    options = MatchOptions(rounding=Rounding.BALANCED)
    for held_bytes, name in ((0, "streamed.onnx"), (1 << 30, "held.onnx")):
        result = FoldAffinePass(options, held_bytes=held_bytes)(io.load_model(source))
        assert len(result.report.folded) == 1
        io.save_model(result.model, tmp_path / name, external_data=True)
    streamed, held = (
        _folded_weights(tmp_path / "streamed.onnx"),
        _folded_weights(tmp_path / "held.onnx"),
    )
    assert streamed.keys() == held.keys()
    for name in held:
        assert np.array_equal(streamed[name], held[name]), name


def test_cli_balanced_fold_verifies_and_reports_its_rounding(cli, tmp_path: Path) -> None:
    from bnfold.onnx_front.match import MatchOptions
    from bnfold.onnx_front.passes import FoldAffinePass

    source = tmp_path / "model.onnx"
    onnx.save_model(_conv_bn_model(), source)
    result = cli(["fold", source, "-o", tmp_path / "out.onnx", "--rounding", "balanced", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["report"]["rounding"] == "balanced"
    assert report["verification"]["status"] == "passed"
    expected = FoldAffinePass(MatchOptions(rounding=Rounding.BALANCED))(ir.load(source)).model
    nearest = FoldAffinePass()(ir.load(source)).model
    got = _folded_weights(tmp_path / "out.onnx")["conv1.weight"]
    assert np.array_equal(got, expected.graph.initializers["conv1.weight"].const_value.numpy())
    assert not np.array_equal(got, nearest.graph.initializers["conv1.weight"].const_value.numpy())


def test_cli_rejects_an_unknown_rounding(cli, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save_model(_conv_bn_model(), source)
    result = cli(["fold", source, "-o", tmp_path / "out.onnx", "--rounding", "stochastic"])
    assert result.exit_code == 2 and "stochastic" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_api_names_the_choices_for_an_unknown_rounding() -> None:
    from bnfold import api
    from bnfold.errors import BnfoldError

    with pytest.raises(BnfoldError, match="choose from nearest, balanced"):
        api.fold(_conv_bn_model(), rounding="up")


def test_folder_mode_passes_rounding_and_no_clone_shared_to_every_model(
    cli, tmp_path: Path
) -> None:
    """Folder mode used to drop --no-clone-shared: every model got the default."""
    models = tmp_path / "models"
    models.mkdir()
    onnx.save_model(_conv_bn_model(), models / "conv.onnx")
    shared = _conv_bn_model()
    # A second conv reads conv1.weight too: with --no-clone-shared the fold is refused.
    shared.graph.node.append(
        helper.make_node(
            "Conv", ["input", "conv1.weight"], ["other"], name="conv2", pads=[1, 1, 1, 1]
        )
    )
    shared.graph.output.append(
        helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT16, None)
    )
    onnx.save_model(shared, models / "shared.onnx")
    args = ["fold", models, "-o", tmp_path / "out", "--json", "--rounding", "balanced"]
    result = cli([*args, "--no-clone-shared"])
    assert result.exit_code == 0, result.output
    outcomes = {o["source"]: o["result"]["report"] for o in json.loads(result.output)["outcomes"]}
    assert {r["rounding"] for r in outcomes.values()} == {"balanced"}
    assert [r["code"] for r in outcomes["shared.onnx"]["refused"]] == ["shared_weight"]
    assert len(outcomes["conv.onnx"]["folded"]) == 1


@pytest.mark.parametrize("kind", ["module", "exported program"])
def test_torch_front_balances_the_weights_it_folds(kind: str) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from bnfold.api import fold

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 16), nn.BatchNorm1d(16))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    net = net.eval().to(torch.bfloat16)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    source = net if kind == "module" else torch.export.export(net, (x,))
    inputs = (x,) if kind == "module" else None
    nearest = _folded_linear_weight(fold(source, inputs).model)
    result = fold(source, inputs, rounding="balanced")
    assert result.report.rounding is Rounding.BALANCED and len(result.report.folded) == 1
    balanced = _folded_linear_weight(result.model)
    with torch.no_grad():
        bn = net[1]
        scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).numpy()
        exact = net[0].weight.double().numpy() * scale[:, None]
    as_bf16 = np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(balanced, cast_weight(exact, as_bf16, layouts.linear()))
    assert not np.array_equal(balanced, nearest)


def _folded_linear_weight(folded) -> np.ndarray:
    """The (16, 96) weight of a folded module or exported program, as bfloat16 numpy."""
    import torch

    tensors = folded.state_dict if isinstance(folded, torch.export.ExportedProgram) else None
    tensors = tensors or folded.state_dict()
    (weight,) = [t for t in tensors.values() if tuple(t.shape) == (16, 96)]
    return weight.detach().view(torch.uint16).numpy().view(np.dtype(ml_dtypes.bfloat16))
