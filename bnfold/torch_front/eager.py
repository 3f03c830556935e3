"""Check and apply one fold on eager modules.

A pair ``linear -> bn`` (or ``bn -> linear``, either possibly through a view,
flatten or (un)squeeze; after, also through a pool) becomes ``linear'`` with
the BN's affine in its weight and bias, and the BN is replaced by
``nn.Identity`` (or, for a BN that runs an activation or drop-out after its
affine, timm's ``BatchNormAct2d``, by those children: :mod:`bnfold.torch_front.norms`).
A BN after a join (:class:`~bnfold.torch_front.eager_pairs.JoinPair`)
folds into every linear module of it; an identity BN of a branch sum
(:class:`~bnfold.torch_front.eager_pairs.TapPair`) leaves ``x`` and puts the rest
into a sibling conv. New ``nn.Parameter`` objects are assigned (the old
tensors are never written), so a fold is undone by putting the old objects back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from torch import nn
from torch.nn.utils import parametrize

from bnfold.core.affine import (
    Affine,
    add_parts,
    after_factor,
    bn_to_affine,
    concat_parts,
    exact_after_bias,
    fold_after,
    fold_before,
)
from bnfold.core.cast import Unfoldable, balanced_over, product64, scaled
from bnfold.core.layouts import channel_block, merges_leading_axes
from bnfold.core.reparam import absorb_identity
from bnfold.options import Rounding
from bnfold.report import Code, FoldKind, Refusal
from bnfold.rules import batch_merge
from bnfold.rules.adjacent import stats_fit
from bnfold.rules.before import exact_before
from bnfold.rules.family import Found
from bnfold.rules.join import JoinSpec
from bnfold.rules.pool import commute_refusal
from bnfold.torch_front.eager_pairs import AnyPair, JoinPair, Pair, TapPair
from bnfold.torch_front.modules import (
    Calls,
    Roles,
    base_forward_overridden,
    channel_rank,
    in_channels,
    is_conv_transpose,
    layout_of,
    out_channels,
    zero_padded,
)
from bnfold.torch_front.norms import After, after_affine, kept_part
from bnfold.torch_front.site_graph import is_nonlinear
from bnfold.torch_front.tensors import (
    as_parameter,
    rounded_parameter,
    stored_values,
    to_float64,
)


def checked(root: nn.Module, pair: AnyPair, roles: Roles, calls: Calls) -> AnyPair | Refusal:
    """A structurally valid pair as it will fold, or the module-level reason it must not.

    The pair comes back with its ``kind`` (through a pool or a batch-merging
    reshape) and the BN children it ``kept`` (timm's act and drop, which stay).

    The module checks (training mode to dtype) apply to the BN and to every
    linear module of the pair; the shape checks to its kind.

    Refuses:
      TRAINING_MODE      the linear module or the BN is in training mode
      NO_RUNNING_STATS   track_running_stats=False or running_mean/var missing
      PARAMETRIZED       parametrized, tied or non-Parameter weight/bias, a module
                         registered at several paths, an overridden forward()
                         of the linear module, or a BN-like module with working
                         children whose forward is not its affine followed by
                         them, each once (:func:`bnfold.torch_front.norms.after_affine`)
      NONLINEAR_INPUT    before, or as an identity tap: the BN runs an activation
                         after its affine (OP_BETWEEN for other children)
      HOOKED             forward (pre-)hooks on either module
      UNSUPPORTED_DTYPE  the weight is not floating point
      BAD_SHAPE          BN statistics do not match the linear output channels, or
                         one another
      NOT_PER_CHANNEL    the linear output's channels are not on BN's axis 1
                         (e.g. Linear on a 3-D input followed by BatchNorm1d);
                         before: the BN's channels are not the op's input channels
                         (BatchNorm1d on a 3-D input into Linear); through a
                         reshape: a linear channel would span several BN channels
                         (see :func:`bnfold.layouts.channel_block`), or the
                         calls' shapes differ
      MERGE_MOVES_CHANNEL  a Linear on ``(B, N, K)`` reshaped to 2-D for a BN,
                         but not to ``(B*N, C)`` (see :func:`merges_batch`)
      ZERO_PADDING       before: a zero-padded Conv, or a ConvTranspose, with a
                         nonzero shift (the borders would change)
      POOL_PADDING       through an average pool that counts padded zeros or
                         has a divisor_override, and a nonzero shift
      NEGATIVE_SCALE     through a max pool, a negative scale in some channel
                         (see :func:`bnfold.rules.pool.commute_refusal`)
      NOT_PER_CHANNEL    also: a pool of a Linear's output, a cat not over axis 1
      BAD_SHAPE          also: an add of linear modules of different widths, or
                         their channels (summed for a cat) not the BN's
    """
    bn = _module(root, pair.bn)
    for linear in pair.linears:
        one, lin = Pair.of(linear, pair.bn, pair.finder), _module(root, linear)
        for check in (_training, _running_stats, _parametrized, _hooks, _dtype):
            if found := check(one, lin, bn, roles):
                return pair.refusal(*found)
    kept = kept_children(root, pair, calls)
    if isinstance(kept, tuple):
        return pair.refusal(*kept)
    if found := _shape_refusal(root, pair, bn, roles, calls):
        return pair.refusal(*found)
    if isinstance(pair, TapPair):
        return pair
    if isinstance(pair, Pair):
        return replace(pair, kind=fold_kind(root, pair, calls), kept=kept.children)
    return replace(pair, kept=kept.children)


def kept_children(root: nn.Module, pair: AnyPair, calls: Calls) -> After | tuple[Code, str]:
    """The BN's children that stay in its place when ``pair`` folds (timm's act and drop).

    They run after the BN's affine, so only a fold into the op before the BN
    keeps the forward: before the op after it, or as a term of a sum, they
    would sit between the affine and that op. BAD_SHAPE when the BN's tensors
    do not all hold one value per channel (a look-alike's forward may broadcast
    one value): it has no per-channel affine to look behind.
    """
    bn = _module(root, pair.bn)
    if found := _bn_shape(pair, bn):  # one value broadcast to every channel: no affine per channel
        return found
    try:
        affine = bn_affine(bn)
    except Unfoldable:
        return After()  # apply_fold reports it as BAD_VALUES
    shapes = calls.in_shapes.get(pair.bn) or set()  # any call shows what the module computes
    probe = min(shapes, key=lambda shape: (math.prod(shape), shape), default=None)
    after = after_affine(bn, affine, probe)
    if isinstance(after, tuple) or not after.children:
        return after
    if pair.before or isinstance(pair, TapPair):
        types = [type(bn.get_submodule(c)).__name__ for c in after.children]
        code = Code.NONLINEAR_INPUT if any(map(is_nonlinear, types)) else Code.OP_BETWEEN
        where = f"before {pair.linear}" if pair.before else "as a term of the sum"
        detail = (
            f"{pair.bn} runs {', '.join(types)} after its affine: {where}, they would "
            "sit between the affine and what reads it"
        )
        return code, detail
    return after


def _shape_refusal(root: nn.Module, pair: AnyPair, bn: Any, roles: Roles, calls: Calls) -> Found:
    """The checks of shapes and values each kind of pair needs."""
    if isinstance(pair, JoinPair):
        return _join_shapes(root, pair, bn, calls)
    lin = _module(root, pair.linear)
    one = Pair.of(pair.linear, pair.bn, pair.finder)
    if isinstance(pair, TapPair):  # the conv's geometry was checked when it was chosen
        return _shape(one, lin, bn, roles) or _out_rank(one, lin, calls)
    if pair.before:
        return _bn_shape(pair, bn) or _reads_channels(pair, lin, calls) or _exact_before(lin, bn)
    if pair.pool is not None:
        return _through_pool(pair, lin, bn, roles, calls)
    if pair.between:
        return _bn_shape(pair, bn) or _feeds_channels(pair, lin, calls)
    return _shape(pair, lin, bn, roles) or _out_rank(pair, lin, calls)


def _training(pair: Pair, lin: nn.Module, bn: nn.Module, _roles: Roles) -> Found:
    moving = [p for p, m in ((pair.linear, lin), (pair.bn, bn)) if m.training]
    return (Code.TRAINING_MODE, f"{', '.join(moving)} in training mode") if moving else None


def _running_stats(pair: Pair, _lin: nn.Module, bn: nn.Module, _roles: Roles) -> Found:
    if getattr(bn, "track_running_stats", True) is False:
        return Code.NO_RUNNING_STATS, f"{pair.bn} has track_running_stats=False"
    missing = [a for a in ("running_mean", "running_var") if getattr(bn, a, None) is None]
    return (Code.NO_RUNNING_STATS, f"{pair.bn} has no {', '.join(missing)}") if missing else None


def _hooks(pair: Pair, lin: nn.Module, bn: nn.Module, _roles: Roles) -> Found:
    for path, m in ((pair.linear, lin), (pair.bn, bn)):
        if m._forward_hooks or m._forward_pre_hooks:  # type: ignore[union-attr]
            return Code.HOOKED, f"{path} has forward hooks"
    return None


def _parametrized(pair: Pair, lin: nn.Module, bn: nn.Module, roles: Roles) -> Found:
    for path in (pair.linear, pair.bn):
        if len(roles.aliases.get(path, [path])) > 1:
            return Code.PARAMETRIZED, f"module registered at {', '.join(roles.aliases[path])}"
    if parametrize.is_parametrized(lin):
        return Code.PARAMETRIZED, f"{pair.linear} is parametrized"
    if base_forward_overridden(lin):
        return Code.PARAMETRIZED, f"{type(lin).__name__} overrides forward()"
    for name in ("weight", "bias"):
        if name not in lin._parameters:
            return Code.PARAMETRIZED, f"{pair.linear}.{name} is computed, not a Parameter"
    return _tied(pair, lin, roles)


def _tied(pair: Pair, lin: nn.Module, roles: Roles) -> Found:
    for p in lin.parameters(recurse=False):
        paths = roles.param_paths.get(id(p), [])
        if len(paths) > 1:
            return Code.PARAMETRIZED, f"weight tied: {', '.join(paths)}"
    return None


def _dtype(pair: Pair, lin: Any, _bn: nn.Module, _roles: Roles) -> Found:
    if not lin.weight.is_floating_point():
        return Code.UNSUPPORTED_DTYPE, f"{pair.linear}.weight is {lin.weight.dtype}"
    return None


def _shape(pair: Pair, lin: nn.Module, bn: nn.Module, _roles: Roles) -> Found:
    return _stats_fit(pair.bn, bn, out_channels(lin))


def _stats_fit(path: str, bn: nn.Module, c: int) -> Found:
    """The BN's parameters and statistics have ``c`` channels (:func:`stats_fit`)."""
    tensors = ((name, getattr(bn, name, None)) for name in _BN_TENSORS)
    return stats_fit(((f"{path}.{n}", tuple(t.shape)) for n, t in tensors if t is not None), c)


