"""What leads to each tensor of an eager torch run: its reductions, and whether a jump does.

The torch counterpart of :mod:`bnfold.verification.cones`, read from one forward
instead of a graph: a ``TorchDispatchMode`` sees every aten op with the tensors it
reads and writes. A tensor computed from the model's inputs is *data*; each data
tensor carries the reductions behind it (the widest over its inputs, plus the op's
own: a convolution sums ``C_in/groups * prod(kernel)`` terms), which give its
derived bound, and whether a discontinuous op lies upstream (a comparison, an
argmax, a sort, NonMaxSuppression, a cast to integers: any op turning floating
data into indices or flags). An output behind such a jump is judged by the fold
sites and by the continuous values feeding the jump (the *frontier*), which the
tracer records at each such call: a near-tie that reorders detection boxes then
does not undo a correct fold. Parameters, buffers and constants are not data:
anchors computed from shapes with ``floor`` mark nothing.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bnfold.verification.tolerance import Reductions

# Ops whose floating output jumps when a floating input moves by a rounding error.
# Any op that turns floating data into integers or bools (a comparison, argmax,
# nonzero, NonMaxSuppression's indices, the indices of topk or sort) jumps in those
# outputs; the values topk, sort or max return beside them are continuous.
JUMPING_VALUES = frozenset(
    {
        "aten::round", "aten::floor", "aten::ceil", "aten::trunc", "aten::sign",
        "aten::remainder", "aten::fmod", "aten::floor_divide",
    }
)  # fmt: skip
# Indices no one reads in inference (a max pool's): not worth capturing what fed them.
_SILENT_INDICES = ("aten::max_pool", "aten::adaptive_max_pool")
# A Python branch on a value from behind a jump: everything after may follow either way.
_SCALAR_READS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item"})
_MATMULS = frozenset({"aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::dot"})
_ADDMMS = frozenset({"aten::addmm", "aten::baddbmm", "aten::addbmm"})
_CONVOLUTIONS = frozenset({"aten::convolution", "aten::_convolution"})
_SUMS = frozenset({"aten::mean", "aten::sum", "aten::nansum", "aten::nanmean"})
_SOFTMAXES = frozenset({"aten::_softmax", "aten::_log_softmax", "aten::softmax"})


@dataclass(frozen=True)
class Flow:
    """What led to one data tensor."""

    reductions: Reductions = field(default_factory=Reductions)
    jump: bool = False


@dataclass
class Captured:
    """The continuous data one discontinuous call read: its op, those inputs and their flows."""

    op: str
    values: list[torch.Tensor] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)


class FlowTracer(TorchDispatchMode):
    """Within the block, records the :class:`Flow` of every data tensor and the frontier.

    Args:
        inputs: the model's inputs (any pytree): its tensors are the data.
        capture: keep the continuous inputs of each discontinuous call (the frontier).
    """

    def __init__(self, inputs: Any, capture: bool = True) -> None:
        super().__init__()
        self._flows: dict[int, tuple[weakref.ref[torch.Tensor], Flow]] = {}
        self.frontier: list[Captured] = []
        self.capture = capture
        self._branched = False  # Python read a value from behind a jump
        for leaf in pytree.tree_leaves(inputs):
            if isinstance(leaf, torch.Tensor):
                self._set(leaf, Flow())

    def flow(self, tensor: torch.Tensor) -> Flow | None:
        """The flow of ``tensor`` (None: not computed from the inputs)."""
        entry = self._flows.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors_in = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        flows = [(t, f) for t in tensors_in if (f := self.flow(t)) is not None]
        if not flows:
            return out
        name = _op_name(func)
        if name in _SCALAR_READS and any(f.jump for _, f in flows):
            self._branched = True
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        behind = self._branched or any(f.jump for _, f in flows)
        jumping = [] if behind else _jumping(name, flows, outs)
        if jumping and self.capture and not name.startswith(_SILENT_INDICES):
            floating = [(t, f) for t, f in flows if t.is_floating_point()]
            kept = [t.detach().clone() for t, _ in floating]
            self.frontier.append(Captured(name, kept, [f for _, f in floating]))
        reductions = Reductions.widest(f.reductions for _, f in flows)
        reductions = reductions.then(reduction_length(name, args, outs))
        for t in outs:
            self._set(t, Flow(reductions, behind or any(t is j for j in jumping)))
        return out

    def _set(self, tensor: torch.Tensor, flow: Flow) -> None:
        self._flows[id(tensor)] = (weakref.ref(tensor), flow)


def _jumping(
    name: str, flows: list[tuple[torch.Tensor, Flow]], outs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The outputs of an op on continuous data that jump: all of a rounding op's, and
    every integer or bool output computed from floating data."""
    if not any(t.is_floating_point() for t, _ in flows):
        return []
    if name in JUMPING_VALUES:
        return outs
    return [t for t in outs if not (t.is_floating_point() or t.is_complex())]


