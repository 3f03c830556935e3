"""The ``.pt2`` front's fold sites: :class:`bnfold.sites.Site` records naming aten nodes,
and the report entries a fold or refusal of one makes.

A site's report names are the module paths of the weights it reads ("layer1.0.conv1");
its ``keys`` are the names of its aten nodes, stable across fresh ``ep.module()``
copies: the linear ops' nodes, in order, then the BN's (:func:`linear_keys`,
:func:`bn_key`). A branch-sum merge removes several BNs at once: a
:class:`MergeSite` holds its three kinds of site.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from bnfold.report import Code, Folded, FoldKind, Refusal
from bnfold.sites import Site
from bnfold.torch_front.aten_graph import layout_of, owner_path

FINDER = "exported_program"
"""How the report names this front's finder."""


def linear_path(lin: fx.Node) -> str:
    """The module path of a linear op's weight ("layer1.0.conv1"), else its node's name."""
    return owner_path(lin.args[1:3]) or lin.name


def bn_path(bn: fx.Node) -> str:
    """The module path of a batch_norm's parameters ("layer1.0.bn1"), else its node's name."""
    return owner_path(bn.args[1:5]) or bn.name


def adjacent_site(
    lin: fx.Node,
    bn: fx.Node,
    *,
    between: str = "",
    before: bool = False,
    kind: FoldKind = FoldKind.ADJACENT,
) -> Site:
    """``lin -> [between ->] bn``, or with ``before`` ``bn -> [between ->] lin``."""
    return Site(
        kind,
        (linear_path(lin),),
        bn_path(bn),
        between=between,
        before=before,
        finder=FINDER,
        keys=(lin.name, bn.name),
    )


def join_site(terms: list[fx.Node], join: str, bn: fx.Node) -> Site:
    """``a, b -> add -> bn`` or ``a, b -> cat -> bn``: ``join`` is "add" or "cat"."""
    kind = FoldKind.OVER_ADD if join == "add" else FoldKind.OVER_CONCAT
    paths = tuple(linear_path(t) for t in terms)
    return Site(kind, paths, bn_path(bn), join=join, finder=FINDER,
                keys=(*(t.name for t in terms), bn.name))  # fmt: skip


def linear_keys(site: Site) -> tuple[str, ...]:
    """The linear ops' node names of an adjacent or join site."""
    return site.keys[:-1]


def bn_key(site: Site) -> str:
    """The BN's node name of an adjacent or join site."""
    return site.keys[-1]


@dataclass(frozen=True)
class MergeSite:
    """A branch sum that merges: its report sites, and its nodes by name (stable across
    fresh ``ep.module()`` copies)."""

    merge: Site  # the survivor, the top node and the signed terms (keys: the conv nodes)
    taps: tuple[Site, ...]  # one per identity BN (keys: its node)
    trailing: Site | None  # a BN after the tree (keys: its node)
    pattern: str  # "conv2d+conv2d+batch_norm+add"
    conv_op: str  # "conv2d", "convolution"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.REPARAM

    @property
    def label(self) -> str:
        return self.merge.label

    @property
    def top_node(self) -> str:
        return self.merge.join

    @property
    def bn_nodes(self) -> tuple[str, ...]:
        """The BN nodes the merge removes: the identities and a BN after the sum."""
        after = () if self.trailing is None else self.trailing.keys
        return (*(key for tap in self.taps for key in tap.keys), *after)

    def entries(self, bytes_added: int) -> list[Folded]:
        """One ``identity_tap`` per identity BN, an ``adjacent`` BN after the sum, the merge."""
        folded = [tap.folded("batch_norm+add") for tap in self.taps]  # an add tops a tree
        if self.trailing is not None:
            folded.append(self.trailing.folded(f"{self.conv_op}+add+batch_norm"))
        return [*folded, self.merge.folded(self.pattern, bytes_added)]

    def refusals(self, code: Code, detail: str) -> list[Refusal]:
        """The merge not made: one refusal per BN it would have removed (each BN left is
        named by one), or one for the sum when it has none."""
        sites = [Site(FoldKind.IDENTITY_TAP, bn=t.bn, between=self.top_node) for t in self.taps]
        sites += [] if self.trailing is None else [self.trailing]
        return [s.refusal(code, detail) for s in sites or [self.merge]]


AnySite = Site | MergeSite


def refusals(site: AnySite, code: Code, detail: str) -> list[Refusal]:
    """A site not folded: one refusal, or for a merge one per BN it would remove."""
    return (
        site.refusals(code, detail) if isinstance(site, MergeSite) else [site.refusal(code, detail)]
    )


def entries(gm: fx.GraphModule, site: AnySite, bytes_added: int) -> list[Folded]:
    """The report's entries for one applied site (a merge makes several); ``gm`` is a
    module holding the site's nodes, to name their ops."""
    if isinstance(site, MergeSite):
        return site.entries(bytes_added)
    return [site.folded(_pattern(gm, site), bytes_added)]


def _pattern(gm: fx.GraphModule, site: Site) -> str:
    """ "conv2d+batch_norm", "linear+view+batch_norm"; before: "batch_norm+flatten+linear";
    a join: "conv2d+conv2d+add+batch_norm"."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ops = [op_name(nodes[key]) for key in linear_keys(site)]
    if site.join:
        return "+".join([*ops, site.join, "batch_norm"])
    chain = ("batch_norm", site.between, ops[0])
    return "+".join(p for p in (chain if site.before else reversed(chain)) if p)


def op_name(lin: fx.Node) -> str:
    """ "conv2d", "linear"; a decomposed ``convolution`` is named by its layout ("Conv")."""
    name = str(lin.target).split(".")[1]
    return str(layout_of(lin).op) if name == "convolution" else name
