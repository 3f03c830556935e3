"""One fold run on an exported program's module: rounds of find and apply,
lowering, verification with rollback, and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from bnfold.affine import Rounding, Unfoldable
from bnfold.fixpoint import fold_rounds, keep_passing
from bnfold.options import DEFAULT_VERIFY, VerifyOptions
from bnfold.report import (
    Code,
    FoldReport,
    FoldResult,
    LowerForm,
    VerifyResult,
)
from bnfold.torch_front import verify as checking
from bnfold.torch_front.aten_graph import BN_OPS, owner_path
from bnfold.torch_front.census import batchnorm_count
from bnfold.torch_front.program.apply import apply_site
from bnfold.torch_front.program.lower import lower_left
from bnfold.torch_front.program.match import find_sites
from bnfold.torch_front.program.sites import AnySite, entries, refusals
from bnfold.torch_front.tensors import exact_values

aten = torch.ops.aten


def fold_graph_module(
    make: Callable[[], fx.GraphModule],
    args: tuple[Any, ...],
    *,
    verify: VerifyOptions | None = DEFAULT_VERIFY,
    rounding: Rounding = Rounding.NEAREST,
    lower: LowerForm | None = None,
) -> FoldResult:
    """Fold every site of a fresh ``make()`` module; verify and drop folds that fail.

    ``make`` must return a new module each call sharing no mutable state with
    the others (``ep.module`` does: folds assign new Parameters, never write
    into existing tensors). Sites are found and applied in rounds until none is
    new (Conv -> BN -> BN: the second BN follows the conv once the first is
    gone). A failing fold is found by re-folding fresh copies one site at a
    time, keeping those that pass. ``verify`` None skips verification.
    With ``lower``, every inference batch_norm left is then lowered
    (:func:`lower_left`) before the whole module is verified.
    """
    with exact_values():  # a weight folded twice is still rounded once
        report = FoldReport(front="torch", rounding=rounding)
        original = make()
        report.ops_before = _op_counts(original)
        check = None if verify is None else checking.Check.of(original, args, verify)
        gm = make()
        added = _fold_to_fixpoint(gm, report, rounding)
        fold_refusals = list(report.refused)  # what lowering starts from, again after a rollback
        if lower is not None:
            lower_left(gm, report, lower)
        verification = None if check is None else check(gm)
        # Only a failed comparison undoes folds: no_evidence or inputs_unusable says
        # nothing against them (issue 23).
        if check is not None and verification is not None and verification.status == "failed":
            report.refused, report.lowered = fold_refusals, []
            gm, verification, added = _rollback(make, list(added), check, report, rounding)
            if lower is not None:  # the rollback refolded fresh copies: lower those again
                lower_left(gm, report, lower)
                verification = check(gm)
        report.folded = [entry for s, n in added.items() for entry in entries(original, s, n)]
        report.ops_after = _op_counts(gm)
        found, training = graph_batchnorms(original)
        report.batchnorm = batchnorm_count(
            len(found), training, graph_batchnorms(gm)[0], report.refused, len(report.lowered)
        )
        return FoldResult(gm, report, verification)


def graph_batchnorms(gm: fx.GraphModule) -> tuple[list[str], int]:
    """(module path of each inference batch_norm node, number of training-mode ones)."""
    bns = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BN_OPS]
    inference = [
        owner_path(n.args[1:5]) or n.name
        for n in bns
        if not (n.target == aten.batch_norm.default and n.args[5])
    ]
    return inference, len(bns) - len(inference)


def _fold_to_fixpoint(
    gm: fx.GraphModule, report: FoldReport, rounding: Rounding
) -> dict[AnySite, int]:
    """Rounds of find and apply until no site is new (:func:`bnfold.fixpoint.fold_rounds`).

    Returns the sites applied, in order, each with the bytes its clones added.
    """
    rounds = fold_rounds(lambda: find_sites(gm), lambda s: apply_site(gm, s, rounding), refusals)
    report.refused += rounds.refused + rounds.failed
    return dict(rounds.applied)


def _folded(
    make: Callable[[], fx.GraphModule], sites: list[AnySite], rounding: Rounding
) -> tuple[fx.GraphModule, dict[AnySite, int]]:
    gm = make()
    return gm, {s: apply_site(gm, s, rounding) for s in sites}


def _rollback(
    make: Callable[[], fx.GraphModule],
    sites: list[AnySite],
    check: checking.Check,
    report: FoldReport,
    rounding: Rounding,
) -> tuple[fx.GraphModule, VerifyResult, dict[AnySite, int]]:
    """Refold fresh copies, keeping each site that verifies with those kept before it."""

    def failure(kept: list[AnySite], site: AnySite) -> str | None:
        try:
            trial = check(_folded(make, [*kept, site], rounding)[0])
        except Unfoldable as e:  # a merge whose branch folds were rolled back
            return str(e)
        return checking.describe_failure(trial) if trial.status == "failed" else None

    kept, dropped = keep_passing(sites, failure)
    for site, detail in dropped:
        report.refused += refusals(site, Code.VERIFICATION_FAILED, detail)
    gm, added = _folded(make, kept, rounding)
    return gm, check(gm), added


def _op_counts(gm: fx.GraphModule) -> dict[str, int]:
    from bnfold.report import count_ops

    return count_ops([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
