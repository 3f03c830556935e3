"""What each submodule is to the fold, and what it did during one real forward.

The graph finders only see structure. Which modules are linear ops or
BatchNorm-like, how often each was called and what rank its output had come from
here: the eager modules and one observed forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnfold.core import layouts
from bnfold.core.geometry import ConvGeometry, torch_pads
from bnfold.errors import BnfoldError
from bnfold.report import count_ops
from bnfold.rules.branch_sum import identity_tap_misfit as tap_refusal
from bnfold.rules.family import Found

LINEAR = "linear"
BN = "bn"

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_ATTRS = ("running_mean", "running_var", "eps")


def is_linear_module(m: nn.Module) -> bool:
    """Conv, ConvTranspose (1-3 d) or Linear, including subclasses."""
    return isinstance(m, (*_CONV, *_CONV_T, nn.Linear))


def is_bn_like(m: nn.Module) -> bool:
    """A BatchNorm, a subclass, or a frozen-BN style module, read duck-typed.

    Frozen BNs (weight, bias, running_mean, running_var buffers and eps) count,
    with children too (timm's FrozenBatchNormAct2d runs ``drop`` and ``act``
    after the affine); whether a forward computes that is checked on a probe
    before a fold (:mod:`bnfold.torch_front.norms`). InstanceNorm has the same
    attributes but other semantics.
    """
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return False
    if not all(hasattr(m, a) for a in _BN_ATTRS):
        return False
    stats = (m.running_mean, m.running_var)
    affine = (getattr(m, "weight", None), getattr(m, "bias", None))
    return (
        all(isinstance(t, torch.Tensor) and t.ndim == 1 for t in stats)
        and all(t is None or isinstance(t, torch.Tensor) for t in affine)
        and isinstance(m.eps, int | float)
    )


def layout_of(m: nn.Module) -> layouts.WeightLayout:
    """The weight layout of a linear module."""
    if isinstance(m, _CONV_T):
        return layouts.conv_transpose(int(m.groups))  # type: ignore[arg-type]
    if isinstance(m, _CONV):
        return layouts.conv(int(m.groups))  # type: ignore[arg-type]
    return layouts.linear()


def out_channels(m: Any) -> int:
    """Output channels of a linear module."""
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def in_channels(m: Any) -> int:
    """Input channels (features) of a linear module."""
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def is_conv_transpose(m: nn.Module) -> bool:
    return isinstance(m, _CONV_T)


def zero_padded(m: Any) -> bool:
    """A Conv that pads with zeros: its border taps read zeros, whatever came before."""
    if not isinstance(m, _CONV) or m.padding_mode != "zeros":
        return False
    return any(int(p) != 0 for p in m._reversed_padding_repeated_twice)


def is_plain_conv(m: nn.Module) -> bool:
    """A Conv1d/2d/3d (or subclass), not a transposed one."""
    return isinstance(m, _CONV)


def identity_tap_misfit(conv: Any, path: str) -> Found:
    """Why ``conv`` cannot compute ``x`` itself with one centred tap per channel (None: it can):
    :func:`bnfold.rules.branch_sum.identity_tap_misfit` of its geometry, in its own terms.

    Returns:
        BRANCH_MISMATCH (stride, channels) or UNCENTRED_TAP (kernel, padding).
    """
    return tap_refusal(conv_geometry(conv), path, padding=conv.padding)


def conv_geometry(conv: Any) -> ConvGeometry:
    """A Conv module's geometry, its ``padding`` (per axis, "same" or "valid") as ONNX pads."""
    kernel, dilations = tuple(conv.kernel_size), tuple(conv.dilation)
    return ConvGeometry(
        kernel=kernel,
        pads=torch_pads(conv.padding, kernel, dilations),
        strides=tuple(conv.stride),
        dilations=dilations,
        groups=int(conv.groups),
        in_channels=int(conv.in_channels),
        out_channels=int(conv.out_channels),
    )


def channel_rank(m: nn.Module) -> int:
    """Output rank at which a linear module's channels sit on axis 1, BatchNorm's axis.

    A batched ConvNd output is ``(N, C, *spatial)``; a Linear output is ``(N, C)``
    only for a 2-D input. On a 3-D input BatchNorm1d normalizes axis 1, which is
    not the Linear's feature axis.
    """
    if isinstance(m, (*_CONV, *_CONV_T)):
        return len(m.kernel_size) + 2
    return 2


