"""The fold-to-fixpoint loop both torch fronts share (bnfold.fixpoint), on a toy model.

The toy: a chain of BN names; a BN is a site once the BN before it has folded
(``Conv -> BN1 -> BN2``: BN2 follows the conv once BN1 is gone), else refused.
"""

from __future__ import annotations

from bnfold.affine import Unfoldable
from bnfold.fixpoint import Rounds, fold_rounds, keep_passing
from bnfold.layouts import LayoutError
from bnfold.report import Code, Refusal


class Chain:
    """``Conv -> bn0 -> bn1 -> ...``, and ``loose`` BNs that are sites from the start.

    ``bad`` BNs raise when applied, as bad values do.
    """

    def __init__(
        self, length: int, loose: tuple[str, ...] = (), bad: dict[str, Exception] | None = None
    ) -> None:
        self.left = [f"bn{i}" for i in range(length)]
        self.loose = list(loose)
        self.bad = bad or {}
        self.searches = 0
        self.applies: list[str] = []

    def find(self) -> tuple[list[str], list[Refusal]]:
        self.searches += 1
        first, rest = self.left[:1], self.left[1:]
        return first + self.loose, [Refusal(bn, Code.STANDALONE, "fed by a BN") for bn in rest]

    def apply(self, bn: str) -> str:
        self.applies.append(bn)
        if bn in self.bad:
            raise self.bad[bn]
        (self.left if bn in self.left else self.loose).remove(bn)
        return f"undo {bn}"


def refuse(site: str, code: Code, detail: str) -> list[Refusal]:
    return [Refusal(site, code, detail)]


def test_a_chain_folds_one_link_per_round_until_nothing_is_new() -> None:
    chain = Chain(3)
    rounds: Rounds[str, str] = fold_rounds(chain.find, chain.apply, refuse)
    assert rounds.applied == [("bn0", "undo bn0"), ("bn1", "undo bn1"), ("bn2", "undo bn2")]
    assert rounds.refused == [] and rounds.failed == []
    assert chain.searches == 4  # the last search finds nothing new


def test_a_site_that_cannot_fold_is_refused_once_and_not_retried() -> None:
    chain = Chain(2, loose=("x",), bad={"x": Unfoldable("variance < 0")})
    rounds = fold_rounds(chain.find, chain.apply, refuse)
    assert rounds.applied == [("bn0", "undo bn0"), ("bn1", "undo bn1")]
    assert rounds.failed == [Refusal("x", Code.BAD_VALUES, "variance < 0")]
    assert chain.applies == ["bn0", "x", "bn1"]  # x is found in every round, tried once


def test_the_refusals_of_the_last_search_are_kept() -> None:
    chain = Chain(2, bad={"bn0": Unfoldable("variance < 0")})
    rounds = fold_rounds(chain.find, chain.apply, refuse)
    assert rounds.applied == []
    assert [(r.site, r.code) for r in rounds.refused] == [("bn1", Code.STANDALONE)]
    assert rounds.failed == [Refusal("bn0", Code.BAD_VALUES, "variance < 0")]


def test_a_layout_error_is_a_bad_groups_refusal() -> None:
    chain = Chain(1, bad={"bn0": LayoutError("4 channels, 3 groups")})
    rounds = fold_rounds(chain.find, chain.apply, refuse)
    assert rounds.failed == [Refusal("bn0", Code.BAD_GROUPS, "4 channels, 3 groups")]


def test_the_first_search_can_be_given_and_a_search_without_refusals_can_end_the_rounds() -> None:
    chain = Chain(1)
    first = chain.find()
    rounds = fold_rounds(
        chain.find, chain.apply, refuse, first=first, only_refused_become_sites=True
    )
    assert rounds.applied == [("bn0", "undo bn0")]
    assert chain.searches == 1  # nothing was refused, so no second search

    chain = Chain(1)
    rounds = fold_rounds(chain.find, chain.apply, refuse, first=chain.find())
    assert chain.searches == 2


def test_keep_passing_keeps_each_site_that_passes_with_those_kept_before_it() -> None:
    # "b" fails only together with "a"; "c" fails alone.
    def failure(kept: list[str], site: str) -> str | None:
        if site == "c" or (site == "b" and "a" in kept):
            return f"{site} changes the outputs"
        return None

    kept, dropped = keep_passing(["a", "b", "c", "d"], failure)
    assert kept == ["a", "d"]
    assert dropped == [("b", "b changes the outputs"), ("c", "c changes the outputs")]
