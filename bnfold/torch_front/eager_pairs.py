"""The eager front's fold sites: :class:`bnfold.sites.Site` records named by module
paths, and a finder's :class:`Scan` of them.

A linear module and a BN beside it is a :class:`Pair`, a BN after a join of linear
modules a :class:`JoinPair`, an identity BN of a branch sum a :class:`TapPair`.
Each is the one site record of every front (its label, ``result_at`` and report
entries come from :class:`~bnfold.sites.Site`) plus what only an eager fold needs:
the BN children that stay in its place, and a pair's pool. The matchers of
:mod:`bnfold.torch_front.eager_match` make them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bnfold.report import FoldKind, Refusal
from bnfold.sites import Site
from bnfold.torch_front.pools import Pool


@dataclass(frozen=True)
class EagerSite(Site):
    """A :class:`~bnfold.sites.Site` on eager modules.

    ``kept`` is set once the BN is checked: the children it runs after its affine
    (timm's ``drop``, ``act``), which stay in its place when it folds.
    """

    kept: tuple[str, ...] = field(default=(), compare=False)

    @property
    def site(self) -> str:
        """The site's label (:attr:`~bnfold.sites.Site.label`), by the name the torch
        fold run and its verification read."""
        return self.label


@dataclass(frozen=True)
class Pair(EagerSite):
    """A linear module and a BN module beside it.

    After (``before=False``): the linear's only output goes into the BN.
    Before (``before=True``): the BN's only output goes into the linear.
    Either directly or through ``between``: a flatten/view/reshape/(un)squeeze,
    named for the report; whether channels survive it is checked on shapes.
    After, ``between`` may also be a pool (``pool`` says which; the fold passes
    through it, see :mod:`bnfold.torch_front.pools`).
    ``after_refusal`` says why the BN could not fold after (before pairs only).
    ``kind`` is set once the pair is checked on shapes (through a pool, a
    batch-merging reshape).
    """

    pool: Pool | None = None
    after_refusal: Refusal | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls,
        linear: str,
        bn: str,
        finder: str,
        *,
        before: bool = False,
        between: str = "",
        pool: Pool | None = None,
    ) -> Pair:
        """``linear -> between -> bn``, or with ``before`` ``bn -> between -> linear``."""
        return cls(FoldKind.ADJACENT, (linear,), bn, between, before, finder=finder, pool=pool)


@dataclass(frozen=True)
class JoinPair(EagerSite):
    """``BN(L_a(x) + L_b(y))`` or ``BN(torch.cat([L_a(x), L_b(y), ...], dim))``.

    Each ``L`` a linear module whose output only the join reads. On an add every
    term takes the BN's scale and the first also its shift, on a cat each term
    its own channels (:func:`bnfold.affine.add_parts`,
    :func:`bnfold.affine.concat_parts`). The join ("add" or "cat") stays; the BN
    goes, but for the children it runs after its affine (``kept``).
    """

    @classmethod
    def of(cls, linears: Sequence[str], bn: str, finder: str, join: str, dim: int = 1) -> JoinPair:
        """The BN after a ``join`` of ``linears``; ``dim`` a cat's axis, as written."""
        kind = FoldKind.OVER_ADD if join == "add" else FoldKind.OVER_CONCAT
        return cls(kind, tuple(linears), bn, join=join, dim=dim, finder=finder)


@dataclass(frozen=True)
class TapPair(EagerSite):
    """An identity BN of a branch sum and a sibling conv reading the same ``x``.

    ``conv(x) + ... + bn(x)`` with ``bn(x) = s * x + t``: the BN becomes
    ``nn.Identity`` (its term is ``x``) and the conv takes the rest, ``(s - 1) * x``
    as a centred per-channel tap and ``t`` in its bias
    (:func:`bnfold.affine.absorb_identity`); in ``conv(x) - bn(x)`` the negated
    rest (``sign`` -1). The sum, and so forward, is unchanged. ``result_at`` is
    None: the fold's result is a term of a functional sum, which no module
    outputs (the BN's place now passes ``x`` on and the conv's output carries
    the tap); outputs still compare. A BN running more than its affine is no
    identity term, so nothing is ever ``kept``.
    """

    @classmethod
    def of(cls, conv: str, bn: str, finder: str, sign: int = 1) -> TapPair:
        """``bn``'s term moved into ``conv``; ``sign`` -1 when the sum counts one of the
        BN's and the conv's terms negated."""
        return cls(FoldKind.IDENTITY_TAP, (conv,), bn, sign=sign, finder=finder)


AnyPair = Pair | JoinPair | TapPair


@dataclass
class Scan:
    """What a finder saw: candidate pairs, refusals, and why earlier finders failed."""

    finder: str
    pairs: list[AnyPair] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, result: AnyPair | Refusal) -> None:
        """Record one matcher's answer: a candidate pair or a refusal."""
        if isinstance(result, Refusal):
            self.refused.append(result)
        else:
            self.pairs.append(result)
