"""The batch_merge family: merging a channel-last op's leading axes keeps its channels
exactly when the 2-D result has them as its second axis."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.report import Code
from bnfold.rules.batch_merge import channels_refusal, shapes_refusal


@settings(max_examples=60, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=2, max_size=3), c=st.integers(1, 6),
       x=st.integers(1, 8), seed=st.integers(0, 2**16))  # fmt: skip
def test_the_merge_is_refused_exactly_when_a_channel_affine_would_differ(
    lead: list[int], c: int, x: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(*lead, c))
    if y.size % x:
        return  # no such 2-D reshape
    merged = (y.size // x, x)
    found = shapes_refusal(merged, y.shape, "flatten", "linear's output")
    if x != c:
        assert found is not None and found[0] is Code.MERGE_MOVES_CHANNEL
        return
    assert found is None
    scale, shift = rng.normal(size=c), rng.normal(size=c)
    np.testing.assert_allclose(
        (y.reshape(merged) * scale + shift).reshape(y.shape), y * scale + shift
    )


def test_without_shapes_the_bn_must_have_the_ops_channels() -> None:
    assert channels_refusal(8, 8, "Reshape 'r'", "MatMul") is None
    assert channels_refusal(4, 8, "Reshape 'r'", "MatMul") == (
        Code.MERGE_MOVES_CHANNEL,
        "Reshape 'r' makes MatMul's output 2-D with 4 BatchNorm channels, "
        "not its 8 output channels",
    )