_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _through_pool(pair: Pair, lin: nn.Module, bn: Any, roles: Roles, calls: Calls) -> Found:
    """Conv -> pool -> BN: the pool keeps the conv's channels and commutes with the BN."""
    assert pair.pool is not None
    if isinstance(lin, nn.Linear):
        return Code.NOT_PER_CHANNEL, (
            f"{pair.between} pools {pair.linear}'s output along its last axis, the features"
        )
    if found := _shape(pair, lin, bn, roles) or _out_rank(pair, lin, calls):
        return found
    try:
        affine = bn_affine(bn)
    except Unfoldable:
        return None  # apply_fold reports it as BAD_VALUES
    return commute_refusal(pair.pool, affine)


def _join_shapes(root: nn.Module, pair: JoinPair, bn: Any, calls: Calls) -> Found:
    """Every term has its channels on axis 1; an add's widths agree, a cat joins axis 1."""
    lins = [_module(root, linear) for linear in pair.linears]
    for linear, lin in zip(pair.linears, lins, strict=True):
        if found := _out_rank(Pair.of(linear, pair.bn, pair.finder), lin, calls):
            return found
    channels = tuple(out_channels(lin) for lin in lins)
    kind: Literal["add", "cat"] = "cat" if pair.join == "cat" else "add"
    rank = channel_rank(lins[0])
    join = JoinSpec(f"the {kind} before {pair.bn}", kind, channels, pair.dim, rank)
    if not join.joins_channels():
        return Code.NOT_PER_CHANNEL, f"the cat before {pair.bn} joins axis {pair.dim}"
    if not join.widths_agree():
        detail = f"the add before {pair.bn} sums outputs of {list(channels)} channels"
        return Code.BAD_SHAPE, detail
    return _stats_fit(pair.bn, bn, join.bn_channels)


