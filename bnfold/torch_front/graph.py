"""Find (linear module, BatchNorm module) pairs whose output feeds straight into the BN.

Three finders, tried in order; the first that traces the module decides:

1. ``export``: ``torch.export.export(strict=False)``; each aten node is owned by
   the innermost linear/BN module in its ``nn_module_stack``, and by that
   module's call (``"...conv@1"`` is the second).
2. ``fx``: ``torch.fx`` symbolic tracing with linear and BN modules as leaves
   (one node per call).
3. ``sequential``: a linear module directly followed by a BN (or with an
   ``nn.Flatten``/``nn.Unflatten`` between) inside an ``nn.Sequential`` whose
   forward is not overridden. Works when forward() has data-dependent control
   flow that neither tracer can follow.

One reshape (view, flatten, unflatten, (un)squeeze) may sit between the two;
whether channels survive it is checked on the observed shapes. A BN that cannot
fold into the op before it (after a ReLU, say, as in pre-activation nets) may
fold into the op after it: ``BN -> linear`` or ``BN -> flatten -> Linear``,
when that op is the BN's only reader (a "before" pair). A pair that runs
several times folds when every call is the same pair. ``nn.Identity`` (what a
folded BN becomes), eval-mode dropout and ``t + 0`` are looked through.

Beyond a pair, the export and fx graphs also show (the ``sequential`` finder
does not): a BN after a pool of a linear module's output (a :class:`Pair`
with ``pool``), after an add or channel cat of linear modules
(:class:`JoinPair`), and an identity BN summed with a conv reading the same
input (:class:`TapPair`).

Export and fx graphs are reduced to one small node graph (:class:`Node`), and
one function (:func:`match_graph`) finds the pairs in it.

Limitation: the wiring is read from one trace at the example inputs' shapes. A
forward that wires conv and BN differently for other shapes (branching on
``x.shape``) is checked only for the example's shapes, as verification is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import fx, nn

from bnfold.errors import first_line
from bnfold.report import Code, FoldKind, Refusal
from bnfold.torch_front.modules import (
    BN,
    LINEAR,
    Calls,
    Roles,
    eval_mode,
    identity_tap_misfit,
    is_plain_conv,
)
from bnfold.torch_front.pool_rules import Pool, pool_of_call, pool_of_module

log = logging.getLogger(__name__)

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


def site_label(linear: str, bn: str, between: str, before: bool) -> str:
    """ "conv -> bn", "fc -> view -> bn"; before: "bn -> flatten -> fc" (data-flow order)."""
    chain = (bn, between, linear) if before else (linear, between, bn)
    return " -> ".join(p for p in chain if p)


@dataclass(frozen=True)
class Pair:
    """A linear module and a BN module beside it.

    After (``before=False``): the linear's only output goes into the BN.
    Before (``before=True``): the BN's only output goes into the linear.
    Either directly or through ``between``: a flatten/view/reshape/(un)squeeze,
    named for the report; whether channels survive it is checked on shapes.
    After, ``between`` may also be a pool (``pool`` says which; the fold passes
    through it, see :mod:`bnfold.torch_front.pool_rules`).
    ``after_refusal`` says why the BN could not fold after (before pairs only).
    ``kind`` is set once the pair is checked on shapes (a batch-merging reshape).
    """

    linear: str
    bn: str
    finder: str
    before: bool = False
    between: str = ""
    after_refusal: Refusal | None = field(default=None, compare=False)
    kind: FoldKind = field(default=FoldKind.ADJACENT, compare=False)
    pool: Pool | None = None

    @property
    def site(self) -> str:
        return site_label(self.linear, self.bn, self.between, self.before)

    @property
    def linears(self) -> tuple[str, ...]:
        """The linear modules whose weights the fold changes."""
        return (self.linear,)

    @property
    def result_at(self) -> str:
        """The module whose output carries the fold's result in both models.

        After: the BN's place (its ``nn.Identity`` passes the linear output on);
        before: the linear module itself.
        """
        return self.linear if self.before else self.bn


@dataclass(frozen=True)
class JoinPair:
    """``BN(L_a(x) + L_b(y))`` or ``BN(torch.cat([L_a(x), L_b(y), ...], dim))``.

    Each ``L`` a linear module whose output only the join reads. On an add every
    term takes the BN's scale and the first also its shift, on a cat each term
    its own channels (:func:`bnfold.affine.add_parts`,
    :func:`bnfold.affine.concat_parts`). The join stays; the BN goes.
    """

    linears: tuple[str, ...]
    bn: str
    finder: str
    join: str  # "add" or "cat"
    dim: int = 1  # a cat's axis, as written (maybe negative)
    before: ClassVar[bool] = False

    @property
    def linear(self) -> str:
        return ", ".join(self.linears)

    @property
    def site(self) -> str:
        return f"{self.linear} -> {self.join} -> {self.bn}"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.OVER_ADD if self.join == "add" else FoldKind.OVER_CONCAT

    @property
    def result_at(self) -> str:
        return self.bn


@dataclass(frozen=True)
class TapPair:
    """An identity BN of a branch sum and a sibling conv reading the same ``x``.

    ``conv(x) + ... + bn(x)`` with ``bn(x) = s * x + t``: the BN becomes
    ``nn.Identity`` (its term is ``x``) and the conv takes the rest, ``(s - 1) * x``
    as a centred per-channel tap and ``t`` in its bias
    (:func:`bnfold.affine.absorb_identity`); in ``conv(x) - bn(x)`` the negated
    rest (``sign`` -1). The sum, and so forward, is unchanged.
    """

    linear: str  # the conv that takes the tap
    bn: str
    finder: str
    sign: int = 1  # -1 when the sum counts one of the BN's and the conv's terms negated
    before: ClassVar[bool] = False
    kind: ClassVar[FoldKind] = FoldKind.IDENTITY_TAP

    @property
    def site(self) -> str:
        return f"{self.bn} -> {self.linear}"

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.linear,)

    @property
    def result_at(self) -> None:
        """None: the fold's result is a term of a functional sum, which no module outputs.

        The BN's place now passes ``x`` on and the conv's output carries the
        tap, so neither equals its value in the original; outputs still compare.
        """
        return None


AnyPair = Pair | JoinPair | TapPair
_P = TypeVar("_P", Pair, JoinPair, TapPair)


@dataclass
class Scan:
    """What a finder saw: candidate pairs, refusals, and why earlier finders failed."""

    finder: str
    pairs: list[AnyPair] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


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


def find_pairs(root: nn.Module, args: tuple[Any, ...], roles: Roles, calls: Calls) -> Scan:
    """Find candidate pairs with the first finder that can trace ``root``.

    Matches:  linear -> BN (after); else BN -> linear (before); either directly
              or through one flatten/view/reshape/(un)squeeze. A module pair that
              runs several times (a block in a loop) matches if every call does.
    Refuses:
      REUSED_MODULE   the linear module also runs where it does not feed (or is not
                      fed by) the BN, or the BN runs beside different modules: an
                      eager module has one weight for every call (a .pt2 folds per call)
      BRANCHING       the linear op's output is read by something besides the BN
      SHARED_WEIGHT   the linear weight or bias is also read outside the module
      NONLINEAR_INPUT a nonlinearity sits between the linear op and the BN
      OP_BETWEEN      another op sits between them
      STANDALONE      nothing linear feeds the BN
      UNTRACEABLE     the BN did not run, or no finder can see its input
    """
    failures = []
    for name, tracer in (("export", _export_graph), ("fx", _fx_graph)):
        try:
            traced = tracer(root, args, roles)
        except Exception as e:  # tracers fail in many ways; the next finder may work
            failures.append(f"{name}: {type(e).__name__}: {first_line(e)}")
            log.info("torch front: %s could not trace the module: %s", name, e)
            continue
        scan = match_graph(traced, roles, calls, name, root)
        scan.failures = failures
        return scan
    scan = match_sequential(root, roles, calls)
    scan.failures = failures
    return scan


def match_graph(traced: Traced, roles: Roles, calls: Calls, finder: str, root: nn.Module) -> Scan:
    """Pairs and refusals for every BN in a traced graph (``root``: the modules traced)."""
    scan = Scan(finder)
    graph = _Graph(traced, _call_groups(traced.nodes), roles, finder, root)
    for bn in roles.bns():
        _add(scan, _match_bn(bn, graph, calls))
    return scan


@dataclass(frozen=True)
class _Graph:
    """What every matcher reads: the traced nodes, each module call's ops, the modules."""

    traced: Traced
    groups: dict[CallSite, list[str]]
    roles: Roles
    finder: str
    root: nn.Module

    @property
    def nodes(self) -> dict[str, Node]:
        return self.traced.nodes


