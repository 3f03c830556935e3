"""The ``recorded`` finder: pairs in models no tracer can follow whole, read from one eager run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bnfold.report import Code  # noqa: E402
from bnfold.torch_front import fold_module, recorded, trace  # noqa: E402
from bnfold.torch_front.modules import find_roles  # noqa: E402
from tests.torch_standins import (  # noqa: E402
    BatchNormAct2d,
    FrozenBatchNorm2d,
    conv_bn,
    trained_like,
)


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, tuple | list) else [out]


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    for want, got in zip(outputs(a, x), outputs(b, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def refusals(result) -> dict[str, Code]:
    return {r.site: r.code for r in result.report.refused}


class Block(nn.Module):
    """A residual block with a forward of its own (conv, BN, relu; conv, BN; add)."""

    def __init__(self, c: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c, c, 3, norm=norm)
        self.conv2, self.bn2 = conv_bn(c, c, 3, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + x)


class Detector(nn.Module):
    """A detector in miniature: a frozen-BN backbone, an FPN, a head, and Python around it.

    The forward branches on scores it computed, reads them with ``.tolist()`` and
    keeps boxes with a greedy NMS written in Python: neither export nor fx traces it.
    """

    def __init__(self, norm: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8, 3, 2, norm=norm), nn.ReLU(inplace=True))
        self.layer1 = Block(8, norm)
        self.down = nn.Sequential(*conv_bn(8, 16, 3, 2, norm=norm), nn.ReLU())
        self.layer2 = Block(16, norm)
        self.inner = nn.ModuleList([nn.Conv2d(8, 8, 1), nn.Conv2d(16, 8, 1)])
        self.outer = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.head_conv, self.head_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.score, self.box = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(self.down(c1))
        top = self.inner[1](c2)
        lateral = self.inner[0](c1) + F.interpolate(top, size=c1.shape[-2:], mode="nearest")
        return [self.outer[0](lateral), self.outer[1](top)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, boxes = [], []
        for feature in self.features(x):
            t = F.relu(self.head_bn(self.head_conv(feature)))
            scores.append(self.score(t).flatten(1))
            boxes.append(self.box(t).flatten(2).transpose(1, 2))
        score, box = torch.cat(scores, 1)[0], torch.cat(boxes, 1)[0]
        if bool(score.max() < -1e6):  # data-dependent control flow
            return box[:0], score[:0]
        order = score.argsort(descending=True)[:20]
        kept: list[int] = []
        for i in order.tolist():  # a greedy NMS in Python
            if all(float((box[i] - box[j]).abs().max()) > 0.05 for j in kept):
                kept.append(i)
        index = torch.tensor(kept, dtype=torch.long)
        return box[index], score[index]


def untraceable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the tracers' attempts: a list that grows by each tracer's name when it is tried."""
    tried: list[str] = []
    for name in ("_export_graph", "_fx_graph"):
        real = getattr(trace, name)

        def counted(*args, _real=real, _name=name):  # type: ignore[no-untyped-def]
            tried.append(_name)
            return _real(*args)

        monkeypatch.setattr(trace, name, counted)
    return tried


@pytest.mark.parametrize("norm", [FrozenBatchNorm2d, nn.BatchNorm2d], ids=["frozen", "bn"])
def test_every_bn_after_a_conv_folds_in_a_detector_no_tracer_follows(norm, monkeypatch):
    model = trained_like(Detector(norm))
    x = torch.randn(1, 3, 32, 32)
    tried = untraceable(monkeypatch)
    result = fold_module(model, (x,))
    assert {f.finder for f in result.report.folded} == {"recorded"}
    assert sorted(f.site for f in result.report.folded) == [
        "down.0 -> down.1", "head_conv -> head_bn", "layer1.conv1 -> layer1.bn1",
        "layer1.conv2 -> layer1.bn2", "layer2.conv1 -> layer2.bn1",
        "layer2.conv2 -> layer2.bn2", "stem.0 -> stem.1",
    ]  # fmt: skip
    assert result.report.refused == [] and result.verification.passed
    # Its run reads scores into Python (.tolist()): export is not tried, fx fails once.
    assert tried == ["_fx_graph"]
    assert_same(model, result.model, x)


