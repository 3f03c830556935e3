"""The torch front's folds beyond adjacency: batch-merging reshapes (LeViT), ...

Each fold is checked on an eager module (module-level: the BN becomes
``nn.Identity``) and on its ``ExportedProgram`` (graph level), against the
original outputs; each refusal code leaves the outputs as they were.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold import layouts  # noqa: E402
from bnfold.report import Code, FoldKind, Refusal  # noqa: E402
from tests.torch_standins import conv_bn, randomize_bn  # noqa: E402


def run(model: nn.Module | torch.export.ExportedProgram, x: torch.Tensor) -> torch.Tensor:
    callable_ = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        return callable_(x)


def fold_on(front: str, model: nn.Module, x: torch.Tensor) -> bnfold.FoldResult:
    """Fold ``model`` as an eager module or as its ExportedProgram."""
    if front == "eager":
        return bnfold.fold(model, example_inputs=(x,))
    return bnfold.fold(torch.export.export(model, (x,), strict=False))


def batch_norms_left(result: bnfold.FoldResult) -> int:
    model = result.model
    if isinstance(model, torch.export.ExportedProgram):
        return sum(1 for n in model.graph.nodes if "batch_norm" in str(n.target))
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


FRONTS = ["eager", "exported"]


# --- batch merge: Linear(x[B, N, K]) -> flatten(0, 1) -> BN1d(C) -------------------------


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: ``bn(linear(x).flatten(0, 1)).reshape_as(x)``."""

    def __init__(self, k: int = 6, c: int = 8, merge=lambda y: y.flatten(0, 1), bn_features=None):
        super().__init__()
        self.linear = nn.Linear(k, c, bias=False)
        self.bn = nn.BatchNorm1d(bn_features or c)
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(self.merge(y)).reshape_as(y)


MERGES = {
    "flatten01": (lambda y: y.flatten(0, 1), (2, 5, 6)),
    "view_minus1_c": (lambda y: y.view(-1, y.shape[-1]), (2, 5, 6)),
    "reshape_4d": (lambda y: y.reshape(-1, 8), (2, 3, 4, 6)),
}


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("merge", list(MERGES), ids=list(MERGES))
def test_batch_merging_reshape_before_bn1d_folds_into_the_linear(front: str, merge: str) -> None:
    reshape, shape = MERGES[merge]
    model, x = randomize_bn(LinearNorm(merge=reshape)), torch.randn(*shape)
    expected = run(model, x)
    result = fold_on(front, model, x)
    assert [f.kind for f in result.report.folded] == [FoldKind.BATCH_MERGE]
    assert result.report.folded[0].site.startswith("linear -> ")
    assert result.report.refused == []
    assert batch_norms_left(result) == 0
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_eager_batch_merge_keeps_the_class_and_the_linear_names() -> None:
    model, x = randomize_bn(LinearNorm()), torch.randn(2, 5, 6)
    folded = fold_on("eager", model, x).model
    assert type(folded) is LinearNorm and isinstance(folded.bn, nn.Identity)
    assert set(folded.state_dict()) == {"linear.weight", "linear.bias"}
    assert isinstance(model.bn, nn.BatchNorm1d)  # the original is left alone