def _call_groups(nodes: dict[str, Node]) -> dict[CallSite, list[str]]:
    """The ops of each call of each linear/BN module, in graph order."""
    groups: dict[CallSite, list[str]] = {}
    for name, node in nodes.items():
        if node.owner is not None:
            groups.setdefault((node.owner, node.call), []).append(name)
    return groups


def prefer_before(after: Refusal, before: Pair | Refusal | None) -> Pair | Refusal:
    """The before pair if there is one; else the refusal that explains the most.

    As on the ONNX front: a BN with nothing linear before it is best explained by
    why it cannot fold after it; otherwise the after refusal leads.
    """
    if before is None:
        return after
    if isinstance(before, Pair):
        return replace(before, after_refusal=after)
    return explain_both(after, before)


def explain_both(after: Refusal, before: Refusal) -> Refusal:
    """One refusal for a BN that folds neither after nor before: the more telling code leads."""
    if after.code in (Code.STANDALONE, Code.NONLINEAR_INPUT, Code.UNTRACEABLE):
        return replace(before, detail=f"{before.detail} (and {after.detail})")
    last = before.site.rpartition(" -> ")[2]
    return replace(after, detail=f"{after.detail}; nor before {last}: {before.detail}")


def _match_bn(bn: str, graph: _Graph, calls: Calls) -> AnyPair | Refusal:
    """One pair or refusal for a BN module, whichever number of times it ran.

    Each call of the BN is matched on its own: after the op feeding it (also
    through a pool), else after a join of linear ops (:func:`_match_join`), else
    as the identity term of a branch sum (:func:`_match_tap`), else before the
    op reading it. The module folds only if every call is the same pair (see
    :func:`_same_pair_every_call`).
    """
    if refusal := _bn_call_refusal(bn, calls):
        return refusal
    bn_calls = [site for site in graph.groups if site[0] == bn]
    if not bn_calls:
        return Refusal(bn, Code.UNTRACEABLE, f"{graph.finder} graph has no op inside {bn}")
    if len(bn_calls) != calls.of(bn):
        detail = (
            f"{bn} ran {calls.of(bn)} times, the {graph.finder} graph shows {len(bn_calls)} calls"
        )
        return Refusal(bn, Code.UNTRACEABLE, detail)
    afters: list[AnyPair | Refusal] = [_match_after(site, graph) for site in bn_calls]
    after = _same_pair_every_call(bn, afters, calls)
    if not isinstance(after, Refusal):
        return after
    # A refusal of a later matcher explains more: an identity BN of a branch sum
    # often reads a join (a residual) too, and then is best told as a tap.
    for matcher in (_match_join, _match_tap):
        results = [matcher(site, graph) for site in bn_calls]
        if all(r is not None for r in results):  # every call is such a site
            beyond = _same_pair_every_call(bn, [r for r in results if r is not None], calls)
            if not isinstance(beyond, Refusal):
                return beyond
            after = beyond
    befores = [_match_before(site, graph) for site in bn_calls]
    found: list[AnyPair | Refusal] = [b for b in befores if b is not None]
    if len(found) < len(befores):  # some call has no linear op reading it alone
        return after
    return prefer_before(after, _same_pair_every_call(bn, found, calls))  # type: ignore[arg-type]


