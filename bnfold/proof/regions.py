"""Prove one changed region: both pieces, evaluated as maps of the region's inputs.

Each side of a region (the original's changed nodes, the folded model's) is evaluated
over the prover's values (:mod:`bnfold.proof.ops`) from the region's boundary inputs,
each an identity map on a layout read off how the region uses it. A value both sides
compute under one name is compared as soon as it is reached; when equal it becomes a
boundary input for what follows ("a cut"), so a region holding two folds in series
(Conv -> BN -> Conv -> BN) is proven fold by fold. The region is proven when every value
read outside it (by an unchanged node or as a graph output) is proven equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import onnx_ir as ir

from bnfold.proof import dims
from bnfold.proof.certificate import SiteProof
from bnfold.proof.coefs import Coefs
from bnfold.proof.diff import Region
from bnfold.proof.dims import Dim
from bnfold.proof.equivalence import ULP_LIMIT, Verdict, compare
from bnfold.proof.graphs import Scope, Shapes
from bnfold.proof.ops import OPS, Arg, Opaque, OpContext
from bnfold.proof.stencil import Stencil
from bnfold.proof.values import (
    Affine,
    Axis,
    Const,
    Layout,
    Pooled,
    Role,
    Unsupported,
    Value,
    feature_count,
)

LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
POOL_OPS = frozenset({"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"})


class FoldedLike(Protocol):
    """What the prover reads of one ``report.Folded`` (names only; read-only, as a frozen
    record has them)."""

    @property
    def site(self) -> str: ...

    @property
    def linear(self) -> str: ...

    @property
    def affine(self) -> str: ...

    @property
    def value(self) -> str: ...

    @property
    def kind(self) -> object: ...


class LoweredLike(Protocol):
    @property
    def site(self) -> str: ...


class ReportLike(Protocol):
    """A fold report, read for site names only, never trusted for correctness."""

    @property
    def folded(self) -> Sequence[FoldedLike]: ...

    @property
    def lowered(self) -> Sequence[LoweredLike]: ...


# -- boundary inputs --------------------------------------------------------------------


@dataclass
class _Need:
    """What one reader requires of an input: a rank, and roles/sizes of some axes."""

    rank: int | None
    axes: dict[int, tuple[Role, int | None]]


def _const_shape(scope: Scope, value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or not value.name or not scope.is_const(value.name):
        return None
    tensor = scope.stored_tensor(value.name)
    if tensor is not None:
        return tuple(int(d) for d in tensor.shape.numpy())
    return tuple(scope.const_array(value.name).shape)


def _reader_need(node: ir.Node, index: int, scope: Scope, rank: int | None) -> _Need:
    """How ``node`` reads its input ``index`` (the roles its semantics give each axis)."""
    op = node.op_type
    ins = list(node.inputs)
    if op in ("Conv", "ConvTranspose") and index == 0:
        w = _const_shape(scope, ins[1] if len(ins) > 1 else None)
        if w is None:
            return _Need(rank, {})
        groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
        channels = w[1] * groups if op == "Conv" else w[0]
        spatial = {a: (Role.SPACE, None) for a in range(2, len(w))}
        return _Need(len(w), {0: (Role.BATCH, None), 1: (Role.FEATURE, channels), **spatial})
    if op in POOL_OPS and index == 0 and rank is not None:
        spatial = {a: (Role.SPACE, None) for a in range(2, rank)}
        return _Need(rank, {0: (Role.BATCH, None), 1: (Role.FEATURE, None), **spatial})
    if op == "BatchNormalization" and index == 0:
        scale = _const_shape(scope, ins[1] if len(ins) > 1 else None)
        size = scale[0] if scale else None
        return _Need(rank, {0: (Role.BATCH, None), 1: (Role.FEATURE, size)})
    if op == "Gemm" and index == 0:
        b = _const_shape(scope, ins[1])
        trans = "transB" in node.attributes and node.attributes["transB"].value
        k = None if b is None or len(b) != 2 else (b[1] if trans else b[0])
        return _Need(2, {0: (Role.BATCH, None), 1: (Role.FEATURE, k)})
    if op == "MatMul" and index == 0 and rank is not None:
        b = _const_shape(scope, ins[1])
        if b is not None and len(b) == 2:
            batch = {a: (Role.BATCH, None) for a in range(rank - 1)}
            return _Need(rank, {**batch, rank - 1: (Role.FEATURE, b[0])})
    if op in ("Add", "Sub", "Mul", "Div") and rank is not None:
        partner = ins[1 - index] if len(ins) == 2 else None
        other = _const_shape(scope, partner)
        if other is not None:
            full = (1,) * (rank - len(other)) + other[-rank:] if rank else ()
            return _Need(rank, {a: (Role.FEATURE, n) for a, n in enumerate(full) if n > 1})
        if op in ("Add", "Sub") and partner is not None and _windowed(partner, scope):
            # A residual sum: the input takes the roles of the window output it is added to.
            spatial = {a: (Role.SPACE, None) for a in range(2, rank)}
            return _Need(rank, {0: (Role.BATCH, None), 1: (Role.FEATURE, None), **spatial})
    return _Need(rank, {})


WINDOWED_OPS = frozenset({"Conv", "ConvTranspose", "AveragePool", "MaxPool"})
"""Ops whose output is ``[batch, channels, space...]`` with the spatial axes a window slid over."""

# The per-channel ops a windowed value may pass through and keep its axes.
_CHANNEL_OPS = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div", "Identity"})


def _windowed(value: ir.Value, scope: Scope, depth: int = 8) -> bool:
    """Whether ``value`` is a window's output, through per-channel ops (a few at most)."""
    node = scope.producer(value.name) if value.name else None
    for _ in range(depth):
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in WINDOWED_OPS:
            return True
        if node.op_type not in _CHANNEL_OPS:
            return False
        computed = [
            v for v in node.inputs if v is not None and v.name and not scope.is_const(v.name)
        ]
        if not computed:
            return False
        node = scope.producer(computed[0].name or "")
    return False


