"""The pool family: a BN commutes with a pool exactly when the rule says so, whichever
front read the pool."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from bnfold.core.affine import Affine
from bnfold.onnx_front.rules.pooling import pool_spec
from bnfold.report import Code
from bnfold.rules.pool import AVERAGE, MAX, PoolSpec, commute_refusal

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from bnfold.torch_front.pools import pool_of_call, pool_of_module  # noqa: E402

C = 3


def affine(scale: np.ndarray, shift: np.ndarray) -> Affine:
    return Affine(scale.astype(np.float64), shift.astype(np.float64))


def commutes(pool, y: torch.Tensor, scale: np.ndarray, shift: np.ndarray) -> bool:  # type: ignore[no-untyped-def]
    s = torch.from_numpy(scale).view(1, -1, 1)
    t = torch.from_numpy(shift).view(1, -1, 1)
    return torch.allclose(pool(s * y + t), s * pool(y) + t, rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["avg", "max"]),
    padding=st.integers(0, 1),
    count_include_pad=st.booleans(),
    divisor=st.sampled_from([None, 2]),
    negative=st.booleans(),
    shifted=st.booleans(),
)
def test_the_rule_refuses_exactly_the_pools_that_do_not_commute(
    seed: int,
    kind: str,
    padding: int,
    count_include_pad: bool,
    divisor: int | None,
    negative: bool,
    shifted: bool,
) -> None:
    rng = np.random.default_rng(seed)
    y = torch.from_numpy(rng.normal(size=(2, C, 8)))
    scale = rng.uniform(0.5, 2, C) * np.where(np.arange(C) == 1, -1 if negative else 1, 1)
    shift = rng.normal(size=C) if shifted else np.zeros(C)
    if kind == "max":
        args: tuple = (y, 3, 1, padding)

        def pool(v: torch.Tensor) -> torch.Tensor:
            return F.max_pool1d(v, 3, 1, padding)
    else:
        args = (y, 3, 1, padding, False, count_include_pad, divisor)

        def pool(v: torch.Tensor) -> torch.Tensor:
            return F.avg_pool1d(v, 3, 1, padding, False, count_include_pad)

        if divisor is not None:  # avg_pool1d has no divisor_override: a 2-d pool of height 1

            def pool(v: torch.Tensor) -> torch.Tensor:
                out = F.avg_pool2d(v[:, :, None], (1, 3), 1, (0, padding), False,
                                   count_include_pad, divisor)  # fmt: skip
                return out[:, :, 0]

    spec = pool_of_call(f"{kind}_pool1d", args, {})
    assert spec is not None
    found = commute_refusal(spec, affine(scale, shift))
    assert (found is None) == commutes(pool, y, scale, shift), found


def test_each_refusal_names_its_pool_and_why() -> None:
    negative = affine(np.array([1.0, -2.0]), np.zeros(2))
    shifted = affine(np.ones(2), np.array([0.0, 0.5]))
    assert commute_refusal(PoolSpec("mp", MAX), negative) == (
        Code.NEGATIVE_SCALE,
        "mp: BN scale is negative at channel 1, and the max of a negated window is its negated min",
    )
    read = PoolSpec("mp", MAX, indices_read="mp's indices output is read")
    assert commute_refusal(read, shifted) == (Code.TRAINING_MODE, "mp's indices output is read")
    padded = PoolSpec("ap", AVERAGE, divides_by_padding=True, padding_cause="why")
    assert commute_refusal(padded, shifted) == (
        Code.POOL_PADDING, "ap counts padded zeros in its average (why): the shift would not pass"
    )  # fmt: skip
    assert commute_refusal(padded, negative) is None  # no shift: the scale always passes


def onnx_pool(op: str, **attrs: object) -> ir.Node:
    return ir.serde.deserialize_node(helper.make_node(op, ["x"], ["y"], name="p", **attrs))


SAME_POOLS = [  # (ONNX AveragePool attributes, the torch module, divides by padding)
    ({"kernel_shape": [3], "pads": [1, 1]}, nn.AvgPool1d(3, 1, 1, count_include_pad=False), False),
    ({"kernel_shape": [3], "pads": [1, 1], "count_include_pad": 1}, nn.AvgPool1d(3, 1, 1), True),
    ({"kernel_shape": [3], "count_include_pad": 1}, nn.AvgPool1d(3, 1, 0), False),
]


@pytest.mark.parametrize(("onnx_attrs", "module", "divides"), SAME_POOLS)
def test_both_fronts_read_an_average_pool_into_the_same_spec(
    onnx_attrs: dict, module: nn.Module, divides: bool
) -> None:
    specs = [pool_spec(onnx_pool("AveragePool", **onnx_attrs)), pool_of_module(module)]
    assert [(s.kind, s.divides_by_padding) for s in specs if s] == [(AVERAGE, divides)] * 2


def test_ceil_mode_counts_padding_on_onnx_only() -> None:
    """ONNX divides a window overrunning the input by the whole kernel; torch clips it."""
    onnx_spec = pool_spec(onnx_pool("AveragePool", kernel_shape=[2], ceil_mode=1,
                                    count_include_pad=1))  # fmt: skip
    torch_spec = pool_of_call("avg_pool1d", ("x", 2, 2, 0, True, True), {})
    assert onnx_spec.divides_by_padding and torch_spec is not None
    assert not torch_spec.divides_by_padding


def test_a_max_pool_returning_indices_is_no_pool_to_an_eager_graph() -> None:
    assert pool_of_module(nn.MaxPool2d(2, return_indices=True)) is None
    assert pool_of_call("adaptive_max_pool2d", ("x", 1), {}) is None
    assert pool_of_module(nn.MaxPool2d(2)) == PoolSpec("max_pool2d", MAX)
