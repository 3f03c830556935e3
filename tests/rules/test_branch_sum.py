"""The branch-sum family: the tree walk on any graph, the tap geometry, the merged kernel,
and the .pt2 front merging FastViT's RepMixer as the ONNX front does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.core.affine import Affine
from bnfold.core.geometry import ConvGeometry
from bnfold.core.reparam import Branch, Tap, merge_branches
from bnfold.report import Code
from bnfold.rules import branch_sum as rule
from bnfold.rules.family import Refused

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.report import FoldKind  # noqa: E402
from tests.test_torch_rules import run  # noqa: E402
from tests.torch_standins import conv_bn, randomize_bn  # noqa: E402

# --- the tree walk over a toy graph: the rule knows no front ---------------------------


@dataclass(eq=False)
class Op:
    """A node of the toy graph: ``kind`` "input", "conv", "bn", "add", "sub", "mul" or
    "relu"; ``args`` the nodes (or constant arrays) it reads."""

    name: str
    kind: str
    args: tuple[object, ...] = ()
    readers: list[Op] = field(default_factory=list)


class ToyView:
    """The SumView of a toy graph, where an op is its own value."""

    def label(self, node: Op) -> str:
        return node.name

    def producer(self, value: object) -> Op | None:
        return value if isinstance(value, Op) and value.kind != "input" else None

    def output(self, node: Op) -> Op:
        return node

    def operands(self, node: Op) -> tuple[object, object]:
        a, b = node.args
        return a, b

    def op(self, node: Op) -> rule.TreeOp | None:
        return node.kind if node.kind in ("add", "sub", "mul") else None  # type: ignore[return-value]

    def is_constant(self, value: object) -> bool:
        return isinstance(value, np.ndarray)

    def constant(self, value: object) -> np.ndarray | None:
        return value if isinstance(value, np.ndarray) else None

    def leaf(self, node: Op) -> rule.Leaf | None:
        return node.kind if node.kind in ("conv", "bn") else None  # type: ignore[return-value]

    def data_input(self, node: Op) -> object:
        return node.args[0]

    def only_reader_is(self, value: object, node: Op) -> bool:
        return isinstance(value, Op) and value.readers == [node]

    def sole_reader(self, node: Op) -> Op | None:
        return node.readers[0] if len(node.readers) == 1 else None

    def readers(self, node: Op) -> list[Op]:
        return node.readers

    def rank(self, leaves: Sequence[Op], source: object) -> int | None:
        return 4


def graph(*ops: Op) -> None:
    """Link each op to the ops reading it."""
    for op in ops:
        for arg in op.args:
            if isinstance(arg, Op):
                arg.readers.append(op)


VIEW = ToyView()


def repmixer() -> dict[str, Op]:
    """x + g * ((conv_a(x) + conv_b(x) + bn_m(x)) - (bn_n(x) + 0)), as FastViT's RepMixer."""
    x = Op("x", "input")
    ops = {
        "conv_a": Op("conv_a", "conv", (x,)),
        "conv_b": Op("conv_b", "conv", (x,)),
        "bn_m": Op("bn_m", "bn", (x,)),
        "bn_n": Op("bn_n", "bn", (x,)),
    }
    ops["mix_1"] = Op("mix_1", "add", (ops["conv_a"], ops["conv_b"]))
    ops["mix_2"] = Op("mix_2", "add", (ops["mix_1"], ops["bn_m"]))
    ops["norm"] = Op("norm", "add", (ops["bn_n"], np.zeros(())))
    ops["diff"] = Op("diff", "sub", (ops["mix_2"], ops["norm"]))
    ops["scaled"] = Op("scaled", "mul", (np.full((4, 1, 1), 0.5), ops["diff"]))
    ops["top"] = Op("top", "add", (x, ops["scaled"]))
    graph(*ops.values())
    return {"x": x, **ops}


def test_a_tree_gives_every_term_the_sign_and_scale_of_its_path() -> None:
    ops = repmixer()
    tree = rule.sum_tree(VIEW, ops["top"])
    assert tree is not None and tree.source is ops["x"]
    assert tree.signed_terms(VIEW.label) == (
        ("conv_a", 1), ("conv_b", 1), ("bn_m", 1), ("bn_n", -1), ("x", 1)
    )  # fmt: skip
    conv = rule.Survivor("conv_a", 4, 4)
    coefficients = {t.node.name if t.node else "x": t.coefficient(conv) for t in tree.terms}
    assert coefficients["conv_a"].tolist() == [0.5] * 4
    assert coefficients["bn_n"].tolist() == [-0.5] * 4
    assert coefficients["x"].tolist() == [1.0] * 4
    [offset] = tree.offsets
    assert offset.offset(conv).tolist() == [-0.0] * 4  # the norm's "+ 0", negated and scaled


