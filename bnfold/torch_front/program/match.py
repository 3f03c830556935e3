"""Match every batch_norm node of an exported program's graph to a fold site or a refusal.

Sites name aten nodes (stable across fresh ``ep.module()`` copies) and, for the
report, the module paths of the weights. Whether a matched site's values fold
exactly is checked in :mod:`bnfold.torch_front.program.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnfold import layouts
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules.precedence import explain_both
from bnfold.sites import site_label
from bnfold.torch_front import pools
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    arg_node,
    bn_output,
    is_linear_op,
    owner_path,
    traced_shape,
    uses_batch_stats,
)
from bnfold.torch_front.branch_sum import MergeSite, find_merges, why_not_tap
from bnfold.torch_front.program.checks import (
    check_before,
    check_bn,
    check_join,
    check_linear,
)
from bnfold.torch_front.site_graph import is_eval_dropout, is_nonlinear

aten = torch.ops.aten

# Ops that keep the elements and their order, only regrouping axes.
_RESHAPE_OPS: dict[Any, str] = {
    aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten",
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten._unsafe_view.default: "view",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.squeeze.dims: "squeeze",
    aten.squeeze.default: "squeeze",
}


@dataclass(frozen=True)
class Site:
    """One foldable pair, by node names: ``linear op -> BN op``, or with ``before``
    ``BN op -> linear op``; either possibly through ``between``, one of
    :data:`_RESHAPE_OPS`."""

    linear_node: str
    bn_node: str
    linear: str  # module path of the weight, e.g. "layer1.0.conv1"
    bn: str
    before: bool = False
    between: str = ""  # "flatten", "view", "unsqueeze", ...
    kind: FoldKind = FoldKind.ADJACENT

    @property
    def site(self) -> str:
        return site_label(self.linear, self.bn, self.between, self.before)


_JOIN_OPS: dict[Any, str] = {aten.add.Tensor: "add", aten.cat.default: "cat"}


@dataclass(frozen=True)
class JoinSite:
    """``BN(add(L_a(x), L_b(y)))`` or ``BN(cat([L_a(x), L_b(y), ...], 1))``, by node names.

    Each L a conv*/conv_transpose*/linear node whose only reader is the join;
    on an add every term takes the BN's scale and the first also its shift, on
    a cat each term takes its own channels (:func:`bnfold.affine.add_parts`,
    :func:`bnfold.affine.concat_parts`). The join stays; the BN goes.
    """

    linear_nodes: tuple[str, ...]
    join_node: str
    bn_node: str
    linears: tuple[str, ...]  # module paths of the terms' weights
    bn: str
    join: str  # "add" or "cat"

    @property
    def linear(self) -> str:
        return ", ".join(self.linears)

    @property
    def site(self) -> str:
        return f"{self.linear} -> {self.join} -> {self.bn}"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.OVER_ADD if self.join == "add" else FoldKind.OVER_CONCAT


AnySite = Site | JoinSite | MergeSite


def find_sites(gm: fx.GraphModule) -> tuple[list[AnySite], list[Refusal]]:
    """Every BN node of ``gm``: a foldable site or a refusal; and every branch sum
    that merges into one conv (:class:`~bnfold.torch_front.branch_sum.MergeSite`,
    which takes its identity BNs and a BN after the sum along).

    Matches:  batch_norm(conv{1,2,3}d | conv_transpose{1,2,3}d | linear(x, W, B?))
              with W, B and the BN statistics read by get_attr; else (before)
              conv*/conv_transpose*/linear(batch_norm(x), W, B?). Either
              also through one reshape (view, flatten, (un)squeeze) when each
              linear channel lies inside one BN channel
              (:func:`bnfold.layouts.channel_block`). After: also
              batch_norm(avg_pool*d | adaptive_avg_pool*d | max_pool*d |
              adaptive_max_pool*d(conv*(x))) (:mod:`.pools`), the pool left in
              place and the BN folded into the conv before it; and
              batch_norm(add | cat(linear ops)) into every term (:class:`JoinSite`).
    Refuses:
      TRAINING_MODE    batch_norm with training=True
      NO_RUNNING_STATS running_mean/var missing
      NOT_CONSTANT     a weight, bias or statistic is not a get_attr
      BRANCHING        the linear op's output has other readers or is an output
      NONLINEAR_INPUT / OP_BETWEEN / STANDALONE   the BN input is not a linear op
      NOT_PER_CHANNEL  the linear output's channels are not on axis 1, or the
                       reshape splits a linear channel over several BN channels
      POOL_PADDING     through an average pool (kind THROUGH_POOL): it counts
                       padded zeros (count_include_pad with padding) or has a
                       divisor_override, and the shift is nonzero; adaptive
                       average pools always pass
      NEGATIVE_SCALE   through a max pool: a BN scale is negative
      TRAINING_MODE    also: through a max pool whose indices are read
      MERGE_MOVES_CHANNEL  linear(x[B, N, K]) reshaped to 2-D, but not to
                       (B*N, C) (a batch merge folds, kind BATCH_MERGE:
                       :func:`bnfold.layouts.merges_leading_axes`)
      NOT_LINEAR_TERM  an add/cat term is no conv/conv_transpose/linear (or one
                       op twice); see :func:`_match_join` for the join's other codes
      UNSUPPORTED_DTYPE / BAD_SHAPE
      ZERO_PADDING     before: a zero-padded conv or a conv_transpose, nonzero shift
      BRANCH_MISMATCH / UNCENTRED_TAP / BRANCHING   an identity BN's branch sum does
                       not merge (:mod:`bnfold.torch_front.branch_sum`)
    """
    merges = find_merges(gm)
    merged = {name for merge in merges for name in merge.bn_nodes}  # they go with the merge
    sites: list[AnySite] = list(merges)
    refused: list[Refusal] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in BN_OPS and node.name not in merged:
            result: Site | JoinSite | Refusal = _match(gm, node)
            if isinstance(result, Refusal) and result.code in _NO_LINEAR_BESIDE:
                result = why_not_tap(gm, node) or result
            if isinstance(result, Refusal) and result.code not in _BN_ITSELF:
                result = _match_join(gm, node) or result
            if isinstance(result, Refusal) and result.code not in _BN_ITSELF:
                result = _prefer_before(result, _match_before(gm, node))
            if isinstance(result, Site | JoinSite):
                sites.append(result)
            else:
                refused.append(result)
    return sites, refused


def _match(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal:
    bn_name = owner_path(bn.args[1:5]) or bn.name
    x = arg_node(bn.args[0])
    reader, between = bn, ""  # reader: what reads the linear op's output
    if _reshapes_linear(x):
        reader, between, x = x, _RESHAPE_OPS[x.target], arg_node(x.args[0])
    elif (pool := _pooled_conv(x)) is not None:
        reader, between, x = pool, pools.pool_name(pool), arg_node(pool.args[0])
    if not is_linear_op(x):
        return _why_not_linear(bn_name, x)
    lin_name = owner_path(x.args[1:3]) or x.name
    kind = _fold_kind(x, reader)
    site = Site(x.name, bn.name, lin_name, bn_name, between=between, kind=kind)
    if bn.target == aten.batch_norm.default and bn.args[5]:
        return Refusal(site.site, Code.TRAINING_MODE, "batch_norm called with training=True")
    if bn.args[3] is None or bn.args[4] is None:
        return Refusal(site.site, Code.NO_RUNNING_STATS, f"{bn_name} has no running statistics")
    merge = kind is FoldKind.BATCH_MERGE
    if found := check_linear(gm, x, reader, merge) or check_bn(gm, x, bn, reader, merge):
        return Refusal(site.site, *found)
    return site


def _fold_kind(lin: fx.Node, reader: fx.Node) -> FoldKind:
    if pools.is_pool(reader):
        return FoldKind.THROUGH_POOL
    return FoldKind.BATCH_MERGE if _merges_batch(lin, reader) else FoldKind.ADJACENT


def _pooled_conv(value: fx.Node) -> fx.Node | None:
    """The pool whose values ``value`` is, when it pools a conv's output (channels
    on axis 1, which pools keep); None otherwise."""
    pool = pools.pool_of(value)
    source = None if pool is None or not pool.args else pool.args[0]
    if not isinstance(source, fx.Node) or not is_linear_op(source):
        return None
    return pool if source.target != aten.linear.default else None


def _merges_batch(lin: fx.Node, reader: fx.Node) -> bool:
    """``linear(x[B, N, K])`` reshaped to 2-D for the BN: the batch-merge fold.

    Only ``aten.linear`` keeps its channels last; a conv's are on axis 1.
    """
    if reader.target not in _RESHAPE_OPS or lin.target != aten.linear.default:
        return False
    return layouts.merges_leading_axes(traced_shape(reader), traced_shape(lin)) is not None


def _reshapes_linear(node: fx.Node) -> bool:
    """A reshape whose input is a linear op's output (then the BN may fold through it)."""
    source = node.args[0] if node.args else None
    return node.target in _RESHAPE_OPS and isinstance(source, fx.Node) and is_linear_op(source)


