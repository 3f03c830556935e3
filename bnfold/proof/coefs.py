"""Coefficients of an affine map in float64, with what bounds their errors.

Every coefficient the prover compares carries three arrays of one shape:

``val``
    its value, computed in float64 from the model's stored values.
``mag``
    the sum of the magnitudes of the terms it was computed from. Each float64
    operation rounds once, so the computed value is within ``depth * 2**-53 * mag``
    of the real value of the same expression (``depth`` bounds the operations on
    any path; a dot product of n terms counts n). :meth:`Coefs.error` is that bound.
``unit``
    how far the coefficient moves, to first order, when every stored value it was
    computed from moves by one ulp of its own dtype (an L1 sum of
    ``|d coef / d stored| * ulp(stored)``). ``None`` means zero: exact constants
    (attributes, structural ones) and the side whose units are not needed.

A folded model is correct when its stored values are the exact fold rounded once,
so each coefficient of its map lies within one ``unit`` of the exact coefficient:
the prover measures deviations in these units ("ulps").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

U64 = 2.0**-53
"""Unit roundoff of float64."""


def _finfo(dtype: np.dtype) -> tuple[int, int]:
    """(mantissa bits, min exponent) of a float dtype, bf16 included."""
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return int(info.nmant), int(info.minexp)
    import ml_dtypes  # onnx_ir depends on it: bf16 and the fp8 types

    ml_info = ml_dtypes.finfo(dtype)  # type: ignore[no-untyped-call]
    return int(ml_info.nmant), int(ml_info.minexp)


def ulp(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The spacing of ``dtype`` at each of ``values`` (above it at a power of two)."""
    if dtype.kind in "iub":
        return np.zeros(np.shape(values))
    nmant, minexp = _finfo(dtype)
    _, exponent = np.frexp(np.asarray(values, dtype=np.float64))
    spacing: np.ndarray = np.ldexp(1.0, np.maximum(exponent - 1, minexp) - nmant)
    return spacing


def _opt_add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    if b is None:
        return a
    total: np.ndarray = a + b
    return total


def _opt_scale(a: np.ndarray | None, factor: np.ndarray) -> np.ndarray | None:
    return None if a is None else a * factor