def test_only_an_add_tops_a_tree_and_inner_nodes_defer_to_it() -> None:
    ops = repmixer()
    assert rule.sum_tree(VIEW, ops["diff"]) is None  # a subtraction is never a top
    assert rule.defers_to_reader(VIEW, ops["mix_2"])
    assert rule.top_of(VIEW, ops["bn_n"]) is ops["top"]


def test_a_leaf_read_outside_its_tree_is_branching() -> None:
    ops = repmixer()
    spy = Op("spy", "relu", (ops["bn_n"],))
    graph(spy)
    with pytest.raises(Refused) as refused:
        rule.sum_tree(VIEW, ops["top"])
    assert refused.value.code is Code.BRANCHING and "bn_n" in refused.value.detail


def test_a_scale_over_other_axes_is_no_tree_op() -> None:
    ops = repmixer()
    ops["scaled"].args = (np.full((1, 1, 3, 3), 0.5), ops["diff"])
    assert rule.sum_tree(VIEW, ops["top"]) is None


def test_a_plain_residual_over_a_sum_lets_the_sum_merge_alone() -> None:
    x = Op("x", "input")
    a, b = Op("a", "conv", (x,)), Op("b", "conv", (x,))
    inner = Op("inner", "add", (a, b))
    top = Op("top", "add", (x, inner))
    graph(a, b, inner, top)
    assert not rule.defers_to_reader(VIEW, inner)


# --- the geometry of an identity tap ---------------------------------------------------


def conv_geometry(k: int, pad: int, dilation: int, stride: int = 1, c_out: int = 4) -> ConvGeometry:
    return ConvGeometry((k, k), (pad,) * 4, (stride, stride), (dilation, dilation), 1, 4, c_out)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 5), pad=st.integers(0, 4), dilation=st.integers(1, 3))
