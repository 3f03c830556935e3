"""Proof first on the torch fronts: folds are proven in memory before the sampled check.

A fold the proof refutes is rolled back before anything is written, even when every
sampled tensor would pass; a proven fold is not rolled back for a sampled difference
within rounding, but still is for a gross one (the prover would be wrong).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from bnfold.options import FoldOptions, VerifyOptions
from bnfold.proof.torch_proof import PAIRING_ASSUMED
from bnfold.report import Code
from bnfold.torch_front import eager
from bnfold.torch_front import verify as checking
from bnfold.torch_front.files import ModuleSource, fold_torch_files
from bnfold.torch_front.program import run as program_run
from bnfold.torch_front.program.run import fold_graph_module
from bnfold.torch_front.program.sites import linear_keys
from bnfold.verification.verdict import PROOF_ENVELOPE, TensorDiff
from tests.torch_standins import FrozenBatchNorm2d, trained_like

# A relative change of one weight by 8 float32 ulps: far past the proof's one ulp,
# well inside what sampling can resolve on a conv's outputs.
PLANTED = 8 * 2.0**-23


class TwoBlocks(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2, the second block with a residual ``+=``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(y))
        out += y
        return torch.relu(out)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained_like(TwoBlocks(), seed).eval()


def _input() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def _nudge(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.view(-1)[0] *= 1 + PLANTED


@pytest.fixture
def wrong_eager_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every eager fold into conv2 also moves one of its weights by a few ulps."""
    planted = _planting(eager.apply_fold, lambda pair: pair.linear == "conv2")
    monkeypatch.setattr(eager, "apply_fold", planted)


@pytest.fixture
def wrong_program_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``.pt2`` fold into conv2's call also moves one of its folded weights."""
    monkeypatch.setattr(program_run, "apply_site", _planting_site(program_run.apply_site))


def _refusals(result: Any) -> dict[str, Any]:
    return {r.site: r for r in result.report.refused}


def test_a_wrong_eager_fold_is_refuted_and_rolled_back(wrong_eager_fold: None) -> None:
    model, args = _model(), _input()
    sampled_only = bnfold.fold(model, args, prove=False)
    assert sampled_only.verification.status == "passed"  # sampling alone keeps it
    assert [f.site for f in sampled_only.report.folded] == ["conv1 -> bn1", "conv2 -> bn2"]
    result = bnfold.fold(model, args)
    assert [f.site for f in result.report.folded] == ["conv1 -> bn1"]
    refusal = _refusals(result)["conv2 -> bn2"]
    assert refusal.code is Code.VERIFICATION_FAILED
    assert refusal.detail.startswith("the proof found a difference")
    verification = result.verification
    assert verification.status == "passed" and verification.proof.holds
    assert isinstance(result.model.bn2, nn.BatchNorm2d)  # the refuted fold was undone
    torch.testing.assert_close(result.model(*args), model(*args), rtol=1e-5, atol=1e-5)


def test_a_wrong_program_fold_is_refuted_and_refolded_without(wrong_program_fold: None) -> None:
    model, args = _model(), _input()
    program = torch.export.export(model, args, strict=False)
    sampled_only = fold_graph_module(program.module, args, prove=False)
    assert sampled_only.verification.status == "passed"
    assert len(sampled_only.report.folded) == 2
    result = fold_graph_module(program.module, args)
    assert [f.site for f in result.report.folded] == ["conv1 -> bn1"]
    refusal = _refusals(result)["conv2 -> bn2"]
    assert refusal.code is Code.VERIFICATION_FAILED
    assert refusal.detail.startswith("the proof found a difference")
    assert result.verification.status == "passed" and result.verification.proof.holds


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_refuted_fold_is_never_written(
    suffix: str, tmp_path: Path, wrong_eager_fold: None, wrong_program_fold: None
) -> None:
    """The file written holds conv2 and bn2 as they were: the refuted fold never left memory."""
    model, args = _model(), _input()
    out = tmp_path / f"folded{suffix}"
    result, written = fold_torch_files(_Given(module=model, args=args), out, FoldOptions())
    assert written and "conv2 -> bn2" in _refusals(result)
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
        assert torch.equal(state["conv2.weight"], model.conv2.weight)
        assert "bn2.running_var" in state
    else:
        folded = torch.export.load(out).module()
        torch.testing.assert_close(folded(*args), model(*args), rtol=1e-5, atol=1e-5)
        assert torch.equal(folded.get_parameter("conv2.weight"), model.conv2.weight)


def _planting(apply: Callable[..., Any], chosen: Callable[[Any], bool]) -> Callable[..., Any]:
    def planted(root: nn.Module, pair: Any, rounding: Any) -> Any:
        undo = apply(root, pair, rounding)
        if chosen(pair):
            _nudge(root.get_submodule(pair.linear).weight)
        return undo

    return planted


def _planting_site(apply: Callable[..., Any]) -> Callable[..., Any]:
    def planted(gm: Any, site: Any, rounding: Any) -> Any:
        added = apply(gm, site, rounding)
        if site.label.startswith("conv2"):
            conv = next(n for n in gm.graph.nodes if n.name == linear_keys(site)[0])
            _nudge(gm.get_parameter(str(conv.args[1].target)))
        return added

    return planted


