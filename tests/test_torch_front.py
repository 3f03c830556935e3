"""The torch front: each pattern folds with equal outputs, each refusal leaves its site alone."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.report import Code  # noqa: E402
from bnfold.torch_front import eager, fold_module, inspect_module, recorded, trace  # noqa: E402
from tests.torch_standins import randomize_bn, use  # noqa: E402


def outputs_match(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> bool:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return bool(torch.allclose(ya, yb, rtol=tol, atol=tol))


def codes_at(result, site: str) -> list[Code]:
    return [r.code for r in result.report.refused if r.site == site]


def folded_sites(result) -> list[str]:
    return [f.site for f in result.report.folded]


class Pair(nn.Module):
    def __init__(self, linear: nn.Module, bn: nn.Module, between: nn.Module | None = None):
        super().__init__()
        self.linear, self.bn = linear, bn
        self.between = between

    def forward(self, x):
        y = self.linear(x)
        if self.between is not None:
            y = self.between(y)
        return self.bn(y)


def fold_pair(linear, bn, x, **kw):
    model = randomize_bn(Pair(linear, bn))
    return model, fold_module(model, (x,), **kw)


# --- patterns ---------------------------------------------------------------

CONVS = {
    "conv1d": (nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6), (2, 4, 9)),
    "conv2d_groups_dilation_stride": (
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2),
        nn.BatchNorm2d(6),
        (2, 4, 11, 11),
    ),
    "conv2d_depthwise_no_bias": (
        nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False),
        nn.BatchNorm2d(6),
        (2, 6, 7, 7),
    ),
    "conv2d_reflect": (
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(5),
        (2, 3, 8, 8),
    ),
    "conv2d_circular": (
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular", bias=False),
        nn.BatchNorm2d(5),
        (2, 3, 8, 8),
    ),
    "conv3d_replicate": (
        nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate"),
        nn.BatchNorm3d(4),
        (1, 2, 5, 5, 5),
    ),
    "convT1d_groups": (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 7)),
    "convT2d_output_padding_dilation": (
        nn.ConvTranspose2d(6, 9, 3, stride=2, output_padding=1, dilation=2, groups=3),
        nn.BatchNorm2d(9),
        (2, 6, 5, 5),
    ),
    "convT3d_no_bias": (
        nn.ConvTranspose3d(2, 4, 2, stride=2, bias=False),
        nn.BatchNorm3d(4),
        (1, 2, 3, 3, 3),
    ),
    "linear_2d_input": (nn.Linear(7, 5), nn.BatchNorm1d(5), (4, 7)),
    "linear_affine_false": (nn.Linear(7, 5, bias=False), nn.BatchNorm1d(5, affine=False), (4, 7)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_folds_pattern_with_equal_outputs(name):
    linear, bn, shape = CONVS[name]
    linear, bn = copy.deepcopy(linear), copy.deepcopy(bn)
    x = torch.randn(shape)
    model, result = fold_pair(linear, bn, x)
    assert folded_sites(result) == ["linear -> bn"]
    assert result.report.folded[0].finder == "export"
    assert isinstance(result.model.bn, nn.Identity)
    assert result.model.linear.bias is not None
    assert result.verification is not None and result.verification.passed
    assert outputs_match(model, result.model, torch.randn(shape))


def test_folded_model_keeps_class_and_state_dict_keys():
    model, result = fold_pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), torch.randn(1, 3, 6, 6))
    assert type(result.model) is Pair
    before = {k for k in model.state_dict() if not k.startswith("bn.")}
    assert set(result.model.state_dict()) == before


def test_creates_bias_parameter_where_absent():
    x = torch.randn(1, 3, 6, 6)
    model, result = fold_pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), x)
    assert model.linear.bias is None
    bias = result.model.linear.bias
    assert isinstance(bias, nn.Parameter) and bias.dtype == torch.float32
    assert "linear.bias" in result.model.state_dict()


def test_original_module_is_not_changed():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight_obj = model.linear.weight
    fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert model.linear.weight is weight_obj
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training and not model.bn.training


def test_inplace_folds_the_given_module():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    result = fold_module(model, (x,), inplace=True)
    assert result.model is model and isinstance(model.bn, nn.Identity)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_single_tensor_example_input_is_accepted():
    model = randomize_bn(Pair(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert folded_sites(fold_module(model, torch.randn(5, 3))) == ["linear -> bn"]


class FrozenBatchNorm2d(nn.Module):
    """torchvision-style frozen BN: buffers only, explicit formula."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        for name, init in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((c,), init))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class MyBN(nn.BatchNorm2d):
    pass


