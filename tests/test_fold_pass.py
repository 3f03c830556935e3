"""The fold as an onnx_ir pass, ``bnfold.FoldBatchNormPass``, in ``ir.passes.PassManager``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx import helper

import bnfold
from bnfold.onnx_front import passes
from tests.builders import bn_node, bn_params, init, model


def _conv_bn_with_constant_nodes() -> onnx.ModelProto:
    """conv -> bn whose statistics are Constant nodes, as some exporters write them."""
    rng = np.random.default_rng(0)
    stats = [
        helper.make_node("Constant", [], [p.name], value=p) for p in bn_params("bn", 4, rng=rng)
    ]
    nodes = [
        *stats,
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
        bn_node("bn", "c", "output"),
    ]
    inits = [
        init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
        init("b", rng.normal(size=4).astype(np.float32)),
    ]
    return model(nodes, inits, [("input", [1, 3, 6, 6])], ["output"])


def test_the_pass_is_a_public_onnx_ir_pass():
    assert issubclass(bnfold.FoldBatchNormPass, ir.passes.InPlacePass)
    assert bnfold.FoldBatchNormPass is passes.FoldAffinePass  # one class, the old name kept
    doc = bnfold.FoldBatchNormPass.__doc__ or ""
    assert all(part in doc for part in ("Matches:", "Produces:", "Refuses:", "PassManager"))
    assert "FoldBatchNormPass" in bnfold.__all__


def test_called_alone_it_returns_the_report(samples):
    model_ = ir.load(samples / "resnet_tiny.onnx")
    fold = bnfold.FoldBatchNormPass()
    result = fold(model_)
    assert isinstance(result, bnfold.FoldPassResult) and result.modified
    assert result.model is model_  # in place
    assert result.report is fold.report and result.report.folded
    assert "BatchNormalization" not in {node.op_type for node in model_.graph}


def test_it_composes_with_onnx_irs_own_passes(samples, tmp_path):
    """Lift Constant nodes to initializers, fold, drop what is unused, sort, check."""
    original = tmp_path / "original.onnx"
    onnx.save(_conv_bn_with_constant_nodes(), original)
    model_ = ir.load(original)
    fold = bnfold.FoldBatchNormPass()
    pipeline = ir.passes.PassManager(
        [
            common_passes.LiftConstantsToInitializersPass(size_limit=0),
            fold,
            common_passes.RemoveUnusedNodesPass(),
            common_passes.TopologicalSortPass(),
            common_passes.CheckerPass(full_check=True),
        ]
    )
    result = pipeline(model_)
    assert result.modified
    assert [f.site for f in fold.report.folded] == ["conv -> bn"]
    assert [node.op_type for node in model_.graph] == ["Conv"]
    assert set(model_.graph.initializers) == {"w", "b"}  # the lifted statistics went
    assert bnfold.verify(str(original), model_).passed


def test_in_a_multi_step_manager_the_first_step_folds_everything(samples):
    """The pass reaches its fixpoint in one call; later steps find nothing new and stop."""
    model_ = ir.load(samples / "chain_conv_bn_mul_add.onnx")
    fold = bnfold.FoldBatchNormPass()
    calls = []

    class Counting(ir.passes.InPlacePass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            calls.append(len(fold.report.folded) if fold.report else None)
            return ir.passes.PassResult(model, modified=False)

    ir.passes.PassManager([fold, Counting()], steps=3, early_stop=True)(model_)
    assert calls[0] == 3 and calls[1:] == [0]  # step 2 folded nothing, so the manager stopped
    assert {node.op_type for node in model_.graph} == {"Conv"}
