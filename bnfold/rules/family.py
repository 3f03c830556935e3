"""What every rule module shares: the answer of a check, the early exit, the family record.

A check is a pure function over a small spec that a front builds from its own
graph; it answers :data:`Found`: None when the site may fold, else the
:class:`~bnfold.report.Code` and a detail for people. Control flow never needs
an exception, except inside a rule that stops at its first failed check
(:class:`Refused`), converted back to a refusal at the rule's edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bnfold.report import Code, FoldKind

Found = tuple[Code, str] | None
"""None when a check passes, else ``(code, detail)``."""


class Refused(Exception):
    """A rule stopped at its first failed check; its edge turns this into a Refusal."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail

    @classmethod
    def check(cls, found: Found) -> None:
        """Raise the refusal a check found; do nothing when it passed."""
        if found is not None:
            raise cls(*found)


@dataclass(frozen=True)
class Family:
    """One pattern family: the folds it makes and the codes it refuses with, per front.

    Attributes:
        name: the family's module in :mod:`bnfold.rules` ("pool", "join", ...).
        kinds: the :class:`~bnfold.report.FoldKind` of the folds it makes.
        codes: front ("onnx", "eager", "pt2") -> the codes that front reports for a
            site of this family (besides those of reading the BN and the linear
            op, which :data:`~bnfold.rules.adjacent.FAMILY` lists). A test checks
            that each is exercised on its front.
        doc: the module docstring: what it matches, produces and refuses.
    """

    name: str
    kinds: frozenset[FoldKind]
    codes: Mapping[str, frozenset[Code]]
    doc: str

    def codes_on(self, front: str) -> frozenset[Code]:
        """The codes ``front`` reports for this family (none if it has no such sites)."""
        return self.codes.get(front, frozenset())
