"""A sum of conv branches and identity BNs reading one input, in an exported
program's aten graph, merged into one conv.

Matches:  add(... add(conv_a(x), conv_b(x)) ..., batch_norm(x)), any tree of
          ``aten.add.Tensor`` / ``add_.Tensor`` (also ``v + 0``, which timm's
          MobileOne writes) whose leaves are conv{1,2,3}d / convolution nodes
          reading ``x``, batch_norm / _native_batch_norm_legit_no_training nodes
          of ``x`` itself, or ``x`` itself: RepVGG, MobileOne and RepGhost
          train-time blocks and RepViT's ``BN(conv(x) + conv1(x) + x)``. The
          branch BNs after each conv fold first (the adjacent fold, an earlier
          round), so here every conv term has a constant weight of its own. A
          batch_norm reading the sum alone folds into the merge.
Produces: one conv node (the first of the largest kernel) whose weight is the sum
          of every conv's kernel zero-padded, centred, to the largest, plus one
          centred tap per channel for each identity BN (its scale; 1 for a bare
          ``x``), and whose bias sums the biases and the BNs' shifts, then times a
          BN after the sum; the readers of the top add (or of that BN) read it.
          The other convs, the adds and the BNs go. Reported as one ``reparam``
          fold, one ``identity_tap`` per identity BN and an ``adjacent`` one for
          a BN after the sum, as the ONNX rule
          (:mod:`bnfold.onnx_front.rules.branch_sum`). Computed in float64 from
          the branches' exact values, cast once (balanced with ``--rounding
          balanced``).
Refuses (on each identity BN of the sum; a sum of convs alone is not a BN site):
  BRANCH_MISMATCH  the convs differ in strides, dilations, groups, channel counts
                   or dtype, a term's shape is not the sum's (a broadcast), or the
                   identity term needs stride 1 and as many input as output channels
  UNCENTRED_TAP    a smaller kernel or the identity tap would not sit centred in
                   the largest kernel with the padding it has
  BRANCHING        a term is also read outside the sum (or twice by one add)
  and the codes of reading a conv or BN: NOT_CONSTANT, UNSUPPORTED_DTYPE,
  NOT_PER_CHANNEL (an unbatched conv), TRAINING_MODE, NO_RUNNING_STATS,
  BAD_SHAPE, BAD_VALUES.

The sum is planned at its top add only: an add whose one reader is the add of a
larger branch sum leaves the merge to it, so each block merges once. A plain
residual ``conv(x) + x`` with no BN in or after it is left as built.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from bnfold.core.affine import Affine
from bnfold.core.cast import Unfoldable, balanced_over
from bnfold.core.geometry import ConvGeometry, per_axis, torch_pads
from bnfold.core.layouts import LayoutError
from bnfold.core.reparam import Branch, Tap, merge_branches
from bnfold.options import Rounding
from bnfold.report import Code, Folded, FoldKind, Refusal
from bnfold.rules.branch_sum import centred_in, identity_tap_misfit, same_geometry
from bnfold.rules.family import Refused as _Refused
from bnfold.torch_front.aten_graph import (
    BN_OPS,
    CONV_OPS,
    bn_affine,
    check_bn_node,
    check_stats,
    drop_unread_attrs,
    fetch,
    is_linear_op,
    item_source,
    layout_of,
    owner_path,
    remove_bn,
    replace_arg,
    traced_shape,
    uses_batch_stats,
)
from bnfold.torch_front.tensors import as_parameter, to_float64

aten = torch.ops.aten

_ADDS = (aten.add.Tensor, aten.add_.Tensor)


@dataclass(frozen=True)
class MergeSite:
    """A branch sum that merges, by node names (stable across fresh ``ep.module()`` copies)."""

    top_node: str
    survivor_node: str
    conv_nodes: tuple[str, ...]
    identity_nodes: tuple[str, ...]
    bare: int
    trailing_node: str | None
    survivor: str  # module paths, for the report
    convs: tuple[str, ...]
    identities: tuple[str, ...]
    trailing: str | None
    conv_op: str  # "conv2d", "convolution"

    @property
    def kind(self) -> FoldKind:
        return FoldKind.REPARAM

    @property
    def site(self) -> str:
        terms = [*self.convs, *self.identities] + ["x"] * self.bare
        return " + ".join(terms) + f" -> {self.top_node}"

    @property
    def bn_nodes(self) -> tuple[str, ...]:
        """The BN nodes the merge removes: the identities and a BN after the sum."""
        return self.identity_nodes + ((self.trailing_node,) if self.trailing_node else ())

    def entries(self, bytes_added: int) -> list[Folded]:
        """One ``identity_tap`` per identity BN, an ``adjacent`` BN after the sum, the merge."""
        conv, finder = self.survivor, "exported_program"
        taps = [
            Folded(f"{bn} -> {conv}", "batch_norm+add", conv, bn, finder,
                   kind=FoldKind.IDENTITY_TAP)
            for bn in self.identities
        ]  # fmt: skip
        if self.trailing is not None:
            site = f"{conv} -> {self.top_node} -> {self.trailing}"
            pattern = f"{self.conv_op}+add+batch_norm"
            taps.append(Folded(site, pattern, conv, self.trailing, finder))
        ops = [self.conv_op] * len(self.convs) + ["batch_norm"] * len(self.identities)
        pattern = "+".join([*ops, "add"])
        merge = Folded(
            self.site, pattern, conv, self.top_node, finder, bytes_added, kind=FoldKind.REPARAM
        )
        return [*taps, merge]

    def refusals(self, code: Code, detail: str) -> list[Refusal]:
        """The merge not made: one refusal per BN it would have removed (each BN left is
        named by one), or one for the sum when it has none."""
        sites = [f"{bn} -> {self.top_node}" for bn in self.identities]
        if self.trailing is not None:
            sites.append(f"{self.survivor} -> {self.top_node} -> {self.trailing}")
        return [Refusal(s, code, detail) for s in sites or [self.site]]


@dataclass(frozen=True)
class _Tree:
    """The adds of one sum and its leaves, grouped by kind, all reading ``source``."""

    adds: tuple[fx.Node, ...]  # top first
    convs: tuple[fx.Node, ...]
    identities: tuple[fx.Node, ...]  # BN nodes of ``source``
    source: fx.Node
    bare: int  # terms that are ``source`` itself, an identity of scale 1

    @property
    def has_identity(self) -> bool:
        return bool(self.identities) or self.bare > 0


@dataclass(frozen=True, eq=False)  # holds tensors: never compared
class _Merge:
    """A checked merge: the site, its nodes and the merged parameters, cast."""

    site: MergeSite
    tree: _Tree
    survivor: fx.Node
    trailing: fx.Node | None
    weight: nn.Parameter
    bias: nn.Parameter


def find_merges(gm: fx.GraphModule) -> list[MergeSite]:
    """Every branch sum of ``gm`` that merges, at its top add.

    A sum that does not merge is no site: its identity BNs report why
    (:func:`why_not_tap`).
    """
    merges = []
    for node in gm.graph.nodes:
        if not _is_sum(node):
            continue
        try:
            merge = _plan(gm, node, Rounding.NEAREST)
        except _Refused:
            continue
        if merge is not None:
            merges.append(merge.site)
    return merges


def why_not_tap(gm: fx.GraphModule, bn: fx.Node) -> Refusal | None:
    """The refusal of the branch sum ``bn`` is an identity term of, or None.

    None when ``bn`` is no identity term of a branch sum, or when the sum merges
    (the BN goes with it).
    """
    top = _top_add(bn)
    if top is None:
        return None
    try:
        tree = _sum_tree(top)
        if tree is not None and bn in tree.identities:
            _plan(gm, top, Rounding.NEAREST)
    except _Refused as refused:
        name = owner_path(bn.args[1:5]) or bn.name
        return Refusal(f"{name} -> {top.name}", refused.code, refused.detail)
    return None


def apply_merge(gm: fx.GraphModule, site: MergeSite, rounding: Rounding) -> int:
    """Merge ``site`` in place; the values are computed before anything changes.

    Returns:
        Bytes added by cloning the survivor's weight or bias for it (another node
        reads them too).

    Raises:
        Unfoldable: the sum no longer is the one ``site`` names (a fold it built
            on is not there), or the merged values overflow.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    top = nodes.get(site.top_node)
    try:
        merge = None if top is None else _plan(gm, top, rounding)
    except _Refused as refused:
        raise Unfoldable(f"{site.site}: {refused.detail}") from None
    if merge is None or merge.site != site:
        raise Unfoldable(f"{site.site}: the sum is no longer the one planned")
    return _rewrite(gm, merge)