class _Given(ModuleSource):
    """A built module as a fold source."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        super().__init__("")
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "args", args)

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        return self.module, self.args  # type: ignore[attr-defined]


# -- a correct fold, a noisy sampled check ------------------------------------------------

RTOL = 1e-5  # given, so each bound is exactly RTOL * scale


@pytest.fixture
def noisy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Every sampled difference becomes ``factor[0]`` times its bound: noise, not the fold."""
    factor = [3.0]
    measured = checking._measured

    def noisy_measured(*args: Any, **kwargs: Any) -> dict[str, TensorDiff]:
        diffs = measured(*args, **kwargs)
        for diff in diffs.values():
            diff.max_abs = max(diff.max_abs, factor[0] * RTOL * diff.scale)
        return diffs

    monkeypatch.setattr(checking, "_measured", noisy_measured)
    yield factor


def _verify_options() -> VerifyOptions:
    return VerifyOptions(rtol=RTOL)


def test_a_proven_eager_fold_is_not_rolled_back_for_rounding_noise(noisy: list[float]) -> None:
    model, args = _model(), _input()
    unproven = bnfold.fold(model, args, prove=False, verify_options=_verify_options())
    assert unproven.report.folded == []  # sampling alone rolls both back
    assert {r.code for r in unproven.report.refused} == {Code.VERIFICATION_FAILED}
    result = bnfold.fold(model, args, verify_options=_verify_options())
    assert len(result.report.folded) == 2 and result.report.refused == []
    verification = result.verification
    assert verification.status == "passed" and verification.proven
    assert {r.judged_by for r in verification.outputs} == {"proof"}


def test_a_gross_sampled_difference_fails_a_proven_fold_all_the_same(noisy: list[float]) -> None:
    noisy[0] = 2 * PROOF_ENVELOPE
    result = bnfold.fold(_model(), _input(), verify_options=_verify_options())
    assert result.report.folded == []
    assert result.verification.proof is not None and result.verification.proof.holds


def test_a_proven_program_fold_is_not_rolled_back_for_rounding_noise(noisy: list[float]) -> None:
    model, args = _model(), _input()
    make = torch.export.export(model, args, strict=False).module
    unproven = fold_graph_module(make, args, verify=_verify_options(), prove=False)
    assert unproven.report.folded == []
    result = fold_graph_module(make, args, verify=_verify_options())
    assert len(result.report.folded) == 2 and result.report.refused == []
    assert result.verification.status == "passed" and result.verification.proven


def test_no_prove_samples_alone() -> None:
    result = bnfold.fold(_model(), _input(), prove=False)
    assert result.verification.status == "passed" and result.verification.proof is None


# -- detectors: what export cannot trace is proven module by module ---------------------


class FrozenNet(nn.Module):
    """conv -> FrozenBatchNorm2d behind a data-dependent branch export cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.sum()) > 1e9:  # data-dependent: torch.export fails here
            return y * 0
        return y


def test_an_unexportable_module_with_a_frozen_bn_is_proven_module_by_module() -> None:
    model = trained_like(FrozenNet()).eval()
    result = bnfold.fold(model, _input())
    assert [f.site for f in result.report.folded] == ["conv -> bn"]
    proof = result.verification.proof
    assert proof.holds, proof.summary()
    assert any("FrozenBatchNorm2d" in a for a in proof.assumptions)
    assert "torch.export not tried: the run calls __float__" in proof.assumptions
    assert proof.pairing_assumed and PAIRING_ASSUMED in proof.assumptions


def test_a_certificate_that_assumed_the_pairing_does_not_loosen_sampling(
    noisy: list[float],
) -> None:
    """Rounding-level noise a traced proof would excuse fails the fold when the proof
    took the finder's pairing on trust: the sampled check is the finder's only check."""
    model = trained_like(FrozenNet()).eval()
    result = bnfold.fold(model, _input(), verify_options=_verify_options())
    assert result.report.folded == []
    assert _refusals(result)["conv -> bn"].code is Code.VERIFICATION_FAILED
    assert all(r.judged_by != "proof" for r in result.verification.outputs)
    assert result.verification.proof is not None  # attached all the same


# -- a rollback is judged by sampling; the folds kept are proven again -------------------


class Chain(nn.Module):
    """conv -> bn1 -> bn2: bn2 folds into the conv only once bn1 has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.bn1(self.conv(x)))