def _bn_shape(pair: AnyPair, bn: Any) -> Found:
    """The BN's tensors all have as many channels as its running mean."""
    return _stats_fit(pair.bn, bn, int(bn.running_mean.shape[0]))


def _out_rank(pair: Pair, lin: nn.Module, calls: Calls) -> Found:
    """After, directly: every call's output has the linear op's channels on axis 1."""
    ndims, want = calls.out_ndims(pair.linear), channel_rank(lin)
    if ndims != {want}:
        ranks = "/".join(str(n) for n in sorted(ndims)) or "?"
        detail = (
            f"{pair.linear} output is {ranks}-D; BN normalizes axis 1, "
            f"the channels only at {want}-D"
        )
        return Code.NOT_PER_CHANNEL, detail
    return None


def _reads_channels(pair: Pair, lin: nn.Module, calls: Calls) -> Found:
    """Before: each input channel of the linear op lies inside one BN channel."""
    bn_out, lin_in = calls.out_shape(pair.bn), calls.in_shape(pair.linear)
    if not pair.between and None not in (bn_out, lin_in) and bn_out != lin_in:
        return Code.NOT_PER_CHANNEL, f"{pair.bn} output is {bn_out}, {pair.linear} reads {lin_in}"
    return _channels_nest(pair, bn_out, lin_in, lin, in_channels(lin))


