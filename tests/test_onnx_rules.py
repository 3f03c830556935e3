"""The fold rules beyond adjacency (issue 13): batch merges, sums, concats, pooling.

Each rule: the fold happens (BN gone, op counts), the output matches the original
at ORT_DISABLE_ALL, and each refusal code leaves the model's outputs unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold import Code
from tests.builders import RNG, bn_node, bn_params, init, model, op_types, run
from tests.test_onnx_front import fold_and_check, random_feeds, to_proto

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
F16 = np.float16


def fold_sample(name: str) -> bnfold.FoldResult:
    result = bnfold.fold(SAMPLES / name, verify=True)
    assert result.verification is not None and result.verification.passed
    return result


def assert_refused_unchanged(name: str, code: Code) -> None:
    """The refusal carries ``code`` and the folded model computes what the original did."""
    original = onnx.load(str(SAMPLES / name))
    result = bnfold.fold(original)
    assert code in result.report.codes
    assert op_types(to_proto(result.model)).count("BatchNormalization") == op_types(original).count(
        "BatchNormalization"
    )
    feeds = random_feeds(original)
    for ref, new in zip(run(original, feeds), run(to_proto(result.model), feeds), strict=True):
        np.testing.assert_array_equal(ref, new)


# --- batch-merging reshape (LeViT's Linear -> BN1d) ------------------------------------


def test_token_linear_bn_folds_through_the_batch_merge() -> None:
    result = fold_sample("token_linear_bn.onnx")
    assert [f.site for f in result.report.folded] == ["fc1 -> flatten1 -> bn1"]
    after = result.report.ops_after
    assert "BatchNormalization" not in after and "Transpose" not in after
    assert after["Add"] == 1  # an N-d MatMul has no bias slot: the shift is one Add


def test_merge_that_moves_the_channel_is_refused() -> None:
    assert_refused_unchanged("neg_merge_moves_channel.onnx", Code.MERGE_MOVES_CHANNEL)


def token_mlp(merge: str, dtype: type = np.float32, c: int = 6) -> onnx.ModelProto:
    """input [2, 3, 5] -> MatMul(W [5, c]) -> ``merge`` to [6, c] -> BN(c) -> output."""
    nodes = [helper.make_node("MatMul", ["input", "w"], ["y"], name="fc")]
    inits = [init("w", RNG.normal(size=(5, c)).astype(dtype)), *bn_params("bn", c, dtype)]
    if merge == "reshape":
        inits.append(init("target", np.array([-1, c], dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", ["y", "target"], ["m"], name="merge"))
    else:
        nodes.append(helper.make_node("Flatten", ["y"], ["m"], name="merge", axis=int(merge)))
    nodes.append(bn_node("bn", "m", "output"))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return model(nodes, inits, [("input", [2, 3, 5])], ["output"], dtype=elem)


@pytest.mark.parametrize("merge", ["reshape", "2", "-1"])
def test_batch_merge_by_reshape_or_flatten_folds(merge: str) -> None:
    result = fold_and_check(token_mlp(merge))
    assert len(result.report.folded) == 1
    assert "BatchNormalization" not in op_types(to_proto(result.model))


def test_batch_merge_folds_in_fp16_from_float64() -> None:
    m = token_mlp("2", F16)
    result = bnfold.fold(m)
    assert len(result.report.folded) == 1
    feeds = random_feeds(m)
    (ref,) = run(m, feeds)
    (new,) = run(to_proto(result.model), feeds)
    assert new.dtype == F16
    np.testing.assert_allclose(new, ref, rtol=0, atol=2e-2 * float(np.abs(ref).max()))


def test_a_shape_reader_does_not_block_an_adjacent_fold() -> None:
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
        bn_node("bn", "c", "b"),
        helper.make_node("Shape", ["c"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["b", "shape"], ["output"], name="reshape"),
    ]
    inits = [init("w", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)), *bn_params("bn", 4)]
    m = model(nodes, inits, [("input", [1, 3, 5, 5])], ["output"])
    assert len(fold_and_check(m).report.folded) == 1
