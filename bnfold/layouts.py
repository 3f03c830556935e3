"""Where the output channels of each linear op sit in its weight tensor.

The fold multiplies every weight that produces output channel ``c`` by
``scale[c]``. For most ops that is one axis; ConvTranspose stores its weight as
``(C_in, C_out / groups, *k)``, so channel ``c`` of group ``g`` is column
``c - g * C_out/groups`` of the rows belonging to group ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LayoutError(ValueError):
    """The weight shape does not fit the op's layout (e.g. bad group count)."""


@dataclass(frozen=True)
class WeightLayout:
    """Where output channels live in one op's weight.

    Attributes:
        op: human-readable op kind, for reports.
        out_axis: axis of the weight that indexes output channels (within a group).
        groups: ConvTranspose groups; output channels are split across blocks of
            axis 0. 1 for every other op.
    """

    op: str
    out_axis: int
    groups: int = 1

    def out_channels(self, w_shape: tuple[int, ...]) -> int:
        """Number of output channels of an op with weight shape ``w_shape``."""
        return int(w_shape[self.out_axis]) * self.groups

    def expand(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        """Reshape a ``(C_out,)`` vector so it broadcasts onto the weight.

        Raises:
            LayoutError: the vector length or group count does not fit ``w_shape``.
        """
        c_out = self.out_channels(w_shape)
        if per_channel.shape != (c_out,):
            raise LayoutError(
                f"{self.op}: expected {c_out} channel values, got shape {per_channel.shape}"
            )
        if self.groups == 1:
            shape = [1] * len(w_shape)
            shape[self.out_axis] = c_out
            return per_channel.reshape(shape)
        return self._expand_grouped(per_channel, w_shape)

    def _expand_grouped(self, per_channel: np.ndarray, w_shape: tuple[int, ...]) -> np.ndarray:
        # Only ConvTranspose is grouped along the output side: w is (C_in, C_out/g, *k).
        c_in, c_out_per_group = int(w_shape[0]), int(w_shape[1])
        if self.out_axis != 1 or c_in % self.groups:
            raise LayoutError(
                f"{self.op}: {c_in} input channels not divisible by {self.groups} groups"
            )
        rows_per_group = c_in // self.groups
        blocks = per_channel.reshape(self.groups, 1, c_out_per_group)
        rows = np.broadcast_to(blocks, (self.groups, rows_per_group, c_out_per_group))
        return rows.reshape(c_in, c_out_per_group, *([1] * (len(w_shape) - 2)))


def conv() -> WeightLayout:
    """Conv (any rank, any groups): weight ``(C_out, C_in/g, *k)``."""
    return WeightLayout("Conv", out_axis=0)


def conv_transpose(groups: int) -> WeightLayout:
    """ConvTranspose: weight ``(C_in, C_out/g, *k)``, channels split per group."""
    return WeightLayout("ConvTranspose", out_axis=1, groups=groups)


def gemm(trans_b: bool) -> WeightLayout:
    """Gemm ``A @ B``: B is ``(K, N)``, or ``(N, K)`` when transB=1."""
    return WeightLayout("Gemm", out_axis=0 if trans_b else 1)


def matmul() -> WeightLayout:
    """MatMul with a constant right operand ``(K, N)``."""
    return WeightLayout("MatMul", out_axis=1)


def linear() -> WeightLayout:
    """torch ``nn.Linear``: weight ``(out_features, in_features)``."""
    return WeightLayout("Linear", out_axis=0)
