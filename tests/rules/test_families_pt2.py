"""The refusal codes each family declares for the ``.pt2`` front, reported by that front.

The ``.pt2`` twin of :mod:`tests.rules.test_families`: for each code of
``Family.codes_on("pt2")``, a small ``torch.nn`` model, exported, makes the
program's fold refuse a site of that family (its label says which) with that
code. A code declared without a case here, or a case whose code the family no
longer declares, fails: a new refusal code on this front comes with its test.
A code this front cannot produce is left out of its declaration, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bnfold.affine import Affine
from bnfold.report import Code, LowerForm
from bnfold.rules import FAMILIES

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from bnfold.torch_front.program import apply as program_apply  # noqa: E402
from tests.torch_standins import randomize_bn  # noqa: E402

C = 4
X = (1, C, 6, 6)


class After(nn.Module):
    """``bn(between(op(x)))``: the adjacent family's shape, ``between`` optional."""

    def __init__(self, op: nn.Module, bn: nn.Module, between: Callable = lambda y: y) -> None:
        super().__init__()
        self.op, self.bn, self.between = op, bn, between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.between(self.op(x)))


class Before(nn.Module):
    """``op(between(bn(relu(x))))``: only a fold before takes the BN."""

    def __init__(self, op: nn.Module, between: Callable = lambda y: y, c: int = C) -> None:
        super().__init__()
        self.bn, self.op, self.between = nn.BatchNorm2d(c), op, between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.between(self.bn(F.relu(x))))


class Branching(nn.Module):
    """``bn(conv(x)) + conv(x)``'s output read twice: the conv's output has another reader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * torch.sigmoid(y)


class Join(nn.Module):
    """``bn(join(a(x), b(x)))``; ``relu_b`` puts a nonlinearity on the second term."""

    def __init__(self, join: str, b_channels: int = C, dim: int = 1, bn: int = C) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(C, C, 1), nn.Conv2d(C, b_channels, 1)
        self.join, self.dim, self.bn = join, dim, nn.BatchNorm2d(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.join == "relu_add":
            return self.bn(a + F.relu(b))
        if self.join == "shared_add":
            return self.bn(a + b) + a
        if self.join == "cat":
            return self.bn(torch.cat([a, b], self.dim))
        return self.bn(a + b)


class Taps(nn.Module):
    """A MobileOne-style ``conv(x) [+ dw(x)] + identity(x)`` whose identity BN cannot be
    a tap of the merged conv: a depthwise second branch of other groups, a kernel
    with no centre, or the identity's output read again."""

    def __init__(
        self, kernel: int = 3, padding: int | str = 1, depthwise: bool = False, shared: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(C, C, kernel, padding=padding), nn.BatchNorm2d(C))
        dw = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C), nn.BatchNorm2d(C))
        self.dw = dw if depthwise else None
        self.identity, self.shared = nn.BatchNorm2d(C), shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        out = self.conv(x) + identity
        out = out if self.dw is None else out + self.dw(x)
        return out * identity if self.shared else out


class LinearNorm(nn.Module):
    """``bn(linear(x).reshape(-1, 2 * C))``: the batch merge moves the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(C, C, bias=False), nn.BatchNorm1d(2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x).reshape(-1, 2 * C))


class MaxIndices(nn.Module):
    """A max pool whose indices are read too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, indices = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return self.bn(pooled), indices


class ComputedWeight(nn.Module):
    """A conv whose weight is computed in the forward: no attribute to fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.conv.weight * 2, self.conv.bias))


class ComputedStatistics(nn.Module):
    """relu -> batch_norm whose running mean is computed: nothing folds, nor lowers."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        mean, var = bn.running_mean * 1, bn.running_var
        return F.batch_norm(F.relu(x), mean, var, bn.weight, bn.bias, False, 0.1, bn.eps)


def training_bn() -> nn.Module:
    model = randomize_bn(After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)))
    model.bn.train()
    return model


def bad_values(op: nn.Module | None = None) -> nn.Module:
    model = randomize_bn(After(op or nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)))
    with torch.no_grad():
        model.bn.running_var.fill_(-1.0)
    return model


def negative_max_pool() -> nn.Module:
    model = randomize_bn(After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.MaxPool2d(2)))
    with torch.no_grad():
        model.bn.weight.copy_(-torch.rand(C) - 0.5)
    return model


def op_between() -> nn.Module:
    return After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), lambda y: y.transpose(2, 3))


def forgets_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong fold for verification to catch: the BN's shift left out of the bias."""
    original = program_apply.fold_after

    def wrong(weight, bias, affine, layout):  # type: ignore[no-untyped-def]
        return original(weight, bias, Affine(affine.scale, 0 * affine.shift), layout)

    monkeypatch.setattr(program_apply, "fold_after", wrong)


