"""The refusal codes each family declares for the ``.pt2`` front, reported by that front.

The ``.pt2`` twin of :mod:`tests.rules.test_families`: for each code of
``Family.codes_on("pt2")`` that a small ``torch.nn`` model can provoke, the
exported program's fold refuses a site of that family (its label says which)
with that code. :data:`NOT_YET` names the declared codes no case here reaches yet.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bnfold.report import Code
from bnfold.rules import FAMILIES

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold  # noqa: E402
from tests.test_torch_rules import randomize_bn  # noqa: E402

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


def bad_values() -> nn.Module:
    model = After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C))
    with torch.no_grad():
        model.bn.running_var.fill_(-1.0)
    return model


def negative_max_pool() -> nn.Module:
    model = After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.MaxPool2d(2))
    with torch.no_grad():
        model.bn.weight.copy_(-torch.rand(C) - 0.5)
    return model


class MaxIndices(nn.Module):
    """A max pool whose indices are read too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, indices = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return self.bn(pooled), indices


def op_between() -> nn.Module:
    return After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), lambda y: y.transpose(2, 3))


OWN_STATISTICS = {Code.BAD_VALUES, Code.NEGATIVE_SCALE}  # the case sets the BN's values itself

Case = tuple[Callable[[], nn.Module], tuple[int, ...], str]  # the model, its input, the site

CASES: dict[tuple[str, Code], Case] = {
    ("adjacent", Code.BRANCHING): (Branching, X, "conv -> bn"),
    ("adjacent", Code.BAD_VALUES): (bad_values, X, "op -> bn"),
    ("adjacent", Code.NONLINEAR_INPUT): (lambda: Before(nn.Identity()), X, "bn"),
    ("adjacent", Code.OP_BETWEEN): (op_between, X, "op -> bn"),
    ("adjacent", Code.NOT_PER_CHANNEL): (
        lambda: After(nn.Conv2d(C, C, 1), nn.BatchNorm1d(C * 36), lambda y: y.flatten(1)),
        X,
        "op -> flatten -> bn",
    ),
    ("batch_merge", Code.MERGE_MOVES_CHANNEL): (LinearNorm, (2, 3, C), "linear -> reshape -> bn"),
    ("pool", Code.POOL_PADDING): (
        lambda: After(nn.Conv2d(C, C, 1), nn.BatchNorm2d(C), nn.AvgPool2d(3, 1, 1)),
        X,
        "op -> avg_pool2d -> bn",
    ),
    ("pool", Code.NEGATIVE_SCALE): (negative_max_pool, X, "op -> max_pool2d -> bn"),
    ("pool", Code.TRAINING_MODE): (MaxIndices, X, "conv -> max_pool2d -> bn"),
    ("branch_sum", Code.BRANCH_MISMATCH): (lambda: Taps(depthwise=True), X, "identity -> add_1"),
    ("branch_sum", Code.UNCENTRED_TAP): (lambda: Taps(2, "same"), X, "identity -> add"),
    ("branch_sum", Code.BRANCHING): (lambda: Taps(shared=True), X, "identity -> add"),
    ("join", Code.NOT_LINEAR_TERM): (lambda: Join("relu_add"), X, "a, relu -> add -> bn"),
    ("join", Code.BRANCHING): (lambda: Join("shared_add"), X, "a, b -> add -> bn"),
    ("join", Code.NOT_PER_CHANNEL): (lambda: Join("cat", dim=3), X, "a, b -> cat -> bn"),
    ("join", Code.BAD_SHAPE): (lambda: Join("add", b_channels=1), X, "a, b -> add -> bn"),
    ("before", Code.ZERO_PADDING): (
        lambda: Before(nn.Conv2d(C, C, 3, padding=1)),
        X,
        "bn -> op",
    ),
    ("before", Code.NOT_PER_CHANNEL): (lambda: Before(nn.Linear(6, 3)), X, "bn -> op"),
}

NOT_YET = {
    ("adjacent", code)
    for code in (
        Code.TRAINING_MODE, Code.NO_RUNNING_STATS, Code.NOT_CONSTANT, Code.BAD_SHAPE,
        Code.BAD_GROUPS, Code.UNSUPPORTED_DTYPE, Code.STANDALONE, Code.VERIFICATION_FAILED,
    )
} | {("lower", code) for code in (Code.BAD_VALUES, Code.NOT_CONSTANT, Code.UNKNOWN_RANK)} | {
    ("before", Code.BAD_SHAPE),  # a model whose shapes disagree does not export
}  # fmt: skip
"""Declared ``.pt2`` codes with no case here yet (tests/test_torch_rules.py and
tests/test_lower.py reach some of them on other models)."""

DECLARED = sorted(
    ((family.name, code) for family in FAMILIES for code in family.codes_on("pt2")),
    key=lambda pair: (pair[0], pair[1].value),
)
COVERED = [pair for pair in DECLARED if pair not in NOT_YET]


@pytest.mark.parametrize(("family", "code"), COVERED, ids=[f"{f}-{c.value}" for f, c in COVERED])
def test_each_declared_code_is_reported_by_the_pt2_front(family: str, code: Code) -> None:
    make, shape, site = CASES[(family, code)]
    torch.manual_seed(0)
    model = make().eval() if code in OWN_STATISTICS else randomize_bn(make())
    program = torch.export.export(model, (torch.randn(*shape),), strict=False)
    report = bnfold.fold(program).report
    refusals = [(r.site, r.code) for r in report.refused]
    assert (site, code) in refusals, report.summary()


def test_every_case_is_a_declared_code_and_every_declared_one_is_a_case_or_not_yet() -> None:
    assert sorted(CASES, key=lambda pair: (pair[0], pair[1].value)) == COVERED
    assert set(DECLARED) >= NOT_YET
