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
from bnfold.proof import Certificate
from bnfold.report import (
    Code,
    FoldReport,
    FoldResult,
    Lowered,
    LowerForm,
    Refusal,
)
from bnfold.torch_front import verify as checking
from bnfold.torch_front.aten_graph import BN_OPS, owner_path
from bnfold.torch_front.census import batchnorm_count
from bnfold.torch_front.program.apply import apply_site
from bnfold.torch_front.program.lower import lower_left
from bnfold.torch_front.program.match import find_sites
from bnfold.torch_front.program.sites import AnySite, entries, refusals
from bnfold.torch_front.tensors import exact_values
from bnfold.verification.torch_proof import (
    drop_refuted,
    prove_graph_modules,
    vouching,
    with_entries,
)
from bnfold.verification.verdict import with_proof

aten = torch.ops.aten


def fold_graph_module(
    make: Callable[[], fx.GraphModule],
    args: tuple[Any, ...],
    *,
    verify: VerifyOptions | None = DEFAULT_VERIFY,
    rounding: Rounding = Rounding.NEAREST,
    lower: LowerForm | None = None,
    prove: bool = True,
) -> FoldResult:
    """Fold every site of a fresh ``make()`` module; prove, verify and drop folds that fail.

    ``make`` must return a new module each call sharing no mutable state with
    the others (``ep.module`` does: folds assign new Parameters, never write
    into existing tensors). Sites are found and applied in rounds until none is
    new (Conv -> BN -> BN: the second BN follows the conv once the first is
    gone). A failing fold is found by re-folding fresh copies one site at a
    time, keeping those that pass. ``verify`` None skips verification.
    With ``lower``, every inference batch_norm left is then lowered
    (:func:`lower_left`) before the whole module is verified. With ``verify`` and
    ``prove``, the folded module is first proven against ``make()``'s
    (:mod:`bnfold.verification.torch_proof`): a refuted site is refolded without,
    and a certificate that holds judges the sampled check. The rollback's trials are
    judged by sampling alone (a subset of proven sites is not proven); the sites it
    keeps are proven again, and that certificate is reported.
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
        certificate = None
        proving = check is not None and prove
        if proving:
            gm, added, certificate, fold_refusals = _proof_first(
                make, original, (gm, added), fold_refusals, report, rounding, lower
            )
        verification = None if check is None else check(gm, vouching(certificate))
        # Only a failed comparison undoes folds: no_evidence or inputs_unusable says
        # nothing against them (issue 23).
        if check is not None and verification is not None and verification.status == "failed":
            report.refused, report.lowered = fold_refusals, []
            kept = _rollback(make, list(added), check, report, rounding, lower)
            gm, added = _folded(make, kept, rounding)
            fold_refusals = list(report.refused)
            if lower is not None:  # the rollback refolded fresh copies: lower those again
                lower_left(gm, report, lower)
            if proving:  # the folds kept are proven once more: that certificate is reported
                gm, added, certificate, fold_refusals = _proof_first(
                    make, original, (gm, added), fold_refusals, report, rounding, lower
                )
            verification = check(gm, vouching(certificate))
        if verification is not None:
            verification = with_proof(verification, certificate)
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


def _proof_first(
    make: Callable[[], fx.GraphModule],
    original: fx.GraphModule,
    folded: tuple[fx.GraphModule, dict[AnySite, int]],
    fold_refusals: list[Refusal],
    report: FoldReport,
    rounding: Rounding,
    lower: LowerForm | None,
) -> tuple[fx.GraphModule, dict[AnySite, int], Certificate, list[Refusal]]:
    """Prove the folded module; refold a fresh copy without each site the proof refutes
    (:func:`~bnfold.verification.torch_proof.drop_refuted`).

    Repeats until nothing is refuted (a site refolded without one refuted before it
    may be refuted in turn). Returns the module, its sites, the last certificate and
    the fold refusals, each refuted site added as VERIFICATION_FAILED.
    """
    gm, added = folded

    def names(site: AnySite) -> list[str]:
        return [e.site for e in entries(original, site, 0)]

    def prove(gm: fx.GraphModule, added: dict[AnySite, int], lowered: list[Lowered]) -> Certificate:
        folded = [e for s, n in added.items() for e in entries(original, s, n)]
        proven = with_entries(report, folded)
        proven.lowered = lowered
        return prove_graph_modules(original, gm, proven)

    def prove_with(sites: list[AnySite]) -> Certificate:
        gm, added = _refolded(make, sites, rounding, [])
        return prove(gm, added, _lowered_trial(gm, lower, rounding))  # as the fold run lowers

    while (certificate := prove(gm, added, list(report.lowered))).refuted and added:
        kept, dropped = drop_refuted(list(added), certificate, names, prove_with)
        if not dropped:  # no fold alone is wrong: the refuted result fails (with_proof)
            break
        for site, why in dropped:
            fold_refusals = fold_refusals + refusals(site, Code.VERIFICATION_FAILED, why)
        gm, added = _refolded(make, kept, rounding, fold_refusals)
        report.refused, report.lowered = list(fold_refusals), []
        if lower is not None:
            lower_left(gm, report, lower)
    return gm, added, certificate, fold_refusals


def _refolded(
    make: Callable[[], fx.GraphModule],
    sites: list[AnySite],
    rounding: Rounding,
    refused: list[Refusal],
) -> tuple[fx.GraphModule, dict[AnySite, int]]:
    """A fresh module with ``sites`` applied in order; a merge whose branch folds were
    dropped cannot apply and is refused into ``refused``."""
    gm, added = make(), {}
    for site in sites:
        try:
            added[site] = apply_site(gm, site, rounding)
        except Unfoldable as e:
            refused += refusals(site, Code.VERIFICATION_FAILED, str(e))
    return gm, added


def _rollback(
    make: Callable[[], fx.GraphModule],
    sites: list[AnySite],
    check: checking.Check,
    report: FoldReport,
    rounding: Rounding,
    lower: LowerForm | None,
) -> list[AnySite]:
    """The sites to keep: fresh copies refolded (and lowered, as the fold run lowers),
    each site kept if the sampled check passes with it and those kept before.

    Each trial is judged by sampling alone: a subset of proven sites is not proven
    (a site applied without the one it followed lands elsewhere). Each site dropped is
    refused into ``report``.
    """

    def failure(kept: list[AnySite], site: AnySite) -> str | None:
        try:
            gm = _folded(make, [*kept, site], rounding)[0]
        except Unfoldable as e:  # a merge whose branch folds were rolled back
            return str(e)
        _lowered_trial(gm, lower, rounding)
        trial = check(gm, None)
        return checking.describe_failure(trial) if trial.status == "failed" else None

    kept, dropped = keep_passing(sites, failure)
    for site, detail in dropped:
        report.refused += refusals(site, Code.VERIFICATION_FAILED, detail)
    return kept


def _lowered_trial(
    gm: fx.GraphModule, lower: LowerForm | None, rounding: Rounding
) -> list[Lowered]:
    """Lower ``gm`` as the fold run does (a trial's module must differ from the
    original only as the result would); returns what was lowered."""
    if lower is None:
        return []
    scratch = FoldReport(front="torch", rounding=rounding)
    lower_left(gm, scratch, lower)
    return scratch.lowered


def _op_counts(gm: fx.GraphModule) -> dict[str, int]:
    from bnfold.report import count_ops

    return count_ops([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