class TwoRounds(nn.Module):
    """Conv -> BN -> BN (the second BN folds in round two) under untraceable Python."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.bn1(self.conv(x)))
        return y[:, : int(y.abs().sum().item() > 0) + 1]


def test_a_tracer_that_failed_is_not_tried_again_in_a_later_round(monkeypatch):
    model = trained_like(TwoRounds())
    tried = untraceable(monkeypatch)
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert [f.site for f in result.report.folded] == ["conv -> bn1", "conv -> bn2"]
    assert tried == ["_fx_graph"]  # .item(): export is not tried; fx failed once, not again


class Between(nn.Module):
    """``bn(step(conv(x)))``, with an untraceable read of the result."""

    def __init__(self, step) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.conv, self.bn, self.step = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.step(self.conv(x)))
        return y if y.sum().item() == y.sum().item() else -y


def _inplace_relu(y: torch.Tensor) -> torch.Tensor:
    return F.relu(y, inplace=True)


def _written(y: torch.Tensor) -> torch.Tensor:
    y[:, 0] = 0
    return y


def _branches_on(y: torch.Tensor) -> torch.Tensor:
    return y if y.mean().item() > -1e9 else -y


def _shape_read(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(y.shape[0], y.size(1), *y.shape[2:]) if y.dim() == 4 else y


@pytest.mark.parametrize(
    ("step", "code"),
    [
        (_inplace_relu, Code.NONLINEAR_INPUT),  # F.relu(y, inplace=True) hands y back, changed
        (_written, Code.OP_BETWEEN),  # y[:, 0] = 0 writes into the conv's output
        (lambda y: y.tolist() and y, Code.BRANCHING),  # the values read into Python
        (_branches_on, Code.BRANCHING),  # a value of it steers Python
        (lambda y: y.contiguous(), None),  # the same tensor, unchanged
        (_shape_read, None),  # shape reads read no values; the reshape is looked at on shapes
        (nn.Dropout(0.5).eval(), None),
        (lambda y: y + 0, None),
    ],
    ids=[
        "inplace_relu",
        "setitem",
        "tolist",
        "branches_on",
        "contiguous",
        "shape_read",
        "eval_dropout",
        "plus_zero",
    ],
)
def test_what_the_recorded_run_sees_between_a_conv_and_its_bn(step, code, monkeypatch):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = trained_like(Between(step))
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    if code is None:
        assert [(f.site, f.finder) for f in result.report.folded] in (
            [("conv -> bn", "recorded")],
            [("conv -> reshape -> bn", "recorded")],
        )
    else:
        assert result.report.folded == []
        assert [r.code for r in result.report.refused] == [code]
    assert_same(model, result.model, x)


class OneValue(nn.Module):
    """A conv with one output value, which Python reads with ``bool`` before the BN does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 1, 6), nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) if bool(y) or True else y


def test_a_value_read_into_python_is_a_reader_and_leaves_the_tensor_as_it_was(monkeypatch):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = trained_like(OneValue())
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert [r.code for r in result.report.refused] == [Code.BRANCHING]  # not an op between


def test_the_recorded_graph_knows_owners_calls_and_outputs():
    model = trained_like(Between(lambda y: y))
    roles = find_roles(model)
    run = recorded.record_run(model, (torch.randn(1, 3, 6, 6),), roles, list(roles.kind))
    nodes = run.traced.nodes
    conv = [n for n in nodes.values() if n.owner == "conv"]
    bn = [n for n in nodes.values() if n.owner == "bn"]
    assert [n.op for n in conv] == ["conv2d"] and [n.op for n in bn] == ["batch_norm"]
    (conv_name,) = [k for k, n in nodes.items() if n.owner == "conv"]
    assert bn[0].inputs == [conv_name] and nodes[conv_name].users == [
        k for k, n in nodes.items() if n.owner == "bn"
    ]
    assert run.calls.count == {"conv": 1, "bn": 1}
    assert run.calls.out_shape("conv") == (1, 4, 4, 4)
    assert any(n.is_output for n in nodes.values())


def test_a_forward_that_cannot_run_under_the_recorder_falls_back(monkeypatch):
    def refuses(*_args):
        raise RuntimeError("no torch function mode here")

    monkeypatch.setattr(recorded, "record_run", refuses)
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert [f.finder for f in result.report.folded] == ["fx"]


# --- traced once: later rounds of the fixpoint reuse the first graph ----------------------