def _rewrite(gm: fx.GraphModule, merge: _Merge) -> int:
    """The survivor computes the sum (or the BN after it); the rest of the tree goes."""
    tree, survivor = merge.tree, merge.survivor
    if merge.trailing is not None:
        remove_bn(gm, merge.trailing, survivor)
    else:
        tree.adds[0].replace_all_uses_with(survivor)
    for add in tree.adds:  # top first: each add's one reader is gone before it
        gm.graph.erase_node(add)
    for bn in tree.identities:
        remove_bn(gm, bn, tree.source)  # nothing reads it any more
    gone = [conv for conv in tree.convs if conv is not survivor]
    params = [a for conv in gone for a in conv.args[1:3] if isinstance(a, fx.Node)]
    for conv in gone:
        gm.graph.erase_node(conv)
    drop_unread_attrs(gm, params)
    path = merge.site.survivor
    added = replace_arg(gm, survivor, 1, merge.weight, f"{path}.weight")
    added += replace_arg(gm, survivor, 2, merge.bias, f"{path}.bias")
    gm.recompile()
    return added


def _plan(gm: fx.GraphModule, top: fx.Node, rounding: Rounding) -> _Merge | None:
    """The merge of the sum topped by ``top``; None if it is no branch sum to merge.

    Raises:
        _Refused: a precondition fails (see the module docstring).
    """
    tree = _sum_tree(top)
    if tree is None or (not tree.has_identity and len(tree.convs) < 2):
        return None
    if _defers_to_reader(top):
        return None
    for conv in tree.convs:
        _require_constant_conv(gm, conv)
    survivor = max(tree.convs, key=lambda c: int(np.prod(_kernel(gm, c))))
    trailing = _trailing_bn(gm, top, survivor)
    if tree.bare and not tree.identities and trailing is None:
        return None  # a plain residual around a conv: no BN to remove, left as built
    _require_same_geometry(gm, tree, survivor)
    try:
        weight, bias = _merged(gm, tree, survivor, None if trailing is None else trailing[1])
    except LayoutError as err:
        raise _Refused(Code.UNCENTRED_TAP, str(err)) from None
    layout = layout_of(survivor)
    like_w = fetch(gm, survivor.args[1])
    like_b = like_w if _bias(survivor) is None else fetch(gm, _bias(survivor))
    try:
        new_w = as_parameter(weight, like_w, balanced_over(layout, rounding))
        new_b = as_parameter(bias, like_b)
    except Unfoldable as err:
        raise _Refused(Code.BAD_VALUES, str(err)) from None
    site = _site(tree, survivor, None if trailing is None else trailing[0])
    return _Merge(site, tree, survivor, None if trailing is None else trailing[0], new_w, new_b)