def _same_pair_every_call(
    bn: str, results: list[AnyPair | Refusal], calls: Calls
) -> AnyPair | Refusal:
    """The pair if each of the BN's calls is that pair and its linear modules run only there.

    An eager module has one weight for all its calls. A block applied in a loop
    (``for _: x = bn(conv(x))``) folds exactly: every conv call feeds a bn call.
    A conv that also runs elsewhere (or a BN fed by different modules) does not.
    """
    refusals = [r for r in results if isinstance(r, Refusal)]
    if refusals:
        return refusals[0]
    pairs = list(dict.fromkeys(r for r in results if not isinstance(r, Refusal)))
    if len(pairs) > 1:
        sites = "; ".join(p.site for p in pairs)
        detail = f"{bn} ran {len(results)} times beside different modules ({sites})"
        return Refusal(bn, Code.REUSED_MODULE, detail)
    pair = pairs[0]
    for linear in pair.linears:
        if calls.of(linear) != len(results):
            detail = reused_detail(linear, calls.of(linear), pair.bn, len(results))
            return Refusal(pair.site, Code.REUSED_MODULE, detail)
    return pair


def reused_detail(linear: str, count: int, bn: str, paired: int) -> str:
    """Why a module called more often than its BN keeps it: one weight serves every call."""
    return (
        f"{linear} ran {count} times, {paired} of them into {bn}, and an eager module has one "
        "weight for all calls; fold it as an exported program (bnfold.fold(torch.export."
        "export(model, args)), a .pt2 file, or -o x.pt2), where the call into the BN gets "
        "its own folded copy"
    )


def _match_after(site: CallSite, graph: _Graph) -> Pair | Refusal:
    """``linear -> BN``, ``linear -> reshape -> BN`` or ``conv -> pool -> BN`` for one BN call."""
    bn, nodes, roles = site[0], graph.nodes, graph.roles
    group = set(graph.groups[site])
    entries = _entries(group, nodes)
    if len(entries) != 1:
        return Refusal(bn, Code.STANDALONE, f"{bn} reads {len(entries)} activations, not one")
    producer, between = nodes[entries[0]], ""
    if _single_input_reshape(producer, group) or _pools_linear(producer, nodes, roles):
        between, producer = entries[0], nodes[producer.inputs[0]]
    if producer.owner is None or roles.of(producer.owner) != LINEAR:
        return _why_no_linear(bn, entries[0], nodes, roles)
    linear = producer.owner
    pool = nodes[between].pool if between else None
    label = (pool.label if pool else _reshape_label(nodes[between].op)) if between else ""
    pair = Pair(linear, bn, graph.finder, between=label, pool=pool)
    if pool is not None and (others := _other_consumers([between], group, nodes)):
        return Refusal(pair.site, Code.BRANCHING, f"{label} output is also read by {others}")
    readers = group | ({between} if between else set())
    if others := _other_consumers(graph.groups[(linear, producer.call)], readers, nodes):
        return Refusal(pair.site, Code.BRANCHING, f"{linear} output is also read by {others}")
    return _weights_private(pair, graph.traced, roles)


def _entries(group: set[str], nodes: dict[str, Node]) -> list[str]:
    """The activations a module call reads from outside it, by name."""
    return sorted({i for n in group for i in nodes[n].inputs if i not in group})