@pytest.mark.parametrize("front", FRONTS)
def test_linear_on_3d_input_into_bn1d_without_a_merge_stays(front: str) -> None:
    # BN1d on (B, N, C) normalizes axis 1, the tokens: not the Linear's features,
    # even when N == C makes the statistics fit (the silent wrong fold).
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.linear(x))

    model, x = randomize_bn(Direct()), torch.randn(2, 8, 6)
    expected = run(model, x)
    result = fold_on(front, model, x)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.NOT_PER_CHANNEL]
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("front", FRONTS)
def test_merge_that_moves_the_channel_axis_is_refused(front: str) -> None:
    # (B, N, C) -> (B, N*C): each BN channel is one (token, feature), not one feature.
    model = randomize_bn(LinearNorm(merge=lambda y: y.flatten(1), bn_features=5 * 8))
    x = torch.randn(2, 5, 6)
    expected = run(model, x)
    result = fold_on(front, model, x)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.MERGE_MOVES_CHANNEL]
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("front", FRONTS)
def test_linear_output_read_besides_reshape_as_still_branches(front: str) -> None:
    # reshape_as(y) reads y's shape only; a residual "+ y" reads its values.
    class Residual(LinearNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.linear(x)
            return y + self.bn(y.flatten(0, 1)).reshape_as(y)

    model, x = randomize_bn(Residual()), torch.randn(2, 5, 6)
    expected = run(model, x)
    result = fold_on(front, model, x)
    assert [r.code for r in result.report.refused] == [Code.BRANCHING]
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    c=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_merges_leading_axes_is_exact_when_it_says_so(lead: list[int], c: int, seed: int) -> None:
    """A per-feature affine on (..., C) equals one on axis 1 of any 2-D reshape it accepts."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((*lead, c))
    scale, shift = rng.standard_normal(c), rng.standard_normal(c)
    for x_dim in {c, y.size // lead[0]}:
        merged = (y.size // x_dim, x_dim)
        verdict = layouts.merges_leading_axes(merged, y.shape)
        assert verdict is (x_dim == c)
        if verdict:
            via_merge = (y.reshape(merged) * scale + shift).reshape(y.shape)
            np.testing.assert_allclose(via_merge, y * scale + shift)


def test_merges_leading_axes_ignores_what_is_no_merge() -> None:
    assert layouts.merges_leading_axes((10, 8), (10, 8)) is None  # already 2-D: adjacency
    assert layouts.merges_leading_axes((2, 8, 5), (2, 5, 8)) is None  # not 2-D
    assert layouts.merges_leading_axes((9, 8), (2, 5, 8)) is None  # other element count


# --- through a pool: BN(avg_pool(conv(x))) at graph level -------------------------------


class ConvPoolBN(nn.Module):
    def __init__(self, pool: nn.Module, dims: int = 2) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        self.conv, self.pool, self.bn = conv(3, 8, 3), pool, norm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pool(self.conv(x)))


POOLS = {
    "avg2": (lambda: nn.AvgPool2d(2), 2),
    "avg3_padded_not_counted": (lambda: nn.AvgPool2d(3, padding=1, count_include_pad=False), 2),
    "avg2_ceil_not_counted": (lambda: nn.AvgPool2d(3, ceil_mode=True, count_include_pad=False), 2),
    # torch divides an overrunning ceil_mode window by its elements inside the input
    "avg3_ceil_counted": (lambda: nn.AvgPool2d(3, ceil_mode=True), 2),
    "adaptive1": (lambda: nn.AdaptiveAvgPool2d(1), 2),
    "adaptive_3x2": (lambda: nn.AdaptiveAvgPool2d((3, 2)), 2),
    "avg1d": (lambda: nn.AvgPool1d(2), 1),
    "adaptive3d": (lambda: nn.AdaptiveAvgPool3d(2), 3),
}


def pool_input(dims: int) -> torch.Tensor:
    return torch.randn(2, 3, *([9] * dims))


@pytest.mark.parametrize("pool", list(POOLS), ids=list(POOLS))
def test_bn_after_an_average_pool_folds_into_the_conv_before_it(pool: str) -> None:
    make, dims = POOLS[pool]
    model, x = randomize_bn(ConvPoolBN(make(), dims)), pool_input(dims)
    expected = run(model, x)
    result = fold_on("exported", model, x)
    assert [f.kind for f in result.report.folded] == [FoldKind.THROUGH_POOL]
    assert result.report.refused == []
    assert batch_norms_left(result) == 0
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(3, padding=1),  # count_include_pad=True by default
        nn.AvgPool2d(2, divisor_override=3),
    ],
    ids=["counted_padding", "divisor_override"],
)
def test_pool_that_divides_by_more_than_its_elements_refuses_a_shift(pool: nn.Module) -> None:
    model, x = randomize_bn(ConvPoolBN(pool)), pool_input(2)
    expected = run(model, x)
    result = fold_on("exported", model, x)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.POOL_PADDING]
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


def test_counted_padding_passes_a_pure_scale() -> None:
    # Zeros padded in stay zeros under a scale: only a shift would be mis-averaged.
    model = randomize_bn(ConvPoolBN(nn.AvgPool2d(3, padding=1)))
    with torch.no_grad():
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    x = pool_input(2)
    expected = run(model, x)
    result = fold_on("exported", model, x)
    assert [f.kind for f in result.report.folded] == [FoldKind.THROUGH_POOL]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_pooled_conv_output_read_elsewhere_branches() -> None:
    class Both(ConvPoolBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(self.pool(y)), y

    model, x = randomize_bn(Both(nn.AvgPool2d(2))), pool_input(2)
    result = fold_on("exported", model, x)
    assert [r.code for r in result.report.refused] == [Code.BRANCHING]


MAX_POOLS = {  # name: (pool, dims, its aten name in the site)
    "max2": (lambda: nn.MaxPool2d(2), 2, "max_pool2d"),
    # -inf padding, dilation and ceil_mode change which elements a window holds,
    # never that it holds one channel's real elements only
    "max3_padded_dilated_ceil": (
        lambda: nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
        2,
        "max_pool2d",
    ),
    "max1d": (lambda: nn.MaxPool1d(3, padding=1), 1, "max_pool1d"),
    "max3d": (lambda: nn.MaxPool3d(2), 3, "max_pool3d"),
    "adaptive_max": (lambda: nn.AdaptiveMaxPool2d((3, 2)), 2, "adaptive_max_pool2d"),
    "global_max": (lambda: nn.AdaptiveMaxPool2d(1), 2, "adaptive_max_pool2d"),
}


def fold_max_pool(pool: str, decompose: bool = False, gamma=None) -> tuple:
    make, dims, _ = MAX_POOLS[pool]
    model, x = randomize_bn(ConvPoolBN(make(), dims)), pool_input(dims)
    if gamma is not None:
        with torch.no_grad():
            model.bn.weight.copy_(gamma(model.bn.weight))
    expected = run(model, x)
    program = torch.export.export(model, (x,), strict=False)
    if decompose:  # max_pool2d_with_indices + getitem, _native_batch_norm_legit_no_training
        program = program.run_decompositions()
    return bnfold.fold(program), x, expected


@pytest.mark.parametrize("pool", list(MAX_POOLS), ids=list(MAX_POOLS))
def test_bn_after_a_max_pool_folds_into_the_conv_before_it(pool: str) -> None:
    result, x, expected = fold_max_pool(pool)
    assert [(f.kind, f.site) for f in result.report.folded] == [
        (FoldKind.THROUGH_POOL, f"conv -> {MAX_POOLS[pool][2]} -> bn")
    ]
    assert result.report.refused == []
    assert batch_norms_left(result) == 0
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_bn_after_a_decomposed_max_pool_with_indices_folds() -> None:
    result, x, expected = fold_max_pool("max3_padded_dilated_ceil", decompose=True)
    assert [f.kind for f in result.report.folded] == [FoldKind.THROUGH_POOL]
    assert batch_norms_left(result) == 0
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_a_zero_scale_passes_a_max_pool() -> None:
    # max(0 * y + t) == t == 0 * max(y) + t: only a negative scale flips the max.
    result, x, expected = fold_max_pool("max2", gamma=lambda g: g * (torch.arange(8) % 2))
    assert [f.kind for f in result.report.folded] == [FoldKind.THROUGH_POOL]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decompose", [False, True], ids=["max_pool2d", "with_indices"])
def test_a_negative_scale_after_a_max_pool_is_refused(decompose: bool) -> None:
    negate_one = lambda g: g * torch.tensor([1.0] * 7 + [-1.0])  # noqa: E731
    result, x, expected = fold_max_pool("max2", decompose, gamma=negate_one)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.NEGATIVE_SCALE]
    assert "channel 7" in result.report.refused[0].detail
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


def test_a_max_pool_whose_indices_are_read_is_refused() -> None:
    class WithIndices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values, indices = nn.functional.max_pool2d(self.conv(x), 2, return_indices=True)
            return self.bn(values), indices

    model, x = randomize_bn(WithIndices()), pool_input(2)
    expected = run(model, x)
    result = fold_on("exported", model, x)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.TRAINING_MODE]
    for got, want in zip(run(result.model, x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_max_pooled_conv_output_read_elsewhere_branches() -> None:
    class Both(ConvPoolBN):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.pool(self.conv(x))
            return self.bn(pooled), pooled

    model, x = randomize_bn(Both(nn.MaxPool2d(2))), pool_input(2)
    result = fold_on("exported", model, x)
    assert [r.code for r in result.report.refused] == [Code.BRANCHING]


# --- over a join: BN(add(conv_a, conv_b)), BN(cat([conv_a, conv_b], 1)) at graph level ----


class Join(nn.Module):
    """Two convs on different inputs, summed or concatenated, then one BN."""

    def __init__(self, join: str = "add", b_channels: int = 8, bn_channels: int | None = None):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, b_channels, 1, bias=False)
        default = 8 + b_channels if join == "cat" else 8
        self.bn = nn.BatchNorm2d(bn_channels or default)
        self.join = join

    def joined(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], 1) if self.join == "cat" else a + b

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(self.joined(self.a(x), self.b(y)))


JOIN_INPUTS = (torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6))


def fold_program(model: nn.Module, args: tuple[torch.Tensor, ...]) -> bnfold.FoldResult:
    return bnfold.fold(torch.export.export(model, args, strict=False))


def run_program(result: bnfold.FoldResult, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return result.model.module()(*args)


@pytest.mark.parametrize(
    ("join", "b_channels", "kind"),
    [
        ("add", 8, FoldKind.OVER_ADD),
        ("cat", 8, FoldKind.OVER_CONCAT),
        ("cat", 5, FoldKind.OVER_CONCAT),
    ],
)
def test_bn_after_a_join_of_two_convs_folds_into_both(join: str, b_channels: int, kind) -> None:
    model = randomize_bn(Join(join, b_channels))
    with torch.no_grad():
        expected = model(*JOIN_INPUTS)
    result = fold_program(model, JOIN_INPUTS)
    assert [(f.kind, f.site) for f in result.report.folded] == [(kind, f"a, b -> {join} -> bn")]
    assert result.report.refused == []
    assert batch_norms_left(result) == 0
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run_program(result, JOIN_INPUTS), expected, rtol=1e-5, atol=1e-5)


def test_add_gives_the_shift_to_one_conv_only() -> None:
    # The bias-free conv b gets a bias of zero (scale * 0), a the whole shift.
    model = randomize_bn(Join("add"))
    folded = fold_program(model, JOIN_INPUTS).model.module()
    bias_b = dict(folded.named_parameters())["b.bias"]
    assert torch.count_nonzero(bias_b) == 0


def join_refusal(model: nn.Module, args: tuple[torch.Tensor, ...] = JOIN_INPUTS) -> list[Code]:
    with torch.no_grad():
        expected = model(*args)
    result = fold_program(model, args)
    assert result.report.folded == []
    torch.testing.assert_close(run_program(result, args), expected, rtol=0, atol=0)
    return [r.code for r in result.report.refused]


def test_join_with_a_term_that_is_not_a_linear_op_is_refused() -> None:
    class WithResidual(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(self.joined(self.a(x), torch.relu(self.b(y))))

    assert join_refusal(randomize_bn(WithResidual())) == [Code.NOT_LINEAR_TERM]


def test_join_of_one_conv_twice_is_refused() -> None:
    class Twice(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.bn(self.joined(a, a))

    assert join_refusal(randomize_bn(Twice())) == [Code.NOT_LINEAR_TERM]


def test_conv_output_read_outside_the_join_branches() -> None:
    class Leaky(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.bn(self.joined(a, self.b(y))), a

    assert join_refusal(randomize_bn(Leaky())) == [Code.BRANCHING]


def test_cat_over_another_axis_is_not_per_channel() -> None:
    class Wide(Join):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.a(x), self.b(y)], 3))

    assert join_refusal(randomize_bn(Wide("add"))) == [Code.NOT_PER_CHANNEL]


def test_sum_of_convs_of_other_widths_is_a_bad_shape() -> None:
    # (N, 1, H, W) + (N, 8, H, W) broadcasts; one channel of b feeds eight BN channels.
    assert join_refusal(randomize_bn(Join("add", b_channels=1))) == [Code.BAD_SHAPE]


def test_a_join_fold_that_changes_the_outputs_is_rolled_back(monkeypatch) -> None:
    # Verification guards the new kinds like every fold: a wrong split (the
    # shift given to every term) is measured, refused and undone.
    from bnfold.rules import join

    monkeypatch.setattr(join, "add_parts", lambda affine, count: [affine] * count)
    model = randomize_bn(Join("add"))
    with torch.no_grad():
        expected = model(*JOIN_INPUTS)
    result = fold_program(model, JOIN_INPUTS)
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.VERIFICATION_FAILED]
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run_program(result, JOIN_INPUTS), expected, rtol=0, atol=0)


# --- branch sums: RepVGG / MobileOne / RepGhost / RepViT blocks merged into one conv -------


class RepVGGBlock(nn.Module):
    """relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)); no identity BN at stride 2."""

    def __init__(self, c: int = 4, stride: int = 1, groups: int = 1, identity: bool = True):
        super().__init__()
        self.kxk = conv_bn(c, c, 3, stride, groups)
        self.one = conv_bn(c, c, 1, stride, groups, padding=0)
        self.identity = nn.BatchNorm2d(c) if identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kxk(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class MobileOneBlock(nn.Module):
    """timm's MobileOne: depthwise k kxk branches, a 1x1 scale branch and an identity BN,
    summed as ``0 + ...`` and ``+=`` (aten add(v, 0) and add_)."""

    def __init__(self, c: int = 4, k: int = 3) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.scale = conv_bn(c, c, 1, groups=c, padding=0)
        self.kxk = nn.ModuleList(conv_bn(c, c, 3, groups=c) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0 + self.identity(x)
        out = out + self.scale(x)
        for conv in self.kxk:
            out += conv(x)
        return torch.relu(out)


class RepViTMixer(nn.Module):
    """RepViT's RepVggDw: ``BN(conv3x3(x) + conv1x1(x) + x)``, depthwise, a plain biased 1x1."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = conv_bn(c, c, 3, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepGhostFusion(nn.Module):
    """RepGhost's cheap operation: ``BN(dwconv(x1)) + BN(x1)`` after a 1x1 primary conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.primary = conv_bn(3, c, 1, padding=0)
        self.cheap = conv_bn(c, c, 3, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.primary(x))
        return torch.relu(self.cheap(x1) + self.fusion_bn(x1))


def block_input(c: int = 4) -> torch.Tensor:
    return torch.randn(2, c, 7, 7)


def merged(model: nn.Module, x: torch.Tensor, decompose: bool = False) -> bnfold.FoldResult:
    """Fold the program of ``model``; check its outputs against the eager model's."""
    expected = run(model, x)
    program = torch.export.export(model, (x,), strict=False)
    if decompose:  # convolution, _native_batch_norm_legit_no_training + getitem
        program = program.run_decompositions()
    result = bnfold.fold(program)
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)
    return result


