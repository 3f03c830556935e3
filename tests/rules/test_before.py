"""The before family: a shift folds into a bias before a conv exactly when no zero
padding or transposed border keeps it out."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.core import layouts
from bnfold.core.affine import Affine, fold_before
from bnfold.report import Code
from bnfold.rules.before import exact_before

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    padding=st.integers(0, 1),
    transposed=st.booleans(),
    shifted=st.booleans(),
)
def test_a_fold_before_is_exact_exactly_when_the_rule_lets_it(
    seed: int, padding: int, transposed: bool, shifted: bool
) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(1, 3, 6, 6)))
    scale, shift = rng.uniform(0.5, 2, 3), rng.normal(size=3) if shifted else np.zeros(3)
    affine = Affine(scale, shift)
    if transposed:
        weight = rng.normal(size=(3, 2, 3, 3))
        layout = layouts.conv_transpose(1)

        def op(v: torch.Tensor, w: np.ndarray, b: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy
            return F.conv_transpose2d(v, t(w), t(b), padding=padding)
    else:
        weight = rng.normal(size=(2, 3, 3, 3))
        layout = layouts.conv()

        def op(v: torch.Tensor, w: np.ndarray, b: np.ndarray) -> torch.Tensor:
            return F.conv2d(v, torch.from_numpy(w), torch.from_numpy(b), padding=padding)

    bias = rng.normal(size=2)
    new_w, new_b = fold_before(weight, bias, affine, layout)
    s, t = (torch.from_numpy(a).view(1, -1, 1, 1) for a in (scale, shift))
    exact = torch.allclose(op(x, new_w, new_b), op(s * x + t, weight, bias), atol=1e-10)
    padded = padding > 0 and not transposed
    assert (exact_before(shift, "op", transposed=transposed, zero_padded=padded) is None) == exact


def test_zero_padding_is_worded_with_the_ops_and_the_affines_names() -> None:
    shift = np.array([0.0, 0.5])
    padded = exact_before(shift, "Conv2d", transposed=False, zero_padded=True, affine_name="BN")
    assert padded == (
        Code.ZERO_PADDING, "Conv2d pads with zeros: the borders would see the BN's shift, not zeros"
    )  # fmt: skip
    found = exact_before(shift, "ConvTranspose", transposed=True, zero_padded=False)
    assert found is not None and "border outputs receive fewer taps" in found[1]
