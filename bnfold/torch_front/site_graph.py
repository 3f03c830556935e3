"""The small node graph that export and fx traces are both reduced to, and what
the eager matchers ask of it.

A :class:`Traced` holds one :class:`Node` per op (owned by the linear/BN module
call it ran in, or a :class:`Join` or pool outside modules); a :class:`SiteGraph`
adds each module call's ops, the modules and the finder's name. Built from fx
nodes by :mod:`bnfold.torch_front.trace` with :func:`join_of`, :func:`adds_zero`,
:func:`input_names`; read by :mod:`bnfold.torch_front.eager_match` with
:func:`outside_inputs`, :func:`other_consumers` and the op-name tests
(:func:`is_nonlinear`, :func:`is_reshape`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import fx, nn

from bnfold.report import Code, Refusal
from bnfold.torch_front.eager_pairs import JoinPair, Pair, TapPair
from bnfold.torch_front.modules import Roles
from bnfold.torch_front.pools import Pool

# Matched against the tokens of an op or module type name: "aten.leaky_relu.default"
# -> leaky, relu. Short names match whole tokens only ("exp" is not "expand").
_NONLINEAR_PREFIXES = (
    "relu", "gelu", "selu", "celu", "elu", "glu", "sigmoid", "tanh", "silu", "swish", "hardswish",
    "hardsigmoid", "hardtanh", "leaky", "softplus", "softmax", "logsoftmax", "mish", "prelu",
    "threshold", "maxpool", "rsqrt", "sqrt",
)  # fmt: skip
_NONLINEAR_TOKENS = {"exp", "log", "abs", "pow", "clamp", "clip", "square", "max", "min", "sign"}


_RESHAPE_TOKENS = {"flatten", "unflatten", "view", "reshape", "unsqueeze", "squeeze"}
# x.reshape_as(y) and friends read y's shape or dtype, never its values.
_LIKE_OTHER_OPS = {"reshape_as", "view_as", "expand_as", "type_as"}


def metadata_only_inputs(n: fx.Node) -> set[fx.Node]:
    """The nodes ``n`` reads only the shape or dtype of: ``y`` in ``x.reshape_as(y)``.

    LeViT ends ``bn(y.flatten(0, 1)).reshape_as(y)``: ``y`` reaching the
    ``reshape_as`` is no second reader of its values, so a fold that keeps its
    shape may change them.
    """
    name = n.target if isinstance(n.target, str) else str(n.target)
    if not set(re.split(r"[^a-z0-9_]+", name.lower())) & _LIKE_OTHER_OPS or len(n.args) < 2:
        return set()
    source, other = n.args[0], n.args[1]
    return {other} if isinstance(other, fx.Node) and other is not source else set()


def is_nonlinear(op: str) -> bool:
    """Whether an op or module type name looks like a nonlinearity ("aten.relu.default", "GELU")."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", op.lower()) if t]
    return any(t in _NONLINEAR_TOKENS or t.startswith(_NONLINEAR_PREFIXES) for t in tokens)


def is_reshape(op: str) -> bool:
    """Whether an op name is a view/flatten/unflatten/reshape/(un)squeeze."""
    return bool(_RESHAPE_TOKENS & set(re.split(r"[^a-z0-9]+", op.lower())))


def reshape_label(op: str) -> str:
    """The report's name of a reshape op: "aten.view.default" -> "view"."""
    tokens = re.split(r"[^a-z0-9]+", op.lower())
    return next(t for t in tokens if t in _RESHAPE_TOKENS)


@dataclass
class Node:
    """One op of a traced graph, reduced to what pair finding needs.

    Attributes:
        owner: canonical path of the linear/BN module this op runs inside, if any.
        call: which call of ``owner`` it ran in (0 for the first).
        op: readable op name ("aten.relu.default", "ReLU", "add").
        inputs: names of the activation nodes it reads (weights and buffers left out).
        users: names of the nodes reading it.
        is_output: it is (part of) the module's output.
        join: outside modules, the plain sum or concat it is, if any.
        pool: outside modules, the pooling op it is, if any.
    """

    owner: str | None
    op: str
    inputs: list[str]
    call: int = 0
    users: list[str] = field(default_factory=list)
    is_output: bool = False
    join: Join | None = None
    pool: Pool | None = None