def _merge_role(name: str, axis: int, roles: set[Role]) -> Role | None:
    if not roles:
        return None
    if len(roles) == 1:
        return roles.pop()
    if roles == {Role.BATCH, Role.SPACE}:
        return Role.BATCH if axis == 0 else Role.SPACE
    names = "/".join(sorted(r.value for r in roles))
    raise Unsupported(f"input {name!r} is read with axis {axis} as {names}")


def input_layout(
    name: str, readers: list[tuple[ir.Node, int, Scope]], known: tuple[Dim | None, ...] | None
) -> Layout:
    """The layout of a boundary input: each axis's role from the ops that read it.

    Axes no reader constrains: axis 0 is BATCH, a static axis FEATURE (a map may mix
    it), a dynamic one SPACE (pointwise, with the identity window).
    """
    rank = None if known is None else len(known)
    needs = [_reader_need(node, i, scope, rank) for node, i, scope in readers]
    if rank is None:
        ranks = {n.rank for n in needs if n.rank is not None}
        if len(ranks) != 1:
            raise Unsupported(f"the rank of input {name!r} is unknown")
        rank = ranks.pop()
    sizes: list[Dim | None] = list(known) if known is not None else [None] * rank
    axes: list[Axis] = []
    frame = 0
    for axis in range(rank):
        roles = {n.axes[axis][0] for n in needs if axis in n.axes}
        hinted = [n.axes[axis][1] for n in needs if axis in n.axes and n.axes[axis][1] is not None]
        size: Dim | None = (
            sizes[axis] if sizes[axis] is not None else (hinted[0] if hinted else None)
        )
        role = _merge_role(name, axis, roles)
        if role is None:
            role = (
                Role.BATCH if axis == 0 else Role.FEATURE if isinstance(size, int) else Role.SPACE
            )
        if size is None:
            size = dims.named(f"{name}:{axis}")
        if role is Role.SPACE:
            axes.append(Axis(role, size, frame))
            frame += 1
        else:
            axes.append(Axis(role, size))
    return tuple(axes)


def _identity_source(name: str, layout: Layout) -> Affine:
    features = feature_count(layout)
    rank = sum(a.role is Role.SPACE for a in layout)
    return Affine(layout, {name: Stencil.identity(features, rank)}, Coefs.zeros((features,)))


def _as_source(name: str, value: Value) -> Value:
    """A proven-equal value as a fresh boundary input (its own spatial frames)."""
    if isinstance(value, Affine | Pooled):
        frame = 0
        axes = []
        for a in value.layout:
            if a.role is Role.SPACE:
                axes.append(Axis(a.role, a.size, frame))
                frame += 1
            else:
                axes.append(Axis(a.role, a.size))
        return _identity_source(name, tuple(axes))
    return value


# -- evaluating one side -----------------------------------------------------------------