def _site(tree: _Tree, survivor: fx.Node, trailing: fx.Node | None) -> MergeSite:
    def path(node: fx.Node, params: slice) -> str:
        return owner_path(node.args[params]) or node.name

    return MergeSite(
        top_node=tree.adds[0].name,
        survivor_node=survivor.name,
        conv_nodes=tuple(c.name for c in tree.convs),
        identity_nodes=tuple(b.name for b in tree.identities),
        bare=tree.bare,
        trailing_node=None if trailing is None else trailing.name,
        survivor=path(survivor, slice(1, 3)),
        convs=tuple(path(c, slice(1, 3)) for c in tree.convs),
        identities=tuple(path(b, slice(1, 5)) for b in tree.identities),
        trailing=None if trailing is None else path(trailing, slice(1, 5)),
        conv_op=_op_name(survivor),
    )


def _op_name(conv: fx.Node) -> str:
    """ "conv2d"; a decomposed ``convolution`` is named by its layout ("Conv")."""
    name = str(conv.target).split(".")[1]
    return str(layout_of(conv).op) if name == "convolution" else name


# --- the tree -----------------------------------------------------------------------


def _is_sum(node: fx.Node) -> bool:
    """An add of two computed values, or of one and a literal 0 (not a bias add)."""
    if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2:
        return False
    if node.kwargs.get("alpha", 1) != 1:
        return False
    computed = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
    return len(computed) == 2 or (len(computed) == 1 and _is_zero(node.args[1]))