def _feeds_channels(pair: Pair, lin: nn.Module, calls: Calls) -> Found:
    """After, through a reshape: each output channel of the linear op lies inside one BN channel."""
    lin_out, bn_in = calls.out_shape(pair.linear), calls.in_shape(pair.bn)
    if bn_in is not None and lin_out is not None and merges_batch(pair, lin, calls):
        return _merge_keeps_channels(pair, bn_in, lin_out)
    return _channels_nest(pair, bn_in, lin_out, lin, out_channels(lin))


def fold_kind(root: nn.Module, pair: Pair, calls: Calls) -> FoldKind:
    """How a checked pair folds: THROUGH_POOL through a pool, BATCH_MERGE through a
    batch-merging reshape, else ADJACENT."""
    if pair.pool is not None:
        return FoldKind.THROUGH_POOL
    merged = merges_batch(pair, _module(root, pair.linear), calls)
    return FoldKind.BATCH_MERGE if merged else FoldKind.ADJACENT


def merges_batch(pair: Pair, lin: nn.Module, calls: Calls) -> bool:
    """An after pair ``Linear(x[B, N, K]) -> reshape to 2-D -> BN``: the batch-merge fold.

    Only ``nn.Linear`` keeps its channels last; a conv's are on axis 1.
    """
    lin_out, bn_in = calls.out_shape(pair.linear), calls.in_shape(pair.bn)
    if pair.before or not pair.between or pair.pool or not isinstance(lin, nn.Linear):
        return False
    if lin_out is None or bn_in is None:
        return False
    return merges_leading_axes(bn_in, lin_out) is not None