class _Side:
    """One side of a region, evaluated lazily, value by value."""

    def __init__(self, scope: Scope, nodes: list[ir.Node], track_units: bool) -> None:
        self.scope = scope
        self.producers = {v.name: n for n in nodes for v in n.outputs if v.name}
        self.sources: dict[str, Value] = {}
        self.memo: dict[str, Arg] = {}
        self.ctx = OpContext(track_units, scope.opset)

    def value(self, name: str) -> Value:
        got = self._arg(name)
        if isinstance(got, Opaque):
            raise Unsupported(got.reason)
        assert got is not None
        return got

    def _arg(self, name: str) -> Arg:
        if name in self.sources:
            return self.sources[name]
        if name in self.memo:
            return self.memo[name]
        if self.scope.is_const(name):
            return Const(self.scope.const_array(name))
        node = self.producers.get(name)
        if node is None:
            raise Unsupported(f"{name!r} is not computed here")
        self._run(node)
        return self.memo[name]

    def _run(self, node: ir.Node) -> None:
        label = f"{node.op_type} {node.name!r}" if node.name else node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise Unsupported(
                f"{label}: custom op {node.domain}::{node.op_type} in a changed region"
            )
        transfer = OPS.get(node.op_type)
        if transfer is None:
            raise Unsupported(f"{label}: the prover has no semantics for {node.op_type}")
        args = [self._arg(v.name) if v is not None and v.name else None for v in node.inputs]
        results = transfer(node, args, self.ctx)
        for out, result in zip(node.outputs, results, strict=False):
            if out.name:
                self.memo[out.name] = result


# -- one region -----------------------------------------------------------------------------


ELEMENTWISE = frozenset(
    {"BatchNormalization", "Add", "Sub", "Mul", "Div", "Neg", "Identity", "Dropout", "Sum"}
)
"""Ops that keep their input's axes: who reads their output reads the input's layout."""


def _readers(name: str, nodes: list[ir.Node]) -> list[tuple[ir.Node, int]]:
    """The nodes reading ``name``, and through elementwise ops, those reading their output."""
    found: list[tuple[ir.Node, int]] = []
    pending, seen = [name], {name}
    while pending:
        current = pending.pop()
        for node in nodes:
            for i, v in enumerate(node.inputs):
                if v is None or v.name != current:
                    continue
                found.append((node, i))
                out = node.outputs[0].name if node.outputs else ""
                if node.op_type in ELEMENTWISE and out and out not in seen:
                    seen.add(out)
                    pending.append(out)
    return found


@dataclass
class _Outcome:
    verdict: Verdict
    compared: list[str]
    failed: list[str]


def _signature(node: ir.Node) -> tuple[object, ...]:
    """A node as the fold may not change it: op, name, wiring, attributes (not constants)."""
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    wiring = tuple(v.name if v is not None else None for v in node.inputs)
    return (
        node.domain,
        node.op_type,
        node.name,
        wiring,
        tuple(v.name for v in node.outputs),
        attrs,
    )


def nothing_folded(region: Region) -> bool:
    """Both sides are the same nodes, only constants differ: no op was removed or added."""
    return sorted(map(repr, map(_signature, region.original))) == sorted(
        map(repr, map(_signature, region.folded))
    )


def replaced_ops(region: Region) -> list[str]:
    """Nodes computing the same outputs with another op or other attributes."""
    by_outputs = {tuple(v.name for v in n.outputs): n for n in region.original}
    found = []
    for node in region.folded:
        twin = by_outputs.get(tuple(v.name for v in node.outputs))
        # The fold itself hands an affine's output to the linear op: only ops outside
        # what a fold rewrites are suspicious when swapped.
        if twin is None or twin.op_type in OPS or node.op_type in OPS:
            continue
        if twin.op_type != node.op_type:
            found.append(f"{_node_name(twin)}: {twin.op_type} became {node.op_type}")
    return found