def count_nodes(result: bnfold.FoldResult, kind: str) -> int:
    """call_function nodes of the folded program whose aten name contains ``kind``."""
    program = result.model
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and kind in str(n.target))


@pytest.mark.parametrize("decompose", [False, True], ids=["conv2d", "decomposed"])
def test_repvgg_block_merges_into_one_conv(decompose: bool) -> None:
    result = merged(randomize_bn(RepVGGBlock()), block_input(), decompose)
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * 2 + [FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    merge = result.report.folded[-1]
    assert merge.site.startswith("kxk.0 + one.0 + identity -> ") and merge.linear == "kxk.0"
    assert result.report.refused == []
    assert (count_nodes(result, "conv"), count_nodes(result, "add")) == (1, 0)
    assert batch_norms_left(result) == 0
    assert result.report.batchnorm is not None and result.report.batchnorm.folded == 3


def test_a_re_exported_decomposed_program_still_folds() -> None:
    # Exporting a decomposed program again keeps the getitems of every BN's mean and
    # invstd, unread: they are no readers of the BN (every BN was refused branching).
    model, x = randomize_bn(RepVGGBlock()), block_input()
    decomposed = torch.export.export(model, (x,), strict=False).run_decompositions()
    program = torch.export.export(decomposed.module(), (x,), strict=False)
    result = bnfold.fold(program)
    assert result.report.refused == []
    assert [f.kind for f in result.report.folded][-1] is FoldKind.REPARAM
    torch.testing.assert_close(run(result.model, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_repvgg_stride_two_block_without_identity_merges_its_convs() -> None:
    # No BN is left once the branch BNs fold: the merge must still be looked for.
    model, x = randomize_bn(RepVGGBlock(stride=2, identity=False)), block_input()
    result = merged(model, x)
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT, FoldKind.ADJACENT, FoldKind.REPARAM]
    assert count_nodes(result, "conv") == 1


@pytest.mark.parametrize("k", [1, 3])
def test_mobileone_block_with_k_branches_merges_into_one_conv(k: int) -> None:
    result = merged(randomize_bn(MobileOneBlock(k=k)), block_input())
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * (k + 1) + [FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    assert (count_nodes(result, "conv"), count_nodes(result, "add")) == (1, 0)
    assert batch_norms_left(result) == 0


def test_repvit_sum_with_a_bare_identity_then_bn_becomes_one_conv() -> None:
    result = merged(randomize_bn(RepViTMixer()), block_input())
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT, FoldKind.ADJACENT, FoldKind.REPARAM]
    assert result.report.folded[1].site.endswith(" -> bn")  # the BN after the sum
    assert result.report.folded[-1].site.startswith("conv.0 + conv1 + x -> ")
    assert (count_nodes(result, "conv"), count_nodes(result, "add")) == (1, 0)
    assert batch_norms_left(result) == 0


def test_repvit_sum_whose_input_is_a_folded_conv_merges() -> None:
    # Once the stem's BN folds, x is the stem conv's output: the bare term x is then a
    # conv node that the other terms read, not a branch of the sum.
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.mixer = conv_bn(3, 4, 3), RepViTMixer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mixer(self.stem(x))

    result = merged(randomize_bn(Stem()), torch.randn(2, 3, 7, 7))
    assert [f.kind for f in result.report.folded][-1] is FoldKind.REPARAM
    assert (count_nodes(result, "conv"), batch_norms_left(result)) == (2, 0)


def test_repghost_fusion_bn_becomes_a_tap_of_the_cheap_conv() -> None:
    result = merged(randomize_bn(RepGhostFusion()), torch.randn(2, 3, 7, 7))
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * 2 + [FoldKind.IDENTITY_TAP, FoldKind.REPARAM]
    assert (count_nodes(result, "conv"), batch_norms_left(result)) == (2, 0)


def test_bn_after_a_sum_of_convs_on_one_input_folds_into_the_merge() -> None:
    # Not an over_add fold into both convs: they merge, and the BN goes into the merge.
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x) + self.b(x))

    result = merged(randomize_bn(Summed()), block_input())
    assert [f.kind for f in result.report.folded] == [FoldKind.ADJACENT, FoldKind.REPARAM]
    assert count_nodes(result, "conv") == 1


