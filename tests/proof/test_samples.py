"""Every bundled sample model, folded (and lowered), is proven for all inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnfold.proof import prove_onnx
from tests.proof.folding import SAMPLES, fold

MODELS = sorted(SAMPLES.glob("*.onnx")) + sorted((SAMPLES / "external_data").glob("*.onnx"))


@pytest.mark.parametrize("lower", [None, "mul-add", "conv"])
@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_sample_fold_is_proven(path: Path, lower: str | None) -> None:
    folded, report = fold(path, lower)
    certificate = prove_onnx(path, folded, report)
    assert certificate.holds, certificate.summary()
    assert certificate.rest_unchanged and not certificate.differences
    # Every node the fold removed or rewrote lies in a proven site.
    covered = {n for site in certificate.sites for n in site.original_nodes}
    for entry in report.folded:
        assert entry.affine in covered, (entry.site, certificate.summary())
    for entry in report.lowered:
        assert entry.site in covered, (entry.site, certificate.summary())
    if not report.folded and not report.lowered:
        assert certificate.sites == []
        assert certificate.headline() == "proven for all inputs: nothing changed"


def test_sites_are_named_from_the_report() -> None:
    path = SAMPLES / "resnet_tiny.onnx"
    folded, report = fold(path)
    certificate = prove_onnx(path, folded, report)
    assert sorted(s.name for s in certificate.sites) == sorted(f.site for f in report.folded)
    assert {s.kind for s in certificate.sites} == {"adjacent"}


def test_sites_are_named_from_the_graph_without_a_report() -> None:
    path = SAMPLES / "chain_conv_bn_mul_add.onnx"
    folded, _ = fold(path)
    certificate = prove_onnx(path, folded)
    (site,) = certificate.sites
    assert site.name == "conv1 -> bn1 -> mul1 -> add1"
    assert site.original_nodes == ["conv1", "bn1", "mul1", "add1"]
    assert site.folded_nodes == ["conv1"]


def test_ir3_initializer_inputs_are_stated_as_an_assumption() -> None:
    path = SAMPLES / "old_opset_bn.onnx"
    folded, report = fold(path)
    certificate = prove_onnx(path, folded, report)
    assert certificate.holds
    assert any("IR < 4" in a for a in certificate.assumptions)


def test_default_epsilon_is_the_float32_one() -> None:
    """A BatchNormalization without ``epsilon`` adds 1e-5 as the float32 attribute holds
    it, as runtimes and the fold do; in float64 the difference shows (1e8 ulp at var 1e-6)."""
    import numpy as np
    import onnx

    from tests.builders import conv_bn, model

    nodes, inits = conv_bn(dtype=np.float64, var=np.full(4, 1e-6))
    assert not nodes[1].attribute
    m = model(nodes, inits, [("input", [1, 3, 8, 8])], ["output"], dtype=onnx.TensorProto.DOUBLE)
    folded, report = fold(m)
    certificate = prove_onnx(m, folded, report)
    assert certificate.holds, certificate.summary()
    assert certificate.worst_ulp < 10  # float64 evaluation slack; the old default: 1e8
