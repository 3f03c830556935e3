"""The torch front beyond Conv -> BN: pre-folds, shared weights, low precision, chains."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.report import Code  # noqa: E402
from bnfold.torch_front import fold_module  # noqa: E402
from bnfold.torch_front.files import fold_torch_files  # noqa: E402
from bnfold.torch_front.program.run import fold_graph_module  # noqa: E402
from tests.torch_standins import randomize_bn, use  # noqa: E402


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> bool:
    with torch.no_grad():
        return bool(torch.allclose(a(x), b(x), rtol=tol, atol=tol))


def sites(result) -> list[str]:
    return [f.site for f in result.report.folded]


def codes_at(result, site: str) -> list[Code]:
    return [r.code for r in result.report.refused if r.site == site]


class Pre(nn.Module):
    """ReLU -> BN -> op: the BN can only fold into the op after it (pre-activation nets)."""

    def __init__(self, bn: nn.Module, op: nn.Module, between: nn.Module | None = None):
        super().__init__()
        self.bn, self.op = bn, op
        self.between = between

    def forward(self, x):
        y = self.bn(torch.relu(x))
        if self.between is not None:
            y = self.between(y)
        return self.op(y)


# --- BN -> linear op (pre-fold) --------------------------------------------------------

PRE_FOLDS = {
    "conv2d_no_padding_stride": (nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2), (2, 4, 9, 9)),
    "conv2d_groups": (nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, groups=2), (2, 6, 7, 7)),
    "conv2d_depthwise": (nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, groups=6), (2, 6, 7, 7)),
    "conv2d_reflect": (
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        (2, 3, 8, 8),
    ),
    "conv2d_circular_no_bias": (
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular", bias=False),
        (2, 3, 8, 8),
    ),
    "conv3d_replicate": (
        nn.BatchNorm3d(2),
        nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"),
        (1, 2, 5, 5, 5),
    ),
    "conv1d_dilation": (nn.BatchNorm1d(4), nn.Conv1d(4, 6, 3, dilation=2), (2, 4, 11)),
    "linear_2d": (nn.BatchNorm1d(7), nn.Linear(7, 5), (4, 7)),
    "linear_no_bias": (nn.BatchNorm1d(7), nn.Linear(7, 5, bias=False), (4, 7)),
}


@pytest.mark.parametrize("name", sorted(PRE_FOLDS))
def test_bn_folds_into_the_op_after_it(name):
    bn, op, shape = PRE_FOLDS[name]
    model = randomize_bn(Pre(bn, op))
    x = torch.randn(shape)
    result = fold_module(model, (x,))
    assert sites(result) == ["bn -> op"]
    assert result.report.refused == []
    assert result.report.folded[0].pattern == f"{type(bn).__name__}+{type(op).__name__}"
    assert isinstance(result.model.bn, nn.Identity)
    assert result.model.op.bias is not None
    assert result.verification.passed
    assert same_outputs(model, result.model, torch.randn(shape))


def test_bn_flatten_linear_folds_per_block_of_features():
    model = randomize_bn(Pre(nn.BatchNorm2d(3), nn.Linear(3 * 4 * 5, 6), between=nn.Flatten()))
    x = torch.randn(2, 3, 4, 5)
    result = fold_module(model, (x,))
    assert sites(result) == ["bn -> flatten -> op"]
    assert result.report.folded[0].pattern == "BatchNorm2d+Flatten+Linear"
    assert same_outputs(model, result.model, torch.randn(2, 3, 4, 5))


class ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4 * 9, 3)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        return self.fc(y.view(y.shape[0], -1))


def test_bn_view_linear_folds():
    model = randomize_bn(ViewFlatten())
    x = torch.randn(2, 4, 3, 3)
    result = fold_module(model, (x,))
    assert sites(result) == ["bn -> view -> fc"]
    assert same_outputs(model, result.model, torch.randn(2, 4, 3, 3))


class Unflattening(nn.Module):
    """A view that splits the batch: channel c is not a block of each row's features."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(2), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.bn(torch.relu(x)).reshape(-1, 3))


def test_bn_reshape_that_is_not_a_flatten_is_refused():
    model = randomize_bn(Unflattening())
    x = torch.randn(2, 2, 3, 3)
    result = fold_module(model, (x,))
    assert codes_at(result, "bn -> reshape -> fc") == [Code.NOT_PER_CHANNEL]
    assert isinstance(result.model.bn, nn.BatchNorm2d)
    assert same_outputs(model, result.model, x)


