"""Is the folded piece's map the original piece's map? Coefficient by coefficient.

Two affine values are compared source by source: for each boundary input, the taps of
the two stencils (same geometry required), then the constant part. Each coefficient of
the folded map must lie within :data:`ULP_LIMIT` units of the exact original one, where
the unit is the folded coefficient's sensitivity to one ulp of the stored values it is
computed from (:mod:`bnfold.proof.coefs`), plus the float64 error bound of both
computations (about 1e-16 relative: far below any stored dtype's ulp).

Why one ulp: a correct fold stores the exact folded value rounded once to its dtype:
within half an ulp when rounded to nearest, within one when a "balanced" rounding takes
the other neighbour. A float64 computation of the fold may land a tie on the other
side, which costs at most about 2**-29 ulp of float32. So a correct fold passes with
a margin, and a coefficient more than one ulp off is not the fold of these parameters
under any rounding.

The constant part and zero padding: a shift that enters a zero-padded window is not
added in the padding, so the constant of the map differs at border positions. The
prover keeps it as a term from the all-ones field and compares it at every border
pattern that can occur (:func:`border_patterns`), for every input size.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.ops import ONES_PREFIX, same_layout, scaled, shifted
from bnfold.proof.stencil import AxisMap, Stencil, placed
from bnfold.proof.values import (
    Affine,
    Const,
    Pooled,
    ShapeValue,
    Value,
    layout_text,
)

ULP_LIMIT = 1.0
"""A folded coefficient may differ from the exact one by this many units (docstring)."""


@dataclass
class Verdict:
    """The comparison of one value in both models.

    Not proven either because the two maps differ (``unsupported`` False: a
    difference was found) or because a piece could not be modelled (``unsupported``
    True: nothing is known either way, so sampled verification decides).
    """

    proven: bool
    worst_ulp: float = 0.0
    coefficients: int = 0
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    unsupported: bool = False

    @classmethod
    def failed(cls, reason: str) -> Verdict:
        """The maps differ, and ``reason`` says where."""
        return cls(False, math.inf, 0, reason)

    @classmethod
    def unmodelled(cls, reason: str) -> Verdict:
        """The prover cannot model a piece (``reason``): no difference was found."""
        return cls(False, math.inf, 0, reason, unsupported=True)

    @property
    def differs(self) -> bool:
        return not self.proven and not self.unsupported

    def merged(self, other: Verdict) -> Verdict:
        # A difference found anywhere outweighs a piece that could not be modelled.
        differing = [v for v in (self, other) if v.differs]
        unmodelled = [v for v in (self, other) if v.unsupported]
        reasons = [v.reason for v in differing + unmodelled if v.reason]
        return Verdict(
            self.proven and other.proven,
            max(self.worst_ulp, other.worst_ulp),
            self.coefficients + other.coefficients,
            reasons[0] if reasons else "",
            self.notes + other.notes,
            unsupported=bool(unmodelled) and not differing,
        )


def compare(original: Value, folded: Value, limit: float = ULP_LIMIT) -> Verdict:
    """Compare the same tensor as the original and the folded piece compute it.

    ``limit``: the ulps a coefficient may be off (0 where nothing was folded).
    """
    if isinstance(original, ShapeValue) and isinstance(folded, ShapeValue):
        same = len(original.dims) == len(folded.dims) and all(
            dims.same(a, b) for a, b in zip(original.dims, folded.dims, strict=True)
        )
        if same:
            return Verdict(True)
        return Verdict.failed(
            f"shape {dims.text(original.dims)} in the original, {dims.text(folded.dims)} folded"
        )
    if isinstance(original, Const) and isinstance(folded, Const):
        return _compare_consts(original.array, folded.array, limit)
    if isinstance(original, Pooled) and isinstance(folded, Pooled):
        return _compare_pooled(original, folded, limit)
    if isinstance(original, Affine) and isinstance(folded, Affine):
        return compare_affine(original, folded, limit)
    return Verdict.failed(
        f"the original computes {_kind(original)}, the folded model {_kind(folded)}"
    )


def _kind(value: Value) -> str:
    return {
        Affine: "an affine value",
        Pooled: "a pool",
        Const: "a constant",
        ShapeValue: "a shape",
    }[type(value)]


def _compare_consts(a: np.ndarray, b: np.ndarray, limit: float) -> Verdict:
    if a.shape != b.shape:
        return Verdict.failed(f"a constant of shape {list(a.shape)} became {list(b.shape)}")
    if a.dtype == b.dtype and a.tobytes() == b.tobytes():
        return Verdict(True, 0.0, a.size)
    if a.dtype.kind not in "fV" or b.dtype.kind not in "fV":
        return Verdict.failed("a constant changed")
    return _coefficients(Coefs.stored(a, False), Coefs.stored(b, True), "constant", limit)


# -- pools ------------------------------------------------------------------------------


def pushed_into(pool: Pooled, side: str) -> Affine | str:
    """``post(pool(inner))`` as ``pool(post(inner))``, or why that is not the same map.

    A per-channel ``s * y + t`` commutes with a per-channel pool when: for a max,
    ``s >= 0`` (an increasing map keeps the maximum's position; ``s = 0`` gives ``t``
    either way; padding is ``-inf`` for a max, so it never wins); for an average, always
    for ``s`` (the average is linear per channel), and for ``t`` when the divisor counts
    only elements that were summed (``avg(y + t) = avg(y) + t``), else only when ``t = 0``.
    """
    if pool.post is None:
        return pool.inner
    scale, shift = pool.post
    if pool.spec.is_max:
        negative = np.flatnonzero(scale.val < 0)
        if negative.size:
            c = int(negative[0])
            return (
                f"{pool.spec.op_type} in the {side}: channel {c} is scaled by "
                f"{scale.val[c]:.6g} < 0 after it; a max commutes only with a scale >= 0"
            )
    elif pool.spec.divisor_counts_padding():
        shifted_channels = np.flatnonzero(np.abs(shift.val) > shift.error())
        if shifted_channels.size:
            c = int(shifted_channels[0])
            return (
                f"{pool.spec.op_type} in the {side} counts padded zeros in its divisor and "
                f"channel {c} is shifted by {shift.val[c]:.6g} after it"
            )
    inner = shifted(scaled(pool.inner, scale), shift)
    assert isinstance(inner, Affine)
    return inner


def _compare_pooled(original: Pooled, folded: Pooled, limit: float) -> Verdict:
    if original.spec != folded.spec:
        return Verdict.failed(f"the pools differ: {original.spec} vs {folded.spec}")
    inner_o = pushed_into(original, "original")
    inner_f = pushed_into(folded, "folded model")
    if isinstance(inner_o, str):
        return Verdict.failed(inner_o)
    if isinstance(inner_f, str):
        return Verdict.failed(inner_f)
    verdict = compare_affine(inner_o, inner_f, limit)
    if verdict.proven and original.post is not None and original.spec.is_max:
        verdict.notes.append(
            f"{original.spec.op_type}: every channel's scale after it is >= 0 "
            "(min {:.4g}), so it commutes".format(float(original.post[0].val.min()))
        )
    return verdict


# -- affine values ------------------------------------------------------------------------


def compare_affine(original: Affine, folded: Affine, limit: float = ULP_LIMIT) -> Verdict:
    """Compare two affine maps source by source, then their constant parts."""
    if not same_layout(original.layout, folded.layout):
        return Verdict.failed(
            f"shapes {layout_text(original.layout)} (original) and "
            f"{layout_text(folded.layout)} (folded) differ, or their axes play other roles"
        )
    verdict = Verdict(True)
    keys = sorted(set(original.terms) | set(folded.terms))
    bias_o, bias_f = original.bias, folded.bias
    for key in keys:
        o, f = original.terms.get(key), folded.terms.get(key)
        if key.startswith(ONES_PREFIX):
            part, uniform_o, uniform_f = _compare_ones_field(key, o, f, limit)
            bias_o = bias_o if uniform_o is None else bias_o + uniform_o
            bias_f = bias_f if uniform_f is None else bias_f + uniform_f
        else:
            part = _compare_stencils(key, o, f, limit)
        verdict = verdict.merged(part)
    return verdict.merged(_coefficients(bias_o, bias_f, "constant term", limit))


def _compare_stencils(key: str, o: Stencil | None, f: Stencil | None, limit: float) -> Verdict:
    if o is not None and f is not None and o.geometry != f.geometry:
        return Verdict.failed(
            f"input {key!r}: the windows differ (strides, padding or output size): "
            f"{_geometry_text(o.geometry)} vs {_geometry_text(f.geometry)}"
        )
    a, b = _aligned(o, f)
    return _coefficients(a, b, f"weights from input {key!r}", limit, _offsets(o, f))


def _geometry_text(geometry: tuple[AxisMap, ...]) -> str:
    return ", ".join(f"down {g.down} up {g.up} len {g.size}" for g in geometry)


def _offsets(o: Stencil | None, f: Stencil | None) -> tuple[tuple[int, ...], ...]:
    got = set(o.offsets if o else ()) | set(f.offsets if f else ())
    return tuple(sorted(got))


def _aligned(o: Stencil | None, f: Stencil | None) -> tuple[Coefs, Coefs]:
    """Both stencils' taps over the same offsets and group count (zeros where absent)."""
    if o is not None and f is not None and o.offsets == f.offsets and o.groups == f.groups:
        return o.taps, f.taps
    present = [s for s in (o, f) if s is not None]
    groups = math.gcd(*[s.groups for s in present])
    offsets = _offsets(o, f)
    template = present[0].regroup(groups)

    def spread(s: Stencil | None) -> Coefs:
        if s is None:
            return Coefs.zeros((len(offsets), *template.taps.shape[1:]))
        return placed(s.regroup(groups), offsets)

    return spread(o), spread(f)


