"""Every refusal code each family declares for the eager front is one it really reports.

``Family.codes_on("eager")`` lists what the eager torch front refuses a site of that
family with; for each, one small module makes ``bnfold.fold`` refuse a site of
that family (its label says which) with that code. A code declared without a
case here, or a case whose code the family no longer declares, fails: a new
refusal code on this front comes with its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import bnfold  # noqa: E402
from bnfold.affine import Affine, absorb_identity  # noqa: E402
from bnfold.report import Code, LowerForm  # noqa: E402
from bnfold.rules import FAMILIES  # noqa: E402
from bnfold.torch_front import eager  # noqa: E402
from tests.test_torch_rules import Join  # noqa: E402
from tests.torch_standins import FrozenBatchNorm2d, randomize_bn  # noqa: E402

C = 4


def RELU_BN(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.bn(torch.relu(x))


class Net(nn.Module):
    """Named submodules and a forward written as a function of the module."""

    def __init__(self, forward: Callable[..., Any], **modules: nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.run = forward

    def forward(self, *args: Any) -> Any:
        return self.run(self, *args)


def conv(c_in: int = C, c_out: int = C, k: int = 1, **kw: Any) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, **kw)


def conv_bn(forward: Callable[..., Any] | None = None, **modules: nn.Module) -> Net:
    """conv -> bn, unless ``forward`` says otherwise; ``modules`` replace the defaults."""
    parts = {"conv": conv(), "bn": nn.BatchNorm2d(C), **modules}
    return Net(forward or (lambda m, x: m.bn(m.conv(x))), **parts)


def after_relu(reader: nn.Module, bn: nn.Module | None = None) -> Net:
    """relu -> bn -> ``reader``: a BN that only a fold before the reader takes."""
    return Net(lambda m, x: m.fc(m.bn(torch.relu(x))), bn=bn or nn.BatchNorm2d(C), fc=reader)


def training_bn() -> Net:
    model = randomize_bn(conv_bn())
    model.bn.train()
    return model


def parametrized() -> Net:
    model = randomize_bn(conv_bn())
    parametrize.register_parametrization(model.conv, "weight", Double())
    return model


def hooked(on: str) -> Callable[[], Net]:
    def make() -> Net:
        model = randomize_bn(conv_bn())
        model.get_submodule(on).register_forward_hook(lambda *_: None)
        return model

    return make


def negative_var() -> Net:
    model = randomize_bn(conv_bn())
    with torch.no_grad():
        model.bn.running_var.fill_(-1.0)
    return model


def integer_linear() -> Net:
    """An int64 Linear into a frozen BN (which computes on any dtype): nothing to fold into."""
    linear = nn.Linear(6, C)
    for name in ("weight", "bias"):
        integers = getattr(linear, name).detach().mul(10).to(torch.int64)
        setattr(linear, name, nn.Parameter(integers, requires_grad=False))
    bn = FrozenBatchNorm2d(C)
    return Net(lambda m, x: m.bn(m.conv(x).view(-1, C, 1, 1)), conv=linear, bn=bn).eval()


def negative_scale() -> Net:
    model = randomize_bn(conv_bn(lambda m, x: m.bn(F.max_pool2d(m.conv(x), 2))))
    with torch.no_grad():
        model.bn.weight[0] = -1.0
    return model


def narrow_bias() -> Net:
    """A frozen BN whose bias is one value for all channels: its forward broadcasts it."""
    bn = FrozenBatchNorm2d(C)
    bn.bias = torch.full((1,), 0.5)
    return after_relu(conv(k=1), bn).eval()


def lone_bn(change: Callable[[nn.BatchNorm2d], object] = lambda bn: None) -> Net:
    """relu -> bn -> output: nothing to fold into, only a lowering removes it."""
    model = randomize_bn(Net(RELU_BN, bn=nn.BatchNorm2d(C)))
    with torch.no_grad():
        change(model.bn)
    return model


class Double(nn.Module):
    """A parametrization: the stored tensor, doubled."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def forgets_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong fold for verification to catch: the shift left out."""

    def wrong(weight, bias, affine, sign=1):  # type: ignore[no-untyped-def]
        return absorb_identity(weight, bias, Affine(affine.scale, 0 * affine.shift), sign)

    monkeypatch.setattr(eager, "absorb_identity", wrong)


def tap(conv_module: nn.Conv2d) -> Callable[[], Net]:
    """conv(x) + bn(x): the conv takes the identity tap, or says why not."""
    return lambda: randomize_bn(
        Net(lambda m, x: m.conv(x) + m.bn(x), conv=conv_module, bn=nn.BatchNorm2d(C))
    )