def _prove(region: Region, original: Scope, folded: Scope, shapes: Shapes) -> _Outcome:
    # Rounding excuses only values a fold computed: where no op was folded, exactly equal.
    limit = 0.0 if nothing_folded(region) else ULP_LIMIT
    side_o = _Side(original, region.original, track_units=False)
    side_f = _Side(folded, region.folded, track_units=True)
    unbound = _bind_inputs(region, side_o, side_f, shapes)
    if unbound is not None:
        return _Outcome(unbound, [], [])
    both = {v.name for n in region.folded for v in n.outputs if v.name}
    order = [v.name for n in region.original for v in n.outputs if v.name]
    candidates = [n for n in order if n in both or n in region.outputs]
    candidates += [n for n in region.outputs if n not in candidates]
    verdict = Verdict(True)
    failed: list[str] = []
    for name in candidates:
        try:
            result = compare(side_o.value(name), side_f.value(name), limit)
        except Unsupported as exc:
            result = Verdict.unmodelled(str(exc))
        if name in region.outputs:
            if not result.proven:
                result.reason = f"{name}: {result.reason}"
                failed.append(name)
            verdict = verdict.merged(result)
        elif result.proven:
            verdict.worst_ulp = max(verdict.worst_ulp, result.worst_ulp)
            verdict.coefficients += result.coefficients
            verdict.notes += result.notes
        if result.proven:
            source = _as_source(name, side_o.value(name))
            side_o.sources[name] = side_f.sources[name] = source
            # What led here is proven: free its weights (memory stays one site's worth).
            side_o.memo.clear()
            side_f.memo.clear()
            original.forget_all()
            folded.forget_all()
    _qualify(verdict, region, original, exact=limit == 0.0)
    return _Outcome(verdict, list(region.outputs), failed)


def _bind_inputs(region: Region, side_o: _Side, side_f: _Side, shapes: Shapes) -> Verdict | None:
    """Give each boundary input of ``region`` the same free source on both sides; the
    verdict that ends the proof when an input cannot be one (else None)."""
    original, folded = side_o.scope, side_f.scope
    for name in region.inputs:
        if original.is_const(name) != folded.is_const(name):
            return Verdict.failed(f"{name!r} is a constant in only one model")
        readers = [(n, i, original) for n, i in _readers(name, region.original)]
        readers += [(n, i, folded) for n, i in _readers(name, region.folded)]
        try:
            layout = input_layout(name, readers, shapes.dims(name, original))
        except Unsupported as exc:
            return Verdict.unmodelled(str(exc))
        side_o.sources[name] = side_f.sources[name] = _identity_source(name, layout)
    return None


def _qualify(verdict: Verdict, region: Region, original: Scope, exact: bool) -> None:
    """What the region's structure adds to a verdict reached by comparing its maps."""
    if (
        not verdict.proven
        and not verdict.unsupported
        and (dependent := _dependent_inputs(region, original))
    ):
        # The maps were compared as if the inputs were free: one is an affine function
        # of another (a reflect pad of x beside x), so weight moved between them can
        # leave the function unchanged. No difference is established.
        verdict.unsupported = True
        verdict.reason = f"{verdict.reason} (but {dependent}: the inputs are not independent)"
    if not verdict.proven and (replaced := replaced_ops(region)):
        # An op swapped for another is a difference, whether or not either is modelled.
        verdict.reason = f"{'; '.join(replaced)} ({verdict.reason})"
        verdict.unsupported = False
    if exact and verdict.proven and verdict.coefficients:
        verdict.notes.append("no op folded here: the maps are equal exactly")


# Ops no affine function passes through: a boundary input computed through one of them
# from another cannot trade weight with it (x and relu(x) are independent enough).
_BREAKS_DEPENDENCE = frozenset([
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "mish",
    "softmax", "_softmax", "log_softmax", "clamp", "clamp_min", "max_pool1d", "max_pool2d",
    "max_pool3d", "max_pool2d_with_indices", "leakyrelu", "clip", "maxpool", "globalmaxpool",
])  # fmt: skip


def _breaks_dependence(node: ir.Node) -> bool:
    op = node.op_type.lower()
    short = op.split(".")[1] if op.startswith("aten.") else op
    return short in _BREAKS_DEPENDENCE


def _dependent_inputs(region: Region, scope: Scope, depth: int = 64) -> str:
    """``"'b' is computed from 'a'"`` when one boundary input of ``region`` is, in the
    unchanged graph, computed from another through no nonlinear op (within ``depth``
    nodes); "" when none is."""
    inputs = set(region.inputs)
    for name in region.inputs:
        seen: set[str] = set()
        frontier = [name]
        for _ in range(depth):
            if not frontier:
                break
            node = scope.producer(frontier.pop())
            if node is None or _breaks_dependence(node):
                continue
            for value in node.inputs:
                if value is None or not value.name or value.name in seen:
                    continue
                if value.name in inputs:
                    return f"{name!r} is computed from {value.name!r}"
                seen.add(value.name)
                frontier.append(value.name)
    return ""


@dataclass
class RegionProof:
    """A region's site record, and which of its outputs failed (to grow it over)."""

    site: SiteProof
    failed: list[str]


