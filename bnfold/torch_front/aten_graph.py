"""The aten nodes of an exported program's module, read and edited for folds.

``ep.module()`` has no ``nn.Conv2d`` objects left, only aten calls reading
``get_attr`` weights: which calls are convs/linears and batch norms, where their
parameters live, their BN affine, and how a fold gives a node new parameters or
removes a BN node. Shared by the fold rules of :mod:`.exported` and
:mod:`.branch_sum`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.core import layouts
from bnfold.core.affine import Affine, bn_to_affine
from bnfold.report import Code
from bnfold.rules.adjacent import stats_fit
from bnfold.rules.family import Found
from bnfold.torch_front.tensors import to_float64

aten = torch.ops.aten

# op -> (kind, index of `groups` in args; absent means 1)
CONV_OPS: dict[Any, tuple[str, int]] = {
    aten.conv1d.default: ("conv", 6),
    aten.conv2d.default: ("conv", 6),
    aten.conv3d.default: ("conv", 6),
    aten.conv1d.padding: ("conv", 6),
    aten.conv2d.padding: ("conv", 6),
    aten.conv3d.padding: ("conv", 6),
    aten.conv_transpose1d.default: ("conv_transpose", 6),
    aten.conv_transpose2d.input: ("conv_transpose", 6),
    aten.conv_transpose3d.input: ("conv_transpose", 6),
    aten.linear.default: ("linear", -1),
    # run_decompositions(): convolution(x, w, b, stride, pad, dil, transposed, out_pad, groups)
    aten.convolution.default: ("convolution", 8),
}


BN_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def bn_output(bn: fx.Node) -> fx.Node | None:
    """The node carrying the BN's normalized output (item 0 of the no-training op)."""
    if bn.target == aten.batch_norm.default:
        return bn
    items = list(bn.users)
    if len(items) != 1 or items[0].target is not operator.getitem or items[0].args[1] != 0:
        return None
    return items[0]


def item_source(value: fx.Node, targets: Iterable[Any]) -> fx.Node | None:
    """The op among ``targets`` whose item 0 ``value`` is (a decomposed BN's normalized
    output, a max pool's values), else None."""
    if value.target is not operator.getitem or value.args[1] != 0:
        return None
    source = value.args[0]
    return source if isinstance(source, fx.Node) and source.target in targets else None


def arg_node(a: Any) -> fx.Node:
    assert isinstance(a, fx.Node)
    return a


