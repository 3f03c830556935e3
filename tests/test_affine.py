"""Properties of the fold math core, checked against the unfolded computation in numpy."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import layouts
from bnfold.affine import Affine, Unfoldable, bn_to_affine, fold_after, fold_before
from bnfold.layouts import LayoutError

channels = st.integers(1, 8)
eps_values = st.floats(1e-6, 1e-2)


def random_bn(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.normal(0, 0.5, c)
    mean = rng.normal(0, 0.5, c)
    var = rng.uniform(0.1, 2.0, c)
    return gamma, beta, mean, var


@given(c=channels, eps=eps_values, seed=st.integers(0, 2**16))
def test_bn_to_affine_matches_batchnorm(c: int, eps: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gamma, beta, mean, var = random_bn(rng, c)
    x = rng.normal(size=(5, c))
    affine = bn_to_affine(gamma, beta, mean, var, eps)
    expected = gamma * (x - mean) / np.sqrt(var + eps) + beta
    np.testing.assert_allclose(affine.scale * x + affine.shift, expected, rtol=1e-12, atol=1e-12)


@given(c_out=channels, k=st.integers(1, 6), has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fold_after_matches_linear_then_affine(
    c_out: int, k: int, has_bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c_out, k))
    b = rng.normal(size=c_out) if has_bias else None
    affine = Affine.of(rng.uniform(0.5, 2, c_out), rng.normal(size=c_out), c_out)
    x = rng.normal(size=(k, 3))
    linear_out = w @ x + (b[:, None] if b is not None else 0.0)
    expected = affine.scale[:, None] * linear_out + affine.shift[:, None]
    new_w, new_b = fold_after(w, b, affine, layouts.linear())
    np.testing.assert_allclose(new_w @ x + new_b[:, None], expected, rtol=1e-12, atol=1e-12)


@given(
    groups=st.integers(1, 4),
    c_in_per_group=st.integers(1, 3),
    c_out_per_group=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_conv_transpose_layout_scales_each_groups_output_channels(
    groups: int, c_in_per_group: int, c_out_per_group: int, seed: int
) -> None:
    """Scaling the weight must equal scaling output channel g*Cout_g + j of every group."""
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * c_in_per_group, groups * c_out_per_group
    w = rng.normal(size=(c_in, c_out_per_group, 2))
    scale = rng.uniform(0.5, 2.0, c_out)
    scaled = w * layouts.conv_transpose(groups).expand(scale, w.shape)
    for g in range(groups):
        rows = slice(g * c_in_per_group, (g + 1) * c_in_per_group)
        for j in range(c_out_per_group):
            np.testing.assert_allclose(scaled[rows, j], w[rows, j] * scale[g * c_out_per_group + j])


@given(trans_b=st.booleans(), n=channels, k=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gemm_layout_follows_trans_b(trans_b: bool, n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b_mat = rng.normal(size=(n, k) if trans_b else (k, n))
    a = rng.normal(size=(3, k))
    affine = Affine.of(rng.uniform(0.5, 2, n), rng.normal(size=n), n)
    new_b, new_c = fold_after(b_mat, None, affine, layouts.gemm(trans_b))

    def gemm(m: np.ndarray) -> np.ndarray:
        return a @ (m.T if trans_b else m)

    expected = affine.scale * gemm(b_mat) + affine.shift
    np.testing.assert_allclose(gemm(new_b) + new_c, expected, rtol=1e-10, atol=1e-12)


def test_fold_casts_once_to_the_model_dtype() -> None:
    w = np.array([[1.0, 2.0]], dtype=np.float16)
    new_w, new_b = fold_after(w, None, Affine.of(3.0, 0.5, 1), layouts.conv())
    assert new_w.dtype == np.float16 and new_b.dtype == np.float16


@settings(max_examples=50)
@given(seed=st.integers(0, 2**16))
def test_float64_fold_is_closer_than_a_fold_in_fp16(seed: int) -> None:
    """The point of computing in float64: error against the exact fold is never worse."""
    rng = np.random.default_rng(seed)
    c = 16
    w = rng.normal(size=(c, 8)).astype(np.float16)
    gamma, beta, mean, _ = random_bn(rng, c)
    var = rng.uniform(1e-4, 1e-3, c)  # tiny variance: large scale, where fp16 drifts
    affine = bn_to_affine(gamma, beta, mean, var, 1e-5)
    exact = w.astype(np.float64) * affine.scale[:, None]
    ours, _ = fold_after(w, None, affine, layouts.conv())
    naive = w * affine.scale.astype(np.float16)[:, None]
    assert np.abs(ours - exact).max() <= np.abs(naive - exact).max()


def test_bfloat16_weights_stay_bfloat16() -> None:
    w = np.ones((2, 3), dtype=ml_dtypes.bfloat16)
    new_w, _ = fold_after(w, None, Affine.of([2.0, 4.0], 0.0, 2), layouts.conv())
    assert new_w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(new_w.astype(np.float32), [[2, 2, 2], [4, 4, 4]])


@pytest.mark.parametrize(
    ("mean", "var", "message"),
    [
        ([np.nan, 0.0], [1.0, 1.0], "mean is not finite"),
        ([0.0, 0.0], [1.0, np.inf], "var is not finite"),
        ([0.0, 0.0], [1.0, -1.0], "var + eps <= 0"),
    ],
)
def test_unfoldable_values_are_refused(mean: list[float], var: list[float], message: str) -> None:
    with pytest.raises(Unfoldable, match=re.escape(message)):
        bn_to_affine(np.ones(2), np.zeros(2), np.array(mean), np.array(var), 1e-5)


def test_fp16_overflow_is_refused() -> None:
    w = np.full((1, 1), 60000.0, dtype=np.float16)
    with pytest.raises(Unfoldable, match="overflows float16"):
        fold_after(w, None, Affine.of(10.0, 0.0, 1), layouts.conv())


def test_layout_rejects_wrong_channel_count() -> None:
    with pytest.raises(LayoutError):
        layouts.conv().expand(np.ones(3), (4, 2, 3, 3))


def grouped_conv_1x1(w: np.ndarray, x: np.ndarray, groups: int) -> np.ndarray:
    """Reference 1x1 Conv, weight (C_out, C_in/g, 1): y[o] = sum_i w[o, i] x[g(o)*C_in/g + i]."""
    c_out, c_in_g = w.shape[0], w.shape[1]
    out_per_group = c_out // groups
    return np.stack(
        [
            w[o, :, 0] @ x[(o // out_per_group) * c_in_g : (o // out_per_group + 1) * c_in_g]
            for o in range(c_out)
        ]
    )


def grouped_conv_transpose_1x1(w: np.ndarray, x: np.ndarray, groups: int) -> np.ndarray:
    """Reference 1x1 ConvTranspose, weight (C_in, C_out/g, 1)."""
    c_in = w.shape[0]
    rows = c_in // groups
    return np.concatenate(
        [w[g * rows : (g + 1) * rows, :, 0].T @ x[g * rows : (g + 1) * rows] for g in range(groups)]
    )


@given(
    groups=st.integers(1, 3),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    transpose=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_before_matches_affine_then_grouped_op(
    groups: int, per_group_in: int, per_group_out: int, transpose: bool, has_bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = groups * per_group_in, groups * per_group_out
    if transpose:
        w, layout, op = (
            rng.normal(size=(c_in, per_group_out, 1)),
            layouts.conv_transpose(groups),
            grouped_conv_transpose_1x1,
        )
    else:
        w, layout, op = (
            rng.normal(size=(c_out, per_group_in, 1)),
            layouts.conv(groups),
            grouped_conv_1x1,
        )
    b = rng.normal(size=c_out) if has_bias else None
    affine = Affine.of(rng.uniform(0.5, 2, c_in), rng.normal(size=c_in), c_in)
    x = rng.normal(size=(c_in, 4))
    expected = op(w, affine.scale[:, None] * x + affine.shift[:, None], groups)
    expected = expected + (b[:, None] if b is not None else 0.0)
    new_w, new_b = fold_before(w, b, affine, layout)
    np.testing.assert_allclose(
        op(new_w, x, groups) + new_b[:, None], expected, rtol=1e-10, atol=1e-10
    )


@given(trans_b=st.booleans(), k=channels, n=channels, seed=st.integers(0, 2**16))
def test_fold_before_gemm_follows_trans_b(trans_b: bool, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    b_mat = rng.normal(size=(n, k) if trans_b else (k, n))
    a = rng.normal(size=(3, k))
    affine = Affine.of(rng.uniform(0.5, 2, k), rng.normal(size=k), k)

    def gemm(m: np.ndarray) -> np.ndarray:
        return m.T if trans_b else m

    expected = (a * affine.scale + affine.shift) @ gemm(b_mat)
    new_b, new_c = fold_before(b_mat, None, affine, layouts.gemm(trans_b))
    np.testing.assert_allclose(a @ gemm(new_b) + new_c, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (0, 3, 1, 1), (3, 5)])
def test_fold_of_zero_size_or_small_weights_keeps_the_shape(shape: tuple[int, ...]) -> None:
    w = np.ones(shape, dtype=np.float32)
    c = shape[0]
    new_w, new_b = fold_after(w, None, Affine.of(2.0, 1.0, c), layouts.conv())
    assert new_w.shape == shape and new_b.shape == (c,)
    np.testing.assert_array_equal(new_w, 2 * w)


def test_weights_bigger_than_one_block_fold_exactly() -> None:
    """Rows are scaled and checked a block at a time; blocks must not mix."""
    from bnfold.core import cast as cast_module

    rng = np.random.default_rng(3)
    w = rng.normal(size=(300, 7, 3, 3)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 300)
    old = cast_module.CHUNK_BYTES
    cast_module.CHUNK_BYTES = 4 * 7 * 9 * 16  # 16 rows per block: 19 blocks
    try:
        new_w, _ = fold_after(w, None, Affine.of(scale, 0.0, 300), layouts.conv())
    finally:
        cast_module.CHUNK_BYTES = old
    expected = (w.astype(np.float64) * scale[:, None, None, None]).astype(np.float32)
    np.testing.assert_array_equal(new_w, expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16, np.float64])
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 40))
def test_scaled_rounds_the_float64_product_once(dtype: type, seed: int, rows: int) -> None:
    """Bit for bit what a float64 copy of the weight, scaled and cast back, gives."""
    from bnfold.core import cast as cast_module

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, 3, 5)).astype(dtype)
    factor = rng.uniform(1e-3, 1e3, rows).reshape(-1, 1, 1)
    expected = (w.astype(np.float64) * factor).astype(dtype)
    got = cast_module.scaled(w, factor)
    assert got.dtype == w.dtype and got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("shape", [(300, 7, 3, 3), (5, 40000), (0, 3), (3, 0, 2)])
def test_scaled_blocks_join_to_scaled(shape: tuple[int, ...]) -> None:
    """The streamed fold writes exactly the bytes of the whole one, rows in order."""
    from bnfold.core import cast as cast_module

    rng = np.random.default_rng(4)
    w = rng.normal(size=shape).astype(np.float16)
    factor = rng.uniform(0.5, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    old = cast_module.CHUNK_BYTES
    cast_module.CHUNK_BYTES = 2 * 7 * 9 * 16  # several blocks; a 40000-element row exceeds one
    try:
        streamed = b"".join(block.tobytes() for block in cast_module.scaled_blocks(w, factor))
    finally:
        cast_module.CHUNK_BYTES = old
    assert streamed == cast_module.scaled(w, factor).tobytes()


def test_scaled_blocks_with_two_buffers_keep_the_previous_block_intact() -> None:
    """With buffers=2 a block survives the computing of the next one (write-behind)."""
    from bnfold.core import cast as cast_module

    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 3, 3)).astype(np.float32)
    factor = rng.uniform(0.5, 2.0, (64, 1, 1))
    old = cast_module.CHUNK_BYTES
    cast_module.CHUNK_BYTES = 4 * 9 * 5  # 5 rows a block: 13 blocks
    try:
        previous: np.ndarray | None = None
        joined = []
        for block in cast_module.scaled_blocks(w, factor, buffers=2):
            if previous is not None:
                joined.append(previous.tobytes())  # read only after the next was made
            previous = block
        assert previous is not None
        joined.append(previous.tobytes())
    finally:
        cast_module.CHUNK_BYTES = old
    assert b"".join(joined) == cast_module.scaled(w, factor).tobytes()


def test_scaled_blocks_refuse_an_overflow() -> None:
    from bnfold.core import cast as cast_module

    w = np.full((4, 3), 60000, dtype=np.float16)
    with pytest.raises(Unfoldable, match="overflows float16"):
        list(cast_module.scaled_blocks(w, np.full((4, 1), 2.0)))


# --- channels across a reshape ------------------------------------------------------------


def _nesting_by_brute_force(affine_side: tuple[int, ...], linear_side: tuple[int, ...]):
    """For each linear channel, the single affine channel holding all its elements, or None."""
    linear_channel = np.broadcast_to(
        np.arange(linear_side[1]).reshape(1, -1, *[1] * (len(linear_side) - 2)), linear_side
    )
    affine_channel = np.broadcast_to(
        np.arange(affine_side[1]).reshape(1, -1, *[1] * (len(affine_side) - 2)), affine_side
    )
    pairs = zip(linear_channel.reshape(-1), affine_channel.reshape(-1), strict=True)
    owner: dict[int, set[int]] = {}
    for lin, aff in pairs:
        owner.setdefault(int(lin), set()).add(int(aff))
    if any(len(a) != 1 for a in owner.values()):
        return None
    return [owner[j].pop() for j in range(linear_side[1])]


@st.composite
def reshapes(draw):
    """Two shapes of the same elements, batch first: (N, C, *rest) and (N, C', *rest')."""
    n = draw(st.integers(1, 2))
    factors = draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=4))
    total = int(np.prod(factors))

    def split(count: int) -> tuple[int, ...]:
        dims, left = [], total
        for _ in range(count):
            d = draw(st.sampled_from([d for d in range(1, left + 1) if left % d == 0]))
            dims.append(d)
            left //= d
        return (n, *dims, left)

    return split(draw(st.integers(0, 2))), split(draw(st.integers(0, 2)))


@given(reshapes())
@settings(max_examples=300, deadline=None)
def test_channel_block_matches_brute_force(shapes):
    affine_side, linear_side = shapes
    expected = _nesting_by_brute_force(affine_side, linear_side)
    k = layouts.channel_block(affine_side, linear_side)
    if expected is None:
        assert k is None
    else:
        assert k is not None and expected == [j // k for j in range(linear_side[1])]


# --- the overflow bound that spares planning a multi-GB multiply ---------------------------

bound_dtypes = st.sampled_from([np.float16, np.float32])


@settings(max_examples=200, deadline=None)
@given(
    dtype=bound_dtypes,
    rows=st.integers(0, 40),
    magnitude=st.floats(-6, 40),
    factor_magnitude=st.floats(-6, 6),
    seed=st.integers(0, 2**16),
)
def test_cannot_overflow_is_the_whole_array_bound_and_sound(
    dtype: type, rows: int, magnitude: float, factor_magnitude: float, seed: int
) -> None:
    """It answers max|W| * max|factor| <= the dtype's largest value, computed over
    the whole array (not just one block), and when it says True the fold is finite."""
    from bnfold.core import cast as cast_module

    rng = np.random.default_rng(seed)
    largest = float(np.finfo(dtype).max)
    with np.errstate(over="ignore"):
        w = (rng.normal(size=(rows, 5, 3)) * min(10.0**magnitude, largest / 4)).astype(dtype)
    w = np.where(np.isfinite(w), w, 0).astype(dtype)
    factor = (rng.uniform(-1, 1, rows) * 10.0**factor_magnitude).reshape(-1, 1, 1)
    old = cast_module.CHUNK_BYTES
    cast_module.CHUNK_BYTES = 64  # one row per block: the maximum must span the blocks
    try:
        proven = cast_module.cannot_overflow(w, factor)
    finally:
        cast_module.CHUNK_BYTES = old
    w_max = float(np.abs(w.astype(np.float64)).max(initial=0.0))
    assert proven == (w_max * float(np.abs(factor).max(initial=0.0)) <= largest)
    if proven:
        assert np.isfinite(cast_module.scaled(w, factor)).all()


def test_cannot_overflow_holds_at_the_exact_edge() -> None:
    """65504 = 32752 * 2 is float16's largest value: proven, and indeed finite."""
    from bnfold.core import cast as cast_module

    w = np.array([[32752.0, -1.0]], dtype=np.float16)
    assert cast_module.cannot_overflow(w, np.array([[2.0]]))
    assert np.isfinite(cast_module.scaled(w, np.array([[2.0]]))).all()
    assert not cast_module.cannot_overflow(w, np.array([[2.001]]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cannot_overflow_proves_nothing_for_non_finite_weights(bad: float) -> None:
    from bnfold.core import cast as cast_module

    w = np.array([[1.0, bad], [2.0, 3.0]], dtype=np.float32)
    assert not cast_module.cannot_overflow(w, np.array([[1.0], [1.0]]))
    with pytest.raises(Unfoldable):
        cast_module.scaled(w, np.array([[1.0], [1.0]]))


def test_cannot_overflow_bounds_bfloat16_at_its_own_largest_value() -> None:
    """bfloat16 is bounded by its own largest finite value, whichever ml_dtypes
    is installed (numpy's finfo knows it only from ml_dtypes 0.7 on)."""
    from bnfold.core import cast as cast_module

    largest = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    w = np.array([[1.0, -largest / 4]], dtype=ml_dtypes.bfloat16)
    assert cast_module.cannot_overflow(w, np.array([[4.0]]))
    assert not cast_module.cannot_overflow(w, np.array([[4.1]]))
    assert np.isinf((w.astype(np.float64) * 4.1).astype(ml_dtypes.bfloat16)).any()


def test_cannot_overflow_leaves_dtypes_without_finfo_to_the_exact_check() -> None:
    from bnfold.core import cast as cast_module

    w = np.ones((2, 2), dtype=np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cast_module, "_largest_finite", lambda dtype: None)
        assert not cast_module.cannot_overflow(w, np.ones((2, 1)))


@pytest.mark.parametrize("largest_row, bad_row", [(39, None), (0, None), (5, 0), (5, 39)])
def test_the_two_thread_bound_answers_as_one_thread(largest_row: int, bad_row: int | None) -> None:
    """Past PARALLEL_BOUND_BYTES each half of the rows is bounded on its own
    thread: the largest value, or a NaN, counts in either half."""
    from bnfold.core import cast as cast_module

    w = np.random.default_rng(9).uniform(-1, 1, (40, 5, 3)).astype(np.float16)
    w[largest_row, 2, 1] = -30000.0
    if bad_row is not None:
        w[bad_row, 0, 0] = np.nan
    fits, overflows = np.array([[[2.0]]]), np.array([[[2.2]]])  # 65504 / 30000 = 2.18
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cast_module, "CHUNK_BYTES", 2 * 15)  # a block per row
        patch.setattr(cast_module, "PARALLEL_BOUND_BYTES", 0)
        answers = [cast_module.cannot_overflow(w, f) for f in (fits, overflows)]
    assert answers == [bad_row is None, False]
