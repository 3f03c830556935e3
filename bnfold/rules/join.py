"""Family ``join``: a BatchNorm after an add or a channel concat of linear ops.

Matches:  BN(add(L_a(x_a), L_b(x_b))) and BN(concat([L_a(x_a), L_b(x_b), ...], axis=1)),
          each L a linear op with a bias slot whose output only the join reads.
Produces: ``s * (a + b) + t = (s * a + t) + (s * b)``: the scale folds into every
          op of an add and the shift into the first (:func:`bnfold.core.affine.add_parts`);
          a concat gives each op its own channels (:func:`bnfold.core.affine.concat_parts`).
          The join stays (kinds ``over_add``, ``over_concat``).
Refuses:
  NOT_LINEAR_TERM  an input of the join is no such linear op of its own
  BRANCHING        an op's output, or the join's, has other readers
  NOT_PER_CHANNEL  the concat is not over the channel axis (:meth:`JoinSpec.joins_channels`)
  BAD_SHAPE        an add's ops differ in width, or their channels are not the BN's
  (eager) REUSED_MODULE  one module makes two terms: one weight cannot take two parts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bnfold.core.affine import Affine, add_parts, concat_parts
from bnfold.report import Code, FoldKind
from bnfold.rules.family import Family, Found


@dataclass(frozen=True)
class JoinSpec:
    """An add or concat of linear ops' outputs, reduced to what decides the fold.

    Attributes:
        label: how details name the join ("Concat 'c'", "cat_1").
        kind: "add" or "cat".
        channels: each term's output channels, in order.
        dim: a concat's axis, as written (maybe negative).
        rank: the rank of the joined values, None if unknown.
    """

    label: str
    kind: Literal["add", "cat"]
    channels: tuple[int, ...]
    dim: int = 1
    rank: int | None = None

    def joins_channels(self) -> bool:
        """An add, or a concat over axis 1 (``1 - rank`` from the end)."""
        return (
            self.kind == "add"
            or self.dim == 1
            or (self.rank is not None and self.dim == 1 - self.rank)
        )

    def widths_agree(self) -> bool:
        """A concat, or an add of ops of one width."""
        return self.kind == "cat" or len(set(self.channels)) == 1

    @property
    def bn_channels(self) -> int:
        """The channels of the joined values: summed for a concat."""
        return sum(self.channels) if self.kind == "cat" else self.channels[0]

    def parts(self, affine: Affine) -> list[Affine]:
        """The share of the BN's affine each term's op takes."""
        if self.kind == "cat":
            return concat_parts(affine, list(self.channels))
        return add_parts(affine, len(self.channels))


def axis_refusal(join: JoinSpec) -> Found:
    """NOT_PER_CHANNEL for a concat over another axis than the channels."""
    if join.joins_channels():
        return None
    return Code.NOT_PER_CHANNEL, f"{join.label} joins axis {join.dim}, not the channels"


_CODES = frozenset({Code.NOT_LINEAR_TERM, Code.BRANCHING, Code.NOT_PER_CHANNEL, Code.BAD_SHAPE})

FAMILY = Family(
    "join",
    frozenset({FoldKind.OVER_ADD, FoldKind.OVER_CONCAT}),
    {"onnx": _CODES, "eager": _CODES | {Code.REUSED_MODULE}, "pt2": _CODES},
    __doc__ or "",
)
