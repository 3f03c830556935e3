"""The eager front's folds beyond adjacency, on nn.Modules (``bnfold.fold(module)``).

Identity BNs of branch sums (a centred tap into a sibling conv), BNs after an
add/cat of linear modules and BNs after a pool. Each fold keeps the module's
class, forward and state_dict names (the BN becomes ``nn.Identity``; only a
conv without a bias gains one), and the folded module computes what the
original did; each refusal code leaves the outputs exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.affine import Affine, absorb_identity  # noqa: E402
from bnfold.report import Code, FoldKind  # noqa: E402
from bnfold.torch_front import eager  # noqa: E402
from tests.test_torch_rules import POOLS, ConvPoolBN, Join, pool_input  # noqa: E402
from tests.torch_standins import FINDERS, conv_bn, randomize_bn, use  # noqa: E402


def fold(model: nn.Module, *args: torch.Tensor) -> bnfold.FoldResult:
    return bnfold.fold(model, example_inputs=args)


def outputs(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def kinds(result: bnfold.FoldResult) -> list[FoldKind]:
    return sorted(f.kind for f in result.report.folded)


def codes(result: bnfold.FoldResult) -> list[Code]:
    return [r.code for r in result.report.refused]


def batch_norms(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_same_function(model: nn.Module, result: bnfold.FoldResult, *args: torch.Tensor) -> None:
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(outputs(result.model, *args), outputs(model, *args))
    fresh = tuple(torch.randn_like(a) for a in args)
    torch.testing.assert_close(outputs(result.model, *fresh), outputs(model, *fresh))


def assert_untouched(model: nn.Module, result: bnfold.FoldResult, *args: torch.Tensor) -> None:
    assert result.report.folded == []
    torch.testing.assert_close(outputs(result.model, *args), outputs(model, *args), rtol=0, atol=0)


def assert_keeps_names(model: nn.Module, folded: nn.Module) -> None:
    """Same class; the folded BNs' keys gone, every other key kept, new keys only conv biases."""
    assert type(folded) is type(model)
    before, after = set(model.state_dict()), set(folded.state_dict())
    gone = {k for k in before - after if k.rpartition(".")[0] in batch_norms(model)}
    assert before - after == gone
    assert all(k.endswith(".bias") for k in after - before)


# --- identity BN of a branch sum: a centred tap into a sibling conv -------------------------


class RepVgg(nn.Module):
    """timm's RepVggBlock at train time: ``act(conv_1x1(x) + conv_kxk(x) + identity(x))``."""

    def __init__(self, c: int = 4, stride: int = 1) -> None:
        super().__init__()
        self.conv_kxk, self.conv_1x1 = conv_bn(c, c, 3, stride), conv_bn(c, c, 1, stride)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return F.relu(x)


