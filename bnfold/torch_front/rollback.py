"""Roll back the eager folds that fail: proof first, then sampling, fold by fold.

:func:`verify_with_rollback` is what :mod:`bnfold.torch_front.run` calls once the
folds are applied: it proves them (:mod:`bnfold.verification.torch_proof`), checks
them all at once with a :class:`~bnfold.torch_front.verify.Check`, and, when that
fails, keeps only the folds that pass one by one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnfold.affine import Unfoldable
from bnfold.core.layouts import LayoutError
from bnfold.fixpoint import keep_passing
from bnfold.proof import Certificate
from bnfold.report import Code, Refusal, VerifyResult
from bnfold.torch_front.eager import Undo
from bnfold.torch_front.verify import Check, describe_failure
from bnfold.verification.torch_proof import ProveFolds, drop_refuted, vouching
from bnfold.verification.verdict import with_proof


def verify_with_rollback(
    check: Check,
    folded: nn.Module,
    undos: list[Undo],
    redo: Callable[[Undo], Undo],
    prove: ProveFolds | None = None,
) -> tuple[VerifyResult, list[Undo], list[Refusal]]:
    """Prove the folds, then verify them all at once; if that fails, keep only the
    folds that pass one by one.

    With ``prove`` (proof first, :mod:`bnfold.verification.torch_proof`): each fold
    the proof refutes is undone and refused before anything is sampled, and a
    certificate that vouches (:func:`~bnfold.verification.torch_proof.vouching`) lets
    a sampled difference within rounding pass in the whole check. On a sampled
    failure every fold is undone, then re-applied in order, each kept only if the
    outputs still pass, judged by sampling alone: a subset of proven folds is not
    proven (a fold re-applied without the one it followed, Conv -> BN1 -> BN2 without
    BN1, folds into the wrong place). The folds kept are then proven once more, and
    that certificate is the one reported.

    Returns:
        (final verification, with the certificate of the folds kept; folds kept;
        VERIFICATION_FAILED refusals, with the proof's finding or the difference
        measured with that fold).
    """
    undos, certificate, refused = _proven(undos, redo, prove)
    result = check(folded, vouching(certificate))
    if result.status != "failed":  # passed, or nothing to judge by (no evidence): keep
        return with_proof(result, certificate), undos, refused
    undos, dropped = _sampled_rollback(check, folded, undos, redo)
    refused += dropped
    undos, certificate, more = _proven(undos, redo, prove)
    refused += more
    return with_proof(check(folded, vouching(certificate)), certificate), undos, refused


def _proven(
    undos: list[Undo], redo: Callable[[Undo], Undo], prove: ProveFolds | None
) -> tuple[list[Undo], Certificate | None, list[Refusal]]:
    """Prove the folds applied, undoing each the proof refutes (None: no proof).

    Repeats until nothing more is refuted: a fold re-applied without one refuted may be
    refuted in turn. Returns the undos of the folds kept, the last certificate and a
    VERIFICATION_FAILED refusal for each fold dropped.
    """
    refused: list[Refusal] = []
    certificate = None
    while prove is not None:
        certificate = prove(undos)
        if not certificate.refuted or not undos:
            break
        undos, dropped = _without_refuted(undos, certificate, redo, prove)
        refused += [Refusal(u.pair.site, Code.VERIFICATION_FAILED, why) for u, why in dropped]
        if not dropped:  # no fold alone is wrong: the refuted result fails (with_proof)
            break
    return undos, certificate, refused


def _sampled_rollback(
    check: Check, folded: nn.Module, undos: list[Undo], redo: Callable[[Undo], Undo]
) -> tuple[list[Undo], list[Refusal]]:
    """Undo every fold, then re-apply them in order, each kept only if the sampled
    check (no certificate: a trial's subset is unproven) still passes with it."""
    for undo in reversed(undos):
        undo()
    redone: dict[int, Undo] = {}  # id of each fold kept -> the undo of its re-application

    def failure(_kept: list[Undo], undo: Undo) -> str | None:
        again = _redone(redo, undo)
        if isinstance(again, str):
            return again
        trial = check(folded, None)
        if trial.status == "failed":
            again()
            return describe_failure(trial)
        redone[id(undo)] = again
        return None

    kept, dropped = keep_passing(undos, failure)
    refusals = [Refusal(u.pair.site, Code.VERIFICATION_FAILED, why) for u, why in dropped]
    return [redone[id(u)] for u in kept], refusals


def _redone(redo: Callable[[Undo], Undo], undo: Undo) -> Undo | str:
    """The undo of ``undo``'s fold applied again, or why it no longer applies.

    :func:`~bnfold.torch_front.eager.apply_fold` computes every value before it
    writes, so a fold that raises left the module as it was.
    """
    try:
        return redo(undo)
    except (Unfoldable, LayoutError) as e:
        return f"cannot be applied again without the folds dropped: {e}"


def _without_refuted(
    undos: list[Undo], certificate: Certificate, redo: Callable[[Undo], Undo], prove: ProveFolds
) -> tuple[list[Undo], list[tuple[Undo, str]]]:
    """Drop the folds the proof refutes (:func:`drop_refuted`); the module is left with
    the others applied. Returns their new undos, and each fold dropped with its reason
    (one that no longer applies without those dropped among them)."""
    applied: dict[int, Undo] = {id(u): u for u in undos}  # what the module carries now
    unappliable: dict[int, str] = {}

    def apply_only(folds: list[Undo]) -> list[Undo]:
        for undo in reversed(list(applied.values())):
            undo()
        applied.clear()
        for fold in folds:
            again = _redone(redo, fold)
            if isinstance(again, str):
                unappliable[id(fold)] = again
            else:
                applied[id(fold)] = again
        return list(applied.values())

    kept, dropped = drop_refuted(
        undos, certificate, lambda u: [u.pair.site], lambda folds: prove(apply_only(folds))
    )
    now = apply_only(kept)
    dropped += [(u, unappliable[id(u)]) for u in kept if id(u) not in applied]
    return now, dropped
