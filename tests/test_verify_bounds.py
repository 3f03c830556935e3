"""Bounds that hold for correct folds and still catch wrong ones; a proof before sampling.

The derived bound is a tail bound (no false alarm on tiny tensors); where a
network amplifies rounding past it, calibration against one-ulp nudges of the
original widens it; a certificate that proves the folds lets differences within a
rounding envelope pass, never gross ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper, numpy_helper

import bnfold
from bnfold.options import VerifyOptions
from bnfold.verification import verify_onnx
from bnfold.verification.calibrate import nudged
from bnfold.verification.cones import Cones
from bnfold.verification.tolerance import Reductions, derived_rtol
from bnfold.verification.verdict import PROOF_ENVELOPE, Compared, SiteValue, TensorDiff, judge
from tests.test_verify_evidence import _plant, conv_net


@dataclass(frozen=True)
class StubCertificate:
    """Stands in for bnfold.proof's Certificate: the verdict reads ``holds`` and ``refuted``."""

    holds: bool
    refuted: bool = False


def _diff(max_abs: float, scale: float = 1.0) -> TensorDiff:
    return TensorDiff(max_abs, scale, "float32", 1000, lowest=-scale, highest=scale)


def _bound() -> float:
    return derived_rtol("float32", Reductions(), 1000)


# --- the derived bound --------------------------------------------------------------


def test_derived_bound_is_a_tail_bound_not_below_rounding_on_one_element():
    """A 1x1 Linear + BN's correct fold reached 2.8 rounding units on some seeds."""
    u = 2.0**-24
    assert derived_rtol("float32", Reductions(), 1) > 4 * u
    assert derived_rtol("float32", Reductions(), 10**6) < 1e-5


# --- calibration ---------------------------------------------------------------------


@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(width=32, allow_nan=True)))
def test_nudged_moves_every_nonzero_finite_value_by_one_ulp(values):
    out = nudged(values, np.random.default_rng(0))
    assert out.dtype == values.dtype
    keep = ~np.isfinite(values) | (values == 0)
    assert np.array_equal(out[keep], values[keep], equal_nan=True)
    up, down = np.nextafter(values, np.inf), np.nextafter(values, -np.inf)
    overflow = (out == values) & ~(np.isfinite(up) & np.isfinite(down))  # left at the edge
    assert np.all(((out == up) | (out == down) | overflow)[~keep])


def saturated_net(tmp_path: Path) -> Path:
    """conv_net whose relu output is shifted deep into a sigmoid's tail: the outputs are
    ~1e-6, where onnxruntime's sigmoid has an absolute error of about 1e-7, and a
    correct fold's output goes past any bound derived from reductions alone."""
    model = conv_net()
    model.graph.node[-1].output[0] = "r2"
    model.graph.initializer.append(numpy_helper.from_array(np.array(-14.0, np.float32), "shift"))
    model.graph.node.extend(
        [
            helper.make_node("Add", ["r2", "shift"], ["logit"], name="shift"),
            helper.make_node("Sigmoid", ["logit"], ["output"], name="sigmoid"),
        ]
    )
    path = tmp_path / "saturated.onnx"
    onnx.save(model, path)
    return path


def test_rounding_the_network_amplifies_is_calibrated_and_a_wrong_fold_still_fails(tmp_path, cli):
    src, out = saturated_net(tmp_path), tmp_path / "out.onnx"
    result, written = bnfold.api.fold_file(src, out)
    verification = result.verification
    assert written and verification.passed, verification.summary()
    (output,) = verification.outputs
    assert "calibrated" in output.basis and output.max_rel > output.rtol / 1e3
    bad = _plant(out, "conv1", "scale", np.float32)
    payload = json.loads(cli(["verify", src, bad, "--json"]).stdout)
    assert payload["status"] == "failed"
    failed = [s["site"] for s in payload["sites"] if not s["passed"]]
    assert failed[0] == "bn1 (BatchNormalization)"  # and what follows it


# --- proof first, sampling second ------------------------------------------------------


def _judged(site_excess: float, certificate: StubCertificate | None):
    site = (SiteValue("s", "conv -> bn"), _diff(site_excess * _bound()))
    output = ("y", _diff(site_excess * _bound()))
    return judge(
        Compared([output], [site]), Cones(), VerifyOptions(), samples=3, level="ORT", inputs="x",
        certificate=certificate,
    )


def test_a_holding_certificate_lets_rounding_beyond_the_bound_pass():
    result = _judged(10.0, StubCertificate(holds=True))
    assert result.passed and result.proven
    assert {r.judged_by for r in result.outputs + result.sites} == {"proof"}
    assert "within the rounding envelope of proven folds" in result.summary()


@pytest.mark.parametrize(
    ("excess", "certificate"),
    [
        (10.0, None),
        (10.0, StubCertificate(holds=False)),
        (PROOF_ENVELOPE * 10, StubCertificate(True)),
    ],
    ids=["no_certificate", "certificate_fails", "gross_difference"],
)
def test_without_a_holding_proof_or_past_the_envelope_it_fails(excess, certificate):
    assert not _judged(excess, certificate).passed


def test_verify_onnx_takes_a_certificate(tmp_path):
    """A fold off by 2e-5 in one channel: beyond its bound, within a proof's envelope;
    off by 1e-3 it is gross, whatever the certificate says."""
    src = tmp_path / "conv.onnx"
    onnx.save(conv_net(), src)
    folded = tmp_path / "folded.onnx"
    bnfold.api.fold_file(src, folded)
    model = ir.load(folded)
    node = next(n for n in model.graph if n.name == "conv1")
    weights = node.inputs[1].const_value.numpy().copy()
    weights[1] *= 1 + 2e-5
    node.inputs[1].const_value = ir.tensor(weights, name=node.inputs[1].name)
    slightly = tmp_path / "slightly.onnx"
    ir.save(model, slightly)
    assert not verify_onnx(src, slightly).passed
    proven = verify_onnx(src, slightly, certificate=StubCertificate(holds=True))
    assert proven.passed and proven.proven
    gross = _plant(folded, "conv1", "scale", np.float32)
    assert not verify_onnx(src, gross, certificate=StubCertificate(holds=True)).passed
