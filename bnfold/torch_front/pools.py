"""The torch front's pools, read into the spec of the pool rule (:mod:`bnfold.rules.pool`).

A pool shows up three ways: a ``torch.nn.functional`` call or an aten op of a
traced graph (:func:`pool_of_call`), a pooling module (:func:`pool_of_module`),
and a node of an exported program's aten graph (:func:`spec_of`, which also sees
whether a max pool's indices are read). Each becomes a
:class:`~bnfold.rules.pool.PoolSpec`; whether a BN commutes with it is decided
by :func:`bnfold.rules.pool.commute_refusal` alone.

torch's semantics differ from ONNX's in one place: torch clips a ``ceil_mode``
window that overruns the padded input and divides by what is left, so
ceil_mode alone never counts padding.
"""

from __future__ import annotations

import operator
import re
from dataclasses import replace
from typing import Any

import torch
from torch import fx, nn

from bnfold.core.affine import Affine
from bnfold.rules.family import Found
from bnfold.rules.pool import AVERAGE, MAX, PoolSpec, commute_refusal
from bnfold.torch_front.aten_graph import item_source

aten = torch.ops.aten

Pool = PoolSpec  # the name the eager finders know it by

_CALL = re.compile(r"^_?(adaptive_)?(avg|max)_pool([123])d$")


def pool_of_call(target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PoolSpec | None:
    """A pool from an aten op or ``torch.nn.functional`` call; None if ``target`` is none.

    ``target`` is the op's name ("aten.avg_pool2d.default" or "avg_pool2d");
    ``args`` and ``kwargs`` follow ``avg_pool{1,2,3}d(x, kernel, stride=[],
    padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None)``
    and ``max_pool{1,2,3}d(x, kernel, stride, padding, dilation, ceil_mode,
    return_indices=False)``, the signatures aten and functional share. A max
    pool that returns its indices, an adaptive max (the same) and a
    ``max_pool*d_with_indices`` give None: their output is no value a BN commutes
    with (an exported graph's item 0 of one is, see :func:`spec_of`).
    """
    name = target.removeprefix("aten.").split(".")[0]
    match = _CALL.match(name)
    if match is None:
        return None
    adaptive, op = bool(match.group(1)), match.group(2)
    label = f"{'adaptive_' if adaptive else ''}{op}_pool{match.group(3)}d"
    if op == "max":
        if adaptive or _arg(args, kwargs, 6, "return_indices", False):
            return None
        return PoolSpec(label, MAX)  # padding is -inf for a max: it never wins
    if adaptive:
        return PoolSpec(label, AVERAGE)  # its windows never hold padding
    padded = _nonzero(_arg(args, kwargs, 3, "padding", 0))
    counts_pad = bool(_arg(args, kwargs, 5, "count_include_pad", True))
    divisor = _arg(args, kwargs, 6, "divisor_override", None)
    return PoolSpec(
        label, AVERAGE, divides_by_padding=padded and counts_pad, divisor_override=divisor
    )


_MODULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.AvgPool1d, "avg_pool1d"),
    (nn.AvgPool2d, "avg_pool2d"),
    (nn.AvgPool3d, "avg_pool3d"),
    (nn.AdaptiveAvgPool1d, "adaptive_avg_pool1d"),
    (nn.AdaptiveAvgPool2d, "adaptive_avg_pool2d"),
    (nn.AdaptiveAvgPool3d, "adaptive_avg_pool3d"),
    (nn.MaxPool1d, "max_pool1d"),
    (nn.MaxPool2d, "max_pool2d"),
    (nn.MaxPool3d, "max_pool3d"),
)


def pool_of_module(m: nn.Module) -> PoolSpec | None:
    """A pool from a torch pooling module whose forward is torch's; None otherwise."""
    for cls, label in _MODULES:
        if type(m) is cls:
            params = {
                name: getattr(m, name)
                for name in ("padding", "count_include_pad", "divisor_override", "return_indices")
                if hasattr(m, name)
            }
            return pool_of_call(label, (), params)
    return None


# --- an exported program's aten graph --------------------------------------------------

# op -> its name in a site label. Averages and max pools return their values...
_VALUE_POOLS: dict[Any, str] = {
    aten.avg_pool1d.default: "avg_pool1d",
    aten.avg_pool2d.default: "avg_pool2d",
    aten.avg_pool3d.default: "avg_pool3d",
    aten.adaptive_avg_pool1d.default: "adaptive_avg_pool1d",
    aten.adaptive_avg_pool2d.default: "adaptive_avg_pool2d",
    aten.adaptive_avg_pool3d.default: "adaptive_avg_pool3d",
    aten._adaptive_avg_pool2d.default: "adaptive_avg_pool2d",
    aten._adaptive_avg_pool3d.default: "adaptive_avg_pool3d",
    aten.max_pool1d.default: "max_pool1d",
    aten.max_pool2d.default: "max_pool2d",
    aten.max_pool3d.default: "max_pool3d",
}
# ...these max pools return (values, indices); a BN reads item 0.
_INDEXED_POOLS: dict[Any, str] = {
    aten.max_pool1d_with_indices.default: "max_pool1d",
    aten.max_pool2d_with_indices.default: "max_pool2d",
    aten.max_pool3d_with_indices.default: "max_pool3d",
    aten.adaptive_max_pool1d.default: "adaptive_max_pool1d",
    aten.adaptive_max_pool2d.default: "adaptive_max_pool2d",
    aten.adaptive_max_pool3d.default: "adaptive_max_pool3d",
}
_POOLS = {**_VALUE_POOLS, **_INDEXED_POOLS}


def is_pool(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _POOLS


def pool_name(pool: fx.Node) -> str:
    """ "avg_pool2d", "adaptive_max_pool2d", ...: the pool's name in a site label."""
    return _POOLS[pool.target]


def pool_of(value: fx.Node) -> fx.Node | None:
    """The pool whose pooled values ``value`` is: a pool node itself, or item 0 of
    a max pool returning (values, indices); None for anything else."""
    if value.op == "call_function" and value.target in _VALUE_POOLS:
        return value
    return item_source(value, _INDEXED_POOLS)


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes reading ``node``'s values: for a max pool returning (values,
    indices), those reading item 0."""
    if node.target not in _INDEXED_POOLS:
        return list(node.users)
    return [reader for item in _items(node, 0) for reader in item.users]


def spec_of(pool: fx.Node) -> PoolSpec:
    """A pool node of an aten graph as the pool rule reads it, named by the node."""
    if pool.target in _INDEXED_POOLS:
        read = any(item.users for item in _items(pool, 1))
        return PoolSpec(
            pool.name, MAX, indices_read=f"{pool.name}'s indices output is read" if read else ""
        )
    spec = pool_of_call(str(pool.target), pool.args, dict(pool.kwargs))
    assert spec is not None  # every value pool parses
    return replace(spec, label=pool.name)


def check_pool(pool: fx.Node, affine: Affine) -> Found:
    """``pool(affine(y)) == affine(pool(y))``, or why not
    (:func:`bnfold.rules.pool.commute_refusal`)."""
    return commute_refusal(spec_of(pool), affine)


def _items(pool: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in pool.users if u.target is operator.getitem and u.args[1] == index]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _nonzero(padding: Any) -> bool:
    values = padding if isinstance(padding, list | tuple) else [padding]
    return any(int(p) != 0 for p in values)
