"""What the prover knows about each tensor of a changed region.

A tensor is one of:

* :class:`Const`: a constant (an initializer, a ``Constant``, or computed from them).
* :class:`Affine`: an affine function of the region's boundary inputs,
  ``sum over sources of Stencil(source) + bias``, on a :data:`Layout` that says what
  each axis is to the map: ``BATCH`` (leading axes the map acts on pointwise and
  identically: batch, tokens), ``SPACE`` (axes a window slides over; ``frame`` names
  the spatial axis of the sources it follows) or ``FEATURE`` (static axes the map mixes
  freely; their flattened index is the row/column index of every tap matrix).
* :class:`Pooled`: a pool (average or max, per channel) of an affine value, with a
  per-channel affine still to apply after it. A max pool is not affine; it commutes
  with a per-channel affine of scale >= 0, which is what a fold through it needs.
* :class:`ShapeValue`: the output of ``Shape``, known as symbolic dims.

Anything else raises :class:`Unsupported` with a reason, and the region is reported
not proven with that reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from bnfold.proof import dims
from bnfold.proof.coefs import Coefs
from bnfold.proof.dims import Dim
from bnfold.proof.stencil import Stencil


class Unsupported(Exception):
    """The prover cannot model this piece; the message says why (for the report)."""


class Role(str, enum.Enum):
    """What an axis is to a map."""

    BATCH = "batch"
    SPACE = "space"
    FEATURE = "feature"


@dataclass(frozen=True)
class Axis:
    """One axis of a value: its role, its size and, for SPACE, its source frame."""

    role: Role
    size: Dim
    frame: int = -1


Layout = tuple[Axis, ...]


def shape_of(layout: Layout) -> tuple[Dim, ...]:
    return tuple(a.size for a in layout)


def feature_count(layout: Layout) -> int:
    """The number of flattened features (every FEATURE axis must be static)."""
    n = 1
    for a in layout:
        if a.role is Role.FEATURE:
            if not isinstance(a.size, int):
                raise Unsupported(f"a channel axis of unknown size {a.size}")
            n *= a.size
    return n


def feature_dims(layout: Layout) -> tuple[int, ...]:
    feature_count(layout)
    return tuple(int(a.size) for a in layout if a.role is Role.FEATURE)  # type: ignore[arg-type]


def spatial_axes(layout: Layout) -> list[int]:
    return [i for i, a in enumerate(layout) if a.role is Role.SPACE]


def layout_text(layout: Layout) -> str:
    return dims.text([a.size for a in layout])


def roles_text(layout: Layout) -> str:
    """``[batch 1, feature 16, space 32]``: each axis's size and what it is to the map."""
    return "[" + ", ".join(f"{a.role.value} {a.size}" for a in layout) + "]"


@dataclass
class Const:
    """A constant tensor, exactly as the model computes it (its own dtype)."""

    array: np.ndarray


@dataclass
class Affine:
    """``sum over sources of terms[source](source) + bias`` on ``layout``."""

    layout: Layout
    terms: dict[str, Stencil]
    bias: Coefs  # [features], the same at every batch and spatial position

    @property
    def features(self) -> int:
        return feature_count(self.layout)


@dataclass(frozen=True)
class PoolSpec:
    """A pool, as every attribute that decides what it computes."""

    op_type: str
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    ceil_mode: int = 0
    count_include_pad: int = 0

    @property
    def is_max(self) -> bool:
        return "Max" in self.op_type

    def divisor_counts_padding(self) -> bool:
        """True when an average may divide by more than the elements it summed.

        ``count_include_pad=1`` with any padding, ``ceil_mode=1`` or ``auto_pad`` SAME
        (the runtime pads then) makes a border window divide by a count that includes
        padded zeros, so ``avg(y + t) != avg(y) + t`` there.
        """
        if self.op_type == "GlobalAveragePool" or self.is_max or not self.count_include_pad:
            return False
        return bool(any(self.pads) or self.ceil_mode or self.auto_pad not in ("NOTSET", "VALID"))


@dataclass
class Pooled:
    """``post(pool(inner))``: ``post`` a per-feature (scale, shift), or None."""

    spec: PoolSpec
    inner: Affine
    layout: Layout
    post: tuple[Coefs, Coefs] | None = None


@dataclass(frozen=True)
class ShapeValue:
    """The int64 output of ``Shape``: the symbolic dims of a value."""

    dims: tuple[Dim, ...]


Value = Const | Affine | Pooled | ShapeValue
