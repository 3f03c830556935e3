"""In which order the families are asked about a BN, and which refusal explains best.

Every front asks, for each BN, the families of :data:`bnfold.rules.FAMILIES` in
their order: after the op feeding it (``adjacent``, through a ``batch_merge``
reshape or a ``pool``), else as an identity term of a ``branch_sum``, else after a
``join`` of linear ops, else ``before`` the op reading it. ``lower`` runs once the
folds reach their fixpoint. A later family is asked only when the earlier refusal
leaves room for it (:func:`nothing_beside`), and a BN that folds neither after
nor before is reported with both reasons (:func:`explain_both`).

The eager front asks ``join`` before ``branch_sum`` (its tap matcher works on
modules, and a tap refusal then replaces the join's, which says less): the one
exception, kept explicit in :data:`EAGER_ORDER` and followed by
:mod:`bnfold.torch_front.eager_match`.
"""

from __future__ import annotations

from dataclasses import replace

from bnfold.report import Code, Refusal
from bnfold.sites import ARROW

ORDER = ("adjacent", "batch_merge", "pool", "branch_sum", "join", "before")
"""The families asked about a BN, in order (every front; ``lower`` comes after the fixpoint)."""

EAGER_ORDER = ("adjacent", "batch_merge", "pool", "join", "branch_sum", "before")
"""The eager front's order today: ``join`` before ``branch_sum``."""


# No linear op beside the BN at all: a branch sum or a join may still hold it.
_NOTHING_BESIDE = frozenset({Code.STANDALONE, Code.NONLINEAR_INPUT})
# Reasons that say only that nothing folds after the BN: a before refusal says more.
_WEAK_AFTER = _NOTHING_BESIDE | {Code.UNTRACEABLE}
# Reasons about the BN itself: no other family can fold it either.
_BN_ITSELF = frozenset({Code.TRAINING_MODE, Code.NO_RUNNING_STATS})


def nothing_beside(after: Code) -> bool:
    """The after refusal found no linear op beside the BN: ask ``branch_sum`` and ``join``."""
    return after in _NOTHING_BESIDE


def about_the_bn(code: Code) -> bool:
    """The refusal is about the BN itself (training mode, no statistics): no family folds it."""
    return code in _BN_ITSELF


def after_leads(after: Code) -> bool:
    """The after refusal explains more than a before one: the op feeding the BN exists
    and something about it (not merely its absence) stops the fold."""
    return after not in _WEAK_AFTER


def explain_both(
    after: Refusal, before: Refusal, reader: str | None = None, lead_after: bool | None = None
) -> Refusal:
    """One refusal for a BN that folds neither after the op feeding it nor before
    ``reader``, the op reading it: the leading refusal, with the other's reason.

    By default ``reader`` is the last name of the before refusal's label
    (``"bn -> flatten -> fc"``: fc), and the after refusal leads when it says more
    than that nothing linear feeds the BN (:func:`after_leads`): how the torch
    fronts ask. The ONNX front names the reader itself and lets a join it found lead.
    """
    if reader is None:
        reader = before.site.rpartition(ARROW)[2]
    if lead_after is None:
        lead_after = after_leads(after.code)
    if not lead_after:
        return replace(before, detail=f"{before.detail} (and {after.detail})")
    return replace(after, detail=f"{after.detail}; nor before {reader}: {before.detail}")