def _is_zero(value: object) -> bool:
    return type(value) in (int, float) and value == 0


def _terms(add: fx.Node) -> list[fx.Node]:
    return [a for a in add.args if isinstance(a, fx.Node)]


def _sum_tree(add: fx.Node, pending: bool = False) -> _Tree | None:
    """The branch sum topped by ``add``, or None when its leaves do not all read one input.

    With ``pending``, a leaf may still be ``BN(conv(x))`` whose BN the adjacent
    fold removes this round: that is how an inner add sees that a larger sum
    will merge it.

    Raises:
        _Refused: BRANCHING, the leaves read one input but one is also read elsewhere.
    """
    if not _is_sum(add):
        return None
    adds: list[fx.Node] = []
    leaves: list[fx.Node] = []
    shared: list[fx.Node] = []
    bare: list[fx.Node] = []
    _collect(add, adds, leaves, shared, bare)
    _input_terms_are_bare(leaves, shared, bare, pending)
    convs = tuple(n for n in leaves if _is_conv(n))
    if not leaves or (not convs and not pending):
        return None
    source = _source_of(leaves[0], pending)
    if source is None or any(_source_of(n, pending) is not source for n in leaves):
        return None
    if any(v is not source for v in bare):
        return None
    if shared:
        raise _Refused(
            Code.BRANCHING, f"{shared[0].name}'s output is also read outside the sum at {add.name}"
        )
    identities = tuple(n for n in leaves if n.target in BN_OPS)
    return _Tree(tuple(adds), convs, identities, source, bare=len(bare))


def _input_terms_are_bare(
    leaves: list[fx.Node], shared: list[fx.Node], bare: list[fx.Node], pending: bool
) -> None:
    """Move a conv or BN leaf that the other leaves read to ``bare``: it is the sum's
    input ``x`` itself (RepViT's ``conv(x) + conv1(x) + x`` once the BN making ``x``
    has folded into the conv before it), which may well have other readers."""
    sources = [_source_of(n, pending) for n in leaves]
    for leaf in list(leaves):
        value = leaf if _is_conv(leaf) else _normalized(leaf)
        if value is not None and any(s is value for s in sources):
            leaves.remove(leaf)
            bare.append(value)
            if leaf in shared:
                shared.remove(leaf)


def _collect(
    add: fx.Node,
    adds: list[fx.Node],
    leaves: list[fx.Node],
    shared: list[fx.Node],
    bare: list[fx.Node],
) -> None:
    """Walk the adds below ``add``: conv and BN leaves to ``leaves``, other values to ``bare``.

    Leaves whose output is also read elsewhere go to ``shared`` too. An add that
    another node reads too is a value of its own (so no branch sum).
    """
    adds.append(add)
    for value in _terms(add):
        bn = _bn_of(value)
        if _is_sum(value) and _only_reader_is(value, add):
            _collect(value, adds, leaves, shared, bare)
        elif _is_conv(value) or bn is not None:
            leaf = value if bn is None else bn
            if not _only_reader_is(value, add):
                shared.append(leaf)
            leaves.append(leaf)
        else:
            bare.append(value)  # the sum's input itself, or no branch sum


def _bn_of(value: fx.Node) -> fx.Node | None:
    """The BN node whose normalized output ``value`` is, or None."""
    if value.op == "call_function" and value.target == aten.batch_norm.default:
        return value
    return item_source(value, BN_OPS)


def _normalized(bn: fx.Node) -> fx.Node | None:
    """The node carrying the BN's normalized output (the decomposed op's item 0)."""
    if bn.target == aten.batch_norm.default:
        return bn
    items = [u for u in bn.users if u.target is operator.getitem and u.args[1] == 0]
    return items[0] if len(items) == 1 else None


def _is_conv(node: fx.Node) -> bool:
    return is_linear_op(node) and node.target != aten.linear.default and _is_plain_conv(node)


def _is_plain_conv(node: fx.Node) -> bool:
    """A conv, not a transposed one (``convolution`` says which in its args)."""
    return CONV_OPS[node.target][0] == "conv" or (
        CONV_OPS[node.target][0] == "convolution" and not node.args[6]
    )