@pytest.mark.parametrize("bn_cls", [FrozenBatchNorm2d, MyBN, nn.SyncBatchNorm])
def test_folds_bn_subclasses_and_frozen_bn(bn_cls):
    x = torch.randn(2, 3, 6, 6)
    model, result = fold_pair(nn.Conv2d(3, 4, 3), bn_cls(4), x)
    assert folded_sites(result) == ["linear -> bn"]
    assert result.report.folded[0].pattern == f"Conv2d+{bn_cls.__name__}"
    assert outputs_match(model, result.model, x)


class ClippedRunningNorm(nn.Module):
    """BN-shaped attributes, other semantics: the clip makes the fold wrong."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps = 1e-5

    def forward(self, x):
        y = (x - self.running_mean[:, None, None]) / (
            self.running_var[:, None, None] + self.eps
        ).sqrt()
        return y.clamp(-0.1, 0.1)


def test_duck_typed_module_with_other_semantics_is_refused_before_folding():
    # Its forward is run once on a probe and is not the affine of its buffers: refused
    # before any fold, so also where nothing verifies (inspect).
    x = torch.randn(2, 3, 6, 6)
    model, result = fold_pair(nn.Conv2d(3, 4, 3), ClippedRunningNorm(4), x)
    assert codes_at(result, "linear -> bn") == [Code.PARAMETRIZED]
    assert "not the affine of its buffers" in result.report.refused[0].detail
    assert isinstance(result.model.bn, ClippedRunningNorm)
    assert outputs_match(model, result.model, x)
    report = inspect_module(model, (x,))
    assert report.folded == [] and [r.code for r in report.refused] == [Code.PARAMETRIZED]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_keeps_parameter_dtype(dtype):
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).to(dtype)
    result = fold_module(model, (x,))
    assert folded_sites(result) == ["linear -> bn"]
    assert result.model.linear.weight.dtype == dtype
    assert result.model.linear.bias.dtype == dtype
    assert result.verification.passed


def test_tolerance_comes_from_output_dtype_and_is_reported():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    v64 = fold_module(model, (x,)).verification
    v32 = fold_module(model.float(), (x.float(),)).verification
    assert v64.rtol < v32.rtol
    assert v32.derived and v32.outputs[0].basis.startswith("float32, K=27 over 1 reductions")
    assert v32.samples == 4 and v32.optimization_level == "eager"


def test_explicit_tolerance_and_samples_are_used():
    x = torch.randn(5, 3)
    _, result = fold_pair(nn.Linear(3, 4), nn.BatchNorm1d(4), x, rtol=0.5, samples=6, seed=3)
    assert result.verification.rtol == 0.5
    assert result.verification.samples == 7  # the example inputs plus 6 draws


def test_report_is_json():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    data = json.loads(result.to_json())
    assert data["report"]["front"] == "torch"
    assert data["report"]["refused"][0]["code"] == "nonlinear_input"
    assert data["verification"]["status"] == "passed"


# --- refusals ---------------------------------------------------------------


def test_refuses_training_mode():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert codes_at(result, "linear -> bn") == [Code.TRAINING_MODE]
    assert not result.report.folded and isinstance(result.model.bn, nn.BatchNorm2d)
    # the running stats of the original were not updated by our forwards
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and model.bn.training


def test_refuses_bn_without_running_stats():
    x = torch.randn(4, 3, 6, 6)
    model, result = fold_pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), x)
    assert codes_at(result, "linear -> bn") == [Code.NO_RUNNING_STATS]
    assert outputs_match(model, result.model, x)


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_reused_conv_is_refused_and_outputs_stay_correct():
    model = randomize_bn(ReusedConv())
    x = torch.randn(2, 4, 6, 6)
    result = fold_module(model, (x,))
    assert codes_at(result, "conv -> bn") == [Code.REUSED_MODULE]
    assert outputs_match(model, result.model, x)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y.mean()


def test_refuses_branching_conv_output():
    model = randomize_bn(Branching())
    result = fold_module(model, (torch.randn(2, 3, 6, 6),))
    assert codes_at(result, "conv -> bn") == [Code.BRANCHING]
    assert result.verification.passed and len(result.verification.outputs) == 2


def test_refuses_nonlinearity_between():
    x = torch.randn(2, 3, 6, 6)
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), between=nn.ReLU()))
    result = fold_module(model, (x,))
    assert codes_at(result, "linear -> bn") == [Code.NONLINEAR_INPUT]
    assert outputs_match(model, result.model, x)


class Scaled(nn.Module):
    def forward(self, x):
        return x * 2.0


def test_refuses_other_op_between():
    x = torch.randn(2, 3, 6, 6)
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), between=Scaled()))
    result = fold_module(model, (x,))
    assert codes_at(result, "linear -> bn") == [Code.OP_BETWEEN]
    assert outputs_match(model, result.model, x)


def test_refuses_standalone_bn():
    # Nothing linear before the BN, and a ReLU (not a linear op) after it.
    # (BN -> Conv would fold before the conv: see tests/test_torch_beyond.py.)
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1)))
    result = fold_module(model, (torch.randn(1, 3, 4, 4),))
    assert codes_at(result, "0") == [Code.STANDALONE]


def test_linear_bn1d_on_3d_input_is_refused_and_outputs_stay_correct():
    # BatchNorm1d normalizes axis 1 (time here), not the Linear's features.
    x = torch.randn(2, 6, 6)
    model, result = fold_pair(nn.Linear(6, 6), nn.BatchNorm1d(6), x)
    assert codes_at(result, "linear -> bn") == [Code.NOT_PER_CHANNEL]
    assert isinstance(result.model.bn, nn.BatchNorm1d)
    assert outputs_match(model, result.model, x)


def test_refuses_parametrized_weight():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", Double())
    x = torch.randn(1, 3, 6, 6)
    model, result = fold_pair(conv, nn.BatchNorm2d(4), x)
    assert codes_at(result, "linear -> bn") == [Code.PARAMETRIZED]
    assert outputs_match(model, result.model, x)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


def test_refuses_tied_weight():
    model = randomize_bn(Tied())
    x = torch.randn(3, 4)
    result = fold_module(model, (x,))
    assert codes_at(result, "a -> bn") == [Code.PARAMETRIZED]
    assert result.model.a.weight is result.model.b.weight
    assert outputs_match(model, result.model, x)


class FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


@pytest.mark.parametrize("finder", ["export", "fx", "recorded"])
def test_refuses_weight_read_outside_its_module(finder, monkeypatch):
    if finder != "export":
        monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    if finder == "recorded":
        monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    model = randomize_bn(FunctionalReuse())
    x = torch.randn(1, 3, 6, 6)
    result = fold_module(model, (x,))
    assert codes_at(result, "conv -> bn") == [Code.SHARED_WEIGHT]
    assert outputs_match(model, result.model, x)


def test_refuses_old_style_weight_norm():
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    model = randomize_bn(Pair(conv, nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 6, 6)
    expected = model(x)
    with pytest.raises(BnfoldError, match="inplace=True"):  # its weight cannot be deep-copied
        fold_module(model, (x,))
    result = fold_module(model, (x,), inplace=True)
    assert codes_at(result, "linear -> bn") == [Code.PARAMETRIZED]
    assert torch.allclose(result.model(x), expected)


def test_refuses_hooked_module():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.bn.register_forward_hook(lambda m, i, o: None)
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert codes_at(result, "linear -> bn") == [Code.HOOKED]


def test_refuses_bad_values():
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.bn.running_var[1] = -1.0
    result = fold_module(model, (torch.randn(1, 3, 6, 6),), verify=False)
    assert codes_at(result, "linear -> bn") == [Code.BAD_VALUES]


def test_bn_not_run_on_inputs_is_reported():
    class Unused(Pair):
        def forward(self, x):
            return self.linear(x)

    model = randomize_bn(Unused(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert codes_at(result, "bn") == [Code.UNTRACEABLE]


def test_module_that_cannot_run_raises_bnfold_error():
    model = Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(BnfoldError, match="example inputs"):
        fold_module(model, (torch.randn(1, 5, 6, 6),))


# --- finders ----------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_data_dependent_forward_folds_via_the_recorded_run():
    model = randomize_bn(DataDependent())
    x = torch.randn(2, 3, 6, 6).abs()
    result = fold_module(model, (x,))
    assert folded_sites(result) == ["a.0 -> a.1"]
    assert result.report.folded[0].finder == "recorded"
    # b did not run on x: it is reported, not silently skipped
    assert codes_at(result, "b.1") == [Code.UNTRACEABLE]
    assert outputs_match(model, result.model, x)


def test_sequential_fallback_folds_root_and_checks_linear_rank(monkeypatch):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(trace, "_fx_graph", lambda *a: 1 / 0)
    monkeypatch.setattr(recorded, "record_run", lambda *a: 1 / 0)
    model = randomize_bn(nn.Sequential(nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6)))
    x = torch.randn(2, 6, 6)
    result = fold_module(model, (x,))
    assert [(f.site, f.finder) for f in result.report.folded] == [("0 -> 1", "sequential")]
    model3d = randomize_bn(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)))
    assert codes_at(fold_module(model3d, (x,)), "0 -> 1") == [Code.NOT_PER_CHANNEL]


class ReusedAfterBn(nn.Module):
    """relu, bn, conv in a Sequential, the conv also called on its own."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return self.seq(x) + self.seq[2](x)


