"""What two graphs say is worth comparing, read before anything runs.

Besides the outputs: each fold site (the value that carries its result in both
models), each continuous value feeding a discontinuous op (:mod:`bnfold.verification.cones`),
and the operands of a compared sum, whose scale a small difference of large
values is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.onnx_front.io import quiet_ir_logs
from bnfold.verification.cones import Cones, analyse
from bnfold.verification.tolerance import dtype_name
from bnfold.verification.verdict import SiteValue, TensorDiff
from bnfold.verification.wellformed import require_well_formed


@dataclass(frozen=True)
class Plan:
    """What the two graphs say is worth comparing, read before anything runs."""

    sites: list[SiteValue]
    cones: Cones
    frontier: list[str]  # continuous values feeding a jump (see Cones.frontier)
    every_site: bool  # every fold site is among ``sites``
    # A compared tensor computed as a sum or difference -> its computed operands.
    operands: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, ref_path: Path, new_path: Path, sites: Sequence[SiteValue] | None) -> Plan:
        """Read both models once; refuse a malformed original (see require_well_formed)."""
        ref_model, new_model = load_or_none(ref_path), load_or_none(new_path)
        if ref_model is not None:
            require_well_formed(ref_model.graph)
        if ref_model is not None and new_model is not None:
            require_same_interface(ref_model.graph, new_model.graph)
        compared = _comparable_sites(ref_model, new_model, sites)
        cones = analyse(ref_model) if ref_model is not None else Cones()
        # A value the fold removed (a BN parameter the exporter passed through
        # an Identity) has nothing to be compared with.
        in_fold = _producers(new_model.graph) if new_model is not None else {}
        frontier = sorted(v for v in cones.frontier if v in in_fold)
        # Without a fold report, every BN of the original gone from the fold is a
        # site; one whose value the fold no longer names (a fold before a Conv,
        # an identity tap) cannot be compared, and then the sites do not vouch.
        expected = len(sites) if sites is not None else _removed_batchnorms(ref_model, new_model)
        every = len(compared) == expected
        operands = {}
        if ref_model is not None:
            compared_names = [v.name for v in ref_model.graph.outputs if v.name] + frontier
            operands = _sum_operands(ref_model.graph, compared_names, set(in_fold))
        return cls(compared, cones, frontier, every, operands)

    @property
    def extra(self) -> list[str]:
        """The values both models must output besides their own outputs."""
        summed = [v for values in self.operands.values() for v in values]
        return [s.value for s in self.sites] + self.frontier + summed

    def rescale(self, diffs: dict[str, TensorDiff]) -> None:
        """Scale each sum or difference by its largest operand, not by itself.

        ``a - b`` of two large, nearly equal values carries the rounding errors
        of ``a`` and ``b``, which are relative to ``max|a|, max|b|``; measured
        against the small ``max|a - b|`` a correct fold would fail.
        """
        for name, values in self.operands.items():
            diff = diffs[name]
            largest = max(diffs[v].scale for v in values)
            if largest > diff.scale:
                diff.scale = largest
                diff.scaled_by = values


_SUM_OPS = frozenset({"Add", "Sub", "Sum"})


def _sum_operands(graph: ir.Graph, names: Sequence[str], in_fold: set[str]) -> dict[str, list[str]]:
    """For each of ``names`` made by Add/Sub/Sum: the operands both models compute."""
    wanted = set(names)
    out = {}
    for node in graph:
        if node.op_type not in _SUM_OPS or not node.outputs or node.outputs[0].name not in wanted:
            continue
        values = [
            v.name
            for v in node.inputs
            if v is not None and v.name in in_fold and v.producer() is not None
        ]
        if len(values) >= 2:
            out[node.outputs[0].name] = values  # type: ignore[index]
    return out


def _comparable_sites(
    ref: ir.Model | None, new: ir.Model | None, sites: Sequence[SiteValue] | None
) -> list[SiteValue]:
    """The sites whose value both main graphs compute (a later fold may have renamed one).

    Without a fold report (``sites`` None), a site is a BatchNormalization output
    of the original that the folded model computes with another op.
    """
    if ref is None or new is None:
        return []
    original, folded = _producers(ref.graph), _producers(new.graph)
    if sites is None:
        sites = [
            SiteValue(value, f"{node} (BatchNormalization)")
            for value, (op, node) in original.items()
            if op == "BatchNormalization" and folded.get(value, (op, ""))[0] != op
        ]
    return [
        replace(s, channel_axis=_channel_axis(new.graph, s.value))
        for s in sites
        if s.value in original and s.value in folded
    ]


# Where the output channels of the op now carrying a fold lie.
_CHANNEL_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": -1, "BatchNormalization": 1}


def _channel_axis(graph: ir.Graph, value: str) -> int | None:
    """The output-channel axis of the op computing ``value`` in ``graph`` (None: unknown)."""
    for node in graph:
        if any(v.name == value for v in node.outputs):
            return _CHANNEL_AXIS.get(node.op_type)
    return None


def require_same_interface(original: ir.Graph, folded: ir.Graph) -> None:
    """Refuse two models whose inputs or outputs differ in name, dtype or rank.

    Comparing them numerically would report a meaningless FAILED: this is a
    mistake in what was given (two unrelated models, say), so it is bad input.

    Raises:
        BnfoldError: "the interfaces differ: ..." naming each difference.
    """
    problems = _differences(
        "input", _interface(original.inputs, original), _interface(folded.inputs, folded)
    )
    problems += _differences("output", _interface(original.outputs), _interface(folded.outputs))
    if problems:
        raise BnfoldError(f"the interfaces differ: {'; '.join(problems)}")


def _interface(
    values: Sequence[ir.Value], graph: ir.Graph | None = None
) -> dict[str, tuple[str | None, int | None]]:
    """name -> (dtype, rank) of each value, None where unknown (initializers listed as
    inputs left out)."""
    skip = set(graph.initializers) if graph is not None else set()
    return {
        v.name: (
            _dtype_name(v.dtype) if v.dtype is not None else None,
            len(v.shape) if v.shape is not None else None,
        )
        for v in values
        if v.name and v.name not in skip
    }


def _dtype_name(dtype: ir.DataType) -> str:
    """``FLOAT`` -> ``"float32"``, as verification names dtypes elsewhere."""
    try:
        return dtype_name(dtype.numpy())
    except TypeError:  # strings and other types numpy has no dtype for
        return dtype.name.lower()


def _differences(
    kind: str,
    a: dict[str, tuple[str | None, int | None]],
    b: dict[str, tuple[str | None, int | None]],
) -> list[str]:
    out = [f"{kind} {n!r} only in the original" for n in a if n not in b]
    out += [f"{kind} {n!r} only in the folded model" for n in b if n not in a]
    for name in (n for n in a if n in b):
        (dtype_a, rank_a), (dtype_b, rank_b) = a[name], b[name]
        if None not in (dtype_a, dtype_b) and dtype_a != dtype_b:
            out.append(f"{kind} {name!r} is {dtype_a} vs {dtype_b}")
        if None not in (rank_a, rank_b) and rank_a != rank_b:
            out.append(f"{kind} {name!r} has rank {rank_a} vs {rank_b}")
    return out


def _removed_batchnorms(ref: ir.Model | None, new: ir.Model | None) -> int:
    """How many BatchNormalization outputs of the original no BN computes in the fold."""
    if ref is None or new is None:
        return 0
    folded = _producers(new.graph)
    return sum(
        1
        for value, (op, _) in _producers(ref.graph).items()
        if op == "BatchNormalization" and folded.get(value, ("", ""))[0] != op
    )


def _producers(graph: ir.Graph) -> dict[str, tuple[str, str]]:
    """Each value of the main graph, by name -> (op type, node name) computing it."""
    out = {v.name: ("", "") for v in graph.inputs if v.name}
    for node in graph:
        out.update({v.name: (node.op_type, node.name or "") for v in node.outputs if v.name})
    return out


def load_or_none(path: Path) -> ir.Model | None:
    """The model at ``path`` (external data mapped), or None: the runtimes will say why."""
    try:
        with quiet_ir_logs():
            return ir.load(path)
    except Exception:  # onnx/protobuf raise assorted types
        return None