def test_a_tap_fits_exactly_when_a_centred_identity_kernel_computes_x(
    k: int, pad: int, dilation: int
) -> None:
    x = torch.randn(1, 4, 15, 15, dtype=torch.float64)  # wider than any dilated kernel
    kernel = torch.zeros(4, 4, k, k, dtype=torch.float64)
    if k % 2:
        kernel[range(4), range(4), k // 2, k // 2] = 1.0
    y = F.conv2d(x, kernel, padding=pad, dilation=dilation)
    computes_x = y.shape == x.shape and torch.equal(y, x)
    misfit = rule.identity_tap_misfit(conv_geometry(k, pad, dilation), "conv")
    assert (misfit is None) == computes_x


def test_tap_misfits_are_worded_for_graphs_and_for_modules() -> None:
    strided = conv_geometry(3, 1, 1, stride=2)
    assert rule.identity_tap_misfit(strided, "c") == (
        Code.BRANCH_MISMATCH,
        "an identity term needs stride 1 and equal channel counts; c has strides (2, 2), "
        "4 -> 4 channels",
    )
    off = conv_geometry(3, 0, 1)
    assert rule.identity_tap_misfit(off, "c") == (
        Code.UNCENTRED_TAP, "an identity tap needs pads 1 on axis 0; c has pads (0, 0, 0, 0)"
    )  # fmt: skip
    assert rule.identity_tap_misfit(off, "c", padding="valid") == (
        Code.UNCENTRED_TAP,
        "an identity tap needs padding (1, 1) in c's kernel (3, 3); it has valid",
    )
    even = conv_geometry(2, 0, 1)
    found = rule.identity_tap_misfit(even, "c", padding=(0, 0))
    assert found == (Code.UNCENTRED_TAP, "c's kernel (2, 2) has no centre tap")


def test_convs_of_other_groups_are_a_branch_mismatch() -> None:
    found = rule.same_geometry([("b", {"groups": 2})], ("a", {"groups": 1}))
    assert found == (Code.BRANCH_MISMATCH, "b has groups 2, a 1")


# --- the merged kernel: the sum of the branches, as one conv ---------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    groups=st.sampled_from([1, 2, 4]),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
)
def test_the_merged_conv_computes_the_sum_of_its_terms(
    seed: int, groups: int, signs: list[float]
) -> None:
    rng = np.random.default_rng(seed)
    c, x = 4, torch.from_numpy(rng.normal(size=(2, 4, 6, 6)))
    w3, w1 = rng.normal(size=(c, c // groups, 3, 3)), rng.normal(size=(c, c // groups, 1, 1))
    b3, b1 = rng.normal(size=c), rng.normal(size=c)
    scale, shift, layer = rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2, c)
    a3, a1, tap = (np.full(c, s) * layer for s in signs)
    after_scale, after_shift = rng.uniform(0.5, 2, c), rng.normal(size=c)
    weight, bias = merge_branches(
        (c, c // groups, 3, 3),
        [Branch(w3, b3, a3), Branch(w1, b1, a1)],
        [Tap(tap * scale, tap * shift), Tap(np.ones(c))],
        [layer * 0.25],
        after=Affine(after_scale, after_shift),
    )

    def conv(w: np.ndarray, b: np.ndarray, pad: int) -> torch.Tensor:
        t = torch.from_numpy
        return F.conv2d(x, t(w), t(b), padding=pad, groups=groups)

    per_channel = lambda v: torch.from_numpy(v).view(1, -1, 1, 1)  # noqa: E731
    terms = per_channel(a3) * conv(w3, b3, 1) + per_channel(a1) * conv(w1, b1, 0)
    terms += per_channel(tap * scale) * x + per_channel(tap * shift) + x
    terms += per_channel(layer * 0.25)
    expected = per_channel(after_scale) * terms + per_channel(after_shift)
    torch.testing.assert_close(conv(weight, bias, 1), expected, rtol=1e-10, atol=1e-10)


# --- the .pt2 front merges FastViT's RepMixer like the ONNX front -----------------------


class MobileOneBranches(nn.Module):
    """timm FastViT's train-time MobileOneBlock (no activation): the identity BN, a 1x1
    scale branch and ``branches`` kxk branches, summed from ``0`` as timm does."""

    def __init__(self, c: int, k: int = 3, scale: bool = True, branches: int = 1) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_scale = conv_bn(c, c, 1, groups=c, padding=0) if scale else None
        self.conv_kxk = nn.ModuleList(conv_bn(c, c, k, groups=c) for _ in range(branches))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = self.identity(x)
        scale_out = 0 if self.conv_scale is None else self.conv_scale(x)
        out = scale_out + identity_out
        for branch in self.conv_kxk:
            out += branch(x)
        return out


class LayerScale2d(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class RepMixer(nn.Module):
    """timm FastViT's RepMixer: ``x + layer_scale(mixer(x) - norm(x))``."""

    def __init__(self, dim: int = 4, scale: type[nn.Module] = LayerScale2d) -> None:
        super().__init__()
        self.norm = MobileOneBranches(dim, scale=False, branches=0)
        self.mixer = MobileOneBranches(dim)
        self.layer_scale = scale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


def fold_program(model: nn.Module, x: torch.Tensor) -> bnfold.FoldResult:
    result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), run(model, x), rtol=1e-5, atol=1e-5)
    return result


def call_targets(result: bnfold.FoldResult) -> list[str]:
    nodes = result.model.graph.nodes
    return [str(n.target).split(".")[1] for n in nodes if n.op == "call_function"]


@pytest.mark.parametrize("decompose", [False, True], ids=["conv2d", "decomposed"])
def test_a_pt2_repmixer_block_merges_into_one_conv(decompose: bool) -> None:
    torch.manual_seed(0)
    model, x = randomize_bn(RepMixer()), torch.randn(2, 4, 7, 7)
    program = torch.export.export(model, (x,), strict=False)
    if decompose:
        program = program.run_decompositions()
    result = bnfold.fold(program)
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), run(model, x), rtol=1e-5, atol=1e-5)
    kinds = [f.kind for f in result.report.folded]
    assert kinds == [FoldKind.ADJACENT] * 2 + [FoldKind.IDENTITY_TAP] * 2 + [FoldKind.REPARAM]
    merge = result.report.folded[-1]
    assert merge.site.startswith(
        "mixer.conv_scale.0 + mixer.conv_kxk.0.0 + mixer.identity - norm.identity + x -> "
    )
    assert merge.pattern.endswith("+add+mul+sub")
    assert call_targets(result) in (["conv2d"], ["convolution"])
    assert result.report.refused == []