@pytest.fixture
def gross_with_bn1_folded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gross sampled difference whenever bn1 is folded, which the proof does not see."""
    measured = checking._measured

    def planted(ref: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        diffs = measured(ref, module, *args, **kwargs)
        if isinstance(module.get_submodule("bn1"), nn.Identity):
            for diff in diffs.values():
                diff.max_abs = max(diff.max_abs, 2 * PROOF_ENVELOPE * RTOL * diff.scale)
        return diffs

    monkeypatch.setattr(checking, "_measured", planted)


def test_a_rollback_reports_the_proof_of_the_folds_it_kept(gross_with_bn1_folded: None) -> None:
    """Dropping bn1 leaves bn2's fold in the wrong place (bn1 between): its trial fails
    by sampling, and the certificate reported is of what was kept, not of both folds."""
    model, args = trained_like(Chain()).eval(), _input()
    result = bnfold.fold(model, args, verify_options=_verify_options())
    kept = [f.site for f in result.report.folded]
    assert "conv -> bn1" not in kept
    proof = result.verification.proof
    assert proof is not None and proof.holds, proof.summary()
    assert sorted(s.name for s in proof.sites) == sorted(kept)
    torch.testing.assert_close(result.model(*args), model(*args), rtol=1e-5, atol=1e-5)


@pytest.fixture
def gross_with_bn1_folded_in_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """As :func:`gross_with_bn1_folded`, for graph modules: bn1's batch_norm call is gone."""
    measured = checking._measured

    def planted(ref: Any, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        diffs = measured(ref, module, *args, **kwargs)
        if "bn1" not in program_run.graph_batchnorms(module)[0]:
            for diff in diffs.values():
                diff.max_abs = max(diff.max_abs, 2 * PROOF_ENVELOPE * RTOL * diff.scale)
        return diffs

    monkeypatch.setattr(checking, "_measured", planted)


def test_a_program_rollback_reports_the_proof_of_the_sites_it_kept(
    gross_with_bn1_folded_in_program: None,
) -> None:
    model, args = trained_like(Chain()).eval(), _input()
    make = torch.export.export(model, args, strict=False).module
    result = fold_graph_module(make, args, verify=_verify_options())
    kept = [f.site for f in result.report.folded]
    assert "conv -> bn1" not in kept
    proof = result.verification.proof
    assert proof is not None and proof.holds, proof.summary()
    assert sorted(s.name for s in proof.sites) == sorted(kept)
    torch.testing.assert_close(result.model(*args), model(*args), rtol=1e-5, atol=1e-5)


# -- a difference that names no fold is not blamed on one --------------------------------


class FoldAndLower(nn.Module):
    """conv -> bn1 folds; bn2, on the input, has no linear module to fold into: lowered."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm2d(3)
        self.conv, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(torch.relu(self.bn2(x))))


def test_a_wrong_lowering_is_not_blamed_on_the_one_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof's region ``bn2 (lowered)`` names no fold: the fold stays, and the
    result fails with the proof's finding at the lowered BN."""
    from bnfold.torch_front import lower_modules

    lower_left = lower_modules.lower_left

    def wrong_lowering(root: nn.Module, *args: Any, **kwargs: Any) -> Any:
        outcome = lower_left(root, *args, **kwargs)
        _nudge(root.get_submodule("bn2").lowered_scale)
        return outcome

    monkeypatch.setattr(lower_modules, "lower_left", wrong_lowering)
    model, args = trained_like(FoldAndLower()).eval(), _input()
    result = bnfold.fold(model, args, lower_standalone="mul-add")
    assert [f.site for f in result.report.folded] == ["conv -> bn1"]
    assert "conv -> bn1" not in _refusals(result)
    assert result.verification.status == "failed"
    assert "bn2 (lowered)" in result.verification.reason


def test_a_fold_that_no_longer_applies_after_a_refutation_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """conv2's fold is refuted; re-applying conv1's (the module carries only the folds
    kept) raises: conv1's fold is refused with why, not a traceback, bn1 left in place."""
    from bnfold.affine import Unfoldable

    planted = _planting(eager.apply_fold, lambda pair: pair.linear == "conv2")
    calls = {"conv1": 0}

    def once_for_conv1(root: nn.Module, pair: Any, rounding: Any) -> Any:
        if pair.linear == "conv1":
            calls["conv1"] += 1
            if calls["conv1"] > 1:
                raise Unfoldable("planted: the statistics went bad")
        return planted(root, pair, rounding)

    monkeypatch.setattr(eager, "apply_fold", once_for_conv1)
    model, args = _model(), _input()
    result = bnfold.fold(model, args)
    assert result.report.folded == []
    refused = _refusals(result)
    assert "planted" in refused["conv1 -> bn1"].detail
    assert refused["conv2 -> bn2"].detail.startswith("the proof found a difference")
    assert isinstance(result.model.bn1, nn.BatchNorm2d)
    torch.testing.assert_close(result.model(*args), model(*args), rtol=1e-5, atol=1e-5)


def test_a_folded_module_that_fails_export_is_proven_by_modules_and_says_why(monkeypatch):
    from bnfold.verification import torch_proof

    model = trained_like(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 6, 6)
    result = bnfold.fold(model, example_inputs=(x,), verify=False)
    prover = torch_proof.EagerProver((x,), model, torch.export.export(model.eval(), (x,)))

    def fails(*_args: Any) -> Any:
        raise RuntimeError("no export today")

    monkeypatch.setattr(torch_proof, "export_program", fails)
    certificate = prover.prove(result.model, result.report)
    assert certificate.holds
    assert any("no export today" in a for a in certificate.assumptions)
