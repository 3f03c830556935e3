"""Every BatchNorm kind users have, on the eager front: stock, frozen (torchvision and
detectron2 style), and timm's BN-with-activation modules, whose activation and drop-out
stay in place when the BN's affine folds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bnfold.report import Code  # noqa: E402
from bnfold.torch_front import fold_module  # noqa: E402
from bnfold.torch_front.census import modules_left  # noqa: E402
from tests.torch_standins import (  # noqa: E402
    FINDERS,
    BatchNormAct2d,
    Detectron2FrozenBN,
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    trained_like,
    use,
)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class ActFirst(BatchNormAct2d):
    """Looks like BatchNormAct2d, but activates first: its affine cannot leave the act behind."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            self.act(x), self.running_mean, self.running_var, self.weight, self.bias,
            False, 0.1, self.eps,
        )  # fmt: skip


class ConvNorm(nn.Module):
    def __init__(self, norm: nn.Module, conv: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


NORMS = {
    "batchnorm2d": lambda: nn.BatchNorm2d(8),
    "frozen": lambda: FrozenBatchNorm2d(8),
    "detectron2_frozen": lambda: Detectron2FrozenBN(8),
    "bn_act_leaky": lambda: BatchNormAct2d(8, nn.LeakyReLU(0.1)),
    "bn_act_silu_drop": lambda: BatchNormAct2d(8, nn.SiLU(), drop=0.2),
    "bn_act_inplace_relu": lambda: BatchNormAct2d(8, nn.ReLU(inplace=True)),
    "bn_act_prelu": lambda: BatchNormAct2d(8, nn.PReLU(8)),
    "bn_act_none": lambda: BatchNormAct2d(8),
    "frozen_bn_act": lambda: FrozenBatchNormAct2d(8, nn.Hardswish()),
}


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("kind", list(NORMS))
def test_every_bn_kind_folds_into_the_conv_before_it(kind, finder, monkeypatch):
    use(finder, monkeypatch)
    model, x = trained_like(ConvNorm(NORMS[kind]())), torch.randn(2, 3, 7, 7)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [(f.site, f.finder) for f in result.report.folded] == [("conv -> bn", finder)]
    assert result.report.refused == [] and result.verification.passed
    assert modules_left(result.model, ["bn"]) == []
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bn_act_leaky", "bn_act_silu_drop", "frozen_bn_act"])
def test_the_activation_and_drop_stay_in_the_bn_place(kind):
    model, x = trained_like(ConvNorm(NORMS[kind]())), torch.randn(2, 3, 7, 7)
    folded = fold_module(model, (x,)).model
    kept = folded.bn
    assert isinstance(kept, nn.Sequential)
    working = [n for n, m in model.bn.named_children() if type(m) is not nn.Identity]
    assert [name for name, _ in kept.named_children()] == working  # in the order they ran
    assert all(type(getattr(kept, n)) is type(getattr(model.bn, n)) for n in working)
    assert kept.training is False


def test_a_kept_drop_out_still_drops_in_training():
    # Only the affine went into the conv: trained further, the drop-out drops as before.
    model = trained_like(ConvNorm(BatchNormAct2d(8, nn.SiLU(), drop=0.5)))
    kept = fold_module(model, (torch.randn(2, 3, 7, 7),)).model.bn
    assert [name for name, _ in kept.named_children()] == ["drop", "act"]
    kept.train()
    out = kept(torch.ones(64, 8, 4, 4))
    assert (out == 0).any() and (out > nn.functional.silu(torch.ones(1))).any()


def test_a_kept_activation_keeps_its_parameters_under_their_keys():
    model = trained_like(ConvNorm(BatchNormAct2d(8, nn.PReLU(8))))
    with torch.no_grad():
        model.bn.act.weight.uniform_(0.05, 0.3)
    x = torch.randn(2, 3, 7, 7)
    result = fold_module(model, (x,))
    before, after = model.state_dict(), result.model.state_dict()
    assert set(after) - set(before) == {"conv.bias"}  # the conv had none
    assert "bn.act.weight" in after and torch.equal(after["bn.act.weight"], before["bn.act.weight"])
    assert set(before) - set(after) == {
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
    }  # fmt: skip


class JoinThenBnAct(nn.Module):
    """``act(bn(conv_a(x) + conv_b(x)))`` in one BatchNormAct2d."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.bn = BatchNormAct2d(8, nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x) + self.b(x))


@pytest.mark.parametrize("finder", FINDERS)
def test_a_bn_act_after_a_join_folds_into_each_term_and_keeps_its_act(finder, monkeypatch):
    use(finder, monkeypatch)
    model, x = trained_like(JoinThenBnAct()), torch.randn(2, 3, 6, 6)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [f.site for f in result.report.folded] == ["a, b -> add -> bn"]
    assert [name for name, _ in result.model.bn.named_children()] == ["act"]  # drop did nothing
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


class ReluBnActConv(nn.Module):
    """``conv(act(bn(relu(x))))``: only a fold before the conv could take the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = BatchNormAct2d(3, nn.GELU()), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(torch.relu(x)))


