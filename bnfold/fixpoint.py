"""Fold to a fixpoint, then keep only the folds that verify: the loop both torch fronts run.

A fold can make a new site: in ``Conv -> BN1 -> BN2``, BN2 follows the conv
once BN1 has folded. So a front finds its sites, applies the new ones, and
finds again, until a round applies nothing (:func:`fold_rounds`). When the
folded model then fails verification, the folds are tried again one at a time,
each kept only if it passes with those kept before it (:func:`keep_passing`).

The eager front (:mod:`bnfold.torch_front.run`) and the ``.pt2`` front
(:mod:`bnfold.torch_front.program.run`) supply ``find`` and ``apply`` over their
own sites; the ONNX front runs its rules as a pass instead. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bnfold.affine import Unfoldable
from bnfold.layouts import LayoutError
from bnfold.report import Code, Refusal

S = TypeVar("S", bound=Hashable)  # a front's site record
R = TypeVar("R")  # what applying one site returns (an undo, the bytes a clone added)

Search = tuple[list[S], list[Refusal]]  # the sites one search found, and its refusals
Refuse = Callable[[S, Code, str], list[Refusal]]  # a site not folded, as report rows


@dataclass
class Rounds(Generic[S, R]):
    """What the rounds did.

    Attributes:
        applied: each site applied, in order, with what ``apply`` returned.
        refused: the last search's refusals (an earlier one may have folded since).
        failed: sites whose values could not fold (BAD_VALUES, BAD_GROUPS).
    """

    applied: list[tuple[S, R]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    failed: list[Refusal] = field(default_factory=list)


def fold_rounds(
    find: Callable[[], Search[S]],
    apply: Callable[[S], R],
    refuse: Refuse[S],
    *,
    first: Search[S] | None = None,
    only_refused_become_sites: bool = False,
) -> Rounds[S, R]:
    """Find sites and apply those not tried before, round after round, until a round applies none.

    A site whose ``apply`` raises :class:`~bnfold.affine.Unfoldable` (BAD_VALUES)
    or :class:`~bnfold.layouts.LayoutError` (BAD_GROUPS) is refused through
    ``refuse`` and not tried again; ``apply`` must leave the model unchanged
    when it raises. The rounds end: every site applied removes a BN.

    Args:
        find: one search of the model as it is now.
        apply: fold one site in place.
        refuse: the report rows of a site that did not fold (a merge removing
            several BNs gives one per BN).
        first: the first search, when the caller has already made it.
        only_refused_become_sites: a fold can make a site only of a BN the last
            search refused (the eager front: its neighbour became linear). A
            round after a search that refused nothing is then skipped, and with
            it a trace. The ``.pt2`` front leaves it False: a branch sum whose
            branch BNs folded may merge although nothing was refused.
    """
    rounds: Rounds[S, R] = Rounds()
    tried: set[S] = set()
    sites, rounds.refused = first if first is not None else find()
    while True:
        fresh = [s for s in sites if s not in tried]
        tried.update(fresh)
        done = _apply_each(fresh, apply, refuse, rounds.failed)
        rounds.applied += done
        if not done or (only_refused_become_sites and not rounds.refused):
            return rounds
        sites, rounds.refused = find()


def _apply_each(
    sites: list[S], apply: Callable[[S], R], refuse: Refuse[S], failed: list[Refusal]
) -> list[tuple[S, R]]:
    """Apply each site in turn; one whose values cannot fold goes to ``failed`` instead."""
    done = []
    for site in sites:
        try:
            done.append((site, apply(site)))
        except Unfoldable as e:
            failed += refuse(site, Code.BAD_VALUES, str(e))
        except LayoutError as e:
            failed += refuse(site, Code.BAD_GROUPS, str(e))
    return done


def keep_passing(
    sites: Sequence[S], failure: Callable[[list[S], S], str | None]
) -> tuple[list[S], list[tuple[S, str]]]:
    """The rollback: keep, in order, each site whose fold passes with the sites kept before it.

    Args:
        sites: the folds applied, in the order they were applied.
        failure: ``failure(kept, site)`` folds ``kept`` and ``site`` and verifies;
            it returns why that fails, or None when it passes.

    Returns:
        The sites kept, and each site dropped with its failure.
    """
    kept: list[S] = []
    dropped: list[tuple[S, str]] = []
    for site in sites:
        if (why := failure(kept, site)) is None:
            kept.append(site)
        else:
            dropped.append((site, why))
    return kept, dropped
