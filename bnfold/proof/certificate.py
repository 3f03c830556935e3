"""The proof's result: a certificate per model pair, a record per changed region."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiteProof:
    """One changed region: what it replaced, and whether both sides compute one map.

    ``worst_ulp`` is the largest deviation of a folded coefficient from the exact one,
    in units of the folded model's stored dtype (see :mod:`bnfold.proof.coefs`);
    ``inf`` when a coefficient differs where no rounding of a stored value could move
    it. ``reason`` says why a site is not proven: its maps differ, or (``unsupported``)
    the prover cannot model a piece of it, which finds no difference either way.
    """

    name: str
    kind: str
    proven: bool
    worst_ulp: float
    reason: str = ""
    unsupported: bool = False
    coefficients: int = 0
    original_nodes: list[str] = field(default_factory=list)
    folded_nodes: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)  # the region's outputs, compared
    notes: list[str] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        """The proof found that the two sides compute different maps."""
        return not self.proven and not self.unsupported

    def line(self) -> str:
        if self.proven:
            extra = f"; {'; '.join(self.notes)}" if self.notes else ""
            return f"  proven      {self.name}  [{self.kind}] worst {_ulp(self.worst_ulp)}{extra}"
        status = "DIFFERS   " if self.differs else "NOT PROVEN"
        return f"  {status}  {self.name}  [{self.kind}] {self.reason}"


@dataclass
class Uncovered:
    """Something the proof does not cover, and why (never silently skipped)."""

    what: str
    reason: str


@dataclass
class Certificate:
    """Whether the folded model computes the original's function for all inputs.

    ``holds`` is True only when every changed region is proven and everything else is
    unchanged (``rest_unchanged``; ``differences`` lists what is not) and nothing was
    left uncovered. ``refuted`` is True when the proof found a difference: a site whose
    maps differ, or a change outside the sites. Neither holds nor refuted: some region
    could not be modelled (or was not covered), and nothing else was found.

    ``pairing_assumed``: the proof took which module feeds which BatchNorm from the
    fold report instead of a trace (an eager module that did not export), so it
    proves the folds' arithmetic, not the finder's pairing.
    """

    front: str  # "onnx", "torch eager", "torch program"
    sites: list[SiteProof] = field(default_factory=list)
    rest_unchanged: bool = True
    differences: list[str] = field(default_factory=list)
    uncovered: list[Uncovered] = field(default_factory=list)
    unchanged_nodes: int = 0
    assumptions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    pairing_assumed: bool = False

    @property
    def holds(self) -> bool:
        return self.rest_unchanged and not self.uncovered and all(s.proven for s in self.sites)

    @property
    def refuted(self) -> bool:
        return not self.rest_unchanged or any(s.differs for s in self.sites)

    @property
    def differing(self) -> list[SiteProof]:
        """The sites whose maps differ."""
        return [s for s in self.sites if s.differs]

    def refutation(self) -> str:
        """Where the proof found a difference, in one line; empty when it found none."""
        found = [f"at {s.name}" for s in self.differing]
        found += [f"outside the sites: {d}" for d in self.differences]
        more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
        return "; ".join(found[:3]) + more

    @property
    def proven(self) -> int:
        return sum(s.proven for s in self.sites)

    @property
    def worst_ulp(self) -> float:
        return max((s.worst_ulp for s in self.sites if s.proven), default=0.0)

    def headline(self) -> str:
        """``proven for all inputs: N of N sites, worst 0.5 ulp`` (or what fails)."""
        n = len(self.sites)
        if self.holds:
            if not n:
                return "proven for all inputs: nothing changed"
            return f"proven for all inputs: {n} of {n} sites, worst {_ulp(self.worst_ulp)}"
        parts = [f"NOT proven for all inputs: {self.proven} of {n} sites proven"]
        if differing := self.differing:
            names = "; ".join(s.name for s in differing[:3])
            names += "; ..." if len(differing) > 3 else ""
            parts.append(f"{len(differing)} differ ({names})")
        if unmodelled := sum(s.unsupported for s in self.sites):
            parts.append(f"{unmodelled} the prover cannot model")
        if not self.rest_unchanged:
            parts.append(f"{len(self.differences)} difference(s) outside the sites")
        if self.uncovered:
            parts.append(f"{len(self.uncovered)} part(s) not covered")
        return ", ".join(parts)

    def summary(self, proven_rows: bool = True) -> str:
        """The headline, then one row per site (past 20 sites, or without ``proven_rows``,
        only those not proven), what differs outside them, and what the proof assumes."""
        lines = [self.headline()]
        rows = proven_rows and len(self.sites) <= 20
        lines += [s.line() for s in self.sites if not s.proven or rows]
        lines += [f"  differs     {d}" for d in self.differences]
        lines += [f"  not covered {u.what}: {u.reason}" for u in self.uncovered]
        lines += [f"  assumes     {a}" for a in self.assumptions]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["holds"] = self.holds
        data["refuted"] = self.refuted
        data["headline"] = self.headline()
        data["worst_ulp"] = _json_number(self.worst_ulp)
        for site in data["sites"]:
            site["worst_ulp"] = _json_number(site["worst_ulp"])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _json_number(x: float) -> float | str:
    return "inf" if math.isinf(x) else round(x, 4)


def _ulp(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2g} ulp"
