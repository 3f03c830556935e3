"""Conv geometry a branch merge needs, as pure functions over ints and tuples.

Every front merges a sum of convs reading one input into one conv (RepVGG,
MobileOne, RepGhost, RepViT). Whether a small kernel, zero-padded to a larger
one, reads the same input positions is a question of kernel sizes, pads and
dilations only; each front reads those from its own graph into a
:class:`ConvGeometry` and asks :mod:`bnfold.rules.branch_sum`.

Pads are in ONNX order: the begin of every spatial axis, then the end of every
spatial axis (``(top, left, bottom, right)`` in 2-D).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ConvGeometry",
    "first_mismatch",
    "off_centre_axis",
    "per_axis",
    "same_pads",
    "symmetric_pads",
    "torch_pads",
]


@dataclass(frozen=True)
class ConvGeometry:
    """One conv, reduced to what decides whether a term may merge into it.

    Attributes:
        kernel: the kernel size per spatial axis.
        pads: ONNX-ordered pads (begins, then ends).
        strides, dilations: per spatial axis.
        groups: the group count.
        in_channels, out_channels: the conv's channel counts (all groups).
    """

    kernel: tuple[int, ...]
    pads: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    groups: int = 1
    in_channels: int = 0
    out_channels: int = 0

    @property
    def rank(self) -> int:
        """The number of spatial axes."""
        return len(self.kernel)

    def identity_off_centre_axis(self) -> int | None:
        """The first axis where a one-tap identity kernel, padded to this kernel, would
        not read what this conv reads at the same position (None: it sits centred)."""
        rank = self.rank
        return off_centre_axis((1,) * rank, (0,) * 2 * rank, self.kernel, self.pads, self.dilations)

    def centre_pad(self, axis: int) -> int:
        """The pad that centres a one-tap identity on ``axis``: ``dilation * (k - 1) / 2``."""
        return (self.kernel[axis] - 1) // 2 * self.dilations[axis]


def off_centre_axis(
    small: Sequence[int],
    small_pads: Sequence[int],
    large: Sequence[int],
    large_pads: Sequence[int],
    dilations: Sequence[int],
) -> int | None:
    """The first spatial axis where kernel ``small`` with ``small_pads``, zero-padded
    symmetrically to ``large``, would not read what ``large`` with ``large_pads`` reads.

    The padded kernel reads the same positions when it grows by an even number of
    taps, ``(large - small) / 2`` on each side, and its pads grow by as many taps
    (times the dilation) on both sides to become ``large_pads``. An identity term is
    the kernel ``(1, ...)`` with pads 0.

    Returns:
        None when it sits centred on every axis.
    """
    rank = len(dilations)
    for axis, (s, k) in enumerate(zip(small, large, strict=True)):
        grow = (k - s) // 2 * dilations[axis]
        centred = (
            s <= k
            and (k - s) % 2 == 0
            and all(
                small_pads[axis + side * rank] + grow == large_pads[axis + side * rank]
                for side in (0, 1)
            )
        )
        if not centred:
            return axis
    return None


def first_mismatch(
    expected: Mapping[str, object], actual: Mapping[str, object]
) -> tuple[str, object, object] | None:
    """The first property (strides, dilations, groups, ...) whose value differs:
    ``(name, actual value, expected value)``; None if every one agrees."""
    for key, value in actual.items():
        if value != expected[key]:
            return key, value, expected[key]
    return None


def symmetric_pads(padding: Sequence[int]) -> tuple[int, ...]:
    """ONNX-ordered pads of a torch conv's ``padding`` (one value per axis, both sides)."""
    return (*padding, *padding)


def same_pads(kernel: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """ONNX-ordered pads of torch's ``padding="same"`` (stride 1): the odd tap of an
    even total goes to the end, as torch pads it."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
    return (*(t // 2 for t in totals), *(t - t // 2 for t in totals))


def torch_pads(padding: object, kernel: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """ONNX-ordered pads of a torch conv's ``padding``: ``"same"`` (stride 1),
    ``"valid"``, one int, or one int per axis (``[1]`` broadcasts)."""
    rank = len(kernel)
    if padding == "same":
        return same_pads(kernel, dilations)
    if padding == "valid":
        return (0,) * 2 * rank
    return symmetric_pads(per_axis(padding, rank))


def per_axis(value: object, rank: int) -> tuple[int, ...]:
    """An int or int list argument as one int per spatial axis (``[1]`` broadcasts)."""
    values = [value] if isinstance(value, int) else list(value)  # type: ignore[call-overload]
    if len(values) == 1:
        values = values * rank
    return tuple(int(v) for v in values)
