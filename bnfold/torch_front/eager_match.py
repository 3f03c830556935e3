"""Match every BN module of a traced site graph to one fold site or one refusal.

Each call of a BN is matched in turn: after the op feeding it (a :class:`Pair`),
also through one reshape (view, flatten, unflatten, (un)squeeze; whether channels
survive it is checked on the observed shapes) or one pool of a linear module's
output (``pool``); after an add or channel cat of linear modules
(:class:`JoinPair`); as the identity term of a branch sum
(:class:`TapPair`, :mod:`bnfold.torch_front.eager_taps`); and, when it cannot fold
into the op before it (after a ReLU, say, as in pre-activation nets), before the
op reading it: ``BN -> linear`` or ``BN -> flatten -> Linear``, when that op is
the BN's only reader. A BN module that runs several times folds when every call
is the same pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules.adjacent import Feed, unpaired_code, why_unpaired
from bnfold.rules.precedence import EAGER_ORDER, explain_both
from bnfold.sites import Site
from bnfold.torch_front.eager_pairs import AnyPair, JoinPair, Pair, Scan
from bnfold.torch_front.eager_taps import match_tap
from bnfold.torch_front.modules import BN, LINEAR, Calls, Roles
from bnfold.torch_front.site_graph import (
    CallSite,
    Node,
    SiteGraph,
    Traced,
    is_nonlinear,
    is_reshape,
    other_consumers,
    outside_inputs,
    reshape_label,
)


def match_graph(traced: Traced, roles: Roles, calls: Calls, finder: str, root: nn.Module) -> Scan:
    """Pairs and refusals for every BN in a traced graph (``root``: the modules traced)."""
    scan = Scan(finder)
    graph = SiteGraph.of(traced, roles, finder, root)
    for bn in roles.bns():
        scan.add(_match_bn(bn, graph, calls))
    return scan


def prefer_before(after: Refusal, before: Pair | Refusal | None) -> Pair | Refusal:
    """The before pair if there is one (it remembers ``after``, to explain itself
    should its checks refuse it); else the refusal that explains the most
    (:func:`bnfold.rules.precedence.explain_both`)."""
    if before is None:
        return after
    if isinstance(before, Pair):
        return replace(before, after_refusal=after)
    return explain_both(after, before)


def _match_bn(bn: str, graph: SiteGraph, calls: Calls) -> AnyPair | Refusal:
    """One pair or refusal for a BN module, whichever number of times it ran.

    Each call of the BN is matched on its own, the families asked in
    :data:`~bnfold.rules.precedence.EAGER_ORDER`: after the op feeding it (also
    through a reshape or a pool: ``adjacent``, ``batch_merge``, ``pool``), else
    after a join of linear ops (:func:`_match_join`), else as the identity term
    of a branch sum (:func:`~bnfold.torch_front.eager_taps.match_tap`), else
    before the op reading it. The module folds only if every call is the same
    pair (see :func:`_same_pair_every_call`).
    """
    if refusal := bn_call_refusal(bn, calls):
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
    for _family, matcher in BESIDE_AFTER:
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
            return pair.refusal(Code.REUSED_MODULE, detail)
    return pair


def reused_detail(linear: str, count: int, bn: str, paired: int) -> str:
    """Why a module called more often than its BN keeps it: one weight serves every call."""
    return (
        f"{linear} ran {count} times, {paired} of them into {bn}, and an eager module has one "
        "weight for all calls; fold it as an exported program (bnfold.fold(torch.export."
        "export(model, args)), a .pt2 file, or -o x.pt2), where the call into the BN gets "
        "its own folded copy"
    )


def _match_after(site: CallSite, graph: SiteGraph) -> Pair | Refusal:
    """``linear -> BN``, ``linear -> reshape -> BN`` or ``conv -> pool -> BN`` for one BN call."""
    bn, nodes, roles = site[0], graph.nodes, graph.roles
    group = set(graph.groups[site])
    entries = outside_inputs(group, nodes)
    if len(entries) != 1:
        return Refusal(bn, Code.STANDALONE, f"{bn} reads {len(entries)} activations, not one")
    producer, between = nodes[entries[0]], ""
    if _single_input_reshape(producer, group) or _pools_linear(producer, nodes, roles):
        between, producer = entries[0], nodes[producer.inputs[0]]
    if producer.owner is None or roles.of(producer.owner) != LINEAR:
        return _why_no_linear(bn, entries[0], nodes, roles)
    linear = producer.owner
    pool = nodes[between].pool if between else None
    label = (pool.label if pool else reshape_label(nodes[between].op)) if between else ""
    pair = Pair.of(linear, bn, graph.finder, between=label, pool=pool)
    if pool is not None and (others := other_consumers([between], group, nodes)):
        return pair.refusal(Code.BRANCHING, f"{label} output is also read by {others}")
    readers = group | ({between} if between else set())
    if others := other_consumers(graph.groups[(linear, producer.call)], readers, nodes):
        return pair.refusal(Code.BRANCHING, f"{linear} output is also read by {others}")
    return graph.weights_private(pair)


def _pools_linear(node: Node, nodes: dict[str, Node], roles: Roles) -> bool:
    """A pool (outside any module) of one linear module's output.

    Looked through even when something else reads the pool too: the pair is
    then refused ``branching``, which says more than the op between.
    """
    if node.owner is not None or node.pool is None or len(node.inputs) != 1:
        return False
    source = nodes[node.inputs[0]]
    return source.owner is not None and roles.of(source.owner) == LINEAR


def _match_join(site: CallSite, graph: SiteGraph) -> JoinPair | Refusal | None:
    """``BN(L_a(x) + L_b(y))`` or ``BN(cat([L_a, L_b, ...]))`` for one BN call.

    None when the BN's input is no join. Channel counts and the cat's axis are
    checked on the modules (:func:`bnfold.torch_front.eager.checked`).
    Refuses: NOT_LINEAR_TERM (a term is no linear module's output, or one output
    twice), REUSED_MODULE (one module makes two terms: one weight cannot take
    two parts), BRANCHING (a term or the join is also read elsewhere),
    SHARED_WEIGHT.
    """
    bn, nodes = site[0], graph.nodes
    group = set(graph.groups[site])
    entries = outside_inputs(group, nodes)
    join = nodes[entries[0]].join if len(entries) == 1 else None
    if join is None or join.kind == "sub" or nodes[entries[0]].owner is not None:
        return None
    terms = [nodes[t] for t in join.terms]
    owners = [t.owner if t.owner and graph.roles.of(t.owner) == LINEAR else None for t in terms]
    linears = [o or t for o, t in zip(owners, join.terms, strict=True)]
    pair = JoinPair.of(linears, bn, graph.finder, join.kind, join.dim)
    if None in owners:
        term = terms[owners.index(None)]
        detail = f"the {join.kind} before {bn} reads {term.op}, not a conv or linear module"
        return pair.refusal(Code.NOT_LINEAR_TERM, detail)
    if len(set(join.terms)) < len(join.terms):
        detail = f"the {join.kind} before {bn} reads one output of {pair.linear} twice"
        return pair.refusal(Code.NOT_LINEAR_TERM, detail)
    if len(set(owners)) < len(owners):
        detail = f"one module makes two terms of the {join.kind} before {bn}: one weight, two parts"
        return pair.refusal(Code.REUSED_MODULE, detail)
    if others := other_consumers([entries[0]], group, nodes):
        return pair.refusal(Code.BRANCHING, f"the {join.kind} is also read by {others}")
    for term, owner in zip(terms, owners, strict=True):
        assert owner is not None
        calls = graph.groups[(owner, term.call)]
        if others := other_consumers(calls, {entries[0]}, nodes):
            return pair.refusal(Code.BRANCHING, f"{owner} output is also read by {others}")
    return graph.weights_private(pair)


def _single_input_reshape(node: Node, readers: set[str]) -> bool:
    """A view/flatten/(un)squeeze read only by ``readers``, outside any module."""
    return (
        node.owner is None
        and is_reshape(node.op)
        and len(node.inputs) == 1
        and not node.is_output
        and set(node.users) <= readers
    )


def _match_before(site: CallSite, graph: SiteGraph) -> Pair | Refusal | None:
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
    if reader.owner is None and is_reshape(reader.op):
        if reader.is_output or len(reader.users) != 1:
            return None
        between, reader = reshape_label(reader.op), nodes[reader.users[0]]
    if reader.owner is None or roles.of(reader.owner) != LINEAR:
        return None
    linear = reader.owner
    lin_group = set(groups[(linear, reader.call)])
    if len({i for n in lin_group for i in nodes[n].inputs if i not in lin_group}) != 1:
        return None
    pair = Pair.of(linear, bn, graph.finder, before=True, between=between)
    return graph.weights_private(pair)


def bn_call_refusal(bn: str, calls: Calls) -> Refusal | None:
    """UNTRACEABLE for a BN that never ran on the example inputs (no graph shows it)."""
    if calls.of(bn) == 0:
        return Refusal(bn, Code.UNTRACEABLE, f"{bn} did not run on the example inputs")
    return None


def _why_no_linear(bn: str, start: str, nodes: dict[str, Node], roles: Roles) -> Refusal:
    """Why the BN cannot fold after ``start``, the op feeding it, which is no linear
    module (:func:`bnfold.rules.adjacent.why_unpaired`, the ops between named as
    traced; a BN fed by no linear op at all is told in module terms)."""
    chain, linear = _chain_to_linear(start, nodes, roles)
    first = nodes[start]
    fed_by_bn = first.owner is not None and roles.of(first.owner) == BN
    feed = Feed(
        first.op,
        nonlinear=not fed_by_bn and is_nonlinear(first.op),
        between=tuple(chain),
        linear=linear,
        affine=bn,
        through_nonlinear=any(map(is_nonlinear, chain)),
    )
    if linear:
        return Site(FoldKind.ADJACENT, (linear,), bn).refusal(*why_unpaired(feed))
    code = unpaired_code(feed)
    if fed_by_bn:
        return Refusal(bn, code, f"{bn} is fed by BatchNorm {first.owner}")
    if code is Code.NONLINEAR_INPUT:
        return Refusal(bn, code, f"{bn} is fed by {first.op}")
    return Refusal(bn, code, f"no linear op feeds {bn} (input from {first.op})")


def _chain_to_linear(start: str, nodes: dict[str, Node], roles: Roles) -> tuple[list[str], str]:
    """The ops of the single-input chain from ``start`` back to a linear module, nearest
    the BN first, and that module ("" when the chain ends elsewhere, or after 16 ops)."""
    chain: list[str] = []
    name = start
    while len(chain) < 16:
        node = nodes[name]
        if node.owner is not None and roles.of(node.owner) == LINEAR:
            return chain, node.owner
        if node.owner is not None or len(node.inputs) != 1:
            break
        chain.append(node.op)
        name = node.inputs[0]
    return chain, ""


Matcher = Callable[[CallSite, SiteGraph], AnyPair | Refusal | None]

_BESIDE: dict[str, Matcher] = {"join": _match_join, "branch_sum": match_tap}

BESIDE_AFTER: tuple[tuple[str, Matcher], ...] = tuple(
    (family, _BESIDE[family]) for family in EAGER_ORDER if family in _BESIDE
)
"""The families asked, with their matchers, when a BN folds after no op: in
:data:`~bnfold.rules.precedence.EAGER_ORDER`, the join of linear modules feeding
it, then the branch sum it is a term of."""