# -- the constant part through zero padding -------------------------------------------------


def border_patterns(
    maps: list[tuple[AxisMap, tuple[int, ...]]],
) -> list[tuple[frozenset[int], ...]]:
    """Which offsets are inside the input, at any output position of any input size.

    ``maps`` are the (geometry, offsets) of several stencils on one axis with one output
    length rule; the result lists each distinct tuple of in-range offset sets.

    Why finitely many sizes suffice: tap ``o`` at output ``p`` is in range when
    ``up | p*down + o`` and ``0 <= p*down + o <= up*S - 1``. With ``A = p*down`` and
    ``R = up*S - 1 - A``, the in-range set depends only on ``A mod up``, on
    ``min(A, L)`` and on ``min(R, Rmax)`` (``L = max(0, -min o)``, ``Rmax = max(0,
    max o)``), and an output position is valid exactly when ``R`` is at least some
    ``r0`` fixed by the output length rule. Lowering ``p`` by ``up`` steps while
    ``A >= L + down*up`` keeps all three (and ``S`` drops by ``down`` to keep ``R``);
    lowering ``S`` while ``R >= max(Rmax, r0) + up`` keeps them too. Every (p, S)
    therefore shares its pattern with one whose ``S`` is at most about
    ``(L + down*up + max(Rmax, r0) + up + 1) / up``. The enumeration below goes well
    past that bound and checks that a second range of sizes adds nothing new.
    """
    rule = maps[0][0].size
    bound = 8
    for geometry, offsets in maps:
        low = max(0, -min(offsets))
        high = max(0, max(offsets))
        reach = abs(rule.c) + rule.m + rule.d
        bound = max(
            bound, (low + high + reach + 4 * geometry.down * geometry.up) // geometry.up + 8
        )
    found = _patterns_up_to(maps, 1, bound)
    extra = _patterns_up_to(maps, bound + 1, 2 * bound)
    if not extra <= found:
        raise AssertionError("border patterns did not settle; the bound argument is wrong")
    return sorted(found, key=repr)