def _merge_keeps_channels(pair: Pair, bn_side: tuple[int, ...], lin_side: tuple[int, ...]) -> Found:
    """The 2-D reshape keeps the Linear's features as the BN's channels (last axis to axis 1)."""
    return batch_merge.shapes_refusal(
        bn_side, lin_side, pair.between, f"{pair.linear}'s {lin_side}"
    )


def _channels_nest(
    pair: Pair,
    bn_side: tuple[int, ...] | None,
    lin_side: tuple[int, ...] | None,
    lin: nn.Module,
    lin_channels: int,
) -> Found:
    """The BN's channels (axis 1 of ``bn_side``) are whole blocks of the linear op's."""
    if bn_side is None or lin_side is None:
        detail = f"shapes around {pair.site} unknown or different between calls"
        return Code.NOT_PER_CHANNEL, detail
    if len(lin_side) != channel_rank(lin):
        detail = (
            f"{pair.linear} sees {len(lin_side)}-D data; its channels are on axis 1 only at "
            f"{channel_rank(lin)}-D"
        )
        return Code.NOT_PER_CHANNEL, detail
    if lin_side[1] != lin_channels:
        return Code.BAD_SHAPE, f"{pair.linear} has {lin_channels} channels, its data {lin_side}"
    if channel_block(bn_side, lin_side) is None:
        source, target = (bn_side, lin_side) if pair.before else (lin_side, bn_side)
        detail = (
            f"{pair.between} maps {source} to {target}: a channel of {pair.linear} "
            "would span several BN channels"
        )
        return Code.NOT_PER_CHANNEL, detail
    return None


def _exact_before(lin: nn.Module, bn: Any) -> Found:
    """The shift enters the bias through every tap; zeros padded in never see it
    (:func:`bnfold.rules.before.exact_before`)."""
    try:
        shift = bn_affine(bn).shift
    except Unfoldable:
        return None  # apply_fold reports it as BAD_VALUES
    name, transposed = type(lin).__name__, is_conv_transpose(lin)
    return exact_before(
        shift, name, transposed=transposed, zero_padded=zero_padded(lin), affine_name="BN"
    )


# (module path, weight, bias) of one linear module a fold changed.
Params = tuple[str, nn.Parameter, nn.Parameter | None]


@dataclass
class Undo:
    """The objects a fold replaced; calling it puts them back."""

    root: nn.Module
    pair: AnyPair
    params: tuple[Params, ...]  # before the fold, per linear module it changed
    bn: nn.Module

    def __call__(self) -> None:
        for path, weight, bias in self.params:
            lin = _module(self.root, path)
            lin.weight, lin.bias = weight, bias
        _replace(self.root, self.pair.bn, self.bn)


def bn_affine(bn: Any) -> Affine:
    """The per-channel affine equal to ``bn`` at inference, in float64.

    ``weight``/``bias`` may be None (affine=False): then 1 and 0.

    Raises:
        Unfoldable: NaN/inf statistics or var + eps <= 0.
    """
    mean, var = to_float64(bn.running_mean), to_float64(bn.running_var)
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    gamma = np.ones_like(mean) if weight is None else to_float64(weight)
    beta = np.zeros_like(mean) if bias is None else to_float64(bias)
    return bn_to_affine(gamma, beta, mean, var, float(bn.eps))


