"""The one record of a fold site, for every front: what folds into what, and its label.

Each front finds sites in its own graph (ONNX nodes, eager module paths, aten
nodes of a ``.pt2``) and describes each as a :class:`Site`, by the names its
report uses. The site's label (``"conv -> bn"``, ``"a, b -> add -> bn"``,
``"bn -> conv"``, ``"conv_a + conv_b - bn -> add"``) and its
:class:`~bnfold.report.Folded` and :class:`~bnfold.report.Refusal` entries are
made here only, so every front reports the same kind of site the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnfold.report import Code, Folded, FoldKind, Refusal

ARROW = " -> "
"""Between the names of a site's label (``conv -> bn``)."""


@dataclass(frozen=True)
class Site:
    """One fold site, by the names its front reports. Frozen and hashable, so a set
    of tried sites works as a fixpoint loop needs.

    Attributes:
        kind: what kind of fold it is.
        linears: the linear ops whose weights the fold writes (a join: every term's;
            none for a refusal made before any was found).
        bn: the affine the fold removes (a merge: the top of its tree).
        between: a shape op or pool between linear op and BN; for an identity tap
            refused before a conv was chosen, the top of its sum.
        before: the BN is before the linear op (``bn -> linear``).
        join: an add/concat join (its name, "add" or "cat" on torch); a merge's top.
        dim: a concat's axis, as written.
        sign: an identity tap's sign (-1 when the BN's term or the conv's is subtracted).
        terms: a merge's terms, ``(name, sign)``, convs then identities ("x" bare).
        finder: which torch finder found it ("" on ONNX).
        keys: the front's own handles (``.pt2`` node names), stable across copies.
    """

    kind: FoldKind
    linears: tuple[str, ...] = ()
    bn: str = ""
    between: str = ""
    before: bool = False
    join: str = ""
    dim: int = 1
    sign: int = 1
    terms: tuple[tuple[str, int], ...] = ()
    finder: str = ""
    keys: tuple[str, ...] = ()

    @property
    def linear(self) -> str:
        """The linear ops, as one name ("a, b" for a join)."""
        return ", ".join(self.linears)

    @property
    def label(self) -> str:
        """How reports name the site, in data-flow order."""
        if self.kind is FoldKind.REPARAM:
            return _signed_sum(self.terms) + ARROW + self.join
        if self.kind is FoldKind.IDENTITY_TAP:
            return _chain(self.bn, self.between, self.linear)
        if self.kind in (FoldKind.OVER_ADD, FoldKind.OVER_CONCAT):
            return _chain(self.linear, self.join, self.bn)
        if self.before:
            return _chain(self.bn, self.between, self.linear)
        return _chain(self.linear, self.between, self.bn)

    @property
    def result_at(self) -> str | None:
        """What carries the fold's result in both models: the BN's place after a fold
        (its output passes the linear op's on), the linear op before one; None for an
        identity tap, a term of a sum that nothing outputs alone."""
        if self.kind is FoldKind.IDENTITY_TAP:
            return None
        return self.linears[0] if self.before else self.bn

    def refusal(self, code: Code, detail: str) -> Refusal:
        """The site left unchanged, and why."""
        return Refusal(self.label, code, detail)

    def folded(self, pattern: str, bytes_added: int = 0, value: str = "") -> Folded:
        """The site folded: ``pattern`` its ops ("Conv+BatchNormalization"), ``value`` the
        name of the value carrying its result (ONNX)."""
        return Folded(
            self.label, pattern, self.linear, self.bn, self.finder, bytes_added, self.kind, value
        )


def site_label(linear: str, bn: str, between: str = "", before: bool = False) -> str:
    """The label of a site of one linear op and an affine beside it (:attr:`Site.label`),
    for a front that keeps its own record of the site."""
    return Site(FoldKind.ADJACENT, (linear,), bn, between, before).label


def _chain(*names: str) -> str:
    return ARROW.join(name for name in names if name)


def _signed_sum(terms: tuple[tuple[str, int], ...]) -> str:
    """ "a + b - c", a leading minus for a first term subtracted."""
    if not terms:
        return ""
    (first, sign), rest = terms[0], terms[1:]
    text = ("-" if sign < 0 else "") + first
    return text + "".join((" - " if s < 0 else " + ") + name for name, s in rest)
