"""Property tests: random conv/linear shapes, groups and BN statistics fold exactly (float64)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.torch_front import fold_module  # noqa: E402
from bnfold.torch_front.program.run import fold_graph_module  # noqa: E402

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def conv_cases(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    transposed = draw(st.booleans())
    bias = draw(st.booleans())
    if transposed:
        output_padding = draw(st.integers(0, max(stride, dilation) - 1))
        conv = CONV_T[rank](
            cin, cout, kernel, stride, output_padding=output_padding, groups=groups,
            bias=bias, dilation=dilation,
        )  # fmt: skip
    else:
        padding = draw(st.integers(0, 1))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        conv = CONV[rank](
            cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode=mode
        )
    size = dilation * (kernel - 1) + 2  # >= 2: reflect padding needs padding < size
    shape = (draw(st.integers(1, 2)), cin, *([size + draw(st.integers(0, 2))] * rank))
    return conv, BN[rank](cout, affine=draw(st.booleans())), shape


def with_stats(bn: nn.Module, seed: int, tiny_var: bool) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=bn.running_mean.dtype))
    var = torch.rand(c, generator=gen, dtype=bn.running_var.dtype)
    bn.running_var.copy_(var * 1e-6 if tiny_var else var + 0.1)
    if bn.affine:
        bn.weight.data.copy_(torch.randn(c, generator=gen, dtype=bn.weight.dtype))
        bn.bias.data.copy_(torch.randn(c, generator=gen, dtype=bn.bias.dtype))
    return bn


def assert_same(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want, got = model(x), folded(x)
    scale = want.abs().max().item() + 1e-30
    assert (want - got).abs().max().item() <= 1e-9 * scale


@SETTINGS
@given(case=conv_cases(), seed=st.integers(0, 2**16), tiny_var=st.booleans())
def test_conv_bn_fold_is_exact_in_float64(case, seed, tiny_var):
    conv, bn, shape = case
    model = nn.Sequential(conv, with_stats(bn, seed, tiny_var)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_module(model, (x,), verify=False)
    assert [f.site for f in result.report.folded] == ["0 -> 1"]
    assert isinstance(result.model[1], nn.Identity)
    assert_same(model, result.model, torch.randn(shape, dtype=torch.float64))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@SETTINGS
@given(
    fin=st.integers(1, 6),
    fout=st.integers(1, 6),
    batch=st.integers(2, 4),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_bn1d_fold_is_exact_in_float64(fin, fout, batch, bias, affine, seed):
    bn = with_stats(nn.BatchNorm1d(fout, affine=affine), seed, tiny_var=False)
    model = nn.Sequential(nn.Linear(fin, fout, bias=bias), bn).double().eval()
    x = torch.randn(batch, fin, dtype=torch.float64)
    result = fold_module(model, (x,), verify=False)
    assert len(result.report.folded) == 1
    assert_same(model, result.model, torch.randn(batch, fin, dtype=torch.float64))


@settings(max_examples=10, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_exported_program_fold_matches_eager(case, seed):
    conv, bn, shape = case
    model = nn.Sequential(conv, with_stats(bn, seed, tiny_var=False)).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    ep = torch.export.export(model, (x,), strict=False)
    result = fold_graph_module(ep.module, (x,), verify=None)
    assert len(result.report.folded) == 1
    assert_same(model, result.model, torch.randn(shape, dtype=torch.float64))


@SETTINGS
@given(
    case=conv_cases(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
    rounding=st.sampled_from(["nearest", "balanced"]),
)
def test_folding_from_the_stored_weight_gives_the_float64_path_bit_for_bit(
    case, seed, dtype, rounding
):
    # The adjacent fold scales the weight as stored (numpy's float64 loop, one
    # rounding); the other folds round a float64 copy. Both round the same products.
    from bnfold.affine import Rounding, fold_after
    from bnfold.torch_front import eager
    from bnfold.torch_front.modules import layout_of, out_channels
    from bnfold.torch_front.tensors import exact_values, to_float64

    conv, _bn, _shape = case
    gen = torch.Generator().manual_seed(seed)
    conv = conv.to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 3)
    bn = BN[len(conv.kernel_size)](out_channels(conv)).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 2 + 1e-3)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
    affine = eager.bn_affine(bn).spread(out_channels(conv))
    mode = Rounding(rounding)
    with exact_values():
        weight, bias = eager._after(conv, affine, mode)
        bias64 = None if conv.bias is None else to_float64(conv.bias)
        exact = fold_after(to_float64(conv.weight), bias64, affine, layout_of(conv))
        want_weight, want_bias = eager._cast(conv, *exact, mode)
        assert torch.equal(weight, want_weight) and torch.equal(bias, want_bias)
        assert (to_float64(weight) == exact[0]).all()  # the exact value, for a later fold