def _pools_linear(node: Node, nodes: dict[str, Node], roles: Roles) -> bool:
    """A pool (outside any module) of one linear module's output.

    Looked through even when something else reads the pool too: the pair is
    then refused ``branching``, which says more than the op between.
    """
    if node.owner is not None or node.pool is None or len(node.inputs) != 1:
        return False
    source = nodes[node.inputs[0]]
    return source.owner is not None and roles.of(source.owner) == LINEAR


def _match_join(site: CallSite, graph: _Graph) -> JoinPair | Refusal | None:
    """``BN(L_a(x) + L_b(y))`` or ``BN(cat([L_a, L_b, ...]))`` for one BN call.

    None when the BN's input is no join. Channel counts and the cat's axis are
    checked on the modules (:func:`bnfold.torch_front.eager.why_not`).
    Refuses: NOT_LINEAR_TERM (a term is no linear module's output, or one output
    twice), REUSED_MODULE (one module makes two terms: one weight cannot take
    two parts), BRANCHING (a term or the join is also read elsewhere),
    SHARED_WEIGHT.
    """
    bn, nodes = site[0], graph.nodes
    group = set(graph.groups[site])
    entries = _entries(group, nodes)
    join = nodes[entries[0]].join if len(entries) == 1 else None
    if join is None or join.kind == "sub" or nodes[entries[0]].owner is not None:
        return None
    terms = [nodes[t] for t in join.terms]
    owners = [t.owner if t.owner and graph.roles.of(t.owner) == LINEAR else None for t in terms]
    pair = JoinPair(tuple(o or t for o, t in zip(owners, join.terms, strict=True)), bn,
                    graph.finder, join.kind, join.dim)  # fmt: skip
    if None in owners:
        term = terms[owners.index(None)]
        detail = f"the {join.kind} before {bn} reads {term.op}, not a conv or linear module"
        return Refusal(pair.site, Code.NOT_LINEAR_TERM, detail)
    if len(set(join.terms)) < len(join.terms):
        detail = f"the {join.kind} before {bn} reads one output of {pair.linear} twice"
        return Refusal(pair.site, Code.NOT_LINEAR_TERM, detail)
    if len(set(owners)) < len(owners):
        detail = f"one module makes two terms of the {join.kind} before {bn}: one weight, two parts"
        return Refusal(pair.site, Code.REUSED_MODULE, detail)
    if others := _other_consumers([entries[0]], group, nodes):
        return Refusal(pair.site, Code.BRANCHING, f"the {join.kind} is also read by {others}")
    for term, owner in zip(terms, owners, strict=True):
        assert owner is not None
        calls = graph.groups[(owner, term.call)]
        if others := _other_consumers(calls, {entries[0]}, nodes):
            return Refusal(pair.site, Code.BRANCHING, f"{owner} output is also read by {others}")
    return _weights_private(pair, graph.traced, graph.roles)


def _match_tap(site: CallSite, graph: _Graph) -> TapPair | Refusal | None:
    """One call of an identity BN, ``bn(x)``, summed with a conv reading the same ``x``.

    Matches a tree of plain adds and subtractions (each inner one read only by
    the next) whose terms include ``bn(x)`` and the output of a conv call whose
    only input is ``x``: RepVGG's ``conv_1x1(x) + conv_kxk(x) + identity(x)``,
    MobileOne, RepGhost's ``cheap(x1) + fusion_bn(x1)``, FastViT's RepMixer
    ``mixer(x) - norm(x)`` (each a MobileOne block; a term subtracted counts
    with sign -1). Of several such convs, the one with the largest kernel that
    can take the tap. None when the BN is no such term. Branch BNs must have
    folded first: a conv whose output goes through a BN into the sum is no
    sibling (a later round finds it).
    Refuses:
      BRANCHING        the BN's output, or the conv's, is also read outside the
                       sum (or counted in it twice)
      BRANCH_MISMATCH  the conv has stride != 1 or other than as many input as
                       output channels (:func:`bnfold.torch_front.modules.identity_tap_misfit`)
      UNCENTRED_TAP    the conv's kernel has no centre tap at its padding
      SHARED_WEIGHT    the conv's weight or bias is also read outside it
    """
    bn, nodes = site[0], graph.nodes
    group = set(graph.groups[site])
    entries = _entries(group, nodes)
    outside = sorted({u for n in group for u in nodes[n].users if u not in group})
    sums = [u for u in outside if _is_plain_sum(nodes[u])]
    if len(entries) != 1 or not sums:
        return None
    terms = _sum_terms(_top_of_sum(sums[0], nodes), nodes)
    convs = [t for t in terms if _conv_reading(t.name, entries[0], graph)]
    mine = [t for t in terms if nodes[t.name].owner == bn]
    if not convs or not mine:
        return None
    ranked = sorted(convs, key=lambda t: -_kernel_size(graph, _owner_of(t, nodes)))
    first = f"{bn} -> {_owner_of(ranked[0], nodes)}"
    if others := _other_consumers(list(group), {mine[0].reader}, nodes):
        return Refusal(first, Code.BRANCHING, f"{bn} output is also read by {others}")
    if len(mine) != 1:
        return Refusal(first, Code.BRANCHING, f"the sum counts {bn}'s output {len(mine)} times")
    refusals = []
    for term in ranked:
        conv = _owner_of(term, nodes)
        pair = TapPair(conv, bn, graph.finder, sign=term.sign * mine[0].sign)
        found = _tap_misfit(term, terms, graph)
        if found is None:
            return _weights_private(pair, graph.traced, graph.roles)
        refusals.append(Refusal(pair.site, *found))
    return refusals[0]