@pytest.mark.parametrize(
    "op",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.ConvTranspose2d(3, 4, 3),
    ],
    ids=["conv_pad1", "conv_same", "conv_transpose"],
)
def test_zero_padding_with_shift_is_refused(op):
    model = randomize_bn(Pre(nn.BatchNorm2d(3), op))
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert codes_at(result, "bn -> op") == [Code.ZERO_PADDING]
    assert not result.report.folded
    assert isinstance(result.model.bn, nn.BatchNorm2d)
    assert same_outputs(model, result.model, x)


@pytest.mark.parametrize(
    "op",
    [nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(3, 4, 3, stride=2, groups=1)],
    ids=["conv_pad1", "conv_transpose"],
)
def test_zero_padding_without_shift_folds(op):
    model = randomize_bn(Pre(nn.BatchNorm2d(3), op), shift=False)
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert sites(result) == ["bn -> op"]
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


def test_grouped_conv_transpose_without_shift_folds():
    model = randomize_bn(Pre(nn.BatchNorm1d(6), nn.ConvTranspose1d(6, 4, 3, groups=2)), shift=False)
    x = torch.randn(2, 6, 7)
    result = fold_module(model, (x,))
    assert sites(result) == ["bn -> op"]
    assert same_outputs(model, result.model, torch.randn(2, 6, 7))


def test_bn1d_on_3d_input_into_linear_is_refused():
    model = randomize_bn(Pre(nn.BatchNorm1d(4), nn.Linear(5, 3)))
    x = torch.randn(2, 4, 5)  # BN normalizes axis 1; Linear reads the last axis
    result = fold_module(model, (x,))
    assert codes_at(result, "bn -> op") == [Code.NOT_PER_CHANNEL]
    assert same_outputs(model, result.model, x)


def test_after_is_preferred_to_before():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    result = fold_module(model, (torch.randn(1, 3, 5, 5),))
    assert sites(result) == ["0 -> 1"]


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        return self.conv(y), y


def test_bn_read_besides_the_op_is_not_prefolded():
    model = randomize_bn(TwoReaders())
    result = fold_module(model, (torch.randn(1, 3, 4, 4),))
    assert codes_at(result, "bn") == [Code.NONLINEAR_INPUT]