@dataclass(frozen=True)
class Join:
    """``a + b``, ``a - b`` (alpha 1) or ``cat([a, b, ...], dim)`` of activations, in order.

    ``terms`` are node names, repeated where the op reads one twice.
    """

    kind: str  # "add", "sub" or "cat"
    terms: tuple[str, ...]
    dim: int = 1


CallSite = tuple[str, int]  # (module path, call index)


@dataclass
class Traced:
    """A traced graph: its nodes, and the parameters read outside their own module.

    Attributes:
        nodes: op name -> Node, in graph order.
        outside_reads: names ("conv.weight") of parameters that some op outside
            the owning module reads directly (e.g. ``F.conv2d(x, self.conv.weight)``).
    """

    nodes: dict[str, Node]
    outside_reads: set[str] = field(default_factory=set)


_P = TypeVar("_P", Pair, JoinPair, TapPair)


@dataclass(frozen=True)
class SiteGraph:
    """What every matcher reads: the traced nodes, each module call's ops, the modules."""

    traced: Traced
    groups: dict[CallSite, list[str]]
    roles: Roles
    finder: str
    root: nn.Module

    @classmethod
    def of(cls, traced: Traced, roles: Roles, finder: str, root: nn.Module) -> SiteGraph:
        return cls(traced, call_groups(traced.nodes), roles, finder, root)

    @property
    def nodes(self) -> dict[str, Node]:
        return self.traced.nodes

    def weights_private(self, pair: _P) -> _P | Refusal:
        """The pair, unless an op outside a linear module of it reads its weight or bias."""
        for linear in pair.linears:
            own = {f"{a}.{p}" for a in self.roles.aliases[linear] for p in ("weight", "bias")}
            if shared := sorted(self.traced.outside_reads & own):
                detail = f"{', '.join(shared)} also read outside {linear}"
                return pair.refusal(Code.SHARED_WEIGHT, detail)
        return pair


def call_groups(nodes: dict[str, Node]) -> dict[CallSite, list[str]]:
    """The ops of each call of each linear/BN module, in graph order."""
    groups: dict[CallSite, list[str]] = {}
    for name, node in nodes.items():
        if node.owner is not None:
            groups.setdefault((node.owner, node.call), []).append(name)
    return groups


def without_calls_of(traced: Traced, modules: set[str]) -> Traced | None:
    """``traced`` as a trace would see it once the modules at ``modules`` are ``nn.Identity``.

    Each call of those modules passes its one input on: its ops go, and their
    readers (and the graph's outputs) read that input instead. None when a call
    reads other than exactly one activation (it was never a fold's BN).
    """
    alias: dict[str, str] = {}
    for (owner, _call), names in call_groups(traced.nodes).items():
        if owner not in modules:
            continue
        entries = outside_inputs(set(names), traced.nodes)
        if len(entries) != 1:
            return None
        source = alias.get(entries[0], entries[0])  # graph order: an earlier call is resolved
        alias.update(dict.fromkeys(names, source))
    nodes: dict[str, Node] = {}
    for name, node in traced.nodes.items():
        if name in alias:
            continue
        join = node.join
        if join is not None:
            join = replace(join, terms=tuple(alias.get(t, t) for t in join.terms))
        inputs = list(dict.fromkeys(alias.get(i, i) for i in node.inputs))
        nodes[name] = replace(node, inputs=inputs, users=[], join=join)
    for name, source in alias.items():
        if traced.nodes[name].is_output:
            nodes[source].is_output = True
    link_users(nodes)
    return Traced(nodes, set(traced.outside_reads))


def outside_inputs(group: set[str], nodes: dict[str, Node]) -> list[str]:
    """The activations a module call reads from outside it, by name."""
    return sorted({i for n in group for i in nodes[n].inputs if i not in group})


def other_consumers(linear_group: list[str], allowed: set[str], nodes: dict[str, Node]) -> str:
    """Describe readers of one linear call's output besides ``allowed`` ("" if none)."""
    own = set(linear_group)
    others = []
    for name in linear_group:
        node = nodes[name]
        if node.is_output:
            others.append("the module output")
        others += [nodes[u].op for u in node.users if u not in own and u not in allowed]
    return ", ".join(sorted(set(others)))