def _only_reader_is(value: fx.Node, reader: fx.Node) -> bool:
    """``reader`` alone reads ``value``, once (a graph output is read by the output node).

    A shape read (``reshape_as``) counts too: the merge removes the value it reads.
    """
    return list(value.users) == [reader] and reader.args.count(value) == 1


def _source_of(leaf: fx.Node, pending: bool) -> fx.Node | None:
    """What a leaf reads; with ``pending``, what the conv under a foldable BN reads."""
    source = leaf.args[0]
    if not isinstance(source, fx.Node):
        return None
    folds_later = (
        pending and leaf.target in BN_OPS and _is_conv(source) and _only_reader_is(source, leaf)
    )
    inner = source.args[0] if folds_later else source
    return inner if isinstance(inner, fx.Node) else None


def _sole_add_reader(add: fx.Node) -> fx.Node | None:
    readers = list(add.users)
    if len(readers) != 1 or not _only_reader_is(add, readers[0]):
        return None
    return readers[0] if _is_sum(readers[0]) else None


def _defers_to_reader(add: fx.Node) -> bool:
    """``add`` is an inner add of a larger branch sum, which merges it."""
    reader = _sole_add_reader(add)
    try:
        return reader is not None and _sum_tree(reader, pending=True) is not None
    except _Refused:  # the larger sum does not merge: this one may
        return False


def _top_add(bn: fx.Node) -> fx.Node | None:
    """The top of the add chain the BN's output goes into alone, or None."""
    out = _normalized(bn)
    if out is None:
        return None
    readers = list(out.users)
    if len(readers) != 1 or not _is_sum(readers[0]):
        return None
    add = readers[0]
    while (reader := _sole_add_reader(add)) is not None:
        add = reader
    return add


# --- the checks and the merged values -------------------------------------------------


def _require_constant_conv(gm: fx.GraphModule, conv: fx.Node) -> None:
    params = [a for a in conv.args[1:3] if a is not None]
    if not all(isinstance(p, fx.Node) and p.op == "get_attr" for p in params):
        raise _Refused(Code.NOT_CONSTANT, f"{conv.name} weight or bias is computed")
    weight = fetch(gm, conv.args[1])
    if not weight.is_floating_point():
        raise _Refused(Code.UNSUPPORTED_DTYPE, f"{conv.name} weight is {weight.dtype}")
    if len(traced_shape(conv)) != weight.ndim:
        raise _Refused(
            Code.NOT_PER_CHANNEL, f"{conv.name} runs unbatched: its channels are not on axis 1"
        )


def _trailing_bn(
    gm: fx.GraphModule, top: fx.Node, survivor: fx.Node
) -> tuple[fx.Node, Affine] | None:
    """The inference BN reading the sum alone, and its affine; None if none can fold.

    Folding it here rounds the merged kernel once; folding it after the merge
    would round it again.
    """
    readers = list(top.users)
    if len(readers) != 1 or readers[0].target not in BN_OPS:
        return None
    bn = readers[0]
    if bn.args[0] is not top or uses_batch_stats(bn) or bn.args[3] is None or bn.args[4] is None:
        return None
    if check_bn_node(bn) or check_stats(gm, bn, _channels(gm, survivor)):
        return None  # it stays, and says why when it is matched itself
    try:
        return bn, bn_affine(gm, bn)
    except Unfoldable:
        return None


def _identity_affine(gm: fx.GraphModule, bn: fx.Node, channels: int) -> Affine:
    """The affine of an identity BN term, or why it cannot be a tap."""
    if uses_batch_stats(bn):
        raise _Refused(Code.TRAINING_MODE, f"{bn.name} is called with training=True")
    if bn.args[3] is None or bn.args[4] is None:
        raise _Refused(Code.NO_RUNNING_STATS, f"{bn.name} has no running statistics")
    if found := check_bn_node(bn) or check_stats(gm, bn, channels):
        raise _Refused(*found)
    try:
        return bn_affine(gm, bn)
    except Unfoldable as err:
        raise _Refused(Code.BAD_VALUES, str(err)) from None