def test_refusal_after_and_before_explains_both():
    model = randomize_bn(Pre(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    result = fold_module(model, (torch.randn(1, 3, 5, 5),))
    (refusal,) = result.report.refused
    assert refusal.code == Code.ZERO_PADDING and "relu" in refusal.detail


@pytest.mark.parametrize("finder", ["fx", "recorded", "sequential"])
def test_prefold_with_other_finders(finder, monkeypatch):
    use(finder, monkeypatch)
    model = randomize_bn(
        nn.Sequential(
            nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(),
            nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
        )
    )  # fmt: skip
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    flatten = "4" if finder == "sequential" else "flatten"
    assert sorted(sites(result)) == ["0 -> 1", f"3 -> {flatten} -> 5"]
    assert {f.finder for f in result.report.folded} == {finder}
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


# --- shared weights ---------------------------------------------------------------------


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + torch.relu(self.conv(x))


def test_eager_reused_module_is_refused_and_points_to_pt2():
    model = randomize_bn(ReusedConv())
    result = fold_module(model, (torch.randn(1, 3, 5, 5),))
    (refusal,) = [r for r in result.report.refused if r.site == "conv -> bn"]
    assert refusal.code == Code.REUSED_MODULE and ".pt2" in refusal.detail


def test_pt2_clones_a_weight_read_by_two_calls():
    model = randomize_bn(ReusedConv())
    x = torch.randn(1, 3, 5, 5)
    ep = torch.export.export(model, (x,), strict=False)
    result = fold_graph_module(ep.module, (x,))
    (folded,) = result.report.folded
    assert folded.site == "conv -> bn"
    weight, bias = model.conv.weight, model.conv.bias
    assert folded.bytes_added == (weight.numel() + bias.numel()) * 4
    assert result.report.refused == [] and result.verification.passed
    gm = result.model
    assert torch.equal(gm.conv.weight, weight)  # the other call sees the original
    assert not torch.equal(gm.conv.weight_folded, weight)
    assert same_outputs(model, gm, torch.randn(1, 3, 5, 5))


class ReusedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.bn, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn2(self.conv(x))


def test_pt2_file_with_a_conv_called_twice_folds_both_calls(tmp_path):
    model = randomize_bn(ReusedTwice())
    x = torch.randn(2, 3, 4, 4)
    src, dst = tmp_path / "in.pt2", tmp_path / "out.pt2"
    torch.export.save(torch.export.export(model, (x,), strict=False), src)
    result, written = fold_torch_files(str(src), dst)
    # Then the sum of the two folded calls is a sum of two convs of x: one conv.
    assert written and sites(result) == ["conv -> bn", "conv -> bn2", "conv + conv -> add"]
    # The first fold copies the shared weight; the second then has it to itself.
    assert [f.bytes_added for f in result.report.folded] == [model.conv.weight.numel() * 4, 0, 0]
    folded = torch.export.load(dst)
    targets = [str(n.target) for n in folded.graph.nodes]
    assert "aten.batch_norm.default" not in targets and targets.count("aten.conv2d.default") == 1
    with torch.no_grad():
        assert torch.allclose(folded.module()(x), model(x), atol=1e-5)


# --- low precision ----------------------------------------------------------------------


def _ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of ``dtype`` numbers around ``x`` (the binade of |x|, normals and subnormals)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    exponent = np.floor(np.log2(np.maximum(np.abs(x), info.tiny)))
    return np.exp2(exponent - mantissa_bits)


def tiny_var_conv(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16)).eval()
    bn = model[1]
    bn.running_var.copy_(torch.rand(16, generator=gen) * 9e-4 + 1e-4)  # U(1e-4, 1e-3)
    bn.running_mean.copy_(torch.randn(16, generator=gen) * 0.1)
    bn.weight.data.copy_(torch.rand(16, generator=gen) + 0.5)
    bn.bias.data.copy_(torch.randn(16, generator=gen) * 0.1)
    return model.to(dtype)


def _exact_weight(model: nn.Module) -> np.ndarray:
    """The fold in float64 from the stored low-precision values: the true answer."""
    conv, bn = model[0], model[1]
    f64 = [t.detach().double().numpy() for t in (conv.weight, bn.weight, bn.running_var)]
    w, gamma, var = f64
    return w * (gamma / np.sqrt(var + bn.eps))[:, None, None, None]


def _weight_folded_in(model: nn.Module, dtype: torch.dtype) -> np.ndarray:
    """The same fold computed in the model's dtype, rounding at every step."""
    conv, bn = model[0], model[1]
    eps = torch.tensor(bn.eps, dtype=dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + eps)
    return (conv.weight * scale[:, None, None, None]).detach().double().numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_fold_is_correctly_rounded(dtype):
    model = tiny_var_conv(dtype)
    x = torch.randn(2, 8, 6, 6).to(dtype)
    result = fold_module(model, (x,), verify=False)
    assert sites(result) == ["0 -> 1"]
    ours = result.model[0].weight.detach()
    assert ours.dtype == dtype and result.model[0].bias.dtype == dtype
    exact = _exact_weight(model)
    err = np.abs(ours.double().numpy() - exact)
    # Correctly rounded: within half a unit in the last place of the exact value
    # (a hair more for torch's float64 -> float -> low-precision double rounding).
    assert np.all(err <= 0.5 * _ulp(exact, dtype) * (1 + 2**-20))
    in_dtype = np.abs(_weight_folded_in(model, dtype) - exact)
    assert err.sum() < in_dtype.sum()
    assert err.max() <= in_dtype.max()


def test_float64_model_stays_float64_and_exact():
    model = tiny_var_conv(torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    result = fold_module(model, (x,))
    weight = result.model[0].weight.detach()
    assert weight.dtype == torch.float64 and result.model[0].bias.dtype == torch.float64
    assert np.allclose(weight.numpy(), _exact_weight(model), rtol=1e-15, atol=0)
    assert result.verification.passed and result.verification.rtol < 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_model_folds_and_verifies(dtype):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(dtype)
    result = fold_module(model, (torch.randn(2, 3, 6, 6).to(dtype),))
    assert sites(result) == ["0 -> 1"] and result.verification.passed


# --- chains -----------------------------------------------------------------------------


class BnConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0, self.conv, self.bn1 = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(self.bn0(torch.relu(x))))


def test_bn_conv_bn_folds_both_sides():
    model = randomize_bn(BnConvBn())
    x = torch.randn(2, 3, 7, 7)
    result = fold_module(model, (x,))
    assert sorted(sites(result)) == ["bn0 -> conv", "conv -> bn1"]
    assert result.report.refused == []
    assert same_outputs(model, result.model, torch.randn(2, 3, 7, 7))


@pytest.mark.parametrize("finder", ["export", "fx", "recorded", "sequential"])
def test_conv_bn_bn_folds_to_a_fixpoint(finder, monkeypatch):
    use(finder, monkeypatch)
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert sites(result) == ["0 -> 1", "0 -> 2", "0 -> 3"]
    assert result.report.refused == []
    assert result.report.ops_after.get("BatchNorm2d") is None
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


def test_chain_with_a_failed_link_is_rolled_back_cleanly(monkeypatch):
    from bnfold.torch_front import eager

    real = eager.bn_affine
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, eps=0.125))
    )

    def corrupt_second(bn):
        affine = real(bn)
        return type(affine)(affine.scale * 3.0, affine.shift) if bn.eps == 0.125 else affine

    monkeypatch.setattr(eager, "bn_affine", corrupt_second)
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert sites(result) == ["0 -> 1"]
    assert codes_at(result, "0 -> 2") == [Code.VERIFICATION_FAILED]
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