@dataclass(frozen=True)
class _Term:
    """One term of a tree of sums: the value, the sign it is counted with, the op reading it."""

    name: str
    sign: int
    reader: str


def _is_plain_sum(node: Node) -> bool:
    return node.owner is None and node.join is not None and node.join.kind in ("add", "sub")


def _sole_sum_reader(name: str, nodes: dict[str, Node]) -> str | None:
    """The plain add or subtraction that alone reads ``name``'s value, if one does."""
    node = nodes[name]
    if node.is_output or len(node.users) != 1 or not _is_plain_sum(nodes[node.users[0]]):
        return None
    return node.users[0]


def _top_of_sum(name: str, nodes: dict[str, Node]) -> str:
    """The last sum of the chain of sums each read only by the next."""
    while (reader := _sole_sum_reader(name, nodes)) is not None:
        name = reader
    return name


def _sum_terms(top: str, nodes: dict[str, Node], sign: int = 1) -> list[_Term]:
    """The terms of a tree of sums, one entry per time the sum counts one.

    An inner sum read only by its parent belongs to the tree; anything else
    (a conv's output, the BN's, a sum read elsewhere) is a term.
    """
    join = nodes[top].join
    assert join is not None
    signs = (1, -1) if join.kind == "sub" else (1, 1)
    terms = []
    for name, own in zip(join.terms, signs, strict=True):
        if _is_plain_sum(nodes[name]) and _sole_sum_reader(name, nodes) == top:
            terms += _sum_terms(name, nodes, sign * own)
        else:
            terms.append(_Term(name, sign * own, top))
    return terms


def _owner_of(term: _Term, nodes: dict[str, Node]) -> str:
    owner = nodes[term.name].owner
    assert owner is not None
    return owner


def _conv_reading(leaf: str, x: str, graph: _Graph) -> bool:
    """Whether ``leaf`` is the output of a plain conv's call whose only input is ``x``."""
    node = graph.nodes[leaf]
    if node.owner is None or graph.roles.of(node.owner) != LINEAR:
        return False
    if not is_plain_conv(graph.root.get_submodule(node.owner)):
        return False
    return _entries(set(graph.groups[(node.owner, node.call)]), graph.nodes) == [x]


def _kernel_size(graph: _Graph, conv: str) -> int:
    module: Any = graph.root.get_submodule(conv)
    return math.prod(module.kernel_size)


def _tap_misfit(term: _Term, terms: list[_Term], graph: _Graph) -> tuple[Code, str] | None:
    """Why the conv making the sum's term ``term`` cannot take the identity tap (None: it can)."""
    nodes, conv = graph.nodes, _owner_of(term, graph.nodes)
    count = sum(1 for t in terms if t.name == term.name)
    if count != 1:
        return Code.BRANCHING, f"the sum counts {conv}'s output {count} times"
    call = graph.groups[(conv, nodes[term.name].call)]
    if others := _other_consumers(call, {term.reader}, nodes):
        return Code.BRANCHING, f"{conv} output is also read by {others}"
    return identity_tap_misfit(graph.root.get_submodule(conv), conv)


def _single_input_reshape(node: Node, readers: set[str]) -> bool:
    """A view/flatten/(un)squeeze read only by ``readers``, outside any module."""
    return (
        node.owner is None
        and _is_reshape(node.op)
        and len(node.inputs) == 1
        and not node.is_output
        and set(node.users) <= readers
    )


def _match_before(site: CallSite, graph: _Graph) -> Pair | Refusal | None:
    """``BN -> linear`` or ``BN -> reshape -> linear`` for one call of the BN.

    None if no linear op reads that call's output alone.
    """
    bn, nodes, groups, roles = site[0], graph.nodes, graph.groups, graph.roles
    group = set(groups[site])
    if any(nodes[n].is_output for n in group):
        return None
    readers = sorted({u for n in group for u in nodes[n].users if u not in group})
    if len(readers) != 1:
        return None
    reader, between = nodes[readers[0]], ""
    if reader.owner is None and _is_reshape(reader.op):
        if reader.is_output or len(reader.users) != 1:
            return None
        between, reader = _reshape_label(reader.op), nodes[reader.users[0]]
    if reader.owner is None or roles.of(reader.owner) != LINEAR:
        return None
    linear = reader.owner
    lin_group = set(groups[(linear, reader.call)])
    if len({i for n in lin_group for i in nodes[n].inputs if i not in lin_group}) != 1:
        return None
    pair = Pair(linear, bn, graph.finder, before=True, between=between)
    return _weights_private(pair, graph.traced, roles)


