"""Whether a matched ``.pt2`` site folds exactly: its linear op, its BN, a pool or
join between them, and before a linear op the shapes and the zero padding.

Each check returns ``(Code, detail)`` or None (:data:`~bnfold.torch_front.aten_graph.Found`).
"""

from __future__ import annotations

import torch
from torch import fx

from bnfold import layouts
from bnfold.affine import Unfoldable
from bnfold.report import Code
from bnfold.rules.batch_merge import shapes_refusal
from bnfold.rules.before import exact_before
from bnfold.rules.join import JoinSpec, axis_refusal
from bnfold.torch_front import pools
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    Found,
    arg_node,
    bn_affine,
    check_bn_node,
    check_stats,
    fetch,
    is_linear_op,
    layout_of,
    traced_shape,
)
from bnfold.torch_front.site_graph import metadata_only_inputs

aten = torch.ops.aten


def check_pool(gm: fx.GraphModule, pool: fx.Node, bn: fx.Node) -> Found:
    """``pool(BN(y)) == BN(pool(y))`` (:func:`bnfold.torch_front.pools.check_pool`)."""
    try:
        affine = bn_affine(gm, bn)
    except Unfoldable:
        return None  # apply_site reports it as BAD_VALUES
    return pools.check_pool(pool, affine)


def check_join(gm: fx.GraphModule, join: fx.Node, bn: fx.Node, terms: list[fx.Node]) -> Found:
    """Every term a linear op of its own that only the join reads; the join over the
    channels with widths that agree (:mod:`bnfold.rules.join`); the BN's statistics
    of the joined channel count."""
    for term in terms:
        if not is_linear_op(term):
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.target}, not a conv or linear op"
        if terms.count(term) > 1:
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.name} twice"
    for term in terms:
        if found := check_linear(gm, term, join, merge=False):
            return found
    spec = _join_spec(gm, join, terms)
    if found := axis_refusal(spec):
        return found
    if not spec.widths_agree():
        return Code.BAD_SHAPE, f"{join.name} sums ops of {list(spec.channels)} channels"
    return check_bn_node(bn) or check_stats(gm, bn, spec.bn_channels)


def _join_spec(gm: fx.GraphModule, join: fx.Node, terms: list[fx.Node]) -> JoinSpec:
    """An add or cat node as the join rule reads it (:class:`bnfold.rules.join.JoinSpec`)."""
    channels = tuple(out_channels(gm, t) for t in terms)
    if join.target != aten.cat.default:
        return JoinSpec(join.name, "add", channels)
    dim = join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0)
    return JoinSpec(join.name, "cat", channels, int(dim), len(traced_shape(join)))  # type: ignore[arg-type]


def out_channels(gm: fx.GraphModule, lin: fx.Node) -> int:
    return layout_of(lin).out_channels(tuple(fetch(gm, lin.args[1]).shape))