def test_sequential_fallback_reports_a_bn_once_when_the_before_refusal_leads(monkeypatch):
    # The after refusal (nonlinear input) lets the before one (the conv is reused)
    # lead, and its label ends in the conv, not the BN.
    use("sequential", monkeypatch)
    result = fold_module(randomize_bn(ReusedAfterBn()), (torch.randn(1, 4, 5, 5),))
    refusals = [(r.site, r.code) for r in result.report.refused]
    assert refusals == [("seq.1 -> seq.2", Code.REUSED_MODULE)]


def test_fx_finder_is_used_when_export_fails(monkeypatch):
    def no_export(*_args):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(trace, "_export_graph", no_export)
    model = randomize_bn(ReusedConv())
    x = torch.randn(1, 4, 5, 5)
    result = fold_module(model, (x,))
    assert codes_at(result, "conv -> bn") == [Code.REUSED_MODULE]
    model2, result2 = fold_pair(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), torch.randn(1, 3, 6, 6))
    assert [f.finder for f in result2.report.folded] == ["fx"]
    assert outputs_match(model2, result2.model, torch.randn(1, 3, 6, 6))


def test_fx_finder_sees_op_between(monkeypatch):
    monkeypatch.setattr(trace, "_export_graph", lambda *a: 1 / 0)
    model = randomize_bn(Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), between=nn.GELU()))
    result = fold_module(model, (torch.randn(1, 3, 6, 6),))
    assert codes_at(result, "linear -> bn") == [Code.NONLINEAR_INPUT]