def _weights_private(pair: _P, traced: Traced, roles: Roles) -> _P | Refusal:
    """The pair, unless an op outside a linear module of it reads its weight or bias."""
    for linear in pair.linears:
        own = {f"{a}.{p}" for a in roles.aliases[linear] for p in ("weight", "bias")}
        if shared := sorted(traced.outside_reads & own):
            return Refusal(
                pair.site, Code.SHARED_WEIGHT, f"{', '.join(shared)} also read outside {linear}"
            )
    return pair


def _is_reshape(op: str) -> bool:
    return bool(_RESHAPE_TOKENS & set(re.split(r"[^a-z0-9]+", op.lower())))


def _reshape_label(op: str) -> str:
    tokens = re.split(r"[^a-z0-9]+", op.lower())
    return next(t for t in tokens if t in _RESHAPE_TOKENS)


def _add(scan: Scan, result: AnyPair | Refusal) -> None:
    if isinstance(result, Refusal):
        scan.refused.append(result)
    else:
        scan.pairs.append(result)


def _bn_call_refusal(bn: str, calls: Calls) -> Refusal | None:
    if calls.of(bn) == 0:
        return Refusal(bn, Code.UNTRACEABLE, f"{bn} did not run on the example inputs")
    return None


def _other_consumers(linear_group: list[str], allowed: set[str], nodes: dict[str, Node]) -> str:
    """Describe readers of one linear call's output besides ``allowed`` ("" if none)."""
    own = set(linear_group)
    others = []
    for name in linear_group:
        node = nodes[name]
        if node.is_output:
            others.append("the module output")
        others += [nodes[u].op for u in node.users if u not in own and u not in allowed]
    return ", ".join(sorted(set(others)))


def _why_no_linear(bn: str, start: str, nodes: dict[str, Node], roles: Roles) -> Refusal:
    """Walk back a single-input chain of ops to explain why the BN cannot fold."""
    chain: list[str] = []
    name = start
    while len(chain) < 16:
        node = nodes[name]
        if node.owner is not None and roles.of(node.owner) == LINEAR:
            site = f"{node.owner} -> {bn}"
            between = " -> ".join(reversed(chain))
            code = Code.NONLINEAR_INPUT if any(map(is_nonlinear, chain)) else Code.OP_BETWEEN
            return Refusal(site, code, f"{between} between {node.owner} and {bn}")
        if node.owner is not None or len(node.inputs) != 1:
            break
        chain.append(node.op)
        name = node.inputs[0]
    first = nodes[start]
    if first.owner is not None and roles.of(first.owner) == BN:
        return Refusal(bn, Code.STANDALONE, f"{bn} is fed by BatchNorm {first.owner}")
    if is_nonlinear(first.op):
        return Refusal(bn, Code.NONLINEAR_INPUT, f"{bn} is fed by {first.op}")
    return Refusal(bn, Code.STANDALONE, f"no linear op feeds {bn} (input from {first.op})")