def join(forward: Callable[..., Any], kind: str = "add", **kw: Any) -> Callable[[], Net]:
    """Join's convs ``a`` (3 -> 8) and ``b`` (4 -> 8) and its ``bn``, with its own forward."""

    def make() -> Net:
        parts = Join(kind, **kw)
        return randomize_bn(Net(forward, a=parts.a, b=parts.b, bn=parts.bn))

    return make


def two_inputs() -> tuple[torch.Tensor, ...]:
    return torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)


def one_input(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


def image() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, C, 6, 6),)


@dataclass(frozen=True)
class Case:
    """A module the eager front refuses at ``site``, with its inputs and fold options."""

    make: Callable[[], nn.Module]
    site: str
    inputs: Callable[[], tuple[torch.Tensor, ...]] = image
    options: dict[str, Any] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


LOWER = {"lower_standalone": LowerForm.MUL_ADD}

CASES: dict[tuple[str, Code], Case] = {
    ("adjacent", Code.TRAINING_MODE): Case(training_bn, "conv -> bn"),
    ("adjacent", Code.NO_RUNNING_STATS): Case(
        lambda: conv_bn(bn=nn.BatchNorm2d(C, track_running_stats=False)).eval(), "conv -> bn"
    ),
    ("adjacent", Code.BRANCHING): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: (c := m.conv(x)) + m.bn(c))), "conv -> bn"
    ),
    ("adjacent", Code.SHARED_WEIGHT): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: m.bn(m.conv(x)) + F.conv2d(x, m.conv.weight))),
        "conv -> bn",
    ),
    ("adjacent", Code.NOT_PER_CHANNEL): Case(
        lambda: randomize_bn(conv_bn(conv=nn.Linear(6, C), bn=nn.BatchNorm1d(C))),
        "conv -> bn",
        one_input(2, C, 6),
    ),
    ("adjacent", Code.BAD_VALUES): Case(negative_var, "conv -> bn"),
    ("adjacent", Code.BAD_SHAPE): Case(
        lambda: randomize_bn(conv_bn(conv=nn.Linear(6, 5), bn=nn.BatchNorm1d(C))),
        "conv -> bn",
        one_input(2, C, 6),
    ),
    ("adjacent", Code.UNSUPPORTED_DTYPE): Case(
        integer_linear, "conv -> view -> bn", lambda: (torch.ones(2, 6, dtype=torch.int64),)
    ),
    ("adjacent", Code.NONLINEAR_INPUT): Case(
        lambda: randomize_bn(Net(RELU_BN, bn=nn.BatchNorm2d(C))), "bn"
    ),
    ("adjacent", Code.STANDALONE): Case(
        lambda: randomize_bn(Net(lambda m, x: m.bn(x), bn=nn.BatchNorm2d(C))), "bn"
    ),
    ("adjacent", Code.OP_BETWEEN): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: m.bn(m.conv(x) * 2))), "conv -> bn"
    ),
    ("adjacent", Code.UNTRACEABLE): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: m.conv(x))), "bn"
    ),
    ("adjacent", Code.REUSED_MODULE): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: m.bn(m.conv(x)) + m.conv(x))), "conv -> bn"
    ),
    ("adjacent", Code.PARAMETRIZED): Case(parametrized, "conv -> bn"),
    ("adjacent", Code.HOOKED): Case(hooked("bn"), "conv -> bn"),
    ("adjacent", Code.VERIFICATION_FAILED): Case(
        tap(conv(k=3, padding=1)), "bn -> conv", patch=forgets_shift
    ),
    ("batch_merge", Code.MERGE_MOVES_CHANNEL): Case(
        lambda: randomize_bn(
            conv_bn(
                lambda m, x: m.bn(m.conv(x).reshape(-1, 3)),
                conv=nn.Linear(6, 6),
                bn=nn.BatchNorm1d(3),
            )
        ),
        "conv -> reshape -> bn",
        one_input(2, 5, 6),
    ),
    ("pool", Code.NEGATIVE_SCALE): Case(negative_scale, "conv -> max_pool2d -> bn"),
    ("pool", Code.POOL_PADDING): Case(
        lambda: randomize_bn(conv_bn(lambda m, x: m.bn(F.avg_pool2d(m.conv(x), 3, 1, padding=1)))),
        "conv -> avg_pool2d -> bn",
    ),
    ("pool", Code.NOT_PER_CHANNEL): Case(
        lambda: randomize_bn(
            conv_bn(
                lambda m, x: m.bn(F.avg_pool1d(m.conv(x), 1)),
                conv=nn.Linear(6, C),
                bn=nn.BatchNorm1d(C),
            )
        ),
        "conv -> avg_pool1d -> bn",
        one_input(2, C, 6),
    ),
    # a 1x1 input makes the shapes agree: stride 2, and an uncentred padding, x broadcast
    ("branch_sum", Code.BRANCH_MISMATCH): Case(
        tap(conv(k=3, padding=1, stride=2)), "bn -> conv", one_input(2, C, 1, 1)
    ),
    ("branch_sum", Code.UNCENTRED_TAP): Case(
        tap(conv(k=3, padding=2)), "bn -> conv", one_input(2, C, 1, 1)
    ),
    ("branch_sum", Code.BRANCHING): Case(
        lambda: randomize_bn(
            Net(lambda m, x: m.conv(x) + m.bn(x) + m.bn(x), conv=conv(), bn=nn.BatchNorm2d(C))
        ),
        "bn -> conv",
    ),
    ("branch_sum", Code.SHARED_WEIGHT): Case(
        lambda: randomize_bn(
            Net(
                lambda m, x: m.conv(x) + m.bn(x) + F.conv2d(x, m.conv.weight),
                conv=conv(),
                bn=nn.BatchNorm2d(C),
            )
        ),
        "bn -> conv",
    ),
    ("join", Code.NOT_LINEAR_TERM): Case(
        join(lambda m, x, y: m.bn(m.a(x) + torch.relu(m.b(y)))), "a, relu -> add -> bn", two_inputs
    ),
    ("join", Code.BRANCHING): Case(
        join(lambda m, x, y: m.bn(s := m.a(x) + m.b(y)) + s), "a, b -> add -> bn", two_inputs
    ),
    ("join", Code.NOT_PER_CHANNEL): Case(
        join(lambda m, x, y: m.bn(torch.cat([m.a(x), m.b(y)], 2)), "cat", bn_channels=8),
        "a, b -> cat -> bn",
        two_inputs,
    ),
    ("join", Code.BAD_SHAPE): Case(
        join(lambda m, x, y: m.bn(m.a(x) + m.b(y)), b_channels=1), "a, b -> add -> bn", two_inputs
    ),
    ("join", Code.REUSED_MODULE): Case(
        join(lambda m, x, y: m.bn(m.a(x) + m.a(x + 1))), "a, a -> add -> bn", two_inputs
    ),
    ("before", Code.ZERO_PADDING): Case(
        lambda: randomize_bn(after_relu(conv(k=3, padding=1))), "bn -> fc"
    ),
    ("before", Code.NOT_PER_CHANNEL): Case(
        lambda: randomize_bn(after_relu(nn.Linear(6, 3), nn.BatchNorm1d(C))),
        "bn -> fc",
        one_input(2, C, 6),
    ),
    ("before", Code.BAD_SHAPE): Case(narrow_bias, "bn -> fc"),
    ("lower", Code.BAD_VALUES): Case(
        lambda: lone_bn(lambda bn: bn.running_var.fill_(-1.0)), "bn", options=LOWER
    ),
    ("lower", Code.HOOKED): Case(
        lambda: lone_bn(lambda bn: bn.register_forward_hook(lambda *_: None)), "bn", options=LOWER
    ),
    ("lower", Code.PARAMETRIZED): Case(
        lambda: lone_bn(lambda bn: parametrize.register_parametrization(bn, "weight", Double())),
        "bn",
        options=LOWER,
    ),
}


DECLARED = sorted(
    ((family.name, code) for family in FAMILIES for code in family.codes_on("eager")),
    key=lambda pair: (pair[0], pair[1].value),
)


def refusals(case: Case, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Code]]:
    """The (site, code) of every refusal folding the case's module reports."""
    if case.patch is not None:
        case.patch(monkeypatch)
    report = bnfold.fold(case.make(), example_inputs=case.inputs(), **case.options).report
    return [(r.site, r.code) for r in report.refused]


@pytest.mark.parametrize(("family", "code"), DECLARED, ids=[f"{f}-{c.value}" for f, c in DECLARED])
def test_each_declared_code_is_reported_by_the_eager_front(
    family: str, code: Code, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (family, code) in CASES, f"no eager case makes the {family} family refuse {code.value}"
    case = CASES[(family, code)]
    assert (case.site, code) in refusals(case, monkeypatch)


def test_every_case_is_a_declared_code() -> None:
    assert sorted(CASES, key=lambda pair: (pair[0], pair[1].value)) == DECLARED