class MobileOne(nn.Module):
    """timm's MobileOneBlock: a sum started from 0, grown in place, grouped kxk branches."""

    def __init__(self, c: int = 4, branches: int = 2) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_scale = conv_bn(c, c, 1, groups=c)
        self.conv_kxk = nn.ModuleList(conv_bn(c, c, 3, groups=c) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.identity(x)
        out = 0
        out += self.conv_scale(x)
        for ck in self.conv_kxk:
            out += ck(x)
        out += identity_out
        return F.relu(out)


class RepGhost(nn.Module):
    """timm's RepGhostModule: ``relu(cheap(x1) + fusion_bn(x1))`` with a depthwise cheap conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.cheap = conv_bn(c, c, 3, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return F.relu(self.cheap(x1) + self.fusion_bn(x1))


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + mixer(x) - norm(x)``, each a MobileOne block with an identity."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.mixer_conv, self.mixer_identity = conv_bn(c, c, 3, groups=c), nn.BatchNorm2d(c)
        self.norm_identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixer = self.mixer_conv(x) + self.mixer_identity(x)
        norm = 0 + self.norm_identity(x)
        return x + (mixer - norm)


BLOCKS = {
    "repvgg": (RepVgg, (2, 4, 6, 6), 2, 1),
    "mobileone": (MobileOne, (2, 4, 6, 6), 3, 1),
    "repghost": (RepGhost, (2, 3, 6, 6), 2, 1),
    "repmixer": (RepMixer, (2, 4, 6, 6), 1, 2),
}


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("block", list(BLOCKS))
def test_identity_bn_of_a_branch_sum_becomes_a_tap_in_a_sibling_conv(
    block: str, finder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, shape, adjacent, taps = BLOCKS[block]
    use(finder, monkeypatch)
    model, x = randomize_bn(make()), torch.randn(*shape)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.ADJACENT] * adjacent + [FoldKind.IDENTITY_TAP] * taps
    assert {f.finder for f in result.report.folded} == {finder}
    assert result.report.refused == []
    assert batch_norms(result.model) == [] and batch_norms(model) != []
    assert result.report.batchnorm.left == 0
    assert_keeps_names(model, result.model)
    assert_same_function(model, result, x)


def test_the_tap_goes_into_the_largest_kernel() -> None:
    model, x = randomize_bn(RepVgg()), torch.randn(2, 4, 6, 6)
    (tap,) = [f for f in fold(model, x).report.folded if f.kind is FoldKind.IDENTITY_TAP]
    assert (tap.site, tap.linear, tap.pattern) == (
        "identity -> conv_kxk.0",
        "conv_kxk.0",
        "BatchNorm2d+add+Conv2d",
    )


def test_the_tap_site_is_no_verification_site_and_retires_the_convs_own() -> None:
    # conv_kxk's output now carries the tap: its place no longer equals the
    # original's BN output, so it is not compared; conv_1x1's still is.
    model, x = randomize_bn(RepVgg()), torch.randn(2, 4, 6, 6)
    result = fold(model, x)
    assert result.verification is not None
    assert [s.name for s in result.verification.sites] == ["conv_1x1.1"]


class ConvPlusBN(nn.Module):
    """``conv(x) + bn(x)``: the conv may take the tap, or say why not."""

    def __init__(self, conv: nn.Conv2d, c: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bn(x)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 4, 1),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, (1, 5), padding=(0, 2), groups=2),
        nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"),
    ],
    ids=["no_bias", "1x1", "dilated", "grouped_1x5", "same_reflect"],
)
def test_a_conv_whose_centre_reads_x_takes_the_tap(conv: nn.Conv2d) -> None:
    model, x = randomize_bn(ConvPlusBN(conv)), torch.randn(2, 4, 6, 6)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.IDENTITY_TAP]
    assert isinstance(result.model.bn, nn.Identity)
    assert result.model.conv.bias is not None
    assert_keeps_names(model, result.model)
    assert_same_function(model, result, x)


def test_conv1d_and_conv3d_take_the_tap() -> None:
    for dims in (1, 3):
        conv = (nn.Conv1d, nn.Conv3d)[dims // 3](4, 4, 3, padding=1)
        bn = (nn.BatchNorm1d, nn.BatchNorm3d)[dims // 3](4)
        model = ConvPlusBN(nn.Conv2d(4, 4, 1))
        model.conv, model.bn = conv, bn
        model, x = randomize_bn(model), torch.randn(2, 4, *([5] * dims))
        result = fold(model, x)
        assert kinds(result) == [FoldKind.IDENTITY_TAP]
        assert_same_function(model, result, x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    ("conv", "shape", "code"),
    [
        # a 1x1 input makes shapes agree at stride 2; the rule still needs stride 1
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), (2, 4, 1, 1), Code.BRANCH_MISMATCH),
        (nn.Conv2d(4, 4, 2, padding="same"), (2, 4, 6, 6), Code.UNCENTRED_TAP),
        # a 3x3 output from a 1x1 input, x broadcast: no centre tap reads x
        (nn.Conv2d(4, 4, 3, padding=2), (2, 4, 1, 1), Code.UNCENTRED_TAP),
    ],
    ids=["stride2", "even_kernel", "uncentred_padding"],
)
def test_a_conv_that_cannot_compute_x_with_a_centred_tap_is_refused(
    conv: nn.Conv2d, shape: tuple[int, ...], code: Code
) -> None:
    model, x = randomize_bn(ConvPlusBN(conv)), torch.randn(*shape)
    result = fold(model, x)
    assert codes(result) == [code]
    assert result.report.refused[0].site == "bn -> conv"
    assert isinstance(result.model.bn, nn.BatchNorm2d)
    assert_untouched(model, result, x)


def test_a_conv_with_other_channel_counts_is_no_identity_sibling() -> None:
    class Widening(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.bn(x)  # (N, 1, H, W) broadcasts over 4 channels

    model, x = randomize_bn(Widening()), torch.randn(2, 1, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCH_MISMATCH]
    assert_untouched(model, result, x)


def test_an_identity_bn_read_outside_the_sum_is_branching() -> None:
    class Leaky(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            identity = self.bn(x)
            return self.conv(x) + identity, identity

    model, x = randomize_bn(Leaky(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCHING]
    assert_untouched(model, result, x)


def test_a_sibling_conv_read_outside_the_sum_is_branching() -> None:
    class Leaky(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return y + self.bn(x), y

    model, x = randomize_bn(Leaky(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCHING]
    assert_untouched(model, result, x)


def test_a_sibling_conv_that_also_runs_elsewhere_is_a_reused_module() -> None:
    class Shared(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.bn(x) + self.conv(x.flip(-1))

    model, x = randomize_bn(Shared(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.REUSED_MODULE]
    assert_untouched(model, result, x)


def test_a_sibling_conv_counted_twice_is_branching() -> None:
    class Twice(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y + y + self.bn(x)

    model, x = randomize_bn(Twice(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCHING]
    assert_untouched(model, result, x)


def test_a_conv_reading_something_else_is_no_sibling() -> None:
    class Shifted(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.flip(-1)) + self.bn(x)

    model, x = randomize_bn(Shifted(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.STANDALONE]  # x itself feeds the BN; no conv reads it
    assert_untouched(model, result, x)


def test_a_scaled_sum_is_no_branch_sum() -> None:
    class Scaled(ConvPlusBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.add(self.conv(x), self.bn(x), alpha=2.0)

    model, x = randomize_bn(Scaled(nn.Conv2d(4, 4, 3, padding=1))), torch.randn(2, 4, 5, 5)
    assert_untouched(model, fold(model, x), x)


def test_a_sibling_conv_in_training_mode_is_refused() -> None:
    model = randomize_bn(ConvPlusBN(nn.Conv2d(4, 4, 3, padding=1)))
    model.conv.train()
    x = torch.randn(2, 4, 5, 5)
    result = fold(model, x)
    assert codes(result) == [Code.TRAINING_MODE]
    assert_untouched(model, result, x)


def test_an_identity_bn_in_training_mode_is_left_alone() -> None:
    model = randomize_bn(ConvPlusBN(nn.Conv2d(4, 4, 3, padding=1)))
    model.bn.train()
    result = fold(model, torch.randn(2, 4, 5, 5))
    assert result.report.folded == []
    assert codes(result) == [Code.TRAINING_MODE]
    assert result.report.batchnorm.training == 1
    assert isinstance(result.model.bn, nn.BatchNorm2d) and result.model.bn.training


def test_a_wrong_tap_is_measured_and_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Verification guards the tap like every fold: here the tap forgets the
    # shift; the branch BN folds stay, the tap is refused and undone.
    def forgets_shift(weight, bias, affine, sign=1):
        return absorb_identity(weight, bias, Affine(affine.scale, 0 * affine.shift), sign)

    monkeypatch.setattr(eager, "absorb_identity", forgets_shift)
    model, x = randomize_bn(RepVgg()), torch.randn(2, 4, 6, 6)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.ADJACENT] * 2
    assert codes(result) == [Code.VERIFICATION_FAILED]
    assert result.report.refused[0].site == "identity -> conv_kxk.0"
    assert isinstance(result.model.identity, nn.BatchNorm2d)
    assert_same_function(model, result, x)


@settings(max_examples=30, deadline=None)
@given(
    c=st.sampled_from([2, 4, 6]),
    groups=st.sampled_from([1, 2]),
    k=st.sampled_from([1, 3, 5]),
    dilation=st.integers(1, 2),
    sign=st.sampled_from([1, -1]),
    seed=st.integers(0, 2**16),
)
def test_absorb_identity_is_conv_plus_affine_minus_x(c, groups, k, dilation, sign, seed) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(c, c // groups, k, k))
    bias = rng.normal(size=c)
    affine = Affine(rng.uniform(-2, 2, size=c), rng.normal(size=c))
    x = torch.from_numpy(rng.normal(size=(2, c, 7, 7)))
    conv = dict(padding=dilation * (k // 2), dilation=dilation, groups=groups)
    w2, b2 = absorb_identity(weight, bias, affine, sign)
    got = F.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2), **conv)
    base = F.conv2d(x, torch.from_numpy(weight), torch.from_numpy(bias), **conv)
    s, t = (torch.from_numpy(a).view(1, c, 1, 1) for a in (affine.scale, affine.shift))
    torch.testing.assert_close(got, base + sign * (s * x + t - x), rtol=1e-12, atol=1e-12)


# --- BN after an add or cat of linear modules ----------------------------------------------

JOIN_ARGS = (torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6))


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize(
    ("join", "b_channels", "kind"),
    [
        ("add", 8, FoldKind.OVER_ADD),
        ("cat", 8, FoldKind.OVER_CONCAT),
        ("cat", 5, FoldKind.OVER_CONCAT),
    ],
)
def test_bn_after_a_join_of_two_convs_folds_into_both(
    join: str, b_channels: int, kind: FoldKind, finder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(finder, monkeypatch)
    model = randomize_bn(Join(join, b_channels))
    result = fold(model, *JOIN_ARGS)
    assert [(f.kind, f.site) for f in result.report.folded] == [(kind, f"a, b -> {join} -> bn")]
    assert result.report.folded[0].finder == finder
    assert result.report.refused == []
    assert isinstance(result.model.bn, nn.Identity)
    assert_keeps_names(model, result.model)
    assert_same_function(model, result, *JOIN_ARGS)
    assert result.verification is not None
    assert [s.name for s in result.verification.sites] == ["bn"]


def test_add_gives_the_shift_to_one_conv_only() -> None:
    model = randomize_bn(Join("add"))
    folded = fold(model, *JOIN_ARGS).model
    assert torch.count_nonzero(folded.b.bias) == 0  # created: scale * 0


def test_cat_of_three_linear_modules_after_their_own_bns_folds() -> None:
    # MixNet's MixedConv2d: split, a conv per part, cat, BN. The branch BNs
    # fold first; the BN after the cat then folds into all three convs.
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(2, 2, k, padding=k // 2) for k in (1, 3, 5))
            self.bns = nn.ModuleList(nn.BatchNorm2d(2) for _ in range(3))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = torch.split(x, 2, 1)
            branches = zip(self.convs, self.bns, parts, strict=True)
            return self.bn(torch.cat([b(c(p)) for c, b, p in branches], 1))

    model, x = randomize_bn(Mixed()), torch.randn(2, 6, 7, 7)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.ADJACENT] * 3 + [FoldKind.OVER_CONCAT]
    assert batch_norms(result.model) == []
    assert_same_function(model, result, x)


def join_refusal(model: nn.Module, args: tuple[torch.Tensor, ...] = JOIN_ARGS) -> list[Code]:
    result = fold(model, *args)
    assert_untouched(model, result, *args)
    assert isinstance(result.model.bn, nn.BatchNorm2d)
    return codes(result)


def test_join_with_a_term_that_is_not_a_linear_module_is_refused() -> None:
    class WithRelu(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(self.joined(self.a(x), torch.relu(self.b(y))))

    assert join_refusal(randomize_bn(WithRelu())) == [Code.NOT_LINEAR_TERM]


def test_join_of_one_output_twice_is_refused() -> None:
    class Twice(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.bn(self.joined(a, a))

    assert join_refusal(randomize_bn(Twice())) == [Code.NOT_LINEAR_TERM]


def test_join_of_one_module_called_twice_is_a_reused_module() -> None:
    class Again(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(self.joined(self.a(x), self.a(x.flip(-1))))

    assert join_refusal(randomize_bn(Again())) == [Code.REUSED_MODULE]


def test_conv_output_read_outside_the_join_branches() -> None:
    class Leaky(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = self.a(x)
            return self.bn(self.joined(a, self.b(y))), a

    assert join_refusal(randomize_bn(Leaky())) == [Code.BRANCHING]


def test_join_read_outside_the_bn_branches() -> None:
    class Leaky(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            joined = self.joined(self.a(x), self.b(y))
            return self.bn(joined), joined

    assert join_refusal(randomize_bn(Leaky())) == [Code.BRANCHING]


def test_cat_over_another_axis_is_not_per_channel() -> None:
    class Wide(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.a(x), self.b(y)], 3))

    assert join_refusal(randomize_bn(Wide("add"))) == [Code.NOT_PER_CHANNEL]


def test_sum_of_convs_of_other_widths_is_a_bad_shape() -> None:
    assert join_refusal(randomize_bn(Join("add", b_channels=1))) == [Code.BAD_SHAPE]


def test_join_with_a_conv_in_training_mode_is_refused() -> None:
    model = randomize_bn(Join("cat"))
    model.b.train()
    assert join_refusal(model) == [Code.TRAINING_MODE]


def test_a_wrong_join_fold_is_measured_and_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eager, "add_parts", lambda affine, count: [affine] * count)
    model = randomize_bn(Join("add"))
    result = fold(model, *JOIN_ARGS)
    assert codes(result) == [Code.VERIFICATION_FAILED]
    assert_untouched(model, result, *JOIN_ARGS)


# --- BN after a pool of a conv ------------------------------------------------------------

MAX_POOLS = {
    "max2": lambda: nn.MaxPool2d(2),
    "max3_padded_ceil": lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    "max_dilated": lambda: nn.MaxPool2d(2, dilation=2),
}


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("pool", list(POOLS) + list(MAX_POOLS))
def test_bn_after_a_pool_folds_into_the_conv_before_it(
    pool: str, finder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(finder, monkeypatch)
    make, dims = POOLS[pool] if pool in POOLS else (MAX_POOLS[pool], 2)
    model, x = randomize_bn(ConvPoolBN(make(), dims)), pool_input(dims)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.THROUGH_POOL]
    assert result.report.folded[0].finder == finder
    assert result.report.folded[0].site.startswith("conv -> ")
    assert result.report.refused == []
    assert isinstance(result.model.bn, nn.Identity) and type(result.model.pool) is type(model.pool)
    assert_keeps_names(model, result.model)
    assert_same_function(model, result, x)


class FunctionalPool(nn.Module):
    def __init__(self, pool) -> None:
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pool(self.conv(x)))


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize(
    "pool",
    [
        lambda y: F.avg_pool2d(y, 3, padding=1, count_include_pad=False),
        lambda y: F.max_pool2d(y, 2),
        lambda y: F.adaptive_avg_pool2d(y, 2),
    ],
    ids=["avg", "max", "adaptive"],
)
def test_functional_pools_fold_too(pool, finder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(finder, monkeypatch)
    model, x = randomize_bn(FunctionalPool(pool)), pool_input(2)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.THROUGH_POOL]
    assert result.report.folded[0].finder == finder
    assert_same_function(model, result, x)


@pytest.mark.parametrize(
    "pool",
    [nn.AvgPool2d(3, padding=1), nn.AvgPool2d(2, divisor_override=3)],
    ids=["counted_padding", "divisor_override"],
)
def test_pool_that_divides_by_more_than_its_elements_refuses_a_shift(pool: nn.Module) -> None:
    model, x = randomize_bn(ConvPoolBN(pool)), pool_input(2)
    result = fold(model, x)
    assert codes(result) == [Code.POOL_PADDING]
    assert_untouched(model, result, x)


def test_counted_padding_passes_a_pure_scale() -> None:
    model = randomize_bn(ConvPoolBN(nn.AvgPool2d(3, padding=1)))
    with torch.no_grad():
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    x = pool_input(2)
    result = fold(model, x)
    assert kinds(result) == [FoldKind.THROUGH_POOL]
    assert_same_function(model, result, x)


def test_max_pool_refuses_a_negative_scale() -> None:
    model = randomize_bn(ConvPoolBN(nn.MaxPool2d(2)))
    with torch.no_grad():
        model.bn.weight[3] = -0.5
    x = pool_input(2)
    result = fold(model, x)
    assert codes(result) == [Code.NEGATIVE_SCALE]
    assert "channel 3" in result.report.refused[0].detail
    assert_untouched(model, result, x)


def test_max_pool_returning_indices_is_not_looked_through() -> None:
    class WithIndices(ConvPoolBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.pool(self.conv(x))[0])

    model, x = randomize_bn(WithIndices(nn.MaxPool2d(2, return_indices=True))), pool_input(2)
    result = fold(model, x)
    assert codes(result) != [] and FoldKind.THROUGH_POOL not in kinds(result)
    assert_untouched(model, result, x)


def test_pooled_conv_output_read_elsewhere_branches() -> None:
    class Both(ConvPoolBN):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return self.bn(self.pool(y)), y

    model, x = randomize_bn(Both(nn.AvgPool2d(2))), pool_input(2)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCHING]
    assert_untouched(model, result, x)


def test_pool_output_read_elsewhere_branches() -> None:
    class Both(ConvPoolBN):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.pool(self.conv(x))
            return self.bn(pooled), pooled

    model, x = randomize_bn(Both(nn.AvgPool2d(2))), pool_input(2)
    result = fold(model, x)
    assert codes(result) == [Code.BRANCHING]
    assert "avg_pool2d output" in result.report.refused[0].detail
    assert_untouched(model, result, x)


def test_pool_of_a_linear_output_is_not_per_channel() -> None:
    class LinearPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.pool, self.bn = nn.Linear(6, 8), nn.AvgPool1d(2), nn.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.pool(self.fc(x)))  # (N, 5, 8) pooled to (N, 5, 4)

    model, x = randomize_bn(LinearPool()), torch.randn(2, 5, 6)
    result = fold(model, x)
    assert codes(result) == [Code.NOT_PER_CHANNEL]
    assert_untouched(model, result, x)


def test_pool_with_the_module_in_training_mode_is_refused() -> None:
    model = randomize_bn(ConvPoolBN(nn.AvgPool2d(2)))
    model.conv.train()
    x = pool_input(2)
    result = fold(model, x)
    assert codes(result) == [Code.TRAINING_MODE]
    assert_untouched(model, result, x)