def prove_region(
    region: Region,
    original: Scope,
    folded: Scope,
    shapes: Shapes,
    report: ReportLike | None = None,
) -> RegionProof:
    """Prove that both sides of ``region`` compute the same values for every input."""
    outcome = _prove(region, original, folded, shapes)
    name, kind = site_name(region, report)
    prefix = f"{original.path.lstrip('/')}: " if original.path else ""
    verdict = outcome.verdict
    if not region.outputs:
        verdict.notes.append("nothing outside the region reads it")
    site = SiteProof(
        name=prefix + name,
        kind=kind,
        proven=verdict.proven,
        worst_ulp=verdict.worst_ulp,
        reason=verdict.reason,
        unsupported=verdict.unsupported,
        coefficients=verdict.coefficients,
        original_nodes=[_node_name(n) for n in region.original],
        folded_nodes=[_node_name(n) for n in region.folded],
        values=outcome.compared,
        notes=verdict.notes,
    )
    return RegionProof(site, outcome.failed)


def evaluate(
    model: ir.Model, output: str, track_units: bool = False
) -> tuple[Value, dict[str, Layout]]:
    """What ``output`` computes, as the prover's value over the graph's inputs.

    For tests and debugging: the whole main graph is treated as one region whose
    boundary inputs are the graph inputs. Returns the value and each input's layout.
    """
    from bnfold.proof.graphs import main_scope

    scope = main_scope(model)
    shapes = Shapes(model)
    nodes = [n for n in scope.graph if not all(scope.is_const(v.name) for v in n.outputs if v.name)]
    side = _Side(scope, nodes, track_units)
    layouts: dict[str, Layout] = {}
    for value in scope.true_inputs():
        name = value.name or ""
        readers = [(n, i, scope) for n, i in _readers(name, nodes)]
        layouts[name] = input_layout(name, readers, shapes.dims(name, scope))
        side.sources[name] = _identity_source(name, layouts[name])
    return side.value(output), layouts


# -- names -----------------------------------------------------------------------------------


def _node_name(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({', '.join(v.name or '' for v in node.outputs)})"


def site_name(region: Region, report: ReportLike | None) -> tuple[str, str]:
    """A name and kind for the region: the report's site labels if it names its nodes,
    else the original's changed nodes in order."""
    names = {n.name or "" for n in region.original} | {n.name or "" for n in region.folded}
    # Programs from torch name calls "module.path/op#k": a report names modules.
    names |= {n.split("/")[0] for n in names if "/" in n}
    if report is not None:
        by_node = [f for f in report.folded if f.affine in names or f.linear in names]
        # A value name is a weaker key (bodies reuse names like "output"): a fallback.
        entries = by_node or [f for f in report.folded if f.value and f.value in region.outputs]
        labels = [f.site for f in entries]
        kinds = [str(getattr(f.kind, "value", f.kind)) for f in entries]
        for lowered in report.lowered:
            if lowered.site in names:
                labels.append(f"{lowered.site} (lowered)")
                kinds.append("lowered")
        if labels:
            return "; ".join(dict.fromkeys(labels)), ", ".join(dict.fromkeys(kinds))
    nodes = region.original or region.folded
    return " -> ".join(_node_name(n) for n in nodes), _infer_kind(region)


def _feeds_linear(node: ir.Node, region: Region) -> bool:
    outputs = {v.name for v in node.outputs}
    return any(
        n.op_type in LINEAR_OPS
        and n.inputs
        and n.inputs[0] is not None
        and n.inputs[0].name in outputs
        for n in region.original
    )


def _infer_kind(region: Region) -> str:
    if nothing_folded(region):
        return "not a fold"
    ops_o = [n.op_type for n in region.original]
    ops_f = [n.op_type for n in region.folded]
    linear_o = sum(op in LINEAR_OPS for op in ops_o)
    if not linear_o and "BatchNormalization" in ops_o:
        return "lowered"
    if any(op in POOL_OPS for op in ops_o):
        return "through_pool"
    if "Concat" in ops_o:
        return "over_concat"
    if linear_o > sum(op in LINEAR_OPS for op in ops_f):
        return "reparam"
    if linear_o >= 2 and ("Add" in ops_o or "Sum" in ops_o):
        return "over_add"
    if linear_o == 0:
        return "changed"
    if any(n.op_type == "BatchNormalization" and _feeds_linear(n, region) for n in region.original):
        return "before"
    return "adjacent"
