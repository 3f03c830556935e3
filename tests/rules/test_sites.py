"""The one site record: its label per kind of site, and the report entries it makes."""

from __future__ import annotations

import pytest

from bnfold.report import Code, Folded, FoldKind, Refusal
from bnfold.sites import Site

LABELS = [
    (Site(FoldKind.ADJACENT, ("conv",), "bn"), "conv -> bn"),
    (Site(FoldKind.ADJACENT, ("fc",), "bn", "view"), "fc -> view -> bn"),
    (Site(FoldKind.THROUGH_POOL, ("conv",), "bn", "avg_pool2d"), "conv -> avg_pool2d -> bn"),
    (Site(FoldKind.ADJACENT, ("fc",), "bn", "flatten", before=True), "bn -> flatten -> fc"),
    (Site(FoldKind.ADJACENT, bn="bn"), "bn"),  # refused before any linear op was found
    (Site(FoldKind.OVER_ADD, ("a", "b"), "bn", join="add"), "a, b -> add -> bn"),
    (Site(FoldKind.OVER_CONCAT, bn="bn", join="Concat_1"), "Concat_1 -> bn"),
    (Site(FoldKind.IDENTITY_TAP, ("conv",), "bn"), "bn -> conv"),
    (Site(FoldKind.IDENTITY_TAP, bn="bn", between="add_1"), "bn -> add_1"),
    (
        Site(FoldKind.REPARAM, ("a",), "top", join="top", terms=(("a", 1), ("b", 1), ("x", 1))),
        "a + b + x -> top",
    ),
    (
        Site(FoldKind.REPARAM, ("m",), "top", join="top", terms=(("m", -1), ("bn", 1))),
        "-m + bn -> top",
    ),
    (
        Site(FoldKind.REPARAM, ("m",), "top", join="top", terms=(("m", 1), ("bn", -1))),
        "m - bn -> top",
    ),
]


@pytest.mark.parametrize(("site", "label"), LABELS, ids=[label for _, label in LABELS])
def test_each_kind_of_site_is_labelled_in_data_flow_order(site: Site, label: str) -> None:
    assert site.label == label


def test_a_site_makes_its_refusal_and_its_folded_entry() -> None:
    site = Site(FoldKind.OVER_ADD, ("a", "b"), "bn", join="add", finder="export")
    assert site.refusal(Code.BRANCHING, "why") == Refusal(
        "a, b -> add -> bn", Code.BRANCHING, "why"
    )
    folded = site.folded("conv2d+conv2d+add+batch_norm", bytes_added=8, value="out")
    assert folded == Folded(
        "a, b -> add -> bn", "conv2d+conv2d+add+batch_norm", "a, b", "bn", "export", 8,
        FoldKind.OVER_ADD, "out",
    )  # fmt: skip


def test_result_is_at_the_bn_after_a_fold_at_the_op_before_one_and_nowhere_for_a_tap() -> None:
    assert Site(FoldKind.ADJACENT, ("conv",), "bn").result_at == "bn"
    assert Site(FoldKind.ADJACENT, ("fc",), "bn", before=True).result_at == "fc"
    assert Site(FoldKind.IDENTITY_TAP, ("conv",), "bn").result_at is None


def test_sites_are_hashable_so_a_fixpoint_remembers_them() -> None:
    tried = {Site(FoldKind.ADJACENT, ("conv",), "bn", keys=("conv2d", "batch_norm"))}
    assert Site(FoldKind.ADJACENT, ("conv",), "bn", keys=("conv2d", "batch_norm")) in tried
    assert Site(FoldKind.ADJACENT, ("conv",), "bn", keys=("conv2d_1", "batch_norm")) not in tried
