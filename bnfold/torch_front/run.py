"""One fold run on an eager module: find pairs, check, apply (to a fixpoint), verify, report."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from torch import nn

from bnfold.affine import Rounding
from bnfold.errors import BnfoldError
from bnfold.fixpoint import fold_rounds
from bnfold.options import VerifyOptions
from bnfold.report import Code, Folded, FoldReport, FoldResult, LowerForm, Refusal
from bnfold.torch_front import eager, lower_modules
from bnfold.torch_front import verify as checking
from bnfold.torch_front.census import batchnorm_count, module_batchnorms, modules_left
from bnfold.torch_front.eager_match import prefer_before
from bnfold.torch_front.eager_pairs import AnyPair, JoinPair, Pair, TapPair
from bnfold.torch_front.modules import find_roles, leaf_type_counts, observe
from bnfold.torch_front.rollback import verify_with_rollback
from bnfold.torch_front.tensors import exact_values
from bnfold.torch_front.trace import Finders
from bnfold.verification.torch_proof import EagerProver, ProveFolds, with_entries


def fold(
    module: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool,
    verify: VerifyOptions | None,
    rounding: Rounding = Rounding.NEAREST,
    lower: LowerForm | None = None,
    prove: bool = True,
) -> FoldResult:
    """See :func:`bnfold.torch_front.fold_module`; ``verify`` None skips verification.

    With ``lower``, the BN modules left once folding reaches its fixpoint are
    lowered (:func:`bnfold.torch_front.lower_modules.lower_left`) before the
    whole module is verified, so a wrong lowering fails verification too.
    With ``verify`` and ``prove``, the folds are proven before they are sampled
    (:mod:`bnfold.verification.torch_proof`): a refuted fold is rolled back.
    """
    with exact_values():  # a module folded twice is still rounded once
        args = as_args(example_inputs)
        work = module if inplace else _copy(module)
        report = FoldReport(front="torch", ops_before=leaf_type_counts(work), rounding=rounding)
        bns, training = module_batchnorms(work)
        finders = Finders()  # shared by every round: what was traced is not traced again
        first_scan = _checked_pairs(work, args, finders)  # a module that cannot run fails here
        # Reference outputs before any fold: with inplace=True the module itself changes.
        check = None if verify is None else checking.Check.of(module, args, verify)
        prover = None
        if check is not None and prove:  # the original as the first search saw it
            prover = EagerProver.of(module, args, inplace=inplace, finders=finders)
        undos = _fold_to_fixpoint(work, args, finders, first_scan, report, rounding)
        if lower is not None:
            left = modules_left(work, bns)
            # the input ranks a conv form needs: seen by the search, else one more run
            calls = finders.calls or observe(work, args, left)
            report.lowered, report.refused = lower_modules.lower_left(
                work, left, report.refused, lower, calls
            )
        result = FoldResult(work, report)
        if check is not None:
            check = check.at_sites(checking.site_paths([u.pair for u in undos]))
            result.verification, undos, failed = verify_with_rollback(
                check, work, undos, lambda u: eager.apply_fold(work, u.pair, rounding),
                _proving(prover, work, report),
            )  # fmt: skip
            report.refused += failed
        report.folded = [_folded(u) for u in undos]
        report.ops_after = leaf_type_counts(work)
        report.batchnorm = batchnorm_count(
            len(bns), training, modules_left(work, bns), report.refused, len(report.lowered)
        )
        return result


def _proving(prover: EagerProver | None, work: nn.Module, report: FoldReport) -> ProveFolds | None:
    """Prove ``work`` with the folds of the given undos applied (None: no proof)."""
    if prover is None:
        return None
    return lambda undos: prover.prove(work, with_entries(report, [_folded(u) for u in undos]))


def _copy(module: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as e:
        raise BnfoldError(
            f"cannot deep-copy the module ({type(e).__name__}: {e}); fold it with inplace=True"
        ) from None


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Positional inputs as a tuple; a single tensor (or other value) becomes ``(x,)``."""
    return tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)


def _fold_to_fixpoint(
    work: nn.Module,
    args: tuple[Any, ...],
    finders: Finders,
    scan: tuple[list[AnyPair], list[Refusal]],
    report: FoldReport,
    rounding: Rounding,
) -> list[eager.Undo]:
    """Find and apply pairs in rounds until a round folds nothing new
    (:func:`bnfold.fixpoint.fold_rounds`, from the first ``scan``).

    A fold can create a pair: in ``Conv -> BN1 -> BN2`` BN2 follows the conv
    directly once BN1 is an ``nn.Identity``. Only a refused BN can become a
    pair, so a scan that refused nothing is the last. Only refusals of the last
    scan are reported (earlier ones may have been folded since); a pair that
    failed to apply is not tried again.
    """
    rounds = fold_rounds(
        lambda: _checked_pairs(work, args, finders),
        lambda pair: eager.apply_fold(work, pair, rounding),
        _refusal,
        first=scan,
        only_refused_become_sites=True,
    )
    report.refused += rounds.refused + rounds.failed
    return [undo for _, undo in rounds.applied]


def _checked_pairs(
    work: nn.Module, args: tuple[Any, ...], finders: Finders
) -> tuple[list[AnyPair], list[Refusal]]:
    roles = find_roles(work)
    scan, calls = finders.search(work, args, roles)
    refused = list(scan.refused)
    pairs: list[AnyPair] = []
    for pair in scan.pairs:
        result = eager.checked(work, pair, roles, calls)
        if isinstance(result, Refusal):
            refused.append(_explained(pair, result))
        else:
            pairs.append(result)
    return pairs, refused


def _explained(pair: AnyPair, refusal: Refusal) -> Refusal:
    """A refused before pair, reported with why the BN could not fold after either."""
    after = pair.after_refusal if isinstance(pair, Pair) else None
    return refusal if after is None else prefer_before(after, refusal)  # type: ignore[return-value]


def _refusal(pair: AnyPair, code: Code, detail: str) -> list[Refusal]:
    return [Refusal(pair.site, code, detail)]


def _folded(undo: eager.Undo) -> Folded:
    pair = undo.pair
    return Folded(pair.site, _pattern(undo), pair.linear, pair.bn, pair.finder, kind=pair.kind)


def _pattern(undo: eager.Undo) -> str:
    """Module types in data-flow order: "Conv2d+BatchNorm2d", "Conv2d+Conv2d+cat+BatchNorm2d",
    "Conv2d+avg_pool2d+BatchNorm2d"; an identity tap: "BatchNorm2d+add+Conv2d"."""
    pair, bn = undo.pair, type(undo.bn).__name__
    lins = [type(undo.root.get_submodule(p)).__name__ for p in pair.linears]
    if isinstance(pair, JoinPair):
        return "+".join([*lins, pair.join, bn])
    if isinstance(pair, TapPair):
        return "+".join([bn, "add", *lins])
    between = pair.between
    if between and pair.pool is None:
        between = _between_label(undo.root, between)
    chain = (bn, between, lins[0]) if pair.before else (lins[0], between, bn)
    return "+".join(p for p in chain if p)


def _between_label(root: nn.Module, between: str) -> str:
    """Type of a Sequential neighbour ("Flatten"), else the traced op, capitalized ("View")."""
    with contextlib.suppress(AttributeError):
        return type(root.get_submodule(between)).__name__
    return between.capitalize()
