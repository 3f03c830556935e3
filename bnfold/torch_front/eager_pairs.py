"""The eager front's fold sites: a linear module and a BN beside it (:class:`Pair`),
a BN after a join of linear modules (:class:`JoinPair`), an identity BN of a branch
sum (:class:`TapPair`), and a finder's :class:`Scan` of them.

Named by module paths, they are the eager twins of the ``.pt2`` front's ``Site``
and ``JoinSite`` (:mod:`bnfold.torch_front.program.match`), which also name aten nodes.
The matchers of :mod:`bnfold.torch_front.eager_match` make them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from bnfold.report import FoldKind, Refusal
from bnfold.torch_front.pools import Pool


def site_label(linear: str, bn: str, between: str, before: bool) -> str:
    """ "conv -> bn", "fc -> view -> bn"; before: "bn -> flatten -> fc" (data-flow order)."""
    chain = (bn, between, linear) if before else (linear, between, bn)
    return " -> ".join(p for p in chain if p)


@dataclass(frozen=True)
class Pair:
    """A linear module and a BN module beside it.

    After (``before=False``): the linear's only output goes into the BN.
    Before (``before=True``): the BN's only output goes into the linear.
    Either directly or through ``between``: a flatten/view/reshape/(un)squeeze,
    named for the report; whether channels survive it is checked on shapes.
    After, ``between`` may also be a pool (``pool`` says which; the fold passes
    through it, see :mod:`bnfold.torch_front.pools`).
    ``after_refusal`` says why the BN could not fold after (before pairs only).
    ``kind`` is set once the pair is checked on shapes (a batch-merging reshape),
    and ``kept`` once the BN is checked: the children it runs after its affine
    (timm's ``drop``, ``act``), which stay in its place.
    """

    linear: str
    bn: str
    finder: str
    before: bool = False
    between: str = ""
    after_refusal: Refusal | None = field(default=None, compare=False)
    kind: FoldKind = field(default=FoldKind.ADJACENT, compare=False)
    pool: Pool | None = None
    kept: tuple[str, ...] = field(default=(), compare=False)

    @property
    def site(self) -> str:
        return site_label(self.linear, self.bn, self.between, self.before)

    @property
    def linears(self) -> tuple[str, ...]:
        """The linear modules whose weights the fold changes."""
        return (self.linear,)

    @property
    def result_at(self) -> str:
        """The module whose output carries the fold's result in both models.

        After: the BN's place (its ``nn.Identity`` passes the linear output on);
        before: the linear module itself.
        """
        return self.linear if self.before else self.bn


@dataclass(frozen=True)
class JoinPair:
    """``BN(L_a(x) + L_b(y))`` or ``BN(torch.cat([L_a(x), L_b(y), ...], dim))``.

    Each ``L`` a linear module whose output only the join reads. On an add every
    term takes the BN's scale and the first also its shift, on a cat each term
    its own channels (:func:`bnfold.affine.add_parts`,
    :func:`bnfold.affine.concat_parts`). The join stays; the BN goes, but for the
    children it runs after its affine (``kept``, as in :class:`Pair`).
    """

    linears: tuple[str, ...]
    bn: str
    finder: str
    join: str  # "add" or "cat"
    dim: int = 1  # a cat's axis, as written (maybe negative)
    kept: tuple[str, ...] = field(default=(), compare=False)
    before: ClassVar[bool] = False

    @property
    def linear(self) -> str:
        return ", ".join(self.linears)

    @property
    def site(self) -> str:
        return f"{self.linear} -> {self.join} -> {self.bn}"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.OVER_ADD if self.join == "add" else FoldKind.OVER_CONCAT

    @property
    def result_at(self) -> str:
        return self.bn


@dataclass(frozen=True)
class TapPair:
    """An identity BN of a branch sum and a sibling conv reading the same ``x``.

    ``conv(x) + ... + bn(x)`` with ``bn(x) = s * x + t``: the BN becomes
    ``nn.Identity`` (its term is ``x``) and the conv takes the rest, ``(s - 1) * x``
    as a centred per-channel tap and ``t`` in its bias
    (:func:`bnfold.affine.absorb_identity`); in ``conv(x) - bn(x)`` the negated
    rest (``sign`` -1). The sum, and so forward, is unchanged.
    """

    linear: str  # the conv that takes the tap
    bn: str
    finder: str
    sign: int = 1  # -1 when the sum counts one of the BN's and the conv's terms negated
    before: ClassVar[bool] = False
    kind: ClassVar[FoldKind] = FoldKind.IDENTITY_TAP
    kept: ClassVar[tuple[str, ...]] = ()  # a BN running more than its affine is no identity term

    @property
    def site(self) -> str:
        return f"{self.bn} -> {self.linear}"

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.linear,)

    @property
    def result_at(self) -> None:
        """None: the fold's result is a term of a functional sum, which no module outputs.

        The BN's place now passes ``x`` on and the conv's output carries the
        tap, so neither equals its value in the original; outputs still compare.
        """
        return None


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