class ConvBnBnAct(nn.Module):
    """Conv -> BN -> BN (two rounds) beside conv -> BatchNormAct (its act stays)."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn3 = BatchNormAct2d(4, nn.SiLU()) if act else nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(x))) * self.bn3(self.conv2(x))


@pytest.mark.parametrize(("act", "traces"), [(False, 1), (True, 2)], ids=["identity", "kept_act"])
def test_later_rounds_reuse_the_first_trace_while_folds_leave_identities(act, traces, monkeypatch):
    # A fold that leaves an activation in the BN's place changes what a trace sees
    # there: the next round traces again.
    tried = untraceable(monkeypatch)
    model, x = trained_like(ConvBnBnAct(act)), torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert sorted(f.site for f in result.report.folded) == [
        "conv -> bn1", "conv -> bn2", "conv2 -> bn3",
    ]  # fmt: skip
    assert tried == ["_export_graph"] * traces
    assert_same(model, result.model, x)


def _blocks() -> dict[str, nn.Module]:
    from tests.test_torch_eager_rules import MobileOne, RepMixer, RepVgg

    return {
        "repvgg": RepVgg(),
        "mobileone": MobileOne(),
        "repmixer": RepMixer(),
        "conv_bn_bn": ConvBnBnAct(act=False),
        "bn_conv_bn": nn.Sequential(
            nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        ),
    }


@pytest.mark.parametrize("finder", ["export", "fx", "recorded"])
@pytest.mark.parametrize("block", ["repvgg", "mobileone", "repmixer", "conv_bn_bn", "bn_conv_bn"])
def test_a_reused_trace_finds_what_a_fresh_trace_finds(block, finder, monkeypatch):
    if finder != "export":
        monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    if finder == "recorded":
        monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = trained_like(_blocks()[block])
    x = torch.randn(2, 3 if block == "conv_bn_bn" else 4, 6, 6)
    reused = fold_module(model, (x,)).report
    monkeypatch.setattr(trace.Finders, "_seen_again", lambda *a: None)
    fresh = fold_module(model, (x,)).report
    assert [(f.site, f.kind, f.finder) for f in reused.folded] == [
        (f.site, f.kind, f.finder) for f in fresh.folded
    ]
    assert reused.refused == fresh.refused


@dataclass
class Boxed:
    t: torch.Tensor


class Plain:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class ReturnsItsConvOutputBoxed(nn.Module):
    """A detector-like forward (a value read into Python) that returns the conv's own
    output inside an object, beside the BN's: folding would change the boxed tensor."""

    def __init__(self, box: type) -> None:
        super().__init__()
        self.conv, self.bn, self.box = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), box

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        c = self.conv(x)
        y = self.bn(c)
        (y > 0).sum().tolist()
        return y * 1.0, self.box(c)


@pytest.mark.parametrize("box", [Boxed, Plain], ids=["dataclass", "plain_object"])
def test_a_conv_output_returned_inside_an_object_is_an_output(box, monkeypatch):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = trained_like(ReturnsItsConvOutputBoxed(box))
    x = torch.randn(2, 3, 6, 6)
    result = fold_module(model, (x,))
    assert result.report.folded == []
    assert [r.code for r in result.report.refused] == [Code.BRANCHING]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x)[1].t, model(x)[1].t)


def test_the_recorder_walks_objects_once_and_stops_at_cycles():
    a, b = Plain(torch.zeros(1)), Plain(torch.ones(1))
    a.other, b.other = b, a  # a cycle
    found = list(recorded._held_tensors([a, Boxed(a.t), a]))  # a again: walked once
    assert [id(t) for t in found] == [id(a.t), id(b.t), id(a.t)]  # the box holds a.t too


class ReturnsItsConvOutputBoxedTraceable(ReturnsItsConvOutputBoxed):
    """The same without the Python read: export and fx may trace it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        c = self.conv(x)
        return self.bn(c) * 1.0, self.box(c)


@pytest.mark.parametrize("box", [Boxed, Plain], ids=["dataclass", "plain_object"])
@pytest.mark.parametrize("finder", ["export", "fx"])
def test_the_tracers_do_not_fold_past_a_conv_output_returned_inside_an_object(
    box, finder, monkeypatch
):
    """export cannot return an unregistered class (untraceable); fx returns a dataclass's
    fields as outputs (branching) and fails on a plain object (untraceable)."""
    monkeypatch.setattr(recorded, "record_run", lambda *a: 1 / 0)
    other = "_fx_graph" if finder == "export" else "_export_graph"
    monkeypatch.setattr(trace, other, lambda *a: 1 / 0)
    model = trained_like(ReturnsItsConvOutputBoxedTraceable(box))
    result = fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert result.report.folded == []
    assert {r.code for r in result.report.refused} <= {Code.BRANCHING, Code.UNTRACEABLE}


@pytest.mark.parametrize(
    ("step", "code"),
    [
        (lambda y: F.alpha_dropout(y, 0.5), None),  # training defaults to False: y itself
        (lambda y: F.feature_alpha_dropout(y, 0.5), None),
        (lambda y: F.dropout(y, 0.0), Code.OP_BETWEEN),  # training defaults to True
        (lambda y: F.alpha_dropout(y, 0.0, True), Code.OP_BETWEEN),
    ],
    ids=["alpha_dropout", "feature_alpha_dropout", "dropout", "alpha_dropout_training"],
)
def test_a_functional_dropout_is_looked_through_where_its_training_is_false(
    step, code, monkeypatch
):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = trained_like(Between(step))
    result = fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert [r.code for r in result.report.refused] == ([code] if code else [])
    assert len(result.report.folded) == (0 if code else 1)


def test_the_recorded_dropout_defaults_are_torchs():
    import inspect

    for op, default in recorded._DROPOUT_TRAINING_DEFAULT.items():
        parameter = inspect.signature(getattr(F, op)).parameters["training"]
        assert parameter.default is default, op