def test_preactivation_block_folds_the_bn_that_feeds_a_conv():
    class PreActBlock(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)

        def forward(self, x):
            y = self.conv1(torch.relu(self.bn1(x)))
            return x[:, :, 1:-1, 1:-1] + self.conv2(self.bn2(torch.relu(y)))[:, :, 1:-1, 1:-1]

    model = randomize_bn(PreActBlock(4))
    x = torch.randn(2, 4, 6, 6)
    result = fold_module(model, (x,))
    # bn1 reads the block input and feeds a ReLU: nothing to fold into.
    assert sites(result) == ["bn2 -> conv2"]
    assert [r.code for r in result.report.refused] == [Code.STANDALONE]
    assert same_outputs(model, result.model, torch.randn(2, 4, 6, 6))
    assert math.isfinite(result.verification.outputs[0].max_rel)


# --- the same in an exported program (.pt2) --------------------------------------------


def fold_program(model: nn.Module, x: torch.Tensor, decompose: bool = False):
    ep = torch.export.export(model, (x,), strict=False)
    if decompose:
        ep = ep.run_decompositions()
    return fold_graph_module(ep.module, (x,))


def bn_nodes(gm) -> int:
    names = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
    return sum(str(n.target) in names for n in gm.graph.nodes)


@pytest.mark.parametrize("decompose", [False, True], ids=["aten", "decomposed"])
def test_pt2_bn_conv_bn_folds_both_sides(decompose):
    model = randomize_bn(BnConvBn())
    x = torch.randn(2, 3, 7, 7)
    result = fold_program(model, x, decompose)
    assert sorted(sites(result)) == ["bn0 -> conv", "conv -> bn1"]
    assert result.report.refused == [] and result.verification.passed
    assert bn_nodes(result.model) == 0
    assert same_outputs(model, result.model, torch.randn(2, 3, 7, 7))


def test_pt2_conv_bn_bn_folds_to_a_fixpoint():
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 6, 6)
    result = fold_program(model, x)
    assert sites(result) == ["0 -> 1", "0 -> 2", "0 -> 3"]
    assert result.report.refused == [] and bn_nodes(result.model) == 0
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize(
    ("model", "shape", "site", "pattern"),
    [
        (Pre(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=2)), (2, 3, 7, 7), "bn -> op",
         "batch_norm+conv2d"),
        (Pre(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
         (2, 3, 6, 6), "bn -> op", "batch_norm+conv2d"),
        (Pre(nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5), "bn -> op", "batch_norm+linear"),
        (Pre(nn.BatchNorm2d(3), nn.Linear(3 * 4 * 4, 2), between=nn.Flatten()), (2, 3, 4, 4),
         "bn -> flatten -> op", "batch_norm+flatten+linear"),
        (ViewFlatten(), (2, 4, 3, 3), "bn -> view -> fc", "batch_norm+view+linear"),
    ],
    ids=["conv_stride", "conv_reflect", "linear", "flatten_linear", "view_linear"],
)  # fmt: skip
def test_pt2_bn_folds_into_the_op_after_it(model, shape, site, pattern):
    model = randomize_bn(model)
    result = fold_program(model, torch.randn(shape))
    assert [(f.site, f.pattern) for f in result.report.folded] == [(site, pattern)]
    assert result.report.refused == [] and bn_nodes(result.model) == 0
    assert same_outputs(model, result.model, torch.randn(shape))