def _patterns_up_to(
    maps: list[tuple[AxisMap, tuple[int, ...]]], low: int, high: int
) -> set[tuple[frozenset[int], ...]]:
    rule = maps[0][0].size
    found: set[tuple[frozenset[int], ...]] = set()
    for size in range(low, high + 1):
        for p in range(max(0, rule.length(size))):
            found.add(
                tuple(
                    frozenset(
                        o
                        for o in offsets
                        if (p * g.down + o) % g.up == 0 and 0 <= (p * g.down + o) // g.up < size
                    )
                    for g, offsets in maps
                )
            )
    return found


def _compare_ones_field(
    key: str, o: Stencil | None, f: Stencil | None, limit: float
) -> tuple[Verdict, Coefs | None, Coefs | None]:
    """Compare the all-ones field's contribution: its interior sum goes to the bias,
    and what border positions miss of it is compared at every border pattern."""
    present = [s for s in (o, f) if s is not None]
    geometry = present[0].geometry
    if any(s.geometry != geometry for s in present):
        return Verdict.failed(f"{key}: the shifted windows differ in geometry"), None, None
    if any(g.size != geometry[i].size for s in present for i, g in enumerate(s.geometry)):
        return Verdict.failed(f"{key}: output length rules differ"), None, None
    uniform = [None if s is None else s.tap_sum().reshape((s.rows,)) for s in (o, f)]
    per_axis = []
    for axis, g in enumerate(geometry):
        maps = [(g, tuple(sorted({off[axis] for off in s.offsets}))) for s in present]
        per_axis.append(border_patterns(maps))
    verdict = Verdict(True)
    for combo in itertools.product(*per_axis):
        missing_o = _missing(o, combo, 0)
        missing_f = _missing(f, combo, 1 if o is not None else 0)
        rows = present[0].rows
        a = missing_o if missing_o is not None else Coefs.zeros((rows,))
        b = missing_f if missing_f is not None else Coefs.zeros((rows,))
        inside = ", ".join(f"axis {i}: {len(c[0])} taps inside" for i, c in enumerate(combo))
        where = f"constant term at a border, relative to the interior ({inside})"
        verdict = verdict.merged(_coefficients(a, b, where, limit))
        if not verdict.proven:
            break
    return verdict, uniform[0], uniform[1]