def test_dilated_branch_sum_merges() -> None:
    class Dilated(RepVGGBlock):
        def __init__(self) -> None:
            super().__init__()
            self.kxk = conv_bn(4, 4, 3, dilation=2)
            self.one = conv_bn(4, 4, 1, padding=0, dilation=2)  # as ONNX: dilations must agree

    result = merged(randomize_bn(Dilated()), block_input())
    assert [f.kind for f in result.report.folded][-1] is FoldKind.REPARAM
    assert count_nodes(result, "conv") == 1


def test_float64_block_merges_exactly() -> None:
    model, x = randomize_bn(RepVGGBlock()).double(), block_input().double()
    result = merged(model, x)
    assert count_nodes(result, "conv") == 1
    torch.testing.assert_close(run(result.model, x), run(model, x), rtol=0, atol=1e-12)


def test_fp16_block_merges_in_fp16() -> None:
    # The merged kernel is summed in float64 from the branches' exact folded values
    # and cast once: against the float64 model it stays within fp16 rounding, as
    # close as the fp16 model itself (both 6e-4 of the largest output here).
    torch.manual_seed(0)
    model, x = randomize_bn(RepVGGBlock(c=8)), torch.randn(2, 8, 9, 9)
    exact = run(model.double(), x.double())
    half = model.half()
    original = run(half, x.half()).double()
    result = bnfold.fold(torch.export.export(half, (x.half(),), strict=False))
    assert count_nodes(result, "conv") == 1
    assert result.verification is not None and result.verification.passed
    folded = run(result.model, x.half())
    assert folded.dtype == torch.float16
    scale = exact.abs().max()
    assert (original - exact).abs().max() <= 2e-3 * scale
    assert (folded.double() - exact).abs().max() <= 2e-3 * scale


