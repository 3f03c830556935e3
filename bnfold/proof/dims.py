"""Tensor dimensions that may be symbolic: a static int, or a product of named sizes.

The prover reasons about models whose batch, token or spatial sizes are dynamic, so a
dimension is either an ``int`` or a :class:`Sym`: an integer coefficient times a sorted
product of atoms. An atom names an unknown size (``"N"`` from a ``dim_param``, or
``"x:2"`` for axis 2 of value ``x`` when the model names nothing) or is a function term
for the output size of a sliding window (``("floor", atom, m, c, d)`` meaning
``floor((m * S + c) / d)``). Two dims are equal when their canonical forms are equal: a
sound test (equal forms are equal sizes), not a complete one (some equal sizes have
different forms), so the prover may fail to prove, never prove wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Atom = str | tuple[object, ...]


@dataclass(frozen=True)
class Sym:
    """``coeff * prod(atoms)``: a size known only symbolically."""

    coeff: int
    atoms: tuple[Atom, ...]

    def __str__(self) -> str:
        names = [_atom_text(a) for a in self.atoms]
        if self.coeff != 1:
            names.insert(0, str(self.coeff))
        return "*".join(names)


Dim = int | Sym


def _atom_text(atom: Atom) -> str:
    if isinstance(atom, str):
        return atom
    _, inner, m, c, d = atom
    return f"floor(({m}*{_atom_text(inner)}+{c})/{d})"  # type: ignore[arg-type]


def _sorted_atoms(atoms: list[Atom]) -> tuple[Atom, ...]:
    return tuple(sorted(atoms, key=repr))


def named(name: str) -> Sym:
    """An unknown size with this name."""
    return Sym(1, (name,))


def mul(a: Dim, b: Dim) -> Dim:
    """``a * b``."""
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    sa, sb = _as_sym(a), _as_sym(b)
    if sa.coeff * sb.coeff == 0:
        return 0
    return Sym(sa.coeff * sb.coeff, _sorted_atoms([*sa.atoms, *sb.atoms]))


def product(dims: list[Dim] | tuple[Dim, ...]) -> Dim:
    """The product of ``dims`` (1 for none)."""
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def div(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when it is exact in canonical form, else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    sa, sb = _as_sym(a), _as_sym(b)
    if sb.coeff == 0 or sa.coeff % sb.coeff:
        return None
    rest = list(sa.atoms)
    for atom in sb.atoms:
        if atom not in rest:
            return None
        rest.remove(atom)
    coeff = sa.coeff // sb.coeff
    return coeff if not rest else Sym(coeff, _sorted_atoms(rest))


def same(a: Dim, b: Dim) -> bool:
    """True when ``a`` and ``b`` are provably the same size."""
    return _as_sym(a) == _as_sym(b)


def window(size: Dim, m: int, c: int, d: int) -> Dim:
    """``floor((m * size + c) / d)``: the output length of a sliding window."""
    if isinstance(size, int):
        return (m * size + c) // d
    g = math.gcd(m, d)
    # floor((g*m'*S + c) / (g*d')) == floor((m'*S + floor(c/g)) / d') for integer S
    m, d, c = m // g, d // g, c // g
    if d == 1 and c == 0:
        return mul(size, m)
    return Sym(1, (("floor", _freeze(size), m, c, d),))


def _freeze(size: Sym) -> Atom:
    if size.coeff == 1 and len(size.atoms) == 1:
        return size.atoms[0]
    return ("prod", size.coeff, size.atoms)


def _as_sym(d: Dim) -> Sym:
    return Sym(d, ()) if isinstance(d, int) else d


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def text(dims: tuple[Dim, ...] | list[Dim]) -> str:
    """``[N,3,H,W]``."""
    return "[" + ",".join(str(d) for d in dims) + "]"