_BN_ITSELF = (Code.TRAINING_MODE, Code.NO_RUNNING_STATS)
# An identity BN of a branch sum has no linear op beside it; the sum's refusal says more.
_NO_LINEAR_BESIDE = (Code.STANDALONE, Code.NONLINEAR_INPUT)


def _match_join(gm: fx.GraphModule, bn: fx.Node) -> JoinSite | Refusal | None:
    """The BN after an add or channel cat of linear ops; None if its input is no join.

    Refuses: NOT_LINEAR_TERM (a term is no conv/conv_transpose/linear, or the
    same node twice), NOT_PER_CHANNEL (a cat not over axis 1), BAD_SHAPE (the
    terms' channels do not make the BN's), and the checks of every after-fold.
    """
    join = arg_node(bn.args[0])
    if join.op != "call_function" or join.target not in _JOIN_OPS or uses_batch_stats(bn):
        return None
    if bn.args[3] is None or bn.args[4] is None:
        return None  # no statistics: the BN's own refusal says so
    kind = _JOIN_OPS[join.target]
    terms = _join_terms(join)
    if kind == "add" and (len(join.args) != 2 or join.kwargs.get("alpha", 1) != 1):
        return None  # x + alpha * y: not a plain sum
    if any(not isinstance(t, fx.Node) or t.op == "get_attr" for t in terms):
        return None  # add(x, 2.0), a constant bias: no join of activations
    bn_name = owner_path(bn.args[1:5]) or bn.name
    site = JoinSite(
        tuple(t.name for t in terms),
        join.name,
        bn.name,
        tuple(owner_path(t.args[1:3]) or t.name for t in terms),
        bn_name,
        kind,
    )
    if found := check_join(gm, join, bn, terms):
        return Refusal(site.site, *found)
    return site