def test_a_plain_residual_around_a_conv_is_left_as_built() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + x

    result = merged(Residual(), block_input())
    assert result.report.folded == [] and result.report.refused == []
    assert (count_nodes(result, "conv"), count_nodes(result, "add")) == (1, 1)


def refused_tap(model: nn.Module, x: torch.Tensor | None = None) -> list[Refusal]:
    """Fold ``model``'s program; the identity BN must stay with the outputs as they were."""
    x = block_input() if x is None else x
    expected = run(model, x)
    result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert not any(f.kind is FoldKind.REPARAM for f in result.report.folded)
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)
    return result.report.refused


def test_branches_of_other_groups_are_a_branch_mismatch() -> None:
    class Grouped(RepVGGBlock):
        def __init__(self) -> None:
            super().__init__()
            self.kxk = conv_bn(4, 4, 3, groups=2)

    [refusal] = refused_tap(randomize_bn(Grouped()))
    assert (refusal.code, refusal.site) == (Code.BRANCH_MISMATCH, "identity -> add_1")
    assert "groups" in refusal.detail


def test_branches_of_other_dilations_are_a_branch_mismatch() -> None:
    class Dilations(RepVGGBlock):
        def __init__(self) -> None:
            super().__init__()
            self.one = conv_bn(4, 4, 3, dilation=2)

    [refusal] = refused_tap(randomize_bn(Dilations()))
    assert refusal.code is Code.BRANCH_MISMATCH and "dilations" in refusal.detail