def _op_name(func: Any) -> str:
    schema = getattr(func, "_schema", None)
    return str(schema.name) if schema is not None else str(func)


def reduction_length(name: str, args: Any, outs: list[torch.Tensor]) -> int:
    """Terms an aten op sums per output element (1 when elementwise or unknown)."""
    if name in _CONVOLUTIONS:
        weight = args[1]
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else 1
        per_group = weight.shape[0] // groups if transposed else weight.shape[1]
        return max(1, int(per_group) * math.prod(weight.shape[2:]))
    if name in _MATMULS:
        return max(1, int(args[0].shape[-1])) if args[0].dim() else 1
    if name in _ADDMMS:
        return max(1, int(args[1].shape[-1]))
    if name in _SUMS:
        return _summed(args)
    if name in _SOFTMAXES:
        x, dim = args[0], int(args[1])
        return max(1, int(x.shape[dim])) if x.dim() else 1
    if name == "aten::native_layer_norm":
        return max(1, math.prod(args[1]))
    if name.startswith("aten::avg_pool"):
        return max(1, math.prod(args[1]))
    if name.startswith("aten::_adaptive_avg_pool") or name.startswith("aten::adaptive_avg_pool"):
        x = args[0]
        if not outs or x.dim() < 3:
            return 1
        return max(1, math.prod(x.shape[2:]) // max(1, math.prod(outs[0].shape[2:])))
    return 1


def _summed(args: Any) -> int:
    x = args[0]
    dims = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else None
    if not dims:
        return max(1, x.numel())
    return max(1, math.prod(int(x.shape[d]) for d in dims))


_INT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
              torch.float32: torch.int32, torch.float64: torch.int64}  # fmt: skip


class RoundingNudger(TorchDispatchMode):
    """Within the block, every floating result computed from the inputs is moved one ulp,
    up or down at random per element: each of the run's roundings done another way, as a
    correct fold's different arithmetic does them.

    Views are left alone (their base was moved already) and so is what parameters alone
    compute. Deterministic for a given ``seed``.
    """

    def __init__(self, inputs: Any, seed: int) -> None:
        super().__init__()
        self._data: dict[int, weakref.ref[torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(seed)
        for leaf in pytree.tree_leaves(inputs):
            if isinstance(leaf, torch.Tensor):
                self._data[id(leaf)] = weakref.ref(leaf)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(t, torch.Tensor) and self._is_data(t) for t in leaves):
            return out
        out = pytree.tree_map(self._moved, out)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._data[id(t)] = weakref.ref(t)
        return out

    def _is_data(self, t: torch.Tensor) -> bool:
        ref = self._data.get(id(t))
        return ref is not None and ref() is t

    def _moved(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t._is_view():
            return t
        return nudged_tensor(t, self._gen)


def nudged_tensor(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` with every nonzero finite element moved one ulp up or down at random (a new
    tensor; other dtypes, empty and non-CPU tensors come back as they are)."""
    if t.dtype not in _INT_VIEWS or t.numel() == 0 or t.device.type != "cpu":
        return t
    step = torch.randint(0, 2, t.shape, generator=gen, dtype=_INT_VIEWS[t.dtype]) * 2 - 1
    moved = (t.contiguous().view(_INT_VIEWS[t.dtype]) + step).view(t.dtype)
    keep = (t == 0) | ~torch.isfinite(t) | ~torch.isfinite(moved)
    return torch.where(keep, t, moved)
