"""Proof first on the torch fronts: prove the folds in memory before the sampled check.

The eager front (:mod:`bnfold.torch_front.run`) and the ``.pt2`` front
(:mod:`bnfold.torch_front.program.run`) fold in memory, then verify. Before the
sampled check they prove the folded module against the original
(:mod:`bnfold.proof`), as the ONNX front proves its staged output:

1. A site the proof refutes (its maps differ) is rolled back with a
   VERIFICATION_FAILED refusal that quotes the proof, and the rest is proven again:
   nothing the proof refutes is written. A difference the proof cannot pin on a site
   (a change outside every site, a lowered BN's region) is sought fold by fold
   (:func:`drop_refuted`); one no fold brings fails the result.
2. A certificate that holds is handed to the sampled check
   (:func:`bnfold.verification.verdict.judge`): a difference within
   :data:`~bnfold.verification.verdict.PROOF_ENVELOPE` times its rounding bound then
   passes, and no fold is rolled back for it; a gross one still fails (the prover
   would be wrong). A certificate that took the finder's pairing on trust
   (module level) does not vouch (:func:`vouching`). A subset of proven folds is not
   proven (a fold re-applied without the one it followed lands elsewhere), so the
   fold-by-fold rollback judges each trial by sampling alone, and the folds it keeps
   are proven again: that certificate is the one reported.
3. A certificate that cannot decide (a region the prover cannot model) leaves the
   sampled check to decide alone, as without the proof.

The prover never stops a fold on its own failure: a program it cannot read, an export
that fails, become a certificate that is "not proven" with the reason
(:func:`~bnfold.verification.proving.attempt`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import fx, nn

from bnfold.fixpoint import keep_passing
from bnfold.proof import Certificate
from bnfold.report import FoldReport
from bnfold.torch_front.trace import Finders, export_program
from bnfold.verification.proving import attempt, not_proven

EAGER = "torch eager"
PROGRAM = "torch program"


def refuted_sites(certificate: Certificate | None, sites: Iterable[str]) -> dict[str, str]:
    """The report sites the proof refutes, each with the reason to report.

    A region the prover found differing names the report sites it covers
    (``"conv1 -> bn1; conv2 -> bn2"``): each is refuted. A difference that names no
    site (:func:`unpinned`) refutes none here.
    """
    if certificate is None or not certificate.refuted:
        return {}
    sites = set(sites)
    wrong: dict[str, str] = {}
    for region in certificate.differing:
        for site in _named(region.name, sites):
            wrong.setdefault(site, f"the proof found a difference: {region.reason}")
    return wrong


def unpinned(certificate: Certificate | None, sites: Iterable[str]) -> list[str]:
    """The differences the proof found that name no fold site: a change outside every
    region, or a differing region that names none (a lowered BN, ``"bn3 (lowered)"``:
    a lowering failed, not a fold)."""
    if certificate is None or not certificate.refuted:
        return []
    sites = set(sites)
    found = [f"outside the sites: {d}" for d in certificate.differences]
    found += [
        f"at {region.name}: {region.reason}"
        for region in certificate.differing
        if not _named(region.name, sites)
    ]
    return found


def _named(region: str, sites: set[str]) -> list[str]:
    """The fold sites a region's name lists (``"conv1 -> bn1; bn3 (lowered)"``)."""
    return [s for s in region.split("; ") if s in sites]


S = TypeVar("S")  # a front's record of one applied fold


def drop_refuted(
    folds: list[S],
    certificate: Certificate,
    names: Callable[[S], list[str]],
    prove_with: Callable[[list[S]], Certificate],
) -> tuple[list[S], list[tuple[S, str]]]:
    """The folds to keep when ``certificate`` (of all ``folds``) refutes some, and each
    fold dropped with the proof's reason.

    When a differing region names exactly one fold, and nothing names none, that fold
    is dropped without more proofs. Otherwise the proof cannot say which is wrong: a
    region holding several folds (a chain into one conv, a tap beside its conv's own
    BN), or a difference that names no fold (:func:`unpinned`). Then the folds are
    re-applied in order (:func:`bnfold.fixpoint.keep_passing`, ``prove_with``
    applying exactly the folds it is given), each suspect kept unless the proof of it
    with those kept before names it, or finds a difference naming no fold that the
    proof of those kept before did not. A difference there without any fold (a
    lowering that failed) drops none: the refuted certificate then fails the result.
    """
    sites = [n for fold in folds for n in names(fold)]
    wrong = refuted_sites(certificate, sites)
    suspects = [f for f in folds if any(n in wrong for n in names(f))]
    if len(suspects) == 1 and not unpinned(certificate, sites):
        (suspect,) = suspects
        reason = next(wrong[n] for n in names(suspect) if n in wrong)
        return [f for f in folds if f is not suspect], [(suspect, reason)]
    suspected = {id(f) for f in (folds if unpinned(certificate, sites) else suspects)}
    known: list[list[str]] = []  # the unpinned differences of the folds kept so far

    def sites_of(kept: list[S]) -> list[str]:
        return [n for f in kept for n in names(f)]

    def failure(kept: list[S], fold: S) -> str | None:
        if id(fold) not in suspected:
            return None
        if not known:
            known.append(unpinned(prove_with(kept), sites_of(kept)))
        trial = prove_with([*kept, fold])
        found = refuted_sites(trial, sites_of([*kept, fold]))
        if reason := next((found[n] for n in names(fold) if n in found), None):
            return reason
        differences = unpinned(trial, sites_of([*kept, fold]))
        if new := [d for d in differences if d not in known[0]]:
            return f"the proof found a difference with this fold: {new[0]}"
        known[0] = differences
        return None

    return keep_passing(folds, failure)