def is_nonlinear(op: str) -> bool:
    """Whether an op or module type name looks like a nonlinearity ("aten.relu.default", "GELU")."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", op.lower()) if t]
    return any(t in _NONLINEAR_TOKENS or t.startswith(_NONLINEAR_PREFIXES) for t in tokens)


def match_sequential(root: nn.Module, roles: Roles, calls: Calls) -> Scan:
    """Pairs from adjacency inside plain ``nn.Sequential`` containers.

    A pair needs the linear module and the BN to have run exactly as often as the
    Sequential: then every call of each was the Sequential's, and the only way
    the linear output reached anything is the Sequential feeding it to the BN.
    """
    scan = Scan("sequential")
    seen: set[str] = set()
    for path, m in root.named_modules():
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            for result in _match_in_sequential(path, m, roles, calls):
                seen.add(result.bn if isinstance(result, Pair) else result.site.split(" -> ")[-1])
                _add(scan, result)
    for bn in roles.bns():
        if bn not in seen:
            refusal = _bn_call_refusal(bn, calls) or Refusal(
                bn, Code.UNTRACEABLE, f"module not traceable and {bn} is not inside nn.Sequential"
            )
            scan.refused.append(refusal)
    return scan


def _match_in_sequential(
    path: str, seq: nn.Sequential, roles: Roles, calls: Calls
) -> list[Pair | Refusal]:
    out: list[Pair | Refusal] = []
    prefix = f"{path}." if path else ""
    # A folded BN is an nn.Identity: look through it, so Conv -> BN -> BN folds twice.
    children = [
        (roles.canonical[prefix + name], child)
        for name, child in seq.named_children()
        if type(child) is not nn.Identity
    ]
    for i, (bn, _) in enumerate(children):
        if roles.of(bn) != BN:
            continue
        if refusal := _bn_call_refusal(bn, calls):
            out.append(refusal)
            continue
        after: Pair | Refusal
        if i == 0:
            after = Refusal(bn, Code.UNTRACEABLE, f"{bn} is first in {path or 'the root'}")
        else:
            after = _sequential_after(path, children[:i], bn, roles, calls)
        if isinstance(after, Refusal):
            after = prefer_before(after, _sequential_before(path, children[i:], roles, calls))
        out.append(after)
    return out


_SEQUENTIAL_RESHAPES = (nn.Flatten, nn.Unflatten)


def _sequential_after(
    seq: str, earlier: list[tuple[str, nn.Module]], bn: str, roles: Roles, calls: Calls
) -> Pair | Refusal:
    """``linear, BN`` or ``linear, nn.Flatten|nn.Unflatten, BN`` as neighbours before ``bn``."""
    prev, prev_mod = earlier[-1]
    if isinstance(prev_mod, _SEQUENTIAL_RESHAPES) and len(earlier) > 1:
        linear = earlier[-2][0]
        if roles.of(linear) == LINEAR:
            pair = Pair(linear, bn, "sequential", between=prev)
            return _only_through(seq, pair, calls) or pair
    return _sequential_pair(seq, prev, prev_mod, bn, roles, calls)


def _sequential_before(
    seq: str, rest: list[tuple[str, nn.Module]], roles: Roles, calls: Calls
) -> Pair | Refusal | None:
    """``BN, linear`` or ``BN, nn.Flatten|nn.Unflatten, linear`` as neighbours.

    ``rest[0]`` is the BN.
    """
    bn, nxt, between = rest[0][0], rest[1:], ""
    if len(nxt) > 1 and isinstance(nxt[0][1], _SEQUENTIAL_RESHAPES):
        between, nxt = nxt[0][0], nxt[1:]
    if not nxt or roles.of(nxt[0][0]) != LINEAR:
        return None
    pair = Pair(nxt[0][0], bn, "sequential", before=True, between=between)
    return _only_through(seq, pair, calls) or pair


def _sequential_pair(
    seq: str, prev: str, prev_mod: nn.Module, bn: str, roles: Roles, calls: Calls
) -> Pair | Refusal:
    site = f"{prev} -> {bn}"
    kind = type(prev_mod).__name__
    if roles.of(prev) == LINEAR:
        pair = Pair(prev, bn, "sequential")
        return _only_through(seq, pair, calls) or pair
    if is_nonlinear(kind):
        return Refusal(site, Code.NONLINEAR_INPUT, f"{bn} follows {kind}")
    if roles.of(prev) == BN:
        return Refusal(site, Code.STANDALONE, f"{bn} follows BatchNorm {prev}")
    return Refusal(site, Code.UNTRACEABLE, f"{bn} follows {kind}, which is not traced")


def _only_through(seq: str, pair: Pair, calls: Calls) -> Refusal | None:
    """Why neighbours in ``seq`` may have run outside it (None if every call was in it)."""
    runs = calls.of(seq)
    if calls.of(pair.bn) != runs:
        detail = f"{pair.bn} ran {calls.of(pair.bn)} times, {seq or 'the root'} {runs}"
        return Refusal(pair.site, Code.UNTRACEABLE, f"{detail}: it is also called directly")
    if calls.of(pair.linear) != runs:
        detail = reused_detail(pair.linear, calls.of(pair.linear), pair.bn, runs)
        return Refusal(pair.site, Code.REUSED_MODULE, detail)
    return None


def _export_graph(root: nn.Module, args: tuple[Any, ...], roles: Roles) -> Traced:
    with eval_mode(root), _quiet(_EXPORT_LOGGERS), contextlib.redirect_stderr(io.StringIO()):
        ep = torch.export.export(root, args, strict=False)
    sig = ep.graph_signature
    user_inputs = set(sig.user_inputs)
    params = dict(sig.inputs_to_parameters)
    traced = Traced({})
    nodes = traced.nodes
    alias: dict[str, str] = {}  # eval-mode dropout -> the node it passes on
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            nodes[n.name] = Node(None, "input", [])
        elif (_eval_dropout_module(root, n) or adds_zero(n)) and len(
            ins := _input_names(n, nodes, alias)
        ) == 1:
            alias[n.name] = ins[0]
        elif n.op == "call_function":
            owner, call = _export_owner(n, roles)
            node = Node(owner, str(n.target), _input_names(n, nodes, alias), call)
            if owner is None:
                node.join = join_of(n, nodes, alias)
                node.pool = pool_of_call(str(n.target), n.args, n.kwargs)
            nodes[n.name] = node
            traced.outside_reads |= _params_read_outside(n, owner, params, roles)
        elif n.op == "output":
            _mark_outputs(n, nodes, alias)
    _link_users(nodes)
    return traced


_DROPOUTS = ("aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default")


def is_eval_dropout(n: fx.Node) -> bool:
    """A dropout traced with ``train=False``, the identity (timm NormLinear: BN, drop, fc)."""
    return (
        n.op == "call_function" and str(n.target) in _DROPOUTS and len(n.args) > 2 and not n.args[2]
    )


def _eval_dropout_module(root: nn.Module, n: fx.Node) -> bool:
    """An eval dropout, and (export traces in eval mode) not from a module left training."""
    if not is_eval_dropout(n):
        return False
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    owner = root.get_submodule(stack[-1][0]) if stack else None
    return not (isinstance(owner, nn.modules.dropout._DropoutNd) and owner.training)


def _params_read_outside(
    n: fx.Node, owner: str | None, params: dict[str, str], roles: Roles
) -> set[str]:
    read = [params[a.name] for a in n.all_input_nodes if a.name in params]
    return {p for p in read if roles.canonical.get(p.rpartition(".")[0]) != owner}


# A failed export (the fallback then takes over) logs a warning and prints the
# partial graph to stderr; neither helps someone whose model still folds.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_owner(n: fx.Node, roles: Roles) -> tuple[str | None, int]:
    """The innermost linear/BN module an aten op ran in, and which call of it.

    Export keys the module stack by call: the second call of ``conv`` is
    ``"L__self___conv@1"``.
    """
    stack = n.meta.get("nn_module_stack") or {}
    for key, (path, _type) in reversed(list(stack.items())):
        if roles.of(path) is not None:
            _, at, index = str(key).rpartition("@")
            return roles.canonical[path], int(index) if at and index.isdigit() else 0
    return None, 0


class _LeafTracer(fx.Tracer):
    """fx tracer that stops at linear and BN modules, so each is one call_module node."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