def is_linear_op(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in CONV_OPS


def check_bn_node(bn: fx.Node) -> Found:
    """Only the BN's normalized output is read, and its statistics are attributes.

    (A re-exported program keeps the getitems of mean and invstd, unread.)
    """
    if bn.target != aten.batch_norm.default and any(
        u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users
    ):
        return Code.BRANCHING, f"{bn.name} mean/invstd outputs are read"
    stats = bn.args[1:5]
    if not all(s is None or (isinstance(s, fx.Node) and s.op == "get_attr") for s in stats):
        return Code.NOT_CONSTANT, f"{bn.name} parameters are computed"
    return None


def check_stats(gm: fx.GraphModule, bn: fx.Node, channels: int) -> Found:
    """The BN's parameters and statistics have ``channels`` values (:func:`stats_fit`)."""
    stats = [s for s in bn.args[1:5] if s is not None]
    return stats_fit(((str(s), tuple(fetch(gm, s).shape)) for s in stats), channels)


def traced_shape(node: fx.Node) -> tuple[int, ...]:
    """The traced shape of a node's value (() if unknown)."""
    return tuple(getattr(node.meta.get("val"), "shape", ()))


def layout_of(lin: fx.Node) -> layouts.WeightLayout:
    """Weight layout of a linear aten node (its groups read from the args)."""
    kind, groups_at = CONV_OPS[lin.target]
    if kind == "convolution":
        kind = "conv_transpose" if lin.args[6] else "conv"
    groups = int(lin.args[groups_at]) if 0 <= groups_at < len(lin.args) else 1  # type: ignore[arg-type]
    if kind == "conv_transpose":
        return layouts.conv_transpose(groups)
    return layouts.conv(groups) if kind == "conv" else layouts.linear()


def bn_affine(gm: fx.GraphModule, bn: fx.Node) -> Affine:
    """The affine of a batch_norm node, from its get_attr statistics, in float64."""
    gamma, beta = (_f64(gm, a) for a in bn.args[1:3])
    mean, var = (to_float64(fetch(gm, a)) for a in bn.args[3:5])
    eps = float(bn.args[7] if bn.target == aten.batch_norm.default else bn.args[6])  # type: ignore[arg-type]
    c = mean.shape[0]
    return bn_to_affine(
        np.ones(c) if gamma is None else gamma,
        np.zeros(c) if beta is None else beta,
        mean,
        var,
        eps,
    )


def replace_arg(
    gm: fx.GraphModule, lin: fx.Node, index: int, value: nn.Parameter, name: str
) -> int:
    """Give ``lin`` ``value`` as argument ``index``: in place, or as a new attribute.

    Returns the bytes of a clone made because another node reads the old attribute.
    """
    old = lin.args[index] if len(lin.args) > index else None
    if not isinstance(old, fx.Node):  # no bias: create one
        old_target = None
    elif not _shared(gm, old):
        _set_attr(gm, str(old.target), value)
        return 0
    else:
        old_target = str(old.target)
    node = new_attr(gm, lin, old_target or name, value)
    args = list(lin.args) + [None] * (index + 1 - len(lin.args))
    args[index] = node
    lin.args = tuple(args)
    return 0 if old_target is None else value.numel() * value.element_size()


def _shared(gm: fx.GraphModule, attr: fx.Node) -> bool:
    """Read by another node, directly or through another get_attr of the same target."""
    return len(attr.users) != 1 or attr_readers(gm, str(attr.target)) != 1


def remove_bn(gm: fx.GraphModule, bn: fx.Node, value: fx.Node) -> None:
    """Let the BN's readers read ``value`` instead; drop the BN and its unread statistics."""
    if bn.target == aten.batch_norm.default:
        bn.replace_all_uses_with(value)
    else:  # returns (out, mean, invstd): only item 0 may be read
        for user in list(bn.users):
            user.replace_all_uses_with(value)
            gm.graph.erase_node(user)
    stats = [a for a in bn.args[1:5] if isinstance(a, fx.Node)]
    gm.graph.erase_node(bn)
    prefix = owner_path(stats)
    for n in list(gm.graph.nodes):
        target = str(n.target)
        if n.op == "get_attr" and not n.users and prefix and target.startswith(prefix + "."):
            alone = attr_readers(gm, target) == 1
            gm.graph.erase_node(n)
            if alone:
                _del_attr(gm, target)


def new_attr(gm: fx.GraphModule, before: fx.Node, name: str, value: nn.Parameter) -> fx.Node:
    while _has_attr(gm, name):
        name += "_folded"
    _set_attr(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def owner_path(args: Any) -> str | None:
    """Module path shared by the get_attr args ("layer1.bn1.weight" -> "layer1.bn1")."""
    for a in args:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return str(a.target).rpartition(".")[0] or str(a.target)
    return None


def attr_readers(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


def fetch(gm: fx.GraphModule, node: Any) -> torch.Tensor:
    return _get(gm, str(node.target))


def _f64(gm: fx.GraphModule, node: Any) -> np.ndarray | None:
    return None if node is None else to_float64(fetch(gm, node))


def _get(gm: nn.Module, target: str) -> torch.Tensor:
    parent, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(parent), name)


def _has_attr(gm: nn.Module, target: str) -> bool:
    parent, _, name = target.rpartition(".")
    try:
        return hasattr(gm.get_submodule(parent), name)
    except AttributeError:
        return False


def _set_attr(gm: nn.Module, target: str, value: nn.Parameter) -> None:
    parent, _, name = target.rpartition(".")
    owner = gm.get_submodule(parent)
    if name in owner._buffers:
        del owner._buffers[name]
    setattr(owner, name, value)


def _del_attr(gm: nn.Module, target: str) -> None:
    parent, _, name = target.rpartition(".")
    delattr(gm.get_submodule(parent), name)


def uses_batch_stats(bn: fx.Node) -> bool:
    return bool(bn.target == aten.batch_norm.default and bn.args[5])


def drop_unread_attrs(gm: fx.GraphModule, attrs: Iterable[fx.Node]) -> None:
    """Erase each of ``attrs`` no node reads any more, and its attribute when no
    other get_attr reads it (a removed node's weights must not stay parameters)."""
    for node in dict.fromkeys(attrs):  # each once: erasing twice would raise
        if node.op != "get_attr" or node.users:
            continue
        target = str(node.target)
        alone = attr_readers(gm, target) == 1
        gm.graph.erase_node(node)
        if alone:
            _del_attr(gm, target)
