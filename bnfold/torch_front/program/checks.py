"""Whether a matched ``.pt2`` site folds exactly: its linear op, its BN, a pool or
join between them, and before a linear op the shapes and the zero padding.

Each check returns ``(Code, detail)`` or None (:data:`~bnfold.torch_front.aten_graph.Found`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from bnfold import layouts
from bnfold.affine import Unfoldable
from bnfold.report import Code
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
    for term in terms:
        if not is_linear_op(term):
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.target}, not a conv or linear op"
        if terms.count(term) > 1:
            return Code.NOT_LINEAR_TERM, f"{join.name} reads {term.name} twice"
    for term in terms:
        if found := check_linear(gm, term, join, merge=False):
            return found
    if join.target == aten.cat.default:
        dim = int(join.args[1]) if len(join.args) > 1 else int(join.kwargs.get("dim", 0))  # type: ignore[arg-type]
        rank = len(traced_shape(join))
        if dim not in (1, 1 - rank):
            return Code.NOT_PER_CHANNEL, f"{join.name} joins axis {dim}, not the channels"
    channels = [out_channels(gm, t) for t in terms]
    if join.target == aten.add.Tensor and len(set(channels)) != 1:
        return Code.BAD_SHAPE, f"{join.name} sums ops of {channels} channels"
    total = sum(channels) if join.target == aten.cat.default else channels[0]
    return check_bn_node(bn) or check_stats(gm, bn, total)


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
    """The shift reaches the bias through every tap; zeros padded in never see it."""
    try:
        shift = bn_affine(gm, bn).shift
    except Unfoldable:
        return None  # apply_site reports it as BAD_VALUES
    if not np.any(shift != 0):
        return None
    if layout_of(lin).op == "ConvTranspose":
        return Code.ZERO_PADDING, "conv_transpose: border outputs receive fewer taps"
    if layout_of(lin).op == "Conv" and _zero_padded(lin):
        return Code.ZERO_PADDING, f"{lin.name} pads with zeros: the borders would see the shift"
    return None


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
        if not layouts.merges_leading_axes(bn_in, lin_out):
            detail = (
                f"{reader.name} maps {lin_out} to {bn_in}: the BN's {bn_in[1]} channels "
                f"are not the {lin_out[-1]} features"
            )
            return Code.MERGE_MOVES_CHANNEL, detail
        channels = bn_in[1]
    else:
        bn_in, lin_out = traced_shape(reader), traced_shape(lin)
        if layouts.channel_block(bn_in, lin_out) is None:
            detail = f"{reader.name} maps {lin_out} to {bn_in}: a channel would span BN channels"
            return Code.NOT_PER_CHANNEL, detail
        channels = bn_in[1]
    return check_stats(gm, bn, channels)