def _fx_graph(root: nn.Module, args: tuple[Any, ...], roles: Roles) -> Traced:
    leaves = {p for p in roles.canonical if roles.of(p) is not None}
    graph = _LeafTracer(leaves).trace(root)
    traced = Traced({})
    nodes = traced.nodes
    alias: dict[str, str] = {}  # nn.Identity node -> the node it passes on
    calls_so_far: dict[str, int] = {}  # owner -> call_module nodes seen (a node is one call)
    shape_reads: set[str] = set()
    for n in graph.nodes:
        if n.op == "get_attr":  # leaf modules read their own weights without get_attr
            traced.outside_reads.add(str(n.target))
        elif _reads_shape(n, shape_reads):
            # x.shape[0] / x.size(1) in y.view(x.shape[0], -1): metadata, not a reader
            # of x's values, so neither an input of the view nor a second consumer.
            shape_reads.add(n.name)
        elif n.op == "placeholder":
            nodes[n.name] = Node(None, "input", [])
        elif (_is_identity(root, n) or adds_zero(n)) and len(
            ins := _input_names(n, nodes, alias)
        ) == 1:
            alias[n.name] = ins[0]
        elif n.op in ("call_module", "call_function", "call_method"):
            owner = roles.canonical.get(str(n.target)) if n.op == "call_module" else None
            if owner is not None and roles.of(owner) is None:
                owner = None
            call = 0
            if owner is not None:
                call = calls_so_far[owner] = calls_so_far.get(owner, -1) + 1
            node = Node(owner, _fx_op_name(root, n), _input_names(n, nodes, alias), call)
            if owner is None:
                node.join = join_of(n, nodes, alias)
                node.pool = _fx_pool(root, n)
            nodes[n.name] = node
        elif n.op == "output":
            _mark_outputs(n, nodes, alias)
    _link_users(nodes)
    return traced


def _fx_pool(root: nn.Module, n: fx.Node) -> Pool | None:
    """A pooling module or ``torch.nn.functional`` pool call of an fx graph, if ``n`` is one."""
    if n.op == "call_module":
        return pool_of_module(root.get_submodule(str(n.target)))
    if n.op == "call_function":
        return pool_of_call(getattr(n.target, "__name__", ""), n.args, dict(n.kwargs))
    return None


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


def _reads_shape(n: fx.Node, shape_reads: set[str]) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``, or an item of one of those."""
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.target is getattr:
        return n.args[1] in ("shape", "ndim")
    return n.target is operator.getitem and n.args[0].name in shape_reads


def _fx_op_name(root: nn.Module, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(root.get_submodule(str(n.target))).__name__
    target: Any = n.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_identity(root: nn.Module, n: fx.Node) -> bool:
    """An ``nn.Identity`` (a folded BN) or a dropout module in eval mode."""
    if n.op != "call_module":
        return False
    m = root.get_submodule(str(n.target))
    dropout = isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
    return type(m) is nn.Identity or dropout


def _input_names(
    n: fx.Node, known: dict[str, Node], alias: dict[str, str] | None = None
) -> list[str]:
    """Activation inputs of ``n``: earlier nodes we kept (weights/buffers were not kept)."""
    names: list[str] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: names.append(a.name) or a)  # type: ignore[func-returns-value]
    shape_only = {a.name for a in metadata_only_inputs(n)}
    names = [a for a in names if a not in shape_only]
    alias = alias or {}
    return [a for a in dict.fromkeys(alias.get(a, a) for a in names) if a in known]


def _mark_outputs(
    out: fx.Node, nodes: dict[str, Node], alias: dict[str, str] | None = None
) -> None:
    for name in _input_names(out, nodes, alias):
        nodes[name].is_output = True


def _link_users(nodes: dict[str, Node]) -> None:
    for name, node in nodes.items():
        for i in node.inputs:
            nodes[i].users.append(name)