def _missing(
    s: Stencil | None, combo: tuple[tuple[frozenset[int], ...], ...], which: int
) -> Coefs | None:
    """``-sum`` of the taps outside the input at one border pattern (None: no stencil)."""
    if s is None:
        return None
    outside = [
        k
        for k, off in enumerate(s.offsets)
        if any(off[axis] not in combo[axis][which] for axis in range(len(off)))
    ]
    d = s.dense()
    if not outside:
        return Coefs.zeros((s.rows,))
    picked = d.taps.map(lambda a: a[outside].sum(axis=0).reshape(-1))
    picked.depth += len(outside)
    return -picked


# -- coefficient-wise comparison --------------------------------------------------------------


def _coefficients(
    original: Coefs,
    folded: Coefs,
    what: str,
    limit: float,
    offsets: tuple[tuple[int, ...], ...] = (),
) -> Verdict:
    """Each folded coefficient within ``limit`` units (+ float64 slack) of the original."""
    worst = _blockwise_pass(original, folded, limit)
    if worst is not None:
        return Verdict(True, worst, int(np.prod(original.shape)))
    shape = np.broadcast_shapes(original.shape, folded.shape)
    o, f = original.broadcast_to(shape), folded.broadcast_to(shape)
    if o.val.size == 0:
        return Verdict(True)
    diff = np.subtract(f.val, o.val)
    np.abs(diff, out=diff)
    unit = np.zeros(shape) if f.unit is None else f.unit
    passes = diff <= (unit if limit == 1.0 else limit * unit)
    if not passes.all():  # only then is the float64 slack worth computing
        slack = o.error() + f.error()
        passes = np.maximum(diff - slack, 0.0) <= limit * unit
    with np.errstate(divide="ignore", invalid="ignore"):
        ulps = np.divide(diff, unit, dtype=np.float64)  # 0/0 (exact, no unit) is nan
    if passes.all():
        worst = float(np.fmax.reduce(ulps, axis=None))  # fmax skips the nans
        return Verdict(True, 0.0 if np.isnan(worst) else worst, int(diff.size))
    np.nan_to_num(ulps, copy=False, nan=0.0)
    ulps[(unit == 0) & ~passes] = np.inf
    excess = np.maximum(diff - o.error() - f.error(), 0.0)
    bad = np.unravel_index(_worst_failure(passes, excess, unit), shape)
    return Verdict(
        False,
        float(ulps[bad]),
        int(diff.size),
        f"{what}{_position(bad, offsets)}: folded {f.val[bad]:.9g}, original {o.val[bad]:.9g} "
        f"({_ulp_text(float(ulps[bad]))}; {int((~passes).sum())} of {diff.size} beyond "
        f"{limit:g} ulp)",
    )


