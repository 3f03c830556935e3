"""The order families are asked in, and the one refusal a BN that folds nowhere gets."""

from __future__ import annotations

import pytest

from bnfold.report import Code, Refusal
from bnfold.rules import FAMILIES, precedence


def test_the_registry_lists_every_family_once_in_the_asking_order() -> None:
    names = [family.name for family in FAMILIES]
    assert names[:-1] == list(precedence.ORDER) and names[-1] == "lower"
    assert len(set(names)) == len(names)
    for family in FAMILIES:  # each module's docstring says what it matches and refuses
        assert "Matches:" in family.doc and "Refuses" in family.doc


def test_the_eager_order_differs_only_in_asking_join_before_branch_sum() -> None:
    eager, order = list(precedence.EAGER_ORDER), list(precedence.ORDER)
    assert sorted(eager) == sorted(order) and eager != order
    swapped = [{"join": "branch_sum", "branch_sum": "join"}.get(name, name) for name in eager]
    assert swapped == order


AFTER_STANDALONE = Refusal("bn", Code.STANDALONE, "input comes from a graph input")
AFTER_BRANCHING = Refusal("conv -> bn", Code.BRANCHING, "conv's output is also read")
BEFORE = Refusal("bn -> fc", Code.ZERO_PADDING, "fc pads with zeros")


def test_with_nothing_beside_the_bn_the_before_refusal_leads() -> None:
    assert precedence.nothing_beside(AFTER_STANDALONE.code)
    assert not precedence.after_leads(AFTER_STANDALONE.code)
    both = precedence.explain_both(AFTER_STANDALONE, BEFORE, "fc", lead_after=False)
    assert both == Refusal(
        "bn -> fc", Code.ZERO_PADDING, "fc pads with zeros (and input comes from a graph input)"
    )


def test_a_reason_about_the_op_beside_the_bn_leads_and_names_the_reader() -> None:
    assert precedence.after_leads(AFTER_BRANCHING.code)
    both = precedence.explain_both(AFTER_BRANCHING, BEFORE, "fc", lead_after=True)
    assert both == Refusal(
        "conv -> bn",
        Code.BRANCHING,
        "conv's output is also read; nor before fc: fc pads with zeros",
    )


def test_a_bns_own_reasons_leave_no_other_family_a_chance() -> None:
    assert precedence.about_the_bn(Code.TRAINING_MODE)
    assert precedence.about_the_bn(Code.NO_RUNNING_STATS)
    assert not precedence.about_the_bn(Code.BRANCHING)


def test_by_default_the_reader_is_the_before_label_end_and_the_after_code_decides() -> None:
    assert precedence.explain_both(AFTER_BRANCHING, BEFORE) == precedence.explain_both(
        AFTER_BRANCHING, BEFORE, "fc", lead_after=True
    )
    assert precedence.explain_both(AFTER_STANDALONE, BEFORE) == precedence.explain_both(
        AFTER_STANDALONE, BEFORE, "fc", lead_after=False
    )


def test_the_eager_front_asks_the_families_beside_after_in_the_eager_order() -> None:
    pytest.importorskip("torch")
    from bnfold.torch_front.eager_match import BESIDE_AFTER

    asked = [family for family, _matcher in BESIDE_AFTER]
    assert asked == ["join", "branch_sum"]
    assert asked == [family for family in precedence.EAGER_ORDER if family in asked]