def base_forward_overridden(m: nn.Module) -> bool:
    """True if a subclass of a torch linear module replaces its forward."""
    for base in (*_CONV, *_CONV_T, nn.Linear):
        if isinstance(m, base):
            return type(m).forward is not base.forward
    return False


@dataclass
class Roles:
    """The linear and BatchNorm-like modules of one model, by path.

    Attributes:
        kind: canonical path -> LINEAR or BN.
        canonical: every path (aliases included) -> canonical path of that module.
        aliases: canonical path -> all paths the same module object is registered at.
        param_paths: id of each parameter -> every path it is reachable at.
    """

    kind: dict[str, str] = field(default_factory=dict)
    canonical: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    param_paths: dict[int, list[str]] = field(default_factory=dict)

    def of(self, path: str) -> str | None:
        """LINEAR, BN or None for any (possibly aliased) path."""
        canon = self.canonical.get(path)
        return None if canon is None else self.kind.get(canon)

    def bns(self) -> list[str]:
        return [p for p, k in self.kind.items() if k == BN]


def find_roles(root: nn.Module) -> Roles:
    """Classify every submodule of ``root``; a module registered twice is one entry."""
    roles = Roles()
    first_path: dict[int, str] = {}
    for path, m in root.named_modules(remove_duplicate=False):
        canon = first_path.setdefault(id(m), path)
        roles.canonical[path] = canon
        roles.aliases.setdefault(canon, []).append(path)
        if canon == path and path:
            if is_linear_module(m):
                roles.kind[path] = LINEAR
            elif is_bn_like(m):
                roles.kind[path] = BN
    for name, p in root.named_parameters(remove_duplicate=False):
        roles.param_paths.setdefault(id(p), []).append(name)
    return roles


@dataclass
class Calls:
    """What one eager forward did, per canonical module path.

    A module may run several times (a block applied in a loop); its input and
    output shapes are kept per distinct value, so a check can tell "every call
    had this shape" from "the calls differ".
    """

    count: dict[str, int] = field(default_factory=dict)
    out_shapes: dict[str, set[tuple[int, ...]]] = field(default_factory=dict)
    in_shapes: dict[str, set[tuple[int, ...]]] = field(default_factory=dict)

    def of(self, path: str) -> int:
        return self.count.get(path, 0)

    def out_ndims(self, path: str) -> set[int]:
        """The output ranks the module's calls produced."""
        return {len(s) for s in self.out_shapes.get(path, ())}

    def out_shape(self, path: str) -> tuple[int, ...] | None:
        """The output shape of every call; None if unknown or the calls differ."""
        return _only(self.out_shapes.get(path))

    def in_shape(self, path: str) -> tuple[int, ...] | None:
        """The (first) input shape of every call; None if unknown or the calls differ."""
        return _only(self.in_shapes.get(path))


def _only(shapes: set[tuple[int, ...]] | None) -> tuple[int, ...] | None:
    return next(iter(shapes)) if shapes and len(shapes) == 1 else None


def observe(root: nn.Module, args: tuple[Any, ...], paths: list[str]) -> Calls:
    """Run ``root`` once (eval mode, no grad) counting calls and recording shapes.

    Raises:
        BnfoldError: the module cannot run on the example inputs.
    """
    calls = Calls()
    handles = []
    for path in paths:
        handles.append(root.get_submodule(path).register_forward_hook(_recorder(calls, path)))
    try:
        with eval_mode(root), torch.no_grad():
            root(*args)
    except Exception as e:
        raise BnfoldError(f"the module fails on the example inputs: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return calls


def _recorder(calls: Calls, path: str) -> Any:
    def hook(_m: nn.Module, inp: Any, out: Any) -> None:
        calls.count[path] = calls.count.get(path, 0) + 1
        if isinstance(out, torch.Tensor):
            calls.out_shapes.setdefault(path, set()).add(tuple(out.shape))
        if isinstance(inp, tuple) and inp and isinstance(inp[0], torch.Tensor):
            calls.in_shapes.setdefault(path, set()).add(tuple(inp[0].shape))

    return hook


@contextlib.contextmanager
def eval_mode(root: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each one's own flag afterwards."""
    flags = [(m, m.training) for m in root.modules()]
    # ep.module() refuses eval(): its graph already has the mode baked in.
    with contextlib.suppress(NotImplementedError):
        root.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def leaf_type_counts(root: nn.Module) -> dict[str, int]:
    """Module type names of the leaves of ``root``, counted (for the op table)."""
    return count_ops(
        [type(m).__name__ for m in root.modules() if not any(True for _ in m.children())]
    )