def _blockwise_pass(original: Coefs, folded: Coefs, limit: float) -> float | None:
    """The worst ulp if every coefficient is within ``limit`` units, else None.

    The common case, computed a block at a time without the float64 slack (which only
    a coefficient beyond its units needs); None sends the caller down the full path.
    Where the folded values are stored values (no arithmetic on them), a block whose
    exact values rounded to nearest in the stored dtype equal the stored ones is within
    half an ulp (plus the float64 error of the exact values, about 2**-29 ulp of float32):
    one cast and one comparison decide it, and 0.5 is recorded as its worst (a bound).
    """
    shape = original.shape
    if folded.shape != shape or not shape or not folded.has_units:
        return None
    stored = folded.spacing and folded.factor is None and folded.depth == 0
    axis = original.outer_axis()
    step = max(1, BLOCK * shape[axis] // max(1, int(np.prod(shape))))
    worst = 0.0
    for index in original.block_indices(axis, step):
        o = original.block(index)
        if stored and limit >= 0.5:
            raw = folded.raw[index]
            if np.array_equal(o.astype(raw.dtype), raw):
                worst = max(worst, 0.5)
                continue
        f = folded.block(index)
        diff = np.subtract(f, o, out=f)
        np.abs(diff, out=diff)
        unit = folded.unit_block(index)
        assert unit is not None
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.divide(diff, unit, out=diff)  # 0/0 (exact, no unit) is nan
        block_worst = float(np.fmax.reduce(ratio, axis=None))  # fmax skips the nans
        if not block_worst <= limit and not np.isnan(block_worst):
            return None
        if block_worst > worst:
            worst = block_worst
    return worst


BLOCK = 1 << 15
"""Coefficients compared at a time on the fast path (a block stays in cache)."""


def _worst_failure(passes: np.ndarray, excess: np.ndarray, unit: np.ndarray) -> int:
    """Flat index of the failing coefficient furthest off (no unit first, then in units)."""
    failing = ~passes.reshape(-1)
    flat_excess, flat_unit = excess.reshape(-1), unit.reshape(-1)
    unitless = failing & (flat_unit == 0)
    if unitless.any():
        return int(np.argmax(np.where(unitless, flat_excess, -1.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return int(np.argmax(np.where(failing, flat_excess / flat_unit, -1.0)))


def _position(index: tuple[np.intp, ...], offsets: tuple[tuple[int, ...], ...]) -> str:
    if len(index) == 4 and offsets:
        k, g, r, c = (int(i) for i in index)
        return f" at offset {offsets[k]}, group {g}, row {r}, column {c}"
    return " at [" + ", ".join(str(int(i)) for i in index) + "]"


def _ulp_text(ulps: float) -> str:
    return "no rounding of the folded model explains it" if math.isinf(ulps) else f"{ulps:.3g} ulp"