# --- verification and rollback ----------------------------------------------


def test_corrupted_fold_is_rolled_back_and_others_kept(monkeypatch):
    model = randomize_bn(ResNetLike())
    work = copy.deepcopy(model)
    target = work.layer1[0].bn2
    real = eager.bn_affine

    def corrupt_one(bn):
        affine = real(bn)
        return type(affine)(affine.scale * 1.5, affine.shift) if bn is target else affine

    monkeypatch.setattr(eager, "bn_affine", corrupt_one)
    x = torch.randn(2, 3, 16, 16)
    result = fold_module(work, (x,), inplace=True)
    site = "layer1.0.conv2 -> layer1.0.bn2"
    assert codes_at(result, site) == [Code.VERIFICATION_FAILED]
    # Folded in place: the original was exported before the fold, and the proof of the
    # fold against it names the wrong site before anything is sampled.
    assert result.report.refused[0].detail.startswith("the proof found a difference")
    assert result.model.layer1[0].bn2 is target
    assert len(result.report.folded) == count_bn(model) - 1
    assert result.verification.passed
    assert outputs_match(model, result.model, x)


# --- whole models -----------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 16, 2, 3),
            InvertedResidual(16, 16, 1, 2),
        )
        self.head = nn.Sequential(
            nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Hardswish(), nn.Linear(12, 5)
        )

    def forward(self, x):
        x = self.blocks(nn.functional.hardswish(self.stem(x)))
        return self.head(x.mean((2, 3)))


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("cls", [ResNetLike, MobileNetLike])
def test_whole_model_folds_every_bn(cls):
    model = randomize_bn(cls())
    x = torch.randn(2, 3, 16, 16)
    result = fold_module(model, (x,))
    assert result.report.refused == []
    assert len(result.report.folded) == count_bn(model)
    assert count_bn(result.model) == 0
    assert result.report.ops_after["Identity"] == count_bn(model)
    assert outputs_match(model, result.model, torch.randn(2, 3, 16, 16), tol=1e-4)


def test_inspect_reports_without_changing_the_module():
    model = randomize_bn(ResNetLike())
    report = inspect_module(model, (torch.randn(1, 3, 16, 16),))
    assert report.dry_run and report.summary().startswith("would fold 10")
    assert len(report.folded) == count_bn(model)
    assert count_bn(model) == 10  # still BatchNorms: inspect folded a copy


def test_import_bnfold_works_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import bnfold, bnfold.torch_front\n"
        "try:\n"
        "    bnfold.torch_front.require_torch()\n"
        "except bnfold.NotSupportedError as e:\n"
        "    assert 'bnfold[torch]' in str(e)\n"
        "else:\n"
        "    raise AssertionError('torch counted as installed')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