def _merged(
    gm: fx.GraphModule, tree: _Tree, survivor: fx.Node, after: Affine | None
) -> tuple[np.ndarray, np.ndarray]:
    """The merged kernel and bias in float64 (:func:`bnfold.core.reparam.merge_branches`):
    padded kernels and identity taps summed, ``after`` (a BN reading the sum) folded in.

    Raises:
        LayoutError: a kernel cannot be centred (:func:`bnfold.core.reparam.centred_kernel`).
    """
    shape = tuple(fetch(gm, survivor.args[1]).shape)
    channels = shape[0]
    branches = []
    for conv in tree.convs:
        _require_centred(gm, conv, survivor)
        conv_bias = _bias(conv)
        bias = None if conv_bias is None else to_float64(fetch(gm, conv_bias))
        branches.append(Branch(to_float64(fetch(gm, conv.args[1])), bias, np.ones(channels)))
    if tree.has_identity:
        _require_identity_fits(gm, survivor)
    # The bare terms first, as one tap: the order these merges have always summed in.
    taps = [Tap(np.full(channels, float(tree.bare)))] if tree.bare else []
    for bn in tree.identities:
        affine = _identity_affine(gm, bn, channels)
        taps.append(Tap(affine.scale, affine.shift))
    return merge_branches(shape, branches, taps, after=after)


def _bias(conv: fx.Node) -> fx.Node | None:
    bias = conv.args[2] if len(conv.args) > 2 else None
    return bias if isinstance(bias, fx.Node) else None


def _kernel(gm: fx.GraphModule, conv: fx.Node) -> tuple[int, ...]:
    return tuple(fetch(gm, conv.args[1]).shape[2:])


def _channels(gm: fx.GraphModule, conv: fx.Node) -> int:
    return int(fetch(gm, conv.args[1]).shape[0])


def _geometry(gm: fx.GraphModule, conv: fx.Node) -> ConvGeometry:
    """conv*d(x, w, b, stride=1, padding=0, dilation=1, groups=1) (padding may be
    "same"/"valid"), or convolution(x, w, b, stride, padding, dilation, transposed,
    output_padding, groups)."""
    shape = tuple(fetch(gm, conv.args[1]).shape)
    kernel = shape[2:]

    def arg(index: int, default: object) -> object:
        return conv.args[index] if len(conv.args) > index else default

    dilations = per_axis(arg(5, 1), len(kernel))
    groups = int(arg(8 if CONV_OPS[conv.target][0] == "convolution" else 6, 1))  # type: ignore[call-overload]
    return ConvGeometry(
        kernel=kernel,
        pads=torch_pads(arg(4, 0), kernel, dilations),
        strides=per_axis(arg(3, 1), len(kernel)),
        dilations=dilations,
        groups=groups,
        in_channels=shape[1] * groups,
        out_channels=shape[0],
    )


def _properties(gm: fx.GraphModule, conv: fx.Node) -> dict[str, object]:
    """What every conv of a sum must share, as this front names it."""
    geometry, weight = _geometry(gm, conv), fetch(gm, conv.args[1])
    return {
        "strides": geometry.strides,
        "dilations": geometry.dilations,
        "groups": geometry.groups,
        "weight rows and columns": tuple(weight.shape[:2]),
        "weight dtype": weight.dtype,
    }


def _require_same_geometry(gm: fx.GraphModule, tree: _Tree, survivor: fx.Node) -> None:
    terms = [(conv.name, _properties(gm, conv)) for conv in tree.convs]
    _Refused.check(same_geometry(terms, (survivor.name, _properties(gm, survivor))))
    shape = traced_shape(tree.adds[0])
    # a BN keeps its input's shape (and a decomposed one's node is a tuple)
    terms_read = [*tree.convs] + [tree.source] * tree.has_identity
    for term in terms_read:
        if not shape or traced_shape(term) != shape:
            raise _Refused(
                Code.BRANCH_MISMATCH,
                f"{term.name} is {traced_shape(term)}, the sum {shape}: a broadcast, not a merge",
            )


def _require_centred(gm: fx.GraphModule, conv: fx.Node, survivor: fx.Node) -> None:
    """Padding ``conv``'s kernel to the survivor's must grow its pads to the survivor's."""
    small, large = _geometry(gm, conv), _geometry(gm, survivor)
    _Refused.check(centred_in(small, large, conv.name, survivor.name))


def _require_identity_fits(gm: fx.GraphModule, survivor: fx.Node) -> None:
    """The identity reads x unpadded at stride 1 with as many inputs as outputs."""
    _Refused.check(identity_tap_misfit(_geometry(gm, survivor), survivor.name))