@pytest.mark.parametrize(
    ("model", "shape", "site", "code"),
    [
        (Pre(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 6, 6), "bn -> op",
         Code.ZERO_PADDING),
        (Pre(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), (2, 3, 6, 6), "bn -> op",
         Code.ZERO_PADDING),
        (Pre(nn.BatchNorm1d(4), nn.Linear(5, 3)), (2, 4, 5), "bn -> op", Code.NOT_PER_CHANNEL),
        (Unflattening(), (2, 2, 3, 3), "bn -> reshape -> fc", Code.NOT_PER_CHANNEL),
    ],
    ids=["zero_padded_conv", "conv_transpose", "bn1d_3d_linear", "reshape_not_flatten"],
)  # fmt: skip
def test_pt2_prefold_refusals_leave_the_bn(model, shape, site, code):
    model = randomize_bn(model)
    x = torch.randn(shape)
    result = fold_program(model, x)
    assert [(r.site, r.code) for r in result.report.refused] == [(site, code)]
    assert not result.report.folded and bn_nodes(result.model) == 1
    assert same_outputs(model, result.model, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pt2_low_precision_fold_is_correctly_rounded(dtype):
    model = tiny_var_conv(dtype)
    x = torch.randn(2, 8, 6, 6).to(dtype)
    ep = torch.export.export(model, (x,), strict=False)
    result = fold_graph_module(ep.module, (x,), verify=None)
    ours = next(p for n, p in result.model.named_parameters() if n.endswith("weight"))
    assert ours.dtype == dtype
    exact = _exact_weight(model)
    err = np.abs(ours.detach().double().numpy() - exact)
    assert np.all(err <= 0.5 * _ulp(exact, dtype) * (1 + 2**-20))
    assert err.sum() < np.abs(_weight_folded_in(model, dtype) - exact).sum()


def test_inspect_reports_prefolds_and_chains_without_changing_the_module():
    from bnfold.torch_front import inspect_module

    model = randomize_bn(BnConvBn())
    report = inspect_module(model, (torch.randn(1, 3, 5, 5),))
    assert report.dry_run and sorted(f.site for f in report.folded) == [
        "bn0 -> conv",
        "conv -> bn1",
    ]
    assert isinstance(model.bn0, nn.BatchNorm2d) and isinstance(model.bn1, nn.BatchNorm2d)


class BnBnConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0, self.bn1, self.conv = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(self.bn1(self.bn0(torch.relu(x))))


@pytest.mark.parametrize("front", ["eager", "pt2"])
def test_bn_bn_conv_prefolds_both_to_a_fixpoint(front):
    model = randomize_bn(BnBnConv())
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,)) if front == "eager" else fold_program(model, x)
    assert sites(result) == ["bn1 -> conv", "bn0 -> conv"]
    assert result.report.refused == [] and result.verification.passed
    assert same_outputs(model, result.model, torch.randn(2, 3, 6, 6))


# --- a module pair called several times -------------------------------------------------


class LoopedBlock(nn.Module):
    """One conv + BN applied three times (weight-shared recurrent/refinement blocks)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        for _ in range(3):
            x = torch.relu(self.bn(self.conv(x)))
        return x


class SequentialTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


class SharedHead(nn.Module):
    """An FPN-style head: the same conv + BN on two scales (different spatial sizes)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        small = nn.functional.avg_pool2d(x, 2)
        return self.bn(self.conv(x)).mean((2, 3)) + self.bn(self.conv(small)).mean((2, 3))