def check_before(
    gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, out: fx.Node, between: str
) -> Found:
    params = [a for a in lin.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return Code.NOT_CONSTANT, f"{lin.name} weight or bias is computed"
    stats = bn.args[1:5]
    if not all(s is None or (isinstance(s, fx.Node) and s.op == "get_attr") for s in stats):
        return Code.NOT_CONSTANT, f"{bn.name} parameters are computed"
    weight = fetch(gm, lin.args[1])
    if not weight.is_floating_point():
        return Code.UNSUPPORTED_DTYPE, f"weight is {weight.dtype}"
    return _check_before_shapes(gm, lin, bn, out, between) or _check_exact_before(gm, lin, bn)


def _check_before_shapes(
    gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, out: fx.Node, between: str
) -> Found:
    shape = traced_shape(out)
    # Directly (or through a reflect pad, which keeps channels) the op reads the BN's
    # output as is; through a reshape, compare with what the op reads.
    lin_in = traced_shape(arg_node(lin.args[0])) if between else shape
    weight_shape = tuple(fetch(gm, lin.args[1]).shape)
    if len(shape) < 2:
        return Code.NOT_PER_CHANNEL, f"{bn.name} output shape {shape} has no channel axis"
    if len(lin_in) != len(weight_shape):
        detail = f"{lin.name} input is {len(lin_in)}-D; it reads channels on axis 1"
        return Code.NOT_PER_CHANNEL, f"{detail} only at {len(weight_shape)}-D"
    features = layout_of(lin).in_channels(weight_shape)
    if features != lin_in[1]:
        return Code.BAD_SHAPE, f"{lin.name} reads {features} input features, its input is {lin_in}"
    if layouts.channel_block(shape, lin_in) is None:
        detail = f"{between} maps {shape} to {lin_in}: a channel would span BN channels"
        return Code.NOT_PER_CHANNEL, detail
    return check_stats(gm, bn, shape[1])


def _check_exact_before(gm: fx.GraphModule, lin: fx.Node, bn: fx.Node) -> Found:
    """The shift reaches the bias through every tap; zeros padded in never see it
    (:func:`bnfold.rules.before.exact_before`)."""
    try:
        shift = bn_affine(gm, bn).shift
    except Unfoldable:
        return None  # apply_site reports it as BAD_VALUES
    op = layout_of(lin).op
    padded = op == "Conv" and _zero_padded(lin)
    return exact_before(
        shift, lin.name, transposed=op == "ConvTranspose", zero_padded=padded, affine_name="BN"
    )


def _zero_padded(conv: fx.Node) -> bool:
    """conv*(x, w, b, stride, padding, ...) / convolution(...): padding is args[4]."""
    padding = conv.args[4] if len(conv.args) > 4 else 0
    if isinstance(padding, str):
        return padding != "valid"
    values = padding if isinstance(padding, list | tuple) else [padding]
    return any(int(p) != 0 for p in values)  # type: ignore[arg-type]


def check_linear(gm: fx.GraphModule, lin: fx.Node, reader: fx.Node, merge: bool) -> Found:
    """The linear op: read only by ``reader`` (the BN or a reshape), constant weights.

    Its channels must be on axis 1, unless ``merge`` (a batch-merging reshape
    brings its last axis there; :func:`check_bn` checks that).
    """
    readers = [u for u in lin.users if u is not reader and lin not in metadata_only_inputs(u)]
    if readers:
        return Code.BRANCHING, f"{lin.name} output also read by {[u.name for u in readers]}"
    values_read = pools.value_readers(reader)  # a max pool's indices are not its values
    if reader.target not in BN_OPS and len(values_read) != 1:
        return Code.BRANCHING, f"{reader.name} output also read by {len(values_read) - 1} more"
    params = [a for a in lin.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        return Code.NOT_CONSTANT, f"{lin.name} weight or bias is computed"
    weight = fetch(gm, lin.args[1])
    if not weight.is_floating_point():
        return Code.UNSUPPORTED_DTYPE, f"weight is {weight.dtype}"
    out = lin.meta.get("val")
    if not merge and (out is None or out.ndim != weight.ndim):
        ndim = None if out is None else out.ndim
        return Code.NOT_PER_CHANNEL, f"{lin.name} output is {ndim}-D; channels must be on axis 1"
    return None


def check_bn(gm: fx.GraphModule, lin: fx.Node, bn: fx.Node, reader: fx.Node, merge: bool) -> Found:
    """The BN: only its normalized output read, constant statistics of its channel count."""
    if found := check_bn_node(bn):
        return found
    if reader is bn or pools.is_pool(reader):  # a pool keeps every channel
        channels = layout_of(lin).out_channels(tuple(fetch(gm, lin.args[1]).shape))
        if reader is not bn and (found := check_pool(gm, reader, bn)):
            return found
    elif merge:
        bn_in, lin_out = traced_shape(reader), traced_shape(lin)
        if found := shapes_refusal(bn_in, lin_out, reader.name, str(lin_out)):
            return found
        channels = bn_in[1]
    else:
        bn_in, lin_out = traced_shape(reader), traced_shape(lin)
        if layouts.channel_block(bn_in, lin_out) is None:
            detail = f"{reader.name} maps {lin_out} to {bn_in}: a channel would span BN channels"
            return Code.NOT_PER_CHANNEL, detail
        channels = bn_in[1]
    return check_stats(gm, bn, channels)
