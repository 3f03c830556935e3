"""``prove_onnx``: certify that a folded ONNX model computes the original's function."""

from __future__ import annotations

import os
import time

import onnx
import onnx_ir as ir

from bnfold.proof.certificate import Certificate, SiteProof
from bnfold.proof.diff import GraphDiff, diff_graphs
from bnfold.proof.graphs import Scope, Shapes, main_scope, open_model
from bnfold.proof.regions import ReportLike, prove_region

ModelSource = str | os.PathLike[str] | ir.Model | onnx.ModelProto

IR3_ASSUMPTION = (
    "IR < 4: initializers listed as graph inputs are treated as constants "
    "(a runtime may let a caller override them)"
)


def prove_onnx(
    original: ModelSource, folded: ModelSource, report: ReportLike | None = None
) -> Certificate:
    """Prove that ``folded`` computes the same function as ``original`` for all inputs.

    The two graphs are diffed (:mod:`bnfold.proof.diff`); everything outside the changed
    regions must be identical (node for node, constants bit for bit, If/Loop/Scan bodies
    included), and each region must compute the same affine map of its inputs in both
    models, coefficient by coefficient within one ulp of the folded model's dtype
    (:mod:`bnfold.proof.equivalence`), for every input size (:mod:`bnfold.proof.stencil`).
    No model is run: models no runtime can load are proven when their changed regions are
    standard.

    Args:
        original: the unfolded model (path, onnx_ir.Model or onnx.ModelProto).
        folded: the folded model.
        report: the fold's FoldReport, used to name sites only (never trusted).

    Returns:
        A Certificate; ``holds`` is True only when every region is proven and the rest
        is unchanged.

    Raises:
        bnfold.proof.graphs.ModelError: a model cannot be read.
    """
    start = time.perf_counter()
    model_o, model_f = open_model(original), open_model(folded)
    certificate = Certificate(front="onnx")
    certificate.differences.extend(_model_differences(model_o, model_f))
    if int(model_o.ir_version or 0) < 4 and model_o.graph.initializers:
        certificate.assumptions.append(IR3_ASSUMPTION)
    shapes = Shapes(model_o)
    _prove_graph(main_scope(model_o), main_scope(model_f), shapes, report, certificate)
    certificate.rest_unchanged = not certificate.differences
    certificate.seconds = time.perf_counter() - start
    return certificate


def _model_differences(a: ir.Model, b: ir.Model) -> list[str]:
    found = []
    if dict(a.opset_imports) != dict(b.opset_imports):
        found.append(f"opset imports differ: {dict(a.opset_imports)} vs {dict(b.opset_imports)}")
    if a.ir_version != b.ir_version:
        found.append(f"IR version differs: {a.ir_version} vs {b.ir_version}")
    functions_a = {
        k: ir.serde.serialize_function(f).SerializeToString() for k, f in a.functions.items()
    }
    functions_b = {
        k: ir.serde.serialize_function(f).SerializeToString() for k, f in b.functions.items()
    }
    if functions_a != functions_b:
        found.append("model-local functions differ")
    return found


MAX_GROWTH = 8
"""How many times a failing region may grow over unchanged readers of its outputs."""


def _prove_graph(
    original: Scope,
    folded: Scope,
    shapes: Shapes,
    report: ReportLike | None,
    certificate: Certificate,
) -> None:
    diff: GraphDiff = diff_graphs(original, folded)
    certificate.differences.extend(diff.differences)
    proofs: dict[int, SiteProof] = {}
    for region in list(diff.regions):
        if region not in diff.regions:  # merged into a region that grew
            continue
        proof = prove_region(region, original, folded, shapes, report)
        first = proof.site
        steps = 0
        while not proof.site.proven and proof.failed and steps < MAX_GROWTH:
            grown = diff.grown(region, proof.failed, original, folded)
            if grown is None:
                break
            region, steps = grown, steps + 1
            proof = prove_region(region, original, folded, shapes, report)
        if steps:
            proof.site.notes.append(f"grown {steps} time(s) over unchanged readers of its outputs")
        if proof.site.unsupported and first.differs:
            # Growing may reconcile a difference downstream (branches that only add up to
            # the same map), so the first finding is no verdict; it is the lead to follow.
            proof.site.reason += f"; before growing, {first.reason}"
        proofs[id(region)] = proof.site
        original.forget_all()
        folded.forget_all()
    certificate.sites.extend(proofs[id(r)] for r in diff.regions if id(r) in proofs)
    certificate.unchanged_nodes += len(diff.twins)
    for body in diff.bodies:
        _prove_graph(body.original, body.folded, shapes, report, certificate)
