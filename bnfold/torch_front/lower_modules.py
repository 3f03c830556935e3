"""Lower the BatchNorm modules no fold could remove (``lower_standalone``), eager front.

An inference BatchNorm is the per-channel affine ``y = s * x + t`` on axis 1
(:func:`bnfold.affine.bn_to_affine`). Once folding has reached its fixpoint,
each BN module still in the module tree is replaced, at the same path, by

    mul-add:  :class:`LoweredBatchNorm`, ``x * s + t`` (parameters
              ``lowered_scale`` / ``lowered_shift``, the names the ``.pt2``
              lowering gives its attributes)
    conv:     an ``nn.Conv{1,2,3}d(C, C, 1, groups=C)`` whose weight is ``s``
              and bias ``t``

``s`` and ``t`` are computed in float64 and cast once to the BN's parameter
dtype. Exported to ONNX, either becomes plain Mul/Add or Conv: no
BatchNormalization, for toolchains that reject it. The forward of every
other module is unchanged; the BN's own state_dict keys go, as they go when
a BN folds into ``nn.Identity``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from bnfold.core.cast import Unfoldable
from bnfold.report import Code, Lowered, LowerForm, Refusal
from bnfold.rules.lower import TORCH_TERMS, conv_form_note
from bnfold.torch_front.census import refusal_naming
from bnfold.torch_front.eager import bn_affine
from bnfold.torch_front.modules import Calls
from bnfold.torch_front.tensors import as_parameter

_CONV_OF_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
_STOCK_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


class LoweredBatchNorm(nn.Module):
    """An inference BatchNorm as ``x * scale + shift``, per channel on axis 1."""

    def __init__(self, scale: nn.Parameter, shift: nn.Parameter) -> None:
        super().__init__()
        self.lowered_scale, self.lowered_shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [C, 1, ..., 1] broadcasts on axis 1 for any rank; [C] alone would
        # broadcast on the last axis.
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.lowered_scale.view(shape) + self.lowered_shift.view(shape)


def lower_left(
    root: nn.Module, paths: list[str], refused: list[Refusal], form: LowerForm, calls: Calls
) -> tuple[list[Lowered], list[Refusal]]:
    """Replace each inference BN module at ``paths`` (those left after folding) by plain ops.

    Matches:  a stock ``nn.BatchNorm{1,2,3}d`` / ``SyncBatchNorm`` in eval mode with
              running statistics, no hooks and no parametrization.
    Produces: :class:`LoweredBatchNorm` at the same path, or for ``form`` conv a 1x1
              depthwise ``nn.Conv{1,2,3}d`` when every observed call has one input
              rank of 3 to 5 (else mul-add, with a note saying why).
    Refuses (the BN stays; its fold refusal extended): PARAMETRIZED (a subclass
    with its own forward, such as timm's BatchNormAct2d: its activation would be
    lost; or parametrized), HOOKED, BAD_VALUES.

    Returns the lowered entries and the refusals, ``refused`` with each lowered
    BN's refusal removed and each kept one's extended.
    """
    lowered: list[Lowered] = []
    still = list(refused)
    for path in paths:
        refusal = refusal_naming(path, still) or Refusal(
            path, Code.UNTRACEABLE, "no finder reported this BatchNorm"
        )
        if refusal in still:
            still.remove(refusal)
        outcome = _lower_one(root, path, refusal, form, calls)
        (lowered if isinstance(outcome, Lowered) else still).append(outcome)  # type: ignore[arg-type]
    return lowered, still


def _lower_one(
    root: nn.Module, path: str, refusal: Refusal, form: LowerForm, calls: Calls
) -> Lowered | Refusal:
    bn: Any = root.get_submodule(path)
    if why := _why_not_lowerable(bn):
        return refusal.not_lowered(*why)
    try:
        affine = bn_affine(bn)
    except Unfoldable as err:
        return refusal.not_lowered(Code.BAD_VALUES, str(err))
    like = bn.weight if bn.weight is not None else bn.running_mean
    scale, shift = as_parameter(affine.scale, like), as_parameter(affine.shift, like)
    ranks = {len(shape) for shape in calls.in_shapes.get(path, set())}
    note = conv_form_note(ranks, TORCH_TERMS)  # "" when one rank of 3 to 5 has a conv
    if form is LowerForm.CONV and not note:
        new: nn.Module = _depthwise(next(iter(ranks)), scale, shift)
        used = LowerForm.CONV
    else:
        new, used = LoweredBatchNorm(scale, shift), LowerForm.MUL_ADD
        note = "" if form is used else note
    new.train(False)
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, new)
    return Lowered(path, used, refusal.code, refusal.detail, note)


def _why_not_lowerable(bn: Any) -> tuple[Code, str] | None:
    """Why ``bn`` cannot become plain ops with nothing else lost, as the fold decides it.

    A BatchNorm subclass with its own forward and working submodules (timm's
    BatchNormAct2d runs its ``act``) would lose them; children that are
    ``nn.Identity`` do nothing.
    """
    custom = type(bn).forward not in _STOCK_FORWARDS  # a frozen BN with children too
    working = [name for name, m in bn.named_children() if type(m) is not nn.Identity]
    if custom and working:
        runs = ", ".join(working)
        return Code.PARAMETRIZED, f"{type(bn).__name__} overrides forward() and runs {runs}"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return Code.HOOKED, "the BatchNorm has forward hooks"
    if parametrize.is_parametrized(bn):
        return Code.PARAMETRIZED, "the BatchNorm is parametrized"
    return None


def _depthwise(rank: int, scale: nn.Parameter, shift: nn.Parameter) -> Any:
    """A 1x1 depthwise conv for inputs of ``rank`` (3 to 5): weight ``s``, bias ``t``."""
    channels = scale.shape[0]
    conv: Any = _CONV_OF_RANK[rank](channels, channels, 1, groups=channels, bias=True)
    spatial = [1] * (rank - 2)
    conv.weight = nn.Parameter(scale.detach().reshape(channels, 1, *spatial), False)
    conv.bias = shift
    return conv
