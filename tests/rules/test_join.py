"""The join family: a BN after an add or a channel concat splits over the joined ops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.core.affine import Affine
from bnfold.report import Code
from bnfold.rules.join import JoinSpec, axis_refusal


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    kind=st.sampled_from(["add", "cat"]),
    seed=st.integers(0, 2**16),
)
def test_the_parts_applied_to_each_term_make_the_affine_of_the_join(
    widths: list[int], kind: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    join = JoinSpec("j", kind, tuple(widths if kind == "cat" else [widths[0]] * len(widths)))  # type: ignore[arg-type]
    affine = Affine(rng.uniform(0.5, 2, join.bn_channels), rng.normal(size=join.bn_channels))
    terms = [rng.normal(size=(3, c)) for c in join.channels]
    parts = join.parts(affine)
    folded = [term * part.scale + part.shift for term, part in zip(terms, parts, strict=True)]
    joined = np.concatenate(terms, axis=1) if kind == "cat" else sum(terms)
    together = np.concatenate(folded, axis=1) if kind == "cat" else sum(folded)
    np.testing.assert_allclose(together, joined * affine.scale + affine.shift, atol=1e-12)


@pytest.mark.parametrize(("dim", "rank", "joins"), [(1, 4, True), (-3, 4, True), (2, 4, False),
                                                    (-3, None, False), (-1, 2, True)])  # fmt: skip
def test_a_concat_joins_channels_only_over_axis_one(
    dim: int, rank: int | None, joins: bool
) -> None:
    join = JoinSpec("Concat 'c'", "cat", (2, 2), dim, rank)
    assert join.joins_channels() is joins
    assert (axis_refusal(join) is None) is joins


def test_an_add_of_other_widths_does_not_agree() -> None:
    assert not JoinSpec("a", "add", (4, 8)).widths_agree()
    assert JoinSpec("c", "cat", (4, 8)).widths_agree()
    assert axis_refusal(JoinSpec("c", "cat", (4,), 2, 4)) == (
        Code.NOT_PER_CHANNEL, "c joins axis 2, not the channels"
    )  # fmt: skip
