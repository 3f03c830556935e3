"""Match every batch_norm node of an exported program's graph to a fold site or a refusal.

Sites name aten nodes (stable across fresh ``ep.module()`` copies) and, for the
report, the module paths of the weights. Whether a matched site's values fold
exactly is checked in :mod:`bnfold.torch_front.program.checks`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from bnfold import layouts
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules import precedence
from bnfold.rules.adjacent import Feed, why_unpaired
from bnfold.sites import Site, site_label
from bnfold.torch_front import pools
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    arg_node,
    bn_output,
    is_linear_op,
    traced_shape,
    uses_batch_stats,
)
from bnfold.torch_front.branch_sum import find_merges, why_not_tap
from bnfold.torch_front.program.checks import (
    check_before,
    check_bn,
    check_join,
    check_linear,
)
from bnfold.torch_front.program.sites import AnySite, adjacent_site, bn_path, join_site, linear_path
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


_JOIN_OPS: dict[Any, str] = {aten.add.Tensor: "add", aten.cat.default: "cat"}


def find_sites(gm: fx.GraphModule) -> tuple[list[AnySite], list[Refusal]]:
    """Every BN node of ``gm``: a foldable site or a refusal; and every branch sum
    that merges into one conv (:class:`~bnfold.torch_front.program.sites.MergeSite`,
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
              batch_norm(add | cat(linear ops)) into every term (a join site).
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
            result = _match_bn(gm, node)
            if isinstance(result, Site):
                sites.append(result)
            else:
                refused.append(result)
    return sites, refused


def _match_bn(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal:
    """One BN, asking the families in the order of :data:`bnfold.rules.precedence.ORDER`:
    after the op feeding it (also through a batch-merging reshape or a pool), as an
    identity term of a branch sum, after a join, before the op reading it."""
    result = _match(gm, bn)
    if isinstance(result, Refusal) and precedence.nothing_beside(result.code):
        result = why_not_tap(gm, bn) or result
    if isinstance(result, Refusal) and not precedence.about_the_bn(result.code):
        result = _match_join(gm, bn) or result
    if isinstance(result, Site) or precedence.about_the_bn(result.code):
        return result
    before = _match_before(gm, bn)
    if before is None or isinstance(before, Site):
        return before or result
    return precedence.explain_both(result, before)


def _match(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal:
    x = arg_node(bn.args[0])
    reader, between = bn, ""  # reader: what reads the linear op's output
    if _reshapes_linear(x):
        reader, between, x = x, _RESHAPE_OPS[x.target], arg_node(x.args[0])
    elif (pool := _pooled_conv(x)) is not None:
        reader, between, x = pool, pools.pool_name(pool), arg_node(pool.args[0])
    if not is_linear_op(x):
        return _why_not_linear(bn_path(bn), x)
    kind = _fold_kind(x, reader)
    site = adjacent_site(x, bn, between=between, kind=kind)
    if bn.target == aten.batch_norm.default and bn.args[5]:
        return site.refusal(Code.TRAINING_MODE, "batch_norm called with training=True")
    if bn.args[3] is None or bn.args[4] is None:
        return site.refusal(Code.NO_RUNNING_STATS, f"{site.bn} has no running statistics")
    merge = kind is FoldKind.BATCH_MERGE
    if found := check_linear(gm, x, reader, merge) or check_bn(gm, x, bn, reader, merge):
        return site.refusal(*found)
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


def _match_join(gm: fx.GraphModule, bn: fx.Node) -> Site | Refusal | None:
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
    site = join_site(terms, kind, bn)
    if found := check_join(gm, join, bn, terms):
        return site.refusal(*found)
    return site


def _join_terms(join: fx.Node) -> list[Any]:
    """What an add sums, or the tensors a cat joins."""
    if join.target == aten.cat.default:
        return list(join.args[0])  # type: ignore[arg-type]
    return list(join.args[:2])


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
    site = adjacent_site(reader, bn, between=between, before=True)
    if found := check_before(gm, reader, bn, out, between):
        return site.refusal(*found)
    return site


def _copies_values(pad: fx.Node) -> bool:
    """A reflect/replicate/circular pad: border values are copies, so they get the shift too.

    (An eager Conv with such a padding_mode exports as this pad and an unpadded conv.)
    """
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    return pad.target == aten.pad.default and mode in ("reflect", "replicate", "circular")


def _why_not_linear(bn_name: str, x: fx.Node) -> Refusal:
    """Why the BN cannot fold after ``x``, the op feeding it, which is no linear op
    (:func:`bnfold.rules.adjacent.why_unpaired`): the single-input chain back from
    ``x`` names what lies between when it reaches a linear op."""
    chain, linear = _chain_to_linear(x)
    feed = Feed(
        source=_source_name(x),
        nonlinear=is_nonlinear(str(x.target)),
        between=tuple(chain),
        linear="" if linear is None else linear_path(linear),
        affine=bn_name,
        through_nonlinear=any(map(is_nonlinear, chain)),
    )
    code, detail = why_unpaired(feed)
    return Refusal(site_label(feed.linear, bn_name) if feed.linear else bn_name, code, detail)


def _chain_to_linear(x: fx.Node, longest: int = 16) -> tuple[list[str], fx.Node | None]:
    """The ops of a single-input chain from ``x`` back to a linear op, nearest first,
    and that op; None when the chain ends (several inputs, a BN, a graph input) first."""
    chain: list[str] = []
    node = x
    while node.op == "call_function" and len(chain) < longest:
        if is_linear_op(node):
            return chain, node
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1 or node.target in BN_OPS:
            break
        chain.append(str(node.target))
        node = inputs[0]
    return chain, None


def _source_name(x: fx.Node) -> str:
    """How details name the node feeding a BN: its aten op, or the graph input."""
    return f"the graph input {x.target}" if x.op == "placeholder" else str(x.target)