def vouching(certificate: Certificate | None) -> Certificate | None:
    """The certificate the sampled check may lean on: one that holds and traced the
    pairing, else None.

    A module-level certificate (:attr:`~bnfold.proof.Certificate.pairing_assumed`)
    took the pairing from the finder, whose blind spots only the sampled check can
    catch: that check must not be loosened by it. Such a certificate is still
    attached to the result (:func:`~bnfold.verification.verdict.with_proof`).
    """
    if certificate is None or not certificate.holds or certificate.pairing_assumed:
        return None
    return certificate


@dataclass
class EagerProver:
    """Proves eager folds of one module against its state before the fold.

    ``program`` is the original as the export finder exported it in the fold run's
    first search, before any fold (folds assign new Parameters, so the program keeps
    the original's even when the module is folded in place); the folded module is
    exported the same way. Without one (export fails or is not tried: detectors),
    each site is proven from its modules' parameters, the pairing taken from the
    report (:func:`bnfold.proof.prove_eager` without example inputs), which needs the
    original module untouched (``original``; None when folded in place).
    """

    args: tuple[Any, ...]
    original: nn.Module | None
    program: Any = None
    untraced: str = "torch.export was not tried"  # why there is no program

    @classmethod
    def of(
        cls, module: nn.Module, args: tuple[Any, ...], *, inplace: bool, finders: Finders
    ) -> EagerProver:
        """The prover of a fold run whose first search ``finders`` made, before any fold.

        The export finder's program is the original (one export less); where export
        failed or was not tried (a detector), the proof goes module by module.
        """
        prover = cls(args, None if inplace else module, finders.program)
        if prover.program is None:
            prover.untraced = _why_untraced(finders.failed.get("export"))
        return prover

    def prove(self, folded: nn.Module, report: FoldReport) -> Certificate:
        """The certificate of ``folded`` against the original; never raises."""
        from bnfold.proof import prove_eager, prove_program

        def by_program() -> Certificate:
            try:  # as the export finder exported the original: they differ only by the folds
                program = export_program(folded, self.args)
            except Exception as exc:  # the folded module exports as the original did: rare
                certificate = by_modules()
                certificate.assumptions.append(
                    f"the folded module failed torch.export ({type(exc).__name__}: {exc})"
                )
                return certificate
            certificate = prove_program(self.program, program, report)
            certificate.front = EAGER
            return certificate

        def by_modules() -> Certificate:
            if self.original is None:
                return not_proven(EAGER, "folded in place and not exportable: no original left")
            if report.lowered:  # a module-level proof knows no lowered module
                return not_proven(EAGER, "lowered BNs are proven only in an exported program")
            return prove_eager(self.original, folded, report, untraced=self.untraced)

        return attempt(by_program if self.program is not None else by_modules, EAGER)


def _why_untraced(export_failure: str | None) -> str:
    """Why the fold run has no program of the original (its inputs were given)."""
    if export_failure is None:
        return "torch.export was not tried"
    if export_failure.startswith("not tried"):
        return f"torch.export {export_failure}"
    return f"torch.export failed ({export_failure})"


def prove_graph_modules(
    original: fx.GraphModule, folded: fx.GraphModule, report: FoldReport
) -> Certificate:
    """A ``.pt2`` fold proven as the graph modules it was made on; never raises."""
    from bnfold.proof import prove_program

    return attempt(lambda: prove_program(original, folded, report), PROGRAM)


def with_entries(report: FoldReport, entries: Sequence[Any]) -> FoldReport:
    """A copy of ``report`` listing ``entries`` as folded: the site names the prover reads."""
    copy = FoldReport(front=report.front, rounding=report.rounding)
    copy.folded, copy.lowered = list(entries), list(report.lowered)
    return copy


ProveFolds = Callable[[list[Any]], Certificate]
"""Prove the folded model with exactly these folds applied (a front's own records)."""
