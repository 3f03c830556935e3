"""Family ``batch_merge``: a channel-last linear op, a reshape merging its leading axes, a BN.

Matches:  MatMul | Linear on ``(B, N, K)`` -> flatten | reshape to 2-D -> BN, as LeViT's
          ``bn(linear(x).flatten(0, 1))``.
Produces: the after-fold (kind ``batch_merge``). An eval BN is one affine per
          channel, so merging the batch with the token axes is harmless as long
          as the op's channels stay the last axis, where the BN (on axis 1 of the
          2-D result) sees them.
Refuses:  MERGE_MOVES_CHANNEL  the 2-D result's second axis is not the op's C (its
                               features mix several of the op's channels, or split one).

Why a channel count proves it: a reshape keeps element order, so in a 2-D result
``(M, X)`` element ``f`` sits in column ``f % X``, and in the op's ``(..., C)``
output in channel ``f % C``; ``X == C`` makes them agree for every element
(:func:`bnfold.core.layouts.merges_leading_axes`).
"""

from __future__ import annotations

from bnfold.core.layouts import merges_leading_axes
from bnfold.report import Code, FoldKind
from bnfold.rules.family import Family, Found


def channels_refusal(bn_channels: int, op_channels: int, reshape: str, op: str) -> Found:
    """MERGE_MOVES_CHANNEL unless the BN after the 2-D reshape has the op's C channels
    (when the shapes are unknown, the BN's parameter count is what the result's
    second axis must be)."""
    if bn_channels == op_channels:
        return None
    return Code.MERGE_MOVES_CHANNEL, (
        f"{reshape} makes {op}'s output 2-D with {bn_channels} BatchNorm channels, "
        f"not its {op_channels} output channels"
    )


def shapes_refusal(
    bn_side: tuple[int, ...], op_side: tuple[int, ...], reshape: str, source: str
) -> Found:
    """MERGE_MOVES_CHANNEL unless the reshape of ``op_side`` to the BN's 2-D ``bn_side``
    keeps the op's channels as the BN's; ``source`` names what the reshape reads."""
    if merges_leading_axes(bn_side, op_side):
        return None
    return Code.MERGE_MOVES_CHANNEL, (
        f"{reshape} maps {source} to {bn_side}: the BN's {bn_side[1]} channels are not "
        f"the {op_side[-1]} features"
    )


FAMILY = Family(
    "batch_merge",
    frozenset({FoldKind.BATCH_MERGE}),
    {front: frozenset({Code.MERGE_MOVES_CHANNEL}) for front in ("onnx", "eager", "pt2")},
    __doc__ or "",
)
