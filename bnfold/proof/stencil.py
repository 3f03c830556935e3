"""The linear part of a map, in a form that does not depend on the input's size.

A :class:`Stencil` maps one source tensor (a boundary input of a changed region, or
the all-ones field a shift before a zero-padded window becomes) to a value::

    y[n, :, p] = sum over taps k of  T_k @ x[n, :, (p * down + offset_k) / up]

per spatial axis, where a tap contributes only when ``(p * down + offset_k) / up`` is
an integer inside the input (zero padding: a tap that falls outside reads zero).
``down`` is a Conv's stride, ``up`` a ConvTranspose's; a pointwise map has one tap at
offset 0 and ``down = up = 1``. ``T_k`` is a matrix over the flattened feature axes,
stored per group (``[groups, rows/groups, cols/groups]``): a depthwise or diagonal map
costs what its weight costs, not a dense channels x channels matrix.

Why this form, and what it says about input sizes the model was never run at: the
stencil is a description of the map that does not mention the input size. At input
size S (per spatial axis), the coefficient linking output position p to input position
q is the entry of the one tap whose offset is ``q * up - p * down`` (a pair of
positions determines the offset), and zero when no tap has that offset or q lies
outside [0, S). So if two stencils have the same geometry (down, up, output-length
rule) and their taps agree within one ulp, then at *every* size S, batch size and
token count, every coefficient of the two maps agrees within one ulp: the proof covers
dynamic shapes without choosing a patch. The constant part is the other half: a bias
is the same at every position, and a shift that entered a zero-padded window is a term
from the all-ones field, whose value at a border position is a partial sum of taps;
:func:`bnfold.proof.equivalence.border_patterns` enumerates every partial sum that any
(p, S) can produce and shows why finitely many sizes produce them all.

A window applied to a pointwise map stays a stencil; a window after a window does not
(border rows of the composition are not restrictions of its interior rows), and the
prover cuts regions at proven values so that it never needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.dims import Dim


@dataclass(frozen=True)
class SizeRule:
    """Output length ``floor((m * S + c) / d)`` of an input length ``S``."""

    m: int
    c: int
    d: int

    @classmethod
    def of(cls, m: int, c: int, d: int) -> SizeRule:
        """The canonical rule: ``m`` and ``d`` coprime (``c`` floored accordingly)."""
        g = math.gcd(m, d)
        return cls(m // g, c // g, d // g)

    def length(self, size: int) -> int:
        return (self.m * size + self.c) // self.d

    def dim(self, size: Dim) -> Dim:
        return dims.window(size, self.m, self.c, self.d)


@dataclass(frozen=True)
class AxisMap:
    """How output position ``p`` on one spatial axis reads input positions.

    Tap offset ``o`` reads input index ``(p * down + o) / up`` when that is an integer
    in ``[0, S)``; the output has ``size.length(S)`` positions.
    """

    down: int
    up: int
    size: SizeRule


IDENTITY = AxisMap(1, 1, SizeRule(1, 0, 1))


@dataclass
class Stencil:
    """A linear map ``source -> value`` as taps over spatial offsets (module docstring)."""

    geometry: tuple[AxisMap, ...]
    offsets: tuple[tuple[int, ...], ...]
    taps: Coefs  # [K, groups, rows/groups, cols/groups]

    @classmethod
    def identity(cls, features: int, rank: int) -> Stencil:
        """The identity map on a source with ``features`` features and ``rank`` spatial axes."""
        ones = Coefs.exact(np.ones((1, features, 1, 1)))
        return cls((IDENTITY,) * rank, ((0,) * rank,), ones)

    @classmethod
    def pointwise(cls, matrix: Coefs, rank: int) -> Stencil:
        """A pointwise map given by a grouped matrix ``[groups, rows, cols]``."""
        return cls((IDENTITY,) * rank, ((0,) * rank,), matrix.reshape((1, *matrix.shape)))

    @property
    def groups(self) -> int:
        return self.taps.shape[1]

    @property
    def rows(self) -> int:
        return self.taps.shape[1] * self.taps.shape[2]

    @property
    def cols(self) -> int:
        return self.taps.shape[1] * self.taps.shape[3]

    def is_pointwise(self) -> bool:
        """One tap at offset 0 and the identity geometry on every axis."""
        return all(g == IDENTITY for g in self.geometry) and self.offsets == (
            (0,) * len(self.geometry),
        )

    def is_diagonal(self) -> bool:
        return self.taps.shape[2] == 1 and self.taps.shape[3] == 1

    # -- group structure ----------------------------------------------------------------

    def regroup(self, groups: int) -> Stencil:
        """The same map stored with ``groups`` groups (a divisor of the current count)."""
        k, g, ro, ci = self.taps.shape
        if groups == g:
            return self
        f = g // groups

        def blocks(a: np.ndarray) -> np.ndarray:
            parts = a.reshape(k, groups, f, ro, ci)
            out = np.zeros((k, groups, f, ro, f, ci), dtype=a.dtype)
            for j in range(f):
                out[:, :, j, :, j, :] = parts[:, :, j]
            return out.reshape(k, groups, f * ro, f * ci)

        return Stencil(self.geometry, self.offsets, self.taps.map(blocks))

    def dense(self) -> Stencil:
        return self.regroup(1)

    # -- composition ----------------------------------------------------------------------

    def scale_rows(self, vector: Coefs) -> Stencil:
        """``diag(vector) @ T_k`` for every tap (``vector`` has ``rows`` entries)."""
        _, g, ro, _ = self.taps.shape
        return Stencil(self.geometry, self.offsets, self.taps * vector.reshape((1, g, ro, 1)))

    def after(self, window: Stencil) -> Stencil:
        """``window`` applied to the value this pointwise stencil computes."""
        assert self.is_pointwise(), "a window after a window is cut, never composed"
        if self.is_diagonal() and self.taps.is_exact_ones():
            return window
        if self.is_diagonal():
            _, g, _, ci = window.taps.shape
            diag = self.taps.reshape((self.rows,)).reshape((1, g, 1, ci))
            return Stencil(window.geometry, window.offsets, window.taps * diag)
        g = math.gcd(window.groups, self.groups)
        w, m = window.regroup(g), self.regroup(g)
        return Stencil(window.geometry, window.offsets, w.taps.matmul(m.taps))

    def plus(self, other: Stencil) -> Stencil:
        """The sum of two maps of one geometry (the caller checks it)."""
        g = math.gcd(self.groups, other.groups)
        a, b = self.regroup(g), other.regroup(g)
        offsets = tuple(sorted(set(a.offsets) | set(b.offsets)))
        return Stencil(self.geometry, offsets, placed(a, offsets) + placed(b, offsets))

    def with_rows(self, index: np.ndarray, rows: int) -> Stencil:
        """Row ``i`` moved to row ``index[i]`` of a ``rows``-row map (the rest zero)."""
        d = self.dense()
        k, _, _, ci = d.taps.shape

        def scatter(a: np.ndarray) -> np.ndarray:
            out = np.zeros((k, 1, rows, ci), dtype=a.dtype)
            out[:, :, index, :] = a
            return out

        return Stencil(self.geometry, self.offsets, d.taps.map(scatter))

    def tap_sum(self) -> Coefs:
        """``sum_k T_k`` as a dense ``[rows, cols]`` matrix."""
        d = self.dense()
        total = d.taps.map(lambda a: a.sum(axis=0))
        total.depth += len(self.offsets)
        return total.reshape((self.rows, self.cols))


def placed(s: Stencil, offsets: tuple[tuple[int, ...], ...]) -> Coefs:
    """``s``'s taps spread over ``offsets`` (a superset of its own), zero elsewhere."""
    where = [offsets.index(o) for o in s.offsets]
    shape = (len(offsets), *s.taps.shape[1:])

    def place(a: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, dtype=a.dtype)
        out[where] = a
        return out

    return s.taps.map(place)