# Plain sums and channel concats, as export's aten ops and as fx records Python calls.
_JOIN_OPS = {
    "aten.add.Tensor": "add",
    "aten.add_.Tensor": "add",
    "aten.sub.Tensor": "sub",
    "aten.sub_.Tensor": "sub",
    "aten.cat.default": "cat",
}
_JOIN_FUNCTIONS = (
    (operator.add, "add"), (operator.iadd, "add"), (torch.add, "add"),
    (operator.sub, "sub"), (operator.isub, "sub"), (torch.sub, "sub"),
    (torch.cat, "cat"), (torch.concat, "cat"), (torch.concatenate, "cat"),
)  # fmt: skip
_JOIN_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub"}


def join_of(n: fx.Node, known: dict[str, Node], alias: dict[str, str]) -> Join | None:
    """``a + b`` or ``a - b`` with alpha 1, or ``cat([a, ...], dim)``, of activations
    ``known`` holds.

    None for anything else: a sum with a constant (a bias add), ``x + 2 * y``.
    """
    kind = _join_kind(n)
    tensors: Any
    dim: Any
    if kind in ("add", "sub"):
        extra = {k: v for k, v in n.kwargs.items() if k != "alpha"}
        if len(n.args) != 2 or extra or n.kwargs.get("alpha", 1) != 1:
            return None
        tensors, dim = list(n.args), 1
    elif kind == "cat":
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
        if not isinstance(tensors, list | tuple) or not isinstance(dim, int):
            return None
    else:
        return None
    names = [alias.get(t.name, t.name) if isinstance(t, fx.Node) else None for t in tensors]
    if not names or any(name not in known for name in names):
        return None
    return Join(kind, tuple(names), dim)  # type: ignore[arg-type]


def _join_kind(n: fx.Node) -> str | None:
    """ "add", "sub" or "cat" for an op that could be a join, else None."""
    if n.op == "call_method":
        return _JOIN_METHODS.get(str(n.target))
    if n.op != "call_function":
        return None
    return _JOIN_OPS.get(str(n.target)) or next(
        (kind for f, kind in _JOIN_FUNCTIONS if n.target is f), None
    )


def adds_zero(n: fx.Node) -> bool:
    """``t + 0``, ``0 + t`` or ``t - 0`` with a Python zero: ``t`` itself, looked through.

    timm's MobileOne blocks start their sums from ``0`` (``out = 0; out += conv(x)``).
    """
    kind = _join_kind(n)
    if kind not in ("add", "sub") or len(n.args) != 2:
        return False
    zeros = [isinstance(a, int | float) and not isinstance(a, bool) and a == 0 for a in n.args]
    tensors = [isinstance(a, fx.Node) for a in n.args]
    if kind == "sub":
        return tensors[0] and zeros[1]
    return (tensors[0] and zeros[1]) or (zeros[0] and tensors[1])


_DROPOUTS = ("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default")


def is_eval_dropout(n: fx.Node) -> bool:
    """A dropout traced with ``train=False``, the identity (timm NormLinear: BN, drop, fc)."""
    return (
        n.op == "call_function" and str(n.target) in _DROPOUTS and len(n.args) > 2 and not n.args[2]
    )


def input_names(
    n: fx.Node, known: dict[str, Node], alias: dict[str, str] | None = None
) -> list[str]:
    """Activation inputs of ``n``: earlier nodes we kept (weights/buffers were not kept)."""
    names: list[str] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: names.append(a.name) or a)  # type: ignore[func-returns-value]
    shape_only = {a.name for a in metadata_only_inputs(n)}
    names = [a for a in names if a not in shape_only]
    alias = alias or {}
    return [a for a in dict.fromkeys(alias.get(a, a) for a in names) if a in known]


def mark_outputs(out: fx.Node, nodes: dict[str, Node], alias: dict[str, str] | None = None) -> None:
    """Flag the nodes the graph's ``output`` node returns."""
    for name in input_names(out, nodes, alias):
        nodes[name].is_output = True


def link_users(nodes: dict[str, Node]) -> None:
    """Fill in each node's ``users`` from the others' ``inputs``."""
    for name, node in nodes.items():
        for i in node.inputs:
            nodes[i].users.append(name)