def apply_fold(root: nn.Module, pair: AnyPair, rounding: Rounding = Rounding.NEAREST) -> Undo:
    """Fold ``pair.bn`` into the linear modules of ``pair`` inside ``root``.

    After or before one linear module (:class:`Pair`), into every term of a
    join (:class:`JoinPair`: the shares of :func:`bnfold.affine.add_parts` or
    :func:`bnfold.affine.concat_parts`), or as an identity tap into a conv
    (:class:`TapPair`, :func:`bnfold.affine.absorb_identity`). The math runs in
    float64 and each result is cast once to the dtype of the parameter it
    replaces (a created bias takes the weight's dtype); the weight as
    ``rounding`` says. Every value is computed before anything changes, so a
    raise leaves ``root`` as it was.

    Raises:
        Unfoldable: bad statistics, or folded values overflow the dtype.
        LayoutError: the channel count does not fit the weight (ConvTranspose
            groups), or a conv cannot take the tap.
    """
    bn = _module(root, pair.bn)
    affine = bn_affine(bn)
    if isinstance(pair, JoinPair):
        lins = [_module(root, linear) for linear in pair.linears]
        parts = (
            add_parts(affine, len(lins))
            if pair.join == "add"
            else concat_parts(affine, [out_channels(lin) for lin in lins])
        )
        new = [_after(lin, part, rounding) for lin, part in zip(lins, parts, strict=True)]
    elif isinstance(pair, TapPair):
        lin = _module(root, pair.linear)
        exact = absorb_identity(to_float64(lin.weight), _bias64(lin), affine, pair.sign)
        new = [_cast(lin, *exact, rounding)]
    elif pair.before:
        lin = _module(root, pair.linear)
        per_input = affine.spread(in_channels(lin))
        exact = fold_before(to_float64(lin.weight), _bias64(lin), per_input, layout_of(lin))
        new = [_cast(lin, *exact, rounding)]
    else:
        new = [_after(_module(root, pair.linear), affine, rounding)]
    paths = pair.linears
    old = tuple((p, _module(root, p).weight, _module(root, p).bias) for p in paths)
    for path, (weight, bias) in zip(paths, new, strict=True):
        lin = _module(root, path)
        lin.weight, lin.bias = weight, bias
    _replace(root, pair.bn, kept_part(bn, After(pair.kept)))
    return Undo(root, pair, old, bn)


def _after(lin: Any, affine: Affine, rounding: Rounding) -> tuple[nn.Parameter, nn.Parameter]:
    """The weight and bias of ``affine(lin(x))``, each rounded once to its dtype.

    The weight is scaled straight from its stored values in numpy's float64
    loop, rounding each product once into the weight's dtype: the same values
    as a float64 copy scaled and cast afterwards, without the copy or the
    cast. Its exact float64 value is computed only if a later fold of the same
    module asks (:func:`bnfold.torch_front.tensors.to_float64`). A weight a fold
    wrote before (its exact value is the one to start from) and a bfloat16 one
    take the float64 path.
    """
    per_output = affine.spread(out_channels(lin))
    layout, weight = layout_of(lin), lin.weight
    stored = stored_values(weight)
    if stored is None:
        exact = fold_after(to_float64(weight), _bias64(lin), per_output, layout)
        return _cast(lin, *exact, rounding)
    factor = after_factor(per_output, layout, tuple(stored.shape))
    new_weight = scaled(stored, factor, balanced_over(layout, rounding))
    bias = as_parameter(
        exact_after_bias(_bias64(lin), per_output), like=weight if lin.bias is None else lin.bias
    )
    return rounded_parameter(new_weight, weight, lambda: product64(stored, factor)), bias


def _bias64(lin: Any) -> np.ndarray | None:
    return None if lin.bias is None else to_float64(lin.bias)


def _cast(
    lin: Any, w64: np.ndarray, b64: np.ndarray, rounding: Rounding
) -> tuple[nn.Parameter, nn.Parameter]:
    """The one cast of a folded weight and bias to the parameters' dtypes."""
    weight, bias = lin.weight, lin.bias
    balance = balanced_over(layout_of(lin), rounding)
    return as_parameter(w64, like=weight, balance=balance), as_parameter(
        b64, like=weight if bias is None else bias
    )


def _module(root: nn.Module, path: str) -> Any:
    """A submodule, typed Any: BN-like modules are read duck-typed."""
    return root.get_submodule(path)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path), name, new)