def test_an_identity_beside_a_conv_of_other_width_is_a_branch_mismatch() -> None:
    # (N, 1, H, W) + (N, 4, H, W) broadcasts: no conv of x computes that sum.
    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = conv_bn(4, 1, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x) + self.bn(x))

    assert [r.code for r in refused_tap(randomize_bn(Narrow()))] == [Code.BRANCH_MISMATCH]


def test_crossed_kernels_are_an_uncentred_tap() -> None:
    class Crossed(RepVGGBlock):
        def __init__(self) -> None:
            super().__init__()
            self.kxk = conv_bn(4, 4, (3, 1), padding=(1, 0))
            self.one = conv_bn(4, 4, (1, 3), padding=(0, 1))

    assert [r.code for r in refused_tap(randomize_bn(Crossed()))] == [Code.UNCENTRED_TAP]


def test_an_identity_beside_an_even_same_padded_kernel_is_an_uncentred_tap() -> None:
    # padding="same" pads a 2x2 kernel (0, 1): x's tap has no centre to sit in.
    class Even(RepVGGBlock):
        def __init__(self) -> None:
            super().__init__()
            self.kxk = conv_bn(4, 4, 2, padding="same")

    [refusal] = refused_tap(randomize_bn(Even()))
    assert refusal.code is Code.UNCENTRED_TAP and "centre" in refusal.detail