@dataclass
class Coefs:
    """A float64 array of coefficients with its error and ulp bookkeeping.

    ``raw`` holds the values exactly, in a float dtype of the model (a stored tensor
    is kept as stored) or in float64; ``val`` is them in float64. ``factor``, when set,
    is a small float64 array that ``raw`` is still to be multiplied by (a BN scale per
    row of a weight): a fold site's weights are scaled lazily and materialised a block
    at a time where they are compared, never as whole float64 copies.

    ``magnitude`` None means ``|val|``: true of stored values and of products of such
    (``|a| * |b| == |a * b|``), which are most of what a fold site holds.
    """

    raw: np.ndarray
    magnitude: np.ndarray | None = None
    units: np.ndarray | None = None
    depth: int = 0
    factor: np.ndarray | None = None
    mag_factor: np.ndarray | None = None  # with ``factor``: magnitude = |raw| * mag_factor
    spacing: bool = False  # units are the spacing of ``raw`` in its own dtype, on demand
    _val: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def stored(cls, array: np.ndarray, track_units: bool) -> Coefs:
        """A tensor as the model stores it (exact), ``unit`` = its ulps."""
        raw = np.asarray(array)
        if raw.dtype.kind != "f" or raw.dtype.itemsize > 8:
            raw = raw.astype(np.float64)  # ints, bf16 and friends: float64 is exact
            units = ulp(raw, array.dtype) if track_units else None
            return cls(raw, None, units)
        # numpy's own floats: their spacing, computed where needed (a block at a time)
        return cls(raw, spacing=track_units)

    @classmethod
    def exact(cls, array: np.ndarray | float) -> Coefs:
        """A value with no rounding in it (an attribute, a structural 0 or 1)."""
        return cls(np.asarray(array, dtype=np.float64))

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Coefs:
        return cls.exact(np.zeros(shape))

    @property
    def val(self) -> np.ndarray:
        """The coefficients in float64 (materialised once)."""
        if self._val is None:
            value = np.asarray(self.raw, dtype=np.float64)
            if self.factor is not None:
                value = value * self.factor
            self._val = value
        return self._val

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def unit(self) -> np.ndarray | None:
        """Units in which this coefficient is judged (None: none, it is exact)."""
        if self.units is None and self.spacing:
            spacing: np.ndarray = np.spacing(np.abs(self.raw))
            return spacing
        return self.units

    @property
    def has_units(self) -> bool:
        return self.units is not None or self.spacing

    def unit_block(self, index: tuple[slice, ...]) -> np.ndarray | None:
        """``unit[index]``, computing no more than that block."""
        if self.units is None and self.spacing:
            spacing: np.ndarray = np.spacing(np.abs(self.raw[index]))
            return spacing
        return None if self.units is None else self.units[index]

    @property
    def mag(self) -> np.ndarray:
        if self.mag_factor is not None:
            lazy: np.ndarray = np.abs(self.raw) * self.mag_factor
            return lazy
        if self.magnitude is None:
            absolute: np.ndarray = np.abs(self.val)
            return absolute
        return self.magnitude

    def error(self) -> np.ndarray:
        """Bound on ``|val - real value of the same expression|`` (0 for stored values)."""
        if self.depth == 0:
            return np.zeros(self.shape)
        bound: np.ndarray = self.depth * U64 * 1.01 * self.mag
        return bound

    def is_exact_ones(self) -> bool:
        """All ones, no rounding, no unit: multiplying by it changes nothing."""
        return self.depth == 0 and not self.has_units and bool((self.val == 1).all())

    def _scaled_lazily(self, small: Coefs) -> Coefs | None:
        """``self * small`` kept as a factor, when ``small`` is a broadcast vector."""
        if self.has_units or small.has_units or self.magnitude is not None:
            return None
        if 4 * small.raw.size > self.raw.size:
            return None
        factor = small.val if self.factor is None else self.factor * small.val
        if np.broadcast_shapes(factor.shape, self.shape) != self.shape:
            return None
        mag_factor = None
        if small.magnitude is not None or self.mag_factor is not None:
            mine = self.mag_factor
            if mine is None:
                mine = np.ones(1) if self.factor is None else np.abs(self.factor)
            mag_factor = mine * small.mag
        depth = self.depth + small.depth + 1
        return Coefs(self.raw, None, None, depth, factor, mag_factor)

    # -- arithmetic (numpy broadcasting) -------------------------------------------

    def __mul__(self, other: Coefs) -> Coefs:
        lazy = self._scaled_lazily(other) or other._scaled_lazily(self)
        if lazy is not None:
            return lazy
        unit = _opt_add(
            _opt_scale(self.unit, np.abs(other.val)), _opt_scale(other.unit, np.abs(self.val))
        )
        magnitude = None
        if self.magnitude is not None or other.magnitude is not None:
            magnitude = self.mag * other.mag
        return Coefs(self.val * other.val, magnitude, unit, self.depth + other.depth + 1)

    def __add__(self, other: Coefs) -> Coefs:
        return Coefs(
            self.val + other.val,
            self.mag + other.mag,
            _opt_add(self.unit, other.unit),
            max(self.depth, other.depth) + 1,
        )

    def __neg__(self) -> Coefs:
        return Coefs(
            -self.raw, self.magnitude, self.units, self.depth, self.factor, self.mag_factor,
            self.spacing,
        )  # fmt: skip

    def __sub__(self, other: Coefs) -> Coefs:
        return self + (-other)

    def recip(self) -> Coefs:
        """``1 / self`` (callers check for zeros)."""
        inv = 1.0 / self.val
        magnitude = None if self.magnitude is None else self.magnitude * inv * inv
        return Coefs(inv, magnitude, _opt_scale(self.unit, inv * inv), self.depth + 1)

    def __truediv__(self, other: Coefs) -> Coefs:
        return self * other.recip()

    def sqrt(self) -> Coefs:
        """``sqrt(self)`` (callers check the sign)."""
        root = np.sqrt(self.val)
        half_inv = np.divide(0.5, root, out=np.zeros_like(root), where=root > 0)
        return Coefs(
            root, self.mag * half_inv + root, _opt_scale(self.unit, half_inv), self.depth + 1
        )

    def matmul(self, other: Coefs) -> Coefs:
        """``self @ other`` over the last two axes (batched over the leading ones)."""
        n = self.shape[-1]
        unit = _opt_add(
            None if self.unit is None else self.unit @ np.abs(other.val),
            None if other.unit is None else np.abs(self.val) @ other.unit,
        )
        return Coefs(self.val @ other.val, self.mag @ other.mag, unit, self.depth + other.depth + n)

    # -- shape -------------------------------------------------------------------------

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Coefs:
        """Apply one shape-only numpy function (reshape, transpose, index) to all arrays."""
        if self.factor is not None:
            return Coefs(
                fn(self.val), fn(self.mag), None if self.unit is None else fn(self.unit), self.depth
            )
        return Coefs(
            fn(self.raw),
            None if self.magnitude is None else fn(self.magnitude),
            None if self.units is None else fn(self.units),
            self.depth,
            spacing=self.spacing,  # the spacing of an entry goes where the entry goes
        )

    def reshape(self, shape: tuple[int, ...]) -> Coefs:
        return self.map(lambda a: a.reshape(shape))

    def broadcast_to(self, shape: tuple[int, ...]) -> Coefs:
        return self.map(lambda a: np.broadcast_to(a, shape))

    def block(self, index: tuple[slice, ...]) -> np.ndarray:
        """``val[index]`` as a fresh float64 array, computing no more than that block."""
        if self.factor is None:
            return np.array(self.raw[index], dtype=np.float64)
        factor = np.broadcast_to(self.factor, self.shape)
        # one pass: the stored dtype times the float64 factor, in float64
        product: np.ndarray = np.multiply(self.raw[index], factor[index], dtype=np.float64)
        return product

    def block_indices(self, axis: int, step: int) -> Iterator[tuple[slice, ...]]:
        """Index tuples covering the array, ``step`` indices of ``axis`` at a time."""
        for start in range(0, self.shape[axis], step):
            yield tuple(
                slice(start, start + step) if i == axis else slice(None)
                for i in range(len(self.shape))
            )

    def outer_axis(self) -> int:
        """The axis of ``raw`` that is outermost in memory (blocks along it are contiguous)."""
        strides = [
            abs(st) if n > 1 else -1 for st, n in zip(self.raw.strides, self.shape, strict=True)
        ]
        return int(np.argmax(strides)) if strides else 0
