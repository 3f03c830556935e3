"""bnfold.conv_geometry: a kernel it calls centred reads the same taps, zero-padded."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.affine import centred_kernel
from bnfold.conv_geometry import first_mismatch, off_centre_axis, same_pads

torch = pytest.importorskip("torch")
F = torch.nn.functional


def conv(x, w, pads: tuple[int, ...], dilation: int):  # type: ignore[no-untyped-def]
    """2-D conv with ONNX-ordered pads (top, left, bottom, right)."""
    top, left, bottom, right = pads
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, dilation=dilation)


@settings(max_examples=60, deadline=None)
@given(
    small=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    grow=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
    large_pads=st.tuples(*[st.integers(0, 5)] * 4),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_a_centred_kernel_computes_what_the_small_one_did(
    small, grow, pads, large_pads, dilation, seed
) -> None:  # type: ignore[no-untyped-def]
    large = (small[0] + 2 * grow[0], small[1] + 2 * grow[1])
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(1, 2, 9, 9)))
    w = rng.normal(size=(3, 2, *small))
    padded = torch.from_numpy(centred_kernel(w, large))
    centred = tuple(p + grow[i % 2] * dilation for i, p in enumerate(pads))
    for target in (centred, large_pads):
        if off_centre_axis(small, pads, large, target, (dilation, dilation)) is None:
            want = conv(x, torch.from_numpy(w), pads, dilation)
            torch.testing.assert_close(conv(x, padded, target, dilation), want)
    assert off_centre_axis(small, pads, large, centred, (dilation, dilation)) is None


def test_uneven_growth_or_pads_are_off_centre() -> None:
    assert off_centre_axis((1, 1), (0, 0, 0, 0), (2, 3), (0, 1, 1, 1), (1, 1)) == 0
    assert off_centre_axis((1, 1), (0, 0, 0, 0), (3, 3), (1, 1, 1, 0), (1, 1)) == 1
    assert off_centre_axis((3, 1), (1, 0, 1, 0), (1, 3), (0, 1, 0, 1), (1, 1)) == 0


@pytest.mark.parametrize(("k", "d"), [(1, 1), (2, 1), (3, 2), (4, 3)])
def test_same_pads_are_torchs(k: int, d: int) -> None:
    x, w = torch.randn(1, 2, 8, 7), torch.randn(3, 2, k, k)
    pads = same_pads((k, k), (d, d))
    torch.testing.assert_close(conv(x, w, pads, d), F.conv2d(x, w, padding="same", dilation=d))


def test_first_mismatch_names_the_property() -> None:
    expected = {"strides": (1, 1), "groups": 1}
    assert first_mismatch(expected, {"strides": (1, 1), "groups": 2}) == ("groups", 2, 1)
    assert first_mismatch(expected, dict(expected)) is None
