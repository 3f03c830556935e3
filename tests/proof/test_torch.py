"""PyTorch folds get the same certificate: eager modules and torch.export programs."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from bnfold.proof import prove_eager, prove_program  # noqa: E402


def _randomize(module: Any, seed: int = 0) -> Any:
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator))
            m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator))
    return module.eval()


class Mixed(nn.Module):
    """Conv -> BN, Conv -> MaxPool -> BN, Linear -> BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2, self.pool = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.MaxPool2d(2)
        self.fc, self.bn3 = nn.Linear(64, 5), nn.BatchNorm1d(5)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn(self.conv(x)))
        y = self.bn2(self.pool(self.conv2(y))) + 1
        return self.bn3(self.fc(y.flatten(1)))


class RepVgg(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bn_id = nn.BatchNorm2d(c)

    def forward(self, x: Any) -> Any:
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


class Joins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn_add = nn.BatchNorm2d(4)
        self.c, self.d = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 3, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(5)

    def forward(self, x: Any) -> Any:
        y = torch.relu(self.bn_add(self.a(x) + self.b(torch.relu(x))))
        return self.bn_cat(torch.cat([self.c(y), self.d(y)], 1))


class TokenMlp(nn.Module):
    """LeViT: BN1d over the batch merged with the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x: Any) -> Any:
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class PreAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)

    def forward(self, x: Any) -> Any:
        return self.conv(self.bn(torch.relu(x)))


CASES = {
    "mixed": (Mixed, (2, 3, 8, 8)),
    "repvgg": (RepVgg, (1, 4, 6, 6)),
    "joins": (Joins, (1, 3, 6, 6)),
    "token_mlp": (TokenMlp, (2, 5, 6)),
    "preact": (PreAct, (1, 4, 5, 5)),
}


def _case(name: str) -> tuple[Any, tuple[Any, ...]]:
    factory, shape = CASES[name]
    return _randomize(factory()), (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


def _fold(model: Any, inputs: tuple[Any, ...]) -> Any:
    import bnfold

    result = bnfold.fold(model, inputs)
    assert result.report.folded, result.report.summary()
    return result


@pytest.mark.parametrize("name", sorted(CASES))
def test_eager_fold_is_proven_on_example_inputs(name: str) -> None:
    model, inputs = _case(name)
    result = _fold(model, inputs)
    certificate = prove_eager(model, result.model, result.report, example_inputs=inputs)
    assert certificate.holds, certificate.summary()
    assert certificate.front == "torch eager"


@pytest.mark.parametrize("name", sorted(CASES))
def test_program_fold_is_proven(name: str) -> None:
    model, inputs = _case(name)
    program = torch.export.export(model, inputs)
    result = _fold(program, inputs)
    certificate = prove_program(program, result.model, result.report)
    assert certificate.holds, certificate.summary()


def test_programs_with_dynamic_shapes_are_proven() -> None:
    """An eager fold exported with a dynamic batch and spatial size, both sides."""
    model, _ = _case("repvgg")
    inputs = (torch.randn(2, 4, 6, 6),)
    result = _fold(model, inputs)
    dims = {0: torch.export.Dim("batch", min=2, max=64), 2: torch.export.Dim("h", min=3, max=64)}
    programs = [
        torch.export.export(m, inputs, dynamic_shapes=(dims,)) for m in (model, result.model)
    ]
    certificate = prove_program(programs[0], programs[1], result.report)
    assert certificate.holds, certificate.summary()


def test_eager_sites_from_parameters_without_example_inputs() -> None:
    model, inputs = _case("mixed")
    result = _fold(model, inputs)
    certificate = prove_eager(model, result.model, result.report)
    proven = {s.name for s in certificate.sites if s.proven}
    assert proven == {"conv -> bn", "fc -> bn3"}
    assert [u.what for u in certificate.uncovered] == ["conv2 -> max_pool2d -> bn2"]
    assert "needs example inputs" in certificate.uncovered[0].reason
    assert not certificate.holds  # something is not covered, and says so
    assert any("taken from the fold report" in a for a in certificate.assumptions)


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "parameters"])
def test_wrong_eager_fold_fails(traced: bool) -> None:
    model, inputs = _case("mixed")
    result = _fold(model, inputs)
    wrong = copy.deepcopy(result.model)
    with torch.no_grad():
        wrong.conv.weight[1] *= 1.001
    certificate = prove_eager(
        model, wrong, result.report, example_inputs=inputs if traced else None
    )
    (failed,) = [s for s in certificate.sites if not s.proven]
    assert failed.name == "conv -> bn"
    assert "beyond 1 ulp" in failed.reason


def test_wrong_identity_tap_fails() -> None:
    model, inputs = _case("repvgg")
    result = _fold(model, inputs)
    wrong = copy.deepcopy(result.model)
    with torch.no_grad():
        wrong.conv3.weight[0, 0, 1, 1] += 0.01  # the tap of channel 0, off
    certificate = prove_eager(model, wrong, result.report, example_inputs=inputs)
    assert not certificate.holds, certificate.summary()


def test_changed_parameter_elsewhere_fails_without_example_inputs() -> None:
    model, inputs = _case("joins")
    result = _fold(model, inputs)
    wrong = copy.deepcopy(result.model)
    with torch.no_grad():
        wrong.c.bias[0] += 1.0
    assert not prove_eager(model, wrong, result.report, example_inputs=inputs).holds


class ReflectTap(nn.Module):
    """``conv(x) + bn(x)`` with a reflect-padded conv: the conv reads ``pad(x)``, the
    identity BN reads ``x``, so the region's two inputs are not independent."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: Any) -> Any:
        return self.conv(x) + self.bn(x)


def test_a_region_whose_inputs_depend_on_each_other_is_not_modelled_not_refuted() -> None:
    """The tap moved into the conv's centre reads ``x`` through the reflect pad: compared
    as if ``pad(x)`` and ``x`` were free, the maps differ, but no difference is
    established; sampling decides (and the correct fold stays)."""
    model, inputs = _randomize(ReflectTap()), (torch.randn(2, 4, 8, 8),)
    result = _fold(model, inputs)
    assert [f.kind.value for f in result.report.folded] == ["identity_tap"]
    certificate = prove_eager(model, result.model, result.report, example_inputs=inputs)
    (site,) = certificate.sites
    assert not site.proven and site.unsupported and not certificate.refuted
    assert "the inputs are not independent" in site.reason


def _opaque_calls(module: Any, *args: Any) -> list[str]:
    from bnfold.proof.torch_graph import AT, program_model
    from bnfold.torch_front.trace import export_program

    model = program_model(export_program(module.eval(), args))
    return [n.op_type for n in model.graph if n.domain == AT]


class _WritesThroughAView(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: Any) -> Any:
        z = self.conv(x) * 2.0
        z.view(-1).add_(1.0)  # writes into z: the view has no storage of its own
        return z


class _WritesATemporary(_WritesThroughAView):
    def forward(self, x: Any) -> Any:
        z = self.conv(x) * 2.0
        z.add_(1.0)
        return z


def test_an_in_place_write_through_a_view_stays_opaque():
    x = torch.randn(1, 3, 6, 6)
    assert "aten.add_.Tensor" in _opaque_calls(_WritesThroughAView(), x)
    assert _opaque_calls(_WritesATemporary(), x) == []  # its own storage: an Add


class _AdaptiveMaxPool(torch.nn.Module):
    def __init__(self, indices: bool) -> None:
        super().__init__()
        self.indices = indices

    def forward(self, x: Any) -> Any:
        if not self.indices:
            return torch.nn.functional.adaptive_max_pool2d(x, 1)
        out, idx = torch.nn.functional.adaptive_max_pool2d(x, 1, return_indices=True)
        return out, idx.float()


def test_adaptive_max_pool_with_its_indices_read_stays_opaque():
    x = torch.randn(1, 3, 6, 6)
    assert "aten.adaptive_max_pool2d.default" in _opaque_calls(_AdaptiveMaxPool(True), x)
    assert "aten.adaptive_max_pool2d.default" not in _opaque_calls(_AdaptiveMaxPool(False), x)
    for indices in (True, False):  # before: IndexError reading a part never built
        program = _export_of(_AdaptiveMaxPool(indices), x)
        assert prove_program(program, program).holds


def _export_of(module: Any, *args: Any) -> Any:
    from bnfold.torch_front.trace import export_program

    return export_program(module.eval(), args)


def test_prove_eager_with_example_inputs_leaves_the_modules_in_their_mode():
    original = _randomize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    folded = copy.deepcopy(original)
    original.train(), folded.train()
    certificate = prove_eager(original, folded, example_inputs=(torch.randn(1, 3, 6, 6),))
    assert certificate.holds
    assert original.training and folded.training and original[1].training


def test_prove_eager_exports_as_the_fold_exports():
    from bnfold.proof import torch_proof
    from bnfold.torch_front.trace import export_program

    module = _randomize(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout())
    )
    x = torch.randn(1, 3, 6, 6)
    ours = torch_proof._export(module, (x,))
    theirs = export_program(module, (x,))
    assert str(ours.graph) == str(theirs.graph)
