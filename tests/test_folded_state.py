"""A folded ``.pt`` loads back into a freshly built model: ``bnfold.load_folded``.

The fold's record (BNs become Identity or their lowered module, linear modules
gain a bias) travels in the file; ``torch.load(weights_only=True)`` reads it;
plain ``load_state_dict(strict=True)`` on a fresh model fails loudly.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.torch_front.folded_state import RECORD_ATTRIBUTE  # noqa: E402
from tests.test_torch_io import FACTORY  # noqa: E402
from tests.torch_standins import randomize_bn  # noqa: E402


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d, as buffers: folded by the torch front like a BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.eps = 1e-5
        for name, init in (("weight", torch.ones), ("bias", torch.zeros)):
            self.register_buffer(name, init(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Net(nn.Module):
    """Every structural change a fold makes: BN -> Identity (after a bias-free conv, after a
    join, a frozen BN, a BN1d after a Linear) and a standalone BN lowered."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, bias=False)
        self.join_bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = FrozenBN(8)
        self.lone_bn = nn.BatchNorm2d(8)  # after a ReLU with no linear after it: cannot fold
        self.fc = nn.Linear(8, 5, bias=False)
        self.fc_bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.join_bn(self.a(x) + self.b(x)))
        x = self.lone_bn(torch.relu(self.frozen(self.c(x))))
        return self.fc_bn(self.fc(x.mean((2, 3))))


def _trained(seed: int) -> Net:
    with torch.random.fork_rng():  # the other tests' draws stay as they were
        torch.manual_seed(seed)
        net = randomize_bn(Net())
    gen = torch.Generator().manual_seed(seed)
    frozen = net.frozen
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).copy_(torch.randn(8, generator=gen))
    frozen.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return net.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lower", ["mul-add", "conv"])
def test_fold_save_and_load_into_a_fresh_model(tmp_path, lower):
    result = bnfold.fold(_trained(0), (X,), lower_standalone=lower)
    folded_bns = {f.affine for f in result.report.folded}
    assert folded_bns == {"stem_bn", "join_bn", "frozen", "fc_bn"}
    assert [low.site for low in result.report.lowered] == ["lone_bn"]
    path = bnfold.save_folded(result, tmp_path / "folded.pt")

    fresh = _trained(1)  # the same class, other weights: everything must come from the file
    assert bnfold.load_folded(fresh, path) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(X), result.model(X))
        torch.testing.assert_close(fresh(X), _trained(0)(X), rtol=1e-4, atol=1e-4)
    assert isinstance(fresh.stem_bn, nn.Identity) and fresh.stem.bias is not None
    assert not fresh.training and not fresh.lone_bn.training


def test_the_file_is_a_weights_only_state_dict_with_the_folded_keys(tmp_path):
    result = bnfold.fold(_trained(0), (X,))
    path = bnfold.save_folded(result, tmp_path / "folded.pt")
    state = torch.load(path, weights_only=True)
    assert list(state) == list(result.model.state_dict())
    record = getattr(state, RECORD_ATTRIBUTE)
    assert record["replaced"] == {
        "stem_bn": "identity", "join_bn": "identity", "frozen": "identity", "fc_bn": "identity"
    }  # fmt: skip
    assert record["biased"] == ["a", "b", "c", "fc", "stem"]
    json.dumps(record)  # plain data


def test_plain_load_state_dict_fails_loudly_on_a_fresh_model(tmp_path):
    path = bnfold.save_folded(bnfold.fold(_trained(0), (X,)), tmp_path / "folded.pt")
    fresh = _trained(1)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(torch.load(path, weights_only=True))


def test_plain_load_state_dict_works_into_the_folded_shape(tmp_path):
    result = bnfold.fold(_trained(0), (X,))
    path = bnfold.save_folded(result, tmp_path / "folded.pt")
    shaped = bnfold.load_folded(_trained(1), path)  # the folded architecture, by any means
    shaped.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(shaped(X), result.model(X))


def test_loading_twice_is_harmless(tmp_path):
    result = bnfold.fold(_trained(0), (X,), lower_standalone="mul-add")
    path = bnfold.save_folded(result, tmp_path / "folded.pt")
    model = bnfold.load_folded(bnfold.load_folded(_trained(1), path), path)
    with torch.no_grad():
        assert torch.equal(model(X), result.model(X))


def test_a_model_that_does_not_fit_is_refused_and_left_as_it_was(tmp_path):
    path = bnfold.save_folded(bnfold.fold(_trained(0), (X,)), tmp_path / "folded.pt")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BnfoldError, match="stem_bn"):
        bnfold.load_folded(other, path)
    after = other.state_dict()
    assert after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )
    assert type(other[1]) is nn.BatchNorm2d


def test_a_strict_mismatch_after_the_changes_undoes_them(tmp_path):
    path = bnfold.save_folded(bnfold.fold(_trained(0), (X,)), tmp_path / "folded.pt")
    model = _trained(1)
    model.fc = nn.Linear(8, 6, bias=False)  # same paths, another shape
    model.fc_bn = nn.BatchNorm1d(6)
    with pytest.raises(BnfoldError, match=r"does not fit the model: .*size mismatch"):
        bnfold.load_folded(model, path)
    assert type(model.stem_bn) is nn.BatchNorm2d and model.stem.bias is None


def test_a_plain_state_dict_is_refused_with_the_fix(tmp_path):
    torch.save(_trained(0).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(BnfoldError, match=r"no fold record.*load_state_dict"):
        bnfold.load_folded(_trained(1), tmp_path / "plain.pt")


def test_an_onnx_fold_is_not_saved_as_a_pt(tmp_path, samples):
    result = bnfold.fold(samples / "conv2d_bn.onnx")
    with pytest.raises(BnfoldError, match=r"eager nn\.Module"):
        bnfold.save_folded(result, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_cli_pt_output_loads_with_load_folded_and_as_weights(cli, tmp_path, monkeypatch):
    with torch.random.fork_rng():  # the factory seeds torch's global generator
        (tmp_path / "pt_factory.py").write_text(FACTORY)
        monkeypatch.syspath_prepend(str(tmp_path))
        import pt_factory  # type: ignore[import-not-found]

        weights, out = tmp_path / "w.pt", tmp_path / "folded.pt"
        original = randomize_bn(pt_factory.make())
        torch.save(original.state_dict(), weights)
        common = ["--module", "pt_factory:make", "--input-shape", "1x3x8x8"]
        assert cli(["fold", *common, "--weights", weights, "-o", out]).exit_code == 0
        fresh = bnfold.load_folded(pt_factory.make(), out)
        with torch.no_grad():
            torch.testing.assert_close(fresh(X), original(X), rtol=1e-5, atol=1e-5)
        # --weights takes the folded file too: the factory's module gets the fold first.
        inspected = cli(["inspect", *common, "--weights", out, "--json"])
        assert inspected.exit_code == 0, inspected.output
        assert json.loads(inspected.output)["batchnorm"]["found"] == 0