def _join_terms(join: fx.Node) -> list[Any]:
    """What an add sums, or the tensors a cat joins."""
    if join.target == aten.cat.default:
        return list(join.args[0])  # type: ignore[arg-type]
    return list(join.args[:2])


def _prefer_before(after: Refusal, before: Site | Refusal | None) -> Site | Refusal:
    if before is None:
        return after
    return before if isinstance(before, Site) else explain_both(after, before)


def _match_before(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal | None:
    """``linear(bn(x))`` or ``linear(flatten(bn(x)))``; None if no linear op alone reads the BN."""
    out = bn_output(bn)
    if out is None or len(out.users) != 1:
        return None
    (reader,) = out.users
    source, between = out, ""
    if reader.target in _RESHAPE_OPS and len(reader.users) == 1:
        source, between, reader = reader, _RESHAPE_OPS[reader.target], next(iter(reader.users))
    elif (_copies_values(reader) or is_eval_dropout(reader)) and len(reader.users) == 1:
        source, reader = reader, next(iter(reader.users))
    if not is_linear_op(reader) or reader.args[0] is not source or source in reader.args[1:]:
        return None
    bn_name = owner_path(bn.args[1:5]) or bn.name
    lin_name = owner_path(reader.args[1:3]) or reader.name
    site = Site(reader.name, bn.name, lin_name, bn_name, before=True, between=between)
    if found := check_before(gm, reader, bn, out, between):
        return Refusal(site.site, *found)
    return site


def _copies_values(pad: fx.Node) -> bool:
    """A reflect/replicate/circular pad: border values are copies, so they get the shift too.

    (An eager Conv with such a padding_mode exports as this pad and an unpadded conv.)
    """
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    return pad.target == aten.pad.default and mode in ("reflect", "replicate", "circular")


def _why_not_linear(bn_name: str, x: fx.Node) -> Refusal:
    chain: list[str] = []
    node = x
    while node.op == "call_function" and len(chain) < 16:
        if is_linear_op(node):
            lin = owner_path(node.args[1:3]) or node.name
            code = Code.NONLINEAR_INPUT if any(map(is_nonlinear, chain)) else Code.OP_BETWEEN
            return Refusal(f"{lin} -> {bn_name}", code, f"{' -> '.join(reversed(chain))} between")
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1 or node.target in BN_OPS:
            break
        chain.append(str(node.target))
        node = inputs[0]
    code = Code.NONLINEAR_INPUT if is_nonlinear(str(x.target)) else Code.STANDALONE
    return Refusal(bn_name, code, f"{bn_name} is fed by {x.target}")