@dataclass(frozen=True)
class Case:
    """A model that makes the ``.pt2`` fold refuse ``site`` with a code.

    Attributes:
        make: builds the model; its BNs get random statistics unless ``ready``.
        site: the refused site's label.
        shape: the example input's shape.
        ready: ``make`` sets the statistics (or the mode) the case needs itself.
        options: passed to :func:`bnfold.fold`.
        patch: breaks the fold math, for a verification to catch.
    """

    make: Callable[[], nn.Module]
    site: str
    shape: tuple[int, ...] = X
    ready: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


LOWER = {"lower_standalone": LowerForm.MUL_ADD}

CASES: dict[tuple[str, Code], Case] = {
    ("adjacent", Code.TRAINING_MODE): Case(training_bn, "op -> bn", ready=True),
    ("adjacent", Code.NOT_CONSTANT): Case(ComputedWeight, "conv -> bn"),
    ("adjacent", Code.BRANCHING): Case(Branching, "conv -> bn"),
    ("adjacent", Code.BAD_VALUES): Case(bad_values, "op -> bn", ready=True),
    ("adjacent", Code.NONLINEAR_INPUT): Case(lambda: Before(nn.Identity()), "bn"),
    ("adjacent", Code.STANDALONE): Case(lambda: After(nn.Identity(), nn.BatchNorm2d(C)), "bn"),
    ("adjacent", Code.OP_BETWEEN): Case(op_between, "op -> bn"),
    ("adjacent", Code.NOT_PER_CHANNEL): Case(
        lambda: After(nn.Conv2d(C, C, 1), nn.BatchNorm1d(C * 36), lambda y: y.flatten(1)),
        "op -> flatten -> bn",
    ),
    ("adjacent", Code.VERIFICATION_FAILED): Case(
        lambda: After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)), "op -> bn", patch=forgets_shift
    ),
    ("batch_merge", Code.MERGE_MOVES_CHANNEL): Case(
        LinearNorm, "linear -> reshape -> bn", (2, 3, C)
    ),
    ("pool", Code.POOL_PADDING): Case(
        lambda: After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.AvgPool2d(3, 1, 1)),
        "op -> avg_pool2d -> bn",
    ),
    ("pool", Code.NEGATIVE_SCALE): Case(negative_max_pool, "op -> max_pool2d -> bn", ready=True),
    ("pool", Code.TRAINING_MODE): Case(MaxIndices, "conv -> max_pool2d -> bn"),
    ("branch_sum", Code.BRANCH_MISMATCH): Case(lambda: Taps(depthwise=True), "identity -> add_1"),
    ("branch_sum", Code.UNCENTRED_TAP): Case(lambda: Taps(2, "same"), "identity -> add"),
    ("branch_sum", Code.BRANCHING): Case(lambda: Taps(shared=True), "identity -> add"),
    ("join", Code.NOT_LINEAR_TERM): Case(lambda: Join("relu_add"), "a, relu -> add -> bn"),
    ("join", Code.BRANCHING): Case(lambda: Join("shared_add"), "a, b -> add -> bn"),
    ("join", Code.NOT_PER_CHANNEL): Case(lambda: Join("cat", dim=3), "a, b -> cat -> bn"),
    ("join", Code.BAD_SHAPE): Case(lambda: Join("add", b_channels=1), "a, b -> add -> bn"),
    ("before", Code.ZERO_PADDING): Case(lambda: Before(nn.Conv2d(C, C, 3, padding=1)), "bn -> op"),
    ("before", Code.NOT_PER_CHANNEL): Case(lambda: Before(nn.Linear(6, 3)), "bn -> op"),
    ("lower", Code.BAD_VALUES): Case(
        lambda: bad_values(op=nn.ReLU()), "bn", ready=True, options=LOWER
    ),
    ("lower", Code.NOT_CONSTANT): Case(ComputedStatistics, "bn", options=LOWER),
}

DECLARED = sorted(
    ((family.name, code) for family in FAMILIES for code in family.codes_on("pt2")),
    key=lambda pair: (pair[0], pair[1].value),
)


@pytest.mark.parametrize(("family", "code"), DECLARED, ids=[f"{f}-{c.value}" for f, c in DECLARED])
def test_each_declared_code_is_reported_by_the_pt2_front(
    family: str, code: Code, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[(family, code)]
    torch.manual_seed(0)
    model = case.make() if case.ready else randomize_bn(case.make())
    program = torch.export.export(model, (torch.randn(*case.shape),), strict=False)
    if case.patch is not None:
        case.patch(monkeypatch)
    report = bnfold.fold(program, **case.options).report
    refusals = [(r.site, r.code) for r in report.refused]
    assert (case.site, code) in refusals, report.summary()


def test_every_case_is_a_declared_code_and_every_declared_code_has_a_case() -> None:
    assert sorted(CASES, key=lambda pair: (pair[0], pair[1].value)) == DECLARED
