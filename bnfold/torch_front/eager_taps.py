"""Match an identity BN of a branch sum to the sibling conv that takes it as a
centred tap (:class:`~bnfold.torch_front.eager_pairs.TapPair`), in a traced site graph.

The eager twin of the ``.pt2`` merge walk in :mod:`bnfold.torch_front.branch_sum`:
here the sum stays (eager forward() cannot be rewritten), and only the BN's
term moves into one conv.

Why this is not :func:`bnfold.rules.branch_sum.sum_tree` over a view of the site
graph: a tap keeps the sum, so it asks less of the tree than a merge, and the
answers differ. A merge's tree tops only at an add (a subtraction merged at the
top would fail verification's bound); a tap tops at RepMixer's ``mixer(x) - norm(x)``
too. A merge needs every leaf to read one input; a tap needs only its conv to
read the BN's ``x`` (``conv(x) + bn(x) + other(y)``). A merge carries per-channel
coefficients through multiplications by constants; a tap moves the BN's term by
its sign alone, so ``0.5 * conv(x) + bn(x)`` is no tap. Sharing the walk would
change which BNs fold on this front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bnfold.report import Code, Refusal
from bnfold.torch_front.eager_pairs import TapPair
from bnfold.torch_front.modules import LINEAR, identity_tap_misfit, is_plain_conv
from bnfold.torch_front.site_graph import (
    CallSite,
    Node,
    SiteGraph,
    other_consumers,
    outside_inputs,
)


def match_tap(site: CallSite, graph: SiteGraph) -> TapPair | Refusal | None:
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
    entries = outside_inputs(group, nodes)
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
    first = TapPair.of(_owner_of(ranked[0], nodes), bn, graph.finder).site
    if others := other_consumers(list(group), {mine[0].reader}, nodes):
        return Refusal(first, Code.BRANCHING, f"{bn} output is also read by {others}")
    if len(mine) != 1:
        return Refusal(first, Code.BRANCHING, f"the sum counts {bn}'s output {len(mine)} times")
    refusals = []
    for term in ranked:
        conv = _owner_of(term, nodes)
        pair = TapPair.of(conv, bn, graph.finder, sign=term.sign * mine[0].sign)
        found = _tap_misfit(term, terms, graph)
        if found is None:
            return graph.weights_private(pair)
        refusals.append(pair.refusal(*found))
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


def _conv_reading(leaf: str, x: str, graph: SiteGraph) -> bool:
    """Whether ``leaf`` is the output of a plain conv's call whose only input is ``x``."""
    node = graph.nodes[leaf]
    if node.owner is None or graph.roles.of(node.owner) != LINEAR:
        return False
    if not is_plain_conv(graph.root.get_submodule(node.owner)):
        return False
    return outside_inputs(set(graph.groups[(node.owner, node.call)]), graph.nodes) == [x]


def _kernel_size(graph: SiteGraph, conv: str) -> int:
    module: Any = graph.root.get_submodule(conv)
    return math.prod(module.kernel_size)


def _tap_misfit(term: _Term, terms: list[_Term], graph: SiteGraph) -> tuple[Code, str] | None:
    """Why the conv making the sum's term ``term`` cannot take the identity tap (None: it can)."""
    nodes, conv = graph.nodes, _owner_of(term, graph.nodes)
    count = sum(1 for t in terms if t.name == term.name)
    if count != 1:
        return Code.BRANCHING, f"the sum counts {conv}'s output {count} times"
    call = graph.groups[(conv, nodes[term.name].call)]
    if others := other_consumers(call, {term.reader}, nodes):
        return Code.BRANCHING, f"{conv} output is also read by {others}"
    return identity_tap_misfit(graph.root.get_submodule(conv), conv)