def test_a_pt2_repmixer_kernel_is_the_reparameterised_one() -> None:
    """kernel = gamma * (K_mixer + tap(s_mixer) - tap(s_norm)) + tap(1), bias likewise."""
    torch.manual_seed(1)
    model = randomize_bn(RepMixer()).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    result = fold_program(model, x)
    [weight, bias] = [v for k, v in result.model.state_dict.items() if "conv_kxk" in k]

    def affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    with torch.no_grad():
        (kxk, bn_k), (one, bn_1) = model.mixer.conv_kxk[0], model.mixer.conv_scale
        s_k, t_k = affine(bn_k)
        s_1, t_1 = affine(bn_1)
        s_m, t_m = affine(model.mixer.identity)
        s_n, t_n = affine(model.norm.identity)
        gamma = model.layer_scale.gamma
        mixer = kxk.weight * s_k.view(-1, 1, 1, 1)
        mixer[:, :, 1, 1] += one.weight[:, :, 0, 0] * s_1.view(-1, 1)
        mixer[:, 0, 1, 1] += s_m - s_n
        kernel = gamma.view(-1, 1, 1, 1) * mixer
        kernel[:, 0, 1, 1] += 1.0
        torch.testing.assert_close(weight, kernel, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias, gamma * (t_k + t_1 + t_m - t_n), rtol=1e-12, atol=1e-12)


class WrongScale(nn.Module):
    """A layer scale over the spatial axes: no per-channel coefficient, so no tree."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(7) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_a_pt2_layer_scale_not_per_channel_leaves_the_mixer_to_merge_alone() -> None:
    torch.manual_seed(2)
    model, x = randomize_bn(RepMixer(scale=WrongScale)), torch.randn(2, 4, 7, 7)
    result = fold_program(model, x)
    [merge] = [f for f in result.report.folded if f.kind is FoldKind.REPARAM]
    assert merge.site.startswith("mixer.") and "norm" not in merge.site
    assert [r.site for r in result.report.refused] == ["norm.identity"]


def test_a_pt2_conv_called_twice_and_summed_with_a_scale_merges_like_onnx() -> None:
    """``bn(conv(x)) + 0.5 * conv(x)``: once the BN folds into its call's own copy of
    the weight, the sum is a tree of two convs of ``x``, which merges into one."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x) * 0.5

    result = fold_program(randomize_bn(Twice()), torch.randn(1, 3, 5, 5))
    assert [f.kind for f in result.report.folded] == [FoldKind.ADJACENT, FoldKind.REPARAM]
    assert call_targets(result) == ["conv2d"]


# --- a FastViT stage: RepMixers after a GELU and after a residual add, both fronts -----


class ConvGelu(nn.Module):
    """A MobileOneBlock with its activation, as FastViT's stem and downsampling end."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.block, self.act = MobileOneBranches(c), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.block(x))


class ConvMlp(nn.Module):
    """FastViT's ConvMlp, a residual: ``x + layer_scale(fc2(gelu(fc1(bn(dwconv(x))))))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = conv_bn(c, c, 7, groups=c, padding=3)
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, 2 * c, 1), nn.GELU(), nn.Conv2d(2 * c, c, 1)
        self.layer_scale = LayerScale2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.fc2(self.act(self.fc1(self.conv(x)))))


class FastVitStage(nn.Module):
    """timm FastViT's stage layout: a GELU, then RepMixer blocks whose residual adds feed
    the next block's RepMixer. Its first norm BN reads the GELU, the second an add: the
    ten BNs of fastvit_t8 that the .pt2 front used to refuse (``nonlinear_input``,
    ``not_linear_term``) sit where these two do."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = ConvGelu(c)
        self.blocks = nn.Sequential(RepMixer(c), ConvMlp(c), RepMixer(c), ConvMlp(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


@pytest.mark.parametrize("front", ["eager", "pt2"])
def test_every_bn_of_a_fastvit_stage_folds_on_both_torch_fronts(front: str) -> None:
    torch.manual_seed(3)
    model, x = randomize_bn(FastVitStage()), torch.randn(2, 4, 8, 8)
    if front == "eager":
        result = bnfold.fold(model, example_inputs=(x,))
    else:
        result = bnfold.fold(torch.export.export(model, (x,), strict=False))
    assert result.verification is not None and result.verification.passed
    torch.testing.assert_close(run(result.model, x), run(model, x), rtol=1e-5, atol=1e-5)
    assert result.report.refused == []
    counts = result.report.batchnorm
    assert counts is not None and counts.left == 0
    taps = [f.affine for f in result.report.folded if f.kind is FoldKind.IDENTITY_TAP]
    assert {"blocks.0.norm.identity", "blocks.2.norm.identity"} <= set(taps)
