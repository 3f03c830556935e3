"""Where the output and input channels of each linear op sit in its weight tensor.

Folding an affine *after* the op multiplies every weight that produces output
channel ``c`` by ``scale[c]``; folding one *before* it multiplies every weight
that reads input channel ``c``. For most ops each is one axis. Grouped ops split
one side across blocks of rows: Conv stores ``(C_out, C_in/g, *k)``, so input
channel ``c`` of group ``g`` is column ``c - g*C_in/g`` of group ``g``'s rows;
ConvTranspose stores ``(C_in, C_out/g, *k)``, the same shape of problem on the
output side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LayoutError",
    "WeightLayout",
    "channel_block",
    "conv",
    "conv_transpose",
    "gemm",
    "linear",
    "matmul",
    "merges_leading_axes",
]


class LayoutError(ValueError):
    """The weight shape does not fit the op's layout (e.g. bad group count)."""


@dataclass(frozen=True)
class WeightLayout:
    """Where output channels live in one op's weight.

    Attributes:
        op: human-readable op kind, for reports.
        out_axis: axis of the weight that indexes output channels (within a group).
        in_axis: axis of the weight that indexes input channels (within a group).
        groups: group count of a grouped Conv/ConvTranspose, else 1.
        grouped_side: "out" (ConvTranspose) or "in" (Conv): the side whose
            channels are split across row blocks of axis 0.
    """

    op: str
    out_axis: int
    in_axis: int
    groups: int = 1
    grouped_side: str = ""

    def out_channels(self, w_shape: tuple[int, ...]) -> int:
        """Number of output channels of an op with weight shape ``w_shape``."""
        return int(w_shape[self.out_axis]) * (self.groups if self.grouped_side == "out" else 1)

    def in_channels(self, w_shape: tuple[int, ...]) -> int:
        """Number of input channels of an op with weight shape ``w_shape``."""
        return int(w_shape[self.in_axis]) * (self.groups if self.grouped_side == "in" else 1)

    def expand(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """Reshape a ``(C_out,)`` vector so it broadcasts onto the weight.

        Raises:
            LayoutError: the vector length or group count does not fit ``w_shape``.
        """
        return self._expand("out", per_channel, w_shape)

    def expand_in(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """Reshape a ``(C_in,)`` vector so it broadcasts onto the weight."""
        return self._expand("in", per_channel, w_shape)

    def sum_to_out(self, values: np.ndarray) -> np.ndarray:
        """Sum a weight-shaped array over everything but output channels: ``(C_out,)``."""
        if self._outputs_grouped:
            summed: np.ndarray = self._group_blocks(values).sum(axis=(1, 3)).reshape(-1)
            return summed
        axes = tuple(a for a in range(values.ndim) if a != self.out_axis)
        summed = values.sum(axis=axes)
        return summed

    @property
    def rows_are_out_channels(self) -> bool:
        """Each row (axis 0 index) of the weight feeds exactly one output channel, alone."""
        return self.out_axis == 0 and self.grouped_side != "out"

    def out_channel_rows(self, values: np.ndarray) -> np.ndarray:
        """A weight-shaped array as ``(C_out, fan_in)``: row c holds every weight of output c.

        The same grouping as :meth:`sum_to_out`; :meth:`from_out_channel_rows`
        undoes it. A copy unless :attr:`rows_are_out_channels`.
        """
        if self._outputs_grouped:
            blocks = self._group_blocks(values)
            rows: np.ndarray = blocks.transpose(0, 2, 1, 3)
            return rows.reshape(self.groups * blocks.shape[2], -1)
        moved = np.moveaxis(values, self.out_axis, 0)
        return moved.reshape(moved.shape[0], -1)

    def from_out_channel_rows(self, rows: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """Undo :meth:`out_channel_rows`: the ``(C_out, fan_in)`` rows back in ``w_shape``."""
        if self._outputs_grouped:
            c_in, c_out_per_group = int(w_shape[0]), int(w_shape[1])
            blocks = rows.reshape(self.groups, c_out_per_group, c_in // self.groups, -1)
            weight: np.ndarray = blocks.transpose(0, 2, 1, 3)
            return weight.reshape(w_shape)
        others = tuple(size for axis, size in enumerate(w_shape) if axis != self.out_axis)
        moved_shape = (w_shape[self.out_axis], *others)
        return np.moveaxis(rows.reshape(moved_shape), 0, self.out_axis)

    @property
    def _outputs_grouped(self) -> bool:
        return self.grouped_side == "out" and self.groups > 1

    def _group_blocks(self, values: np.ndarray) -> np.ndarray:
        """ConvTranspose's ``(C_in, C_out/g, *k)`` as ``(g, C_in/g, C_out/g, prod(k))``."""
        c_in, c_out_per_group = values.shape[0], values.shape[1]
        return values.reshape(self.groups, c_in // self.groups, c_out_per_group, -1)

    def _expand(self, side: str, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        count = self.out_channels(w_shape) if side == "out" else self.in_channels(w_shape)
        if per_channel.shape != (count,):
            raise LayoutError(
                f"{self.op}: expected {count} {side}put channel values, "
                f"got shape {per_channel.shape}"
            )
        if self.groups > 1 and self.grouped_side == side:
            return self._expand_grouped(per_channel, w_shape)
        shape = [1] * len(w_shape)
        shape[self.out_axis if side == "out" else self.in_axis] = count
        return per_channel.reshape(shape)

    def _expand_grouped(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        # The grouped side is axis 1; group g owns the g-th block of rows of axis 0.
        rows, cols = int(w_shape[0]), int(w_shape[1])
        if rows % self.groups:
            raise LayoutError(f"{self.op}: {rows} rows not divisible by {self.groups} groups")
        blocks = per_channel.reshape(self.groups, 1, cols)
        grid = np.broadcast_to(blocks, (self.groups, rows // self.groups, cols))
        return grid.reshape(rows, cols, *([1] * (len(w_shape) - 2)))


def conv(groups: int = 1) -> WeightLayout:
    """Conv (any rank): weight ``(C_out, C_in/g, *k)``, input channels split per group."""
    return WeightLayout("Conv", out_axis=0, in_axis=1, groups=groups, grouped_side="in")


def conv_transpose(groups: int) -> WeightLayout:
    """ConvTranspose: weight ``(C_in, C_out/g, *k)``, output channels split per group."""
    return WeightLayout("ConvTranspose", out_axis=1, in_axis=0, groups=groups, grouped_side="out")


def gemm(trans_b: bool) -> WeightLayout:
    """Gemm ``A @ B``: B is ``(K, N)``, or ``(N, K)`` when transB=1."""
    return WeightLayout("Gemm", out_axis=0, in_axis=1) if trans_b else matmul("Gemm")


def matmul(op: str = "MatMul") -> WeightLayout:
    """MatMul with a constant right operand ``(K, N)``."""
    return WeightLayout(op, out_axis=1, in_axis=0)


def linear() -> WeightLayout:
    """torch ``nn.Linear``: weight ``(out_features, in_features)``."""
    return WeightLayout("Linear", out_axis=0, in_axis=1)


def channel_block(affine_side: tuple[int, ...], linear_side: tuple[int, ...]) -> int | None:
    """Linear-op channels per affine channel across a reshape, or None if they do not nest.

    Both shapes hold the same elements in the same order (a view, flatten or
    (un)squeeze that keeps the batch axis 0); the per-channel affine (a BN) has
    its channels on axis 1 of ``affine_side``, the linear op on axis 1 of
    ``linear_side``. Each channel is a contiguous run of elements per sample, so
    linear channel ``j`` lies inside affine channel ``j // k`` exactly when the
    affine's runs are a whole number ``k`` of the linear op's. Examples:
    ``(N, C, H, W) -> (N, C*H*W)`` into a Linear gives ``k = H*W``;
    ``(N, 4*C)`` from a Linear viewed as ``(N, C, 2, 2)`` gives ``k = 4``;
    ``(N, C, H, W)`` from a Conv viewed as ``(N, C*H*W)`` gives None (each feature
    would need its own scale).
    """
    if len(affine_side) < 2 or len(linear_side) < 2 or affine_side[0] != linear_side[0]:
        return None
    affine_run, linear_run = math.prod(affine_side[2:]), math.prod(linear_side[2:])
    if affine_side[1] * affine_run != linear_side[1] * linear_run or affine_run == 0:
        return None
    if linear_run == 0 or affine_run % linear_run:
        return None
    return affine_run // linear_run


def merges_leading_axes(affine_side: tuple[int, ...], linear_side: tuple[int, ...]) -> bool | None:
    """Whether a reshape merging a channel-last op's leading axes keeps its channels.

    ``linear_side`` is the output of an op whose channels are its *last* axis
    (``nn.Linear``/MatMul on ``(B, N, C)``); ``affine_side`` is the same elements
    reshaped to 2-D ``(M, X)`` for a per-channel affine on axis 1 (LeViT's
    ``bn(linear(x).flatten(0, 1))``). A reshape keeps element order, so element
    ``f`` is in column ``f % X`` there and in channel ``f % C`` here: ``X == C``
    makes them agree for every element, whatever the batch and token axes were
    (the ONNX rule ``batch_merge`` proves the same from the BN's channel count).

    Returns:
        None when this is no such merge (``linear_side`` not at least 3-D, or
        ``affine_side`` not 2-D, or different element counts); True when
        ``X == C``; False when the merge moves the channel axis
        (``(B, N, C) -> (B, N*C)``: a channel would span several affine channels).
    """
    if len(linear_side) < 3 or len(affine_side) != 2:
        return None
    if math.prod(affine_side) != math.prod(linear_side):
        return None
    return affine_side[1] == linear_side[-1]