@pytest.mark.parametrize(
    ("make", "site", "finder"),
    [
        (LoopedBlock, "conv -> bn", "export"),
        (LoopedBlock, "conv -> bn", "fx"),
        (LoopedBlock, "conv -> bn", "recorded"),
        (SharedHead, "conv -> bn", "export"),
        (SharedHead, "conv -> bn", "recorded"),
        (SequentialTwice, "block.0 -> block.1", "export"),
        (SequentialTwice, "block.0 -> block.1", "sequential"),
    ],
    ids=[
        "loop-export",
        "loop-fx",
        "loop-recorded",
        "shared_head",
        "shared_head-recorded",
        "sequential-export",
        "sequential-adjacency",
    ],
)
def test_a_pair_that_runs_together_every_time_folds(make, site, finder, monkeypatch):
    use(finder, monkeypatch)
    model = randomize_bn(make())
    x = torch.randn(2, 4, 6, 6)
    result = fold_module(model, (x,))
    assert [(f.site, f.finder) for f in result.report.folded] == [(site, finder)]
    assert result.report.refused == [] and result.verification.passed
    assert same_outputs(model, result.model, torch.randn(2, 4, 6, 6))


class OneBnTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class ConvTwiceBnOnce(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(self.conv(x))


@pytest.mark.parametrize("finder", ["export", "fx", "recorded"])
@pytest.mark.parametrize(
    ("make", "site", "words"),
    [
        (OneBnTwoConvs, "bn", "beside different modules"),
        (ConvTwiceBnOnce, "conv -> bn", "ran 3 times, 1 of them into bn"),
    ],
    ids=["bn_after_two_convs", "conv_also_elsewhere"],
)
def test_a_pair_that_does_not_always_run_together_is_refused(
    make, site, words, finder, monkeypatch
):
    use(finder, monkeypatch)
    model = randomize_bn(make())
    x = torch.randn(2, 3, 4, 4)
    result = fold_module(model, (x,))
    (refusal,) = result.report.refused
    assert (refusal.site, refusal.code) == (site, Code.REUSED_MODULE)
    assert words in refusal.detail
    assert not result.report.folded and same_outputs(model, result.model, x)


# --- linear op -> shape op -> BN -------------------------------------------------------------


class After(nn.Module):
    """op -> reshape -> BN, the reshape given as a function of the op's output."""

    def __init__(self, op: nn.Module, reshape, bn: nn.Module):
        super().__init__()
        self.op, self.bn, self.reshape = op, bn, reshape

    def forward(self, x):
        return self.bn(self.reshape(self.op(x)))


def _view_chw(y):
    return y.view(y.shape[0], 3, 2, 2)


def _unsqueeze(y):
    return y.unsqueeze(-1)


def _flatten(y):
    return torch.flatten(y, 1)


AFTER_THROUGH_A_RESHAPE = [
    (After(nn.Linear(5, 12), _view_chw, nn.BatchNorm2d(3)), (2, 5), "op -> view -> bn",
     "Linear+View+BatchNorm2d"),
    (After(nn.Linear(5, 6), _unsqueeze, nn.BatchNorm1d(6)), (2, 5), "op -> unsqueeze -> bn",
     "Linear+Unsqueeze+BatchNorm1d"),
    (After(nn.Conv2d(3, 6, 4), _flatten, nn.BatchNorm1d(6)), (2, 3, 4, 4), "op -> flatten -> bn",
     "Conv2d+Flatten+BatchNorm1d"),
]  # fmt: skip
AFTER_IDS = ["linear_view_chw", "linear_unsqueeze", "conv_1x1_out_flatten"]


@pytest.mark.parametrize("finder", ["export", "fx", "recorded"])
@pytest.mark.parametrize(
    ("model", "shape", "site", "pattern"), AFTER_THROUGH_A_RESHAPE, ids=AFTER_IDS
)
def test_bn_folds_through_a_reshape_after_the_op(model, shape, site, pattern, finder, monkeypatch):
    # fx sees y.view(y.shape[0], ...) read y's shape too: that is no second consumer.
    use(finder, monkeypatch)
    model = randomize_bn(model)
    result = fold_module(model, (torch.randn(shape),))
    assert [(f.site, f.pattern, f.finder) for f in result.report.folded] == [
        (site, pattern, finder)
    ]
    assert result.verification.passed and isinstance(result.model.bn, nn.Identity)
    assert same_outputs(model, result.model, torch.randn(shape))


@pytest.mark.parametrize(
    ("model", "shape", "site", "_pattern"), AFTER_THROUGH_A_RESHAPE, ids=AFTER_IDS
)
def test_pt2_bn_folds_through_a_reshape_after_the_op(model, shape, site, _pattern):
    model = randomize_bn(model)
    result = fold_program(model, torch.randn(shape))
    assert [f.site for f in result.report.folded] == [site]
    assert bn_nodes(result.model) == 0 and result.verification.passed
    assert same_outputs(model, result.model, torch.randn(shape))


def test_a_reshape_that_spreads_a_channel_over_bn_channels_is_refused():
    # Conv channels are 2x2 maps; flattened, each map is 4 BN features with their own scale.
    model = randomize_bn(After(nn.Conv2d(3, 2, 3), _flatten, nn.BatchNorm1d(8)))
    x = torch.randn(2, 3, 4, 4)
    for result in (fold_module(model, (x,)), fold_program(model, x)):
        (refusal,) = result.report.refused
        assert (refusal.site, refusal.code) == ("op -> flatten -> bn", Code.NOT_PER_CHANNEL)
        assert "span" in refusal.detail and not result.report.folded
        assert same_outputs(model, result.model, x)


def test_bn_folds_through_an_unflatten_into_a_conv1d():
    between = nn.Unflatten(1, (4, 1))
    model = randomize_bn(Pre(nn.BatchNorm1d(4), nn.Conv1d(4, 3, 1), between=between))
    x = torch.randn(2, 4)
    for result in (fold_module(model, (x,)), fold_program(model, x)):
        assert sites(result) == ["bn -> unflatten -> op"] and result.verification.passed
        assert same_outputs(model, result.model, torch.randn(2, 4))


class ReusedConvThenConv(nn.Module):
    """conv runs twice, so the BN cannot fold after it; it still folds into conv2."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x))) + self.conv(x)[:, :2]


@pytest.mark.parametrize("finder", ["export", "fx", "recorded"])
def test_a_bn_after_a_reused_conv_folds_into_the_op_after_it(finder, monkeypatch):
    use(finder, monkeypatch)
    model = randomize_bn(ReusedConvThenConv())
    x = torch.randn(2, 3, 4, 4)
    result = fold_module(model, (x,))
    (folded,) = result.report.folded
    assert folded.site == "bn -> conv2" and result.verification.passed
    assert same_outputs(model, result.model, torch.randn(2, 3, 4, 4))


def test_api_folds_an_exported_program_with_a_copy_for_the_bns_call():
    import bnfold

    model = randomize_bn(ReusedConv())
    x = torch.randn(1, 3, 5, 5)
    eager = bnfold.fold(model, (x,))
    (refusal,) = [r for r in eager.report.refused if r.site == "conv -> bn"]
    assert refusal.code == Code.REUSED_MODULE
    assert "bnfold.fold(torch.export.export(" in refusal.detail
    ep = torch.export.export(model, (x,), strict=False)
    report = bnfold.inspect(ep)
    assert report.dry_run and [f.site for f in report.folded] == ["conv -> bn"]
    result = bnfold.fold(ep)
    assert isinstance(result.model, torch.export.ExportedProgram)
    (folded,) = result.report.folded
    assert folded.bytes_added > 0 and result.verification.passed
    y = torch.randn(1, 3, 5, 5)
    assert same_outputs(model, result.model.module(), y)
    assert bn_nodes(ep.module()) == 1  # the program given is untouched


@pytest.mark.parametrize("finder", ["export", "fx", "recorded", "sequential"])
def test_sequential_linear_unflatten_bn_folds_with_every_finder(finder, monkeypatch):
    use(finder, monkeypatch)
    model = randomize_bn(
        nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (3, 2, 2)), nn.BatchNorm2d(3), nn.ReLU())
    )
    x = torch.randn(2, 5)
    result = fold_module(model, (x,))
    (folded,) = result.report.folded
    between = "1" if finder == "sequential" else "unflatten"
    assert (folded.site, folded.finder) == (f"0 -> {between} -> 2", finder)
    assert folded.pattern == "Linear+Unflatten+BatchNorm2d"
    assert result.verification.passed and same_outputs(model, result.model, torch.randn(2, 5))