def test_a_branch_read_outside_the_sum_is_branching() -> None:
    class Leaky(RepVGGBlock):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kxk = self.kxk(x)
            return torch.relu(kxk + self.one(x) + self.identity(x)), kxk

    model, x = randomize_bn(Leaky()), block_input()
    expected = run(model, x)
    result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert [(r.code, r.site) for r in result.report.refused] == [
        (Code.BRANCHING, "identity -> add_1")
    ]
    for got, want in zip(run(result.model, x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_mode_identity_bn_is_never_merged() -> None:
    model = randomize_bn(RepVGGBlock())
    model.identity.train()
    x = block_input()
    result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert [r.code for r in result.report.refused] == [Code.TRAINING_MODE]
    assert not any(f.kind is FoldKind.REPARAM for f in result.report.folded)
    assert batch_norms_left(result) == 1


def test_a_merge_that_changes_the_outputs_is_rolled_back(monkeypatch) -> None:
    # A wrong identity tap (twice the BN's scale) is measured, refused at the BN it
    # would have removed, and undone; the branch folds it built on stay.
    from bnfold.core import reparam

    real = reparam.identity_kernel
    monkeypatch.setattr(reparam, "identity_kernel", lambda scale, *args: real(2 * scale, *args))
    model, x = randomize_bn(RepVGGBlock()), block_input()
    expected = run(model, x)
    result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert [f.kind for f in result.report.folded] == [FoldKind.ADJACENT] * 2
    assert [(r.code, r.site) for r in result.report.refused] == [
        (Code.VERIFICATION_FAILED, "identity -> add_1")
    ]
    assert result.report.batchnorm is not None
    assert result.report.batchnorm.left_by_code == {"verification_failed": 1}
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


# --- eval-mode dropout between a BN and the Linear after it (timm's NormLinear) ----------


class NormLinear(nn.Module):
    """timm LeViT's head: ``linear(drop(bn(x.mean(1))))``; the mean leaves BN nothing before."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x.mean(1))))


@pytest.mark.parametrize("front", FRONTS)
def test_bn_folds_into_the_linear_after_an_eval_dropout(front: str) -> None:
    model, x = randomize_bn(NormLinear()), torch.randn(2, 5, 8)
    expected = run(model, x)
    result = fold_on(front, model, x)
    assert [f.site for f in result.report.folded] == ["bn -> linear"]
    assert batch_norms_left(result) == 0
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_a_dropout_left_training_is_not_looked_through() -> None:
    # Dropout(s*x + t) drops the shift too: in training it is no identity.
    model, x = randomize_bn(NormLinear()), torch.randn(2, 5, 8)
    model.drop.train()
    result = fold_on("eager", model, x)
    assert result.report.folded == []
    assert isinstance(result.model.bn, nn.BatchNorm1d)


# --- a BN subclass that does more than normalize (timm's BatchNormAct2d) -----------------


class BatchNormAct2d(nn.BatchNorm2d):
    """BN then an activation child, in one module, as timm builds its nets."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ConvBnAct(nn.Module):
    def __init__(self, act: bool = True) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_eager_bn_subclass_with_an_activation_child_folds_and_keeps_it() -> None:
    # The affine goes into the conv; the ReLU stays in the BN's place (as nn.Identity
    # it would be lost).
    model, x = randomize_bn(ConvBnAct()), pool_input(2)
    expected = run(model, x)
    result = fold_on("eager", model, x)
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    assert isinstance(result.model.bn, nn.Sequential)
    assert [type(m) for m in result.model.bn] == [nn.ReLU]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_exported_bn_subclass_with_an_activation_child_folds() -> None:
    # In the aten graph it is batch_norm then relu: the batch_norm folds, the relu stays.
    model, x = randomize_bn(ConvBnAct()), pool_input(2)
    expected = run(model, x)
    result = fold_on("exported", model, x)
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


def test_eager_bn_subclass_whose_children_are_identities_folds() -> None:
    model, x = randomize_bn(ConvBnAct(act=False)), pool_input(2)
    expected = run(model, x)
    result = fold_on("eager", model, x)
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)