@pytest.mark.parametrize("finder", FINDERS)
def test_a_bn_act_does_not_fold_into_the_op_after_its_act(finder, monkeypatch):
    use(finder, monkeypatch)
    model, x = trained_like(ReluBnActConv()), torch.randn(2, 3, 5, 5)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert result.report.folded == []
    (refusal,) = result.report.refused
    assert refusal.code == Code.NONLINEAR_INPUT and "GELU after its affine" in refusal.detail
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


def test_a_bn_lookalike_that_activates_first_is_refused_before_folding():
    model, x = trained_like(ConvNorm(ActFirst(8, nn.ReLU()))), torch.randn(2, 3, 7, 7)
    expected = run(model, x)
    result = fold_module(model, (x,))
    (refusal,) = result.report.refused
    assert refusal.code == Code.PARAMETRIZED
    assert "it is not the affine of its buffers then act" in refusal.detail
    assert isinstance(result.model.bn, ActFirst)
    torch.testing.assert_close(run(result.model, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("tensor", ["weight", "bias", "running_mean", "running_var"])
def test_a_frozen_bn_with_one_value_for_all_channels_is_a_bad_shape_and_the_rest_folds(tensor):
    # Its forward broadcasts the one value, but a fold needs one per channel.
    model = trained_like(
        nn.Sequential(
            ConvNorm(FrozenBatchNorm2d(8)), ConvNorm(nn.BatchNorm2d(4), nn.Conv2d(8, 4, 1))
        )
    )
    setattr(model[0].bn, tensor, torch.full((1,), 0.5))
    x = torch.randn(2, 3, 7, 7)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [(r.site, r.code) for r in result.report.refused] == [("0.conv -> 0.bn", Code.BAD_SHAPE)]
    assert [f.site for f in result.report.folded] == ["1.conv -> 1.bn"]
    torch.testing.assert_close(run(result.model, x), expected)


class TwiceAct(BatchNormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.act(super().forward(x)))


class IdleChild(BatchNormAct2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, x)


@pytest.mark.parametrize(
    ("norm", "words"),
    [(TwiceAct(8, nn.ReLU()), "runs act more than once"),
     (IdleChild(8, nn.ReLU()), "holds act but did not run it")],
    ids=["twice", "idle"],
)  # fmt: skip
def test_a_bn_whose_children_do_not_run_once_each_is_refused(norm, words):
    model, x = trained_like(ConvNorm(norm)), torch.randn(2, 3, 7, 7)
    result = fold_module(model, (x,))
    (refusal,) = result.report.refused
    assert refusal.code == Code.PARAMETRIZED and words in refusal.detail


@pytest.mark.parametrize(
    ("norm", "conv", "shape"),
    [
        (nn.BatchNorm1d(6), nn.Conv1d(3, 6, 3), (2, 3, 9)),
        (nn.BatchNorm1d(6), nn.Linear(3, 6), (4, 3)),
        (nn.BatchNorm3d(6), nn.Conv3d(3, 6, 3), (2, 3, 5, 5, 5)),
    ],
    ids=["bn1d_conv1d", "bn1d_linear", "bn3d_conv3d"],
)
def test_bn_1d_and_3d_fold_with_the_recorded_run(norm, conv, shape, monkeypatch):
    use("recorded", monkeypatch)
    model, x = trained_like(ConvNorm(norm, conv)), torch.randn(shape)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [(f.site, f.finder) for f in result.report.folded] == [("conv -> bn", "recorded")]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


class SharedHead(nn.Module):
    """One conv -> BatchNormAct2d head run on two feature maps of different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = F.avg_pool2d(x, 2)
        return self.bn(self.conv(x)).mean((2, 3)) + self.bn(self.conv(small)).mean((2, 3))


@pytest.mark.parametrize("finder", FINDERS)
def test_a_bn_act_called_on_several_shapes_folds(finder, monkeypatch):
    use(finder, monkeypatch)
    model, x = trained_like(SharedHead()), torch.randn(2, 3, 8, 8)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)


class RepVggIdentityBnAct(nn.Module):
    """timm's RepVggBlock: its identity branch is a BatchNormAct2d without activation."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_kxk = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.identity = BatchNormAct2d(c)  # drop and act are nn.Identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv_kxk(x) + self.identity(x))


@pytest.mark.parametrize("finder", FINDERS)
def test_a_bn_act_without_activation_is_an_identity_term_and_folds_as_a_tap(finder, monkeypatch):
    use(finder, monkeypatch)
    model, x = trained_like(RepVggIdentityBnAct()), torch.randn(2, 4, 6, 6)
    expected = run(model, x)
    result = fold_module(model, (x,))
    assert [(f.site, f.kind.value) for f in result.report.folded] == [
        ("identity -> conv_kxk", "identity_tap")
    ]
    assert type(result.model.identity) is nn.Identity
    torch.testing.assert_close(run(result.model, x), expected, rtol=1e-5, atol=1e-5)
