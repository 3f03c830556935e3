"""The adjacent family's checks: per-channel constants, a BN's shapes, why nothing folds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.report import Code
from bnfold.rules.adjacent import Feed, channel_vector, stats_fit, why_unpaired


@settings(max_examples=80, deadline=None)
@given(
    channels=st.integers(2, 5),
    rank=st.integers(2, 4),
    leading=st.integers(0, 3),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_per_channel_constant_broadcasts_as_its_vector(
    channels: int, rank: int, leading: int, per_channel: bool, seed: int
) -> None:
    """Wherever the vector is found, multiplying by it per channel is multiplying by the
    constant; a constant that would grow the output is never one."""
    rng = np.random.default_rng(seed)
    ndim = min(leading + 1 + rank - 2, rank + 1)  # may exceed the output's rank by one
    shape = [1] * ndim
    channel_pos = ndim - (rank - 1)
    if per_channel and 0 <= channel_pos < ndim:
        shape[channel_pos] = channels
    constant = rng.normal(size=shape).astype(np.float32)
    output = rng.normal(size=(2, channels, *[3] * (rank - 2)))
    vector = channel_vector(constant, channels, rank, rank - 1)
    if ndim > rank:
        assert vector is None
        return
    assert vector is not None and vector.dtype == np.float64
    per_axis = vector.reshape(1, channels, *[1] * (rank - 2))
    np.testing.assert_array_equal(output * constant, output * per_axis)


@pytest.mark.parametrize("shape", [(4, 3), (1, 3, 1, 1), (2, 1, 1)])
def test_a_constant_over_other_axes_or_channels_is_not_per_channel(shape: tuple[int, ...]) -> None:
    assert channel_vector(np.ones(shape, np.float32), 4, 4, 3) is None


def test_an_integer_constant_is_never_folded() -> None:
    assert channel_vector(np.ones((4, 1, 1), np.int64), 4, 4, 3) is None


def test_stats_fit_names_the_first_parameter_of_another_shape() -> None:
    shapes = [("bn.weight", (4,)), ("bn.running_mean", (5,)), ("bn.running_var", (3,))]
    assert stats_fit(shapes, 4) == (Code.BAD_SHAPE, "bn.running_mean has shape (5,), want (4,)")
    assert stats_fit(shapes[:1], 4) is None


def test_why_unpaired_tells_a_nonlinearity_from_nothing_linear() -> None:
    relu = why_unpaired(Feed("Relu 'r'", nonlinear=True))
    assert relu == (
        Code.NONLINEAR_INPUT,
        "input comes from Relu 'r'; a BatchNorm cannot be folded across a nonlinearity",
    )
    graph_input = why_unpaired(Feed("a graph input", nonlinear=False))
    assert graph_input[0] is Code.STANDALONE and "not a linear op" in graph_input[1]


def test_why_unpaired_names_the_ops_between_a_linear_op_and_the_bn() -> None:
    """A chain walked back to a linear op: nonlinear if any op on it is (the torch fronts)."""
    chain = Feed("view", False, between=("view", "relu"), linear="conv", affine="bn",
                 through_nonlinear=True)  # fmt: skip
    assert why_unpaired(chain) == (Code.NONLINEAR_INPUT, "relu -> view between conv and bn")
    plain = Feed("view", False, between=("view",), linear="conv", affine="bn")
    assert why_unpaired(plain)[0] is Code.OP_BETWEEN
