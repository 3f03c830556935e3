"""What a BatchNorm-like module computes beyond its affine, and what stays when the affine folds.

A stock ``nn.BatchNorm{1,2,3}d`` and a frozen BN (torchvision's ``FrozenBatchNorm2d``,
detectron2's: a module with ``weight``/``bias``/``running_mean``/``running_var`` and
``eps`` whose forward computes their affine) compute the per-channel affine
``s * x + t`` and nothing else: folded, they become ``nn.Identity``.

timm's ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass) and ``FrozenBatchNormAct2d``
(a frozen BN) run children after the affine: ``act(drop(bn(x)))``. Folding the affine
into the conv before it must keep them: the module is replaced by an ``nn.Sequential``
of those children, in the order they ran, under their own names (so their
state_dict keys stay where they were, and the folded model needs nothing but torch).

What a module with its own forward computes is not read from its class: it is run
once on a probe of the input shape it saw, with hooks on its children, and its output
must equal the children that ran, in that order, applied to the affine of its buffers
(within rounding). A module whose forward does anything else is refused, before any
fold (so also where nothing verifies, ``inspect`` or ``verify=False``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.affine import Affine
from bnfold.report import Code
from bnfold.torch_front.modules import eval_mode

Found = tuple[Code, str] | None

_STOCK_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
# How many units of the dtype's epsilon, relative to the affine's largest term, the
# module's own arithmetic may differ from the float64 affine (and the children,
# Lipschitz up to about 1.5 for hardswish, carry that on).
_ROUNDING_UNITS = 64


@dataclass(frozen=True)
class After:
    """The children a BN-like module runs after its affine that do something (not
    ``nn.Identity``), by name, in the order they ran."""

    children: tuple[str, ...] = ()


def working_children(bn: nn.Module) -> list[str]:
    """The children of ``bn`` that do something (an ``nn.Identity`` does nothing)."""
    return [name for name, m in bn.named_children() if type(m) is not nn.Identity]


def after_affine(
    bn: Any, affine: Affine, in_shape: tuple[int, ...] | None
) -> After | tuple[Code, str]:
    """What ``bn`` runs after ``affine``, its own, checked on a probe of ``in_shape``
    (the input shape of one of its calls); else why not.

    A stock BatchNorm's forward is its affine: no probe. Any other (a frozen BN, a
    subclass with a forward of its own) is run on a normal draw of ``in_shape``
    with hooks on its children.

    Returns:
        The children to keep (none for a frozen BN), or PARAMETRIZED: a child ran
        twice, a working child did not run, or the output is not the children
        applied to the affine.
    """
    if type(bn).forward in _STOCK_FORWARDS:
        return After()
    kind = type(bn).__name__
    if in_shape is None:
        return Code.PARAMETRIZED, (
            f"{kind} has a forward of its own, and no call showed its input shape: "
            "what it computes was not checked"
        )
    probe = _probe(bn, in_shape)
    try:
        out, ran = _run_watching_children(bn, probe)
    except Exception as e:  # the module refuses the probe: nothing is known about it
        return Code.PARAMETRIZED, f"{kind} could not be run on a probe: {type(e).__name__}: {e}"
    if found := _each_working_child_once(bn, kind, ran):
        return found
    if found := _computes_affine_then(bn, affine, kind, probe, out, ran):
        return found
    return After(tuple(name for name in ran if name in working_children(bn)))


def kept_part(bn: nn.Module, after: After) -> nn.Module:
    """What replaces ``bn`` once its affine is folded: ``nn.Identity``, or its children."""
    kept: nn.Module
    if after.children:
        kept = nn.Sequential(OrderedDict((name, bn.get_submodule(name)) for name in after.children))
    else:
        kept = nn.Identity()
    kept.train(bn.training)
    return kept


# A probe keeps the input's rank and channels and at most this many of every other axis:
# what a per-channel affine and an activation compute does not depend on the extent.
_PROBE_EXTENT = 4


def _probe(bn: Any, in_shape: tuple[int, ...]) -> torch.Tensor:
    like = bn.running_mean
    shape = [min(n, _PROBE_EXTENT) if axis != 1 else n for axis, n in enumerate(in_shape)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)


def _run_watching_children(bn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``bn(x)`` in eval mode, and the names of the children called, in call order."""
    ran: list[str] = []
    handles = [
        child.register_forward_pre_hook(lambda *_a, _n=name: ran.append(_n))
        for name, child in bn.named_children()
    ]
    try:
        with eval_mode(bn), torch.no_grad():
            out = bn(x.clone())
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"it returned {type(out).__name__}, not a tensor")
    return out, ran


def _each_working_child_once(bn: nn.Module, kind: str, ran: list[str]) -> Found:
    if twice := sorted({name for name in ran if ran.count(name) > 1}):
        return Code.PARAMETRIZED, f"{kind} runs {', '.join(twice)} more than once"
    if idle := [name for name in working_children(bn) if name not in ran]:
        return Code.PARAMETRIZED, f"{kind} holds {', '.join(idle)} but did not run it"
    return None


def _computes_affine_then(
    bn: Any, affine: Affine, kind: str, x: torch.Tensor, out: torch.Tensor, ran: list[str]
) -> Found:
    """``out`` is ``ran``'s children applied to ``affine(x)``, within rounding."""
    shape = (-1,) + (1,) * (x.dim() - 2)
    scale = torch.from_numpy(affine.scale).reshape(shape)
    shift = torch.from_numpy(affine.shift).reshape(shape)
    x64 = x.detach().to(device="cpu", dtype=torch.float64)
    expected = (x64 * scale + shift).to(dtype=x.dtype, device=x.device)
    with eval_mode(bn), torch.no_grad():
        for name in ran:
            expected = bn.get_submodule(name)(expected)
    if expected.shape != out.shape:
        return Code.PARAMETRIZED, (
            f"{kind} returns shape {tuple(out.shape)}, its affine then {', '.join(ran)} "
            f"{tuple(expected.shape)}"
        )
    terms = (x64 * scale).abs().amax() + (_mean64(bn) * scale.flatten()).abs().amax()
    bound = _ROUNDING_UNITS * torch.finfo(x.dtype).eps * float(terms + shift.abs().amax())
    gap = float((_cpu64(out) - _cpu64(expected)).abs().amax())
    if not gap <= bound:
        steps = " then ".join(["the affine of its buffers", *ran])
        return Code.PARAMETRIZED, (
            f"{kind} has a forward of its own, and it is not {steps}: they differ by "
            f"{gap:.3g} on a probe (rounding allows {bound:.3g})"
        )
    return None


def _mean64(bn: Any) -> torch.Tensor:
    return _cpu64(bn.running_mean)


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)
