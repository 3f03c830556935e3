"""Rule: a BatchNorm after an Add or a channel Concat of linear ops.

Matches:  BatchNormalization(Add(L_a(x_a), L_b(x_b))) and
          BatchNormalization(Concat(L_a(x_a), L_b(x_b), ..., axis=1)), each L a
          Conv, ConvTranspose or Gemm with constant weights (inputs may differ).
Produces: ``s * (a + b) + t = (s * a + t) + (s * b)``: the BN's scale folds into
          every op of the Add and its shift into the first op's bias; for a
          Concat, each op takes the BN channels it produces. The Add/Concat
          stays and takes over the BN's output name.
Refuses:
  NOT_LINEAR_TERM  an input of the Add/Concat is not such a linear op (a pool,
                   a graph input, a MatMul, which has no bias slot, or the same
                   op twice)
  BRANCHING        an op's output, or the Add/Concat's, has other readers
  NOT_PER_CHANNEL  the Concat is not over axis 1 (or its rank is unknown)
  BAD_SHAPE        the ops' channels do not add up to (or, for Add, equal) the BN's
  and the codes of every after-fold (NOT_CONSTANT, BAD_VALUES, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx_ir as ir

from bnfold.onnx_front.constants import is_constant
from bnfold.onnx_front.folded import DeferredWeight
from bnfold.onnx_front.graph_edit import splice_out, write_linear_fold
from bnfold.onnx_front.rules.base import (
    Direction,
    FoldPlan,
    LinearOp,
    MatchOptions,
    batchnorm_affine,
    describe_linear,
    label,
    make_plan,
    names,
    require_single_consumer,
)
from bnfold.onnx_front.shapes import Shapes
from bnfold.report import Code, Folded, FoldKind
from bnfold.rules.family import Refused
from bnfold.rules.join import JoinSpec, axis_refusal
from bnfold.sites import Site

JOIN_OPS = frozenset({"Add", "Concat"})
# Ops whose bias slot takes the folded shift; channels on axis 1 like the BN's.
TERM_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})


@dataclass(frozen=True)
class JoinFold:
    """A checked fold of one BN into every linear op of an Add/Concat, ready to apply."""

    bn: ir.Node
    join: ir.Node
    plans: tuple[FoldPlan, ...]

    @property
    def entries(self) -> list[Folded]:
        ops = [p.linear.node for p in self.plans]
        site = replace(join_site(self.join, self.bn), linears=names(*ops))
        pattern = "+".join([*(n.op_type for n in ops), self.join.op_type, "BatchNormalization"])
        added = sum(p.bytes_added for p in self.plans)
        # The BN's output name passes to the join: verification compares it.
        return [site.folded(pattern, added, value=self.bn.outputs[0].name or "")]

    def apply(self, model: ir.Model) -> None:
        """Write every op's weight and bias, then remove the BN."""
        for plan in self.plans:
            write_linear_fold(plan, model)
        splice_out(self.bn, self.join.outputs[0])


def plan_through_join(
    bn: ir.Node, ir_version: int, options: MatchOptions, hold: Callable[[DeferredWeight], bool]
) -> JoinFold | None:
    """Plan the fold of ``bn`` into the ops of the Add/Concat feeding it; None if none does.

    Raises:
        Refused: a precondition fails (see the module docstring).
    """
    join = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if join is None or join.op_type not in JOIN_OPS or join.domain not in ("", "ai.onnx"):
        return None
    if join.op_type == "Add" and any(v is None or is_constant(v, ir_version) for v in join.inputs):
        return None  # a bias Add of a constant: the after rule's business
    require_single_consumer(join)
    shape = _join_shape(join, ir_version)
    Refused.check(axis_refusal(shape))
    terms = _linear_terms(join, ir_version, options)
    spec = replace(shape, channels=tuple(t.channels for t in terms))
    if not spec.widths_agree():
        raise Refused(Code.BAD_SHAPE, f"the Add's ops have {list(spec.channels)} channels")
    parts = spec.parts(batchnorm_affine(bn, spec.bn_channels, ir_version))
    site = join_site(join, bn)
    plans = tuple(
        make_plan(site, Direction.AFTER, term, bn, join, part, options.rounding, hold)
        for term, part in zip(terms, parts, strict=True)
    )
    return JoinFold(bn, join, plans)


def join_site(join: ir.Node, bn: ir.Node) -> Site:
    """The site of a BN after ``join``, before its linear ops are known ("join -> bn")."""
    kind = FoldKind.OVER_ADD if join.op_type == "Add" else FoldKind.OVER_CONCAT
    return Site(kind, bn=label(bn), join=label(join))


def _join_shape(join: ir.Node, ir_version: int) -> JoinSpec:
    """The join as the join rule reads it, before its terms' channels are known."""
    if join.op_type == "Add":
        return JoinSpec(f"Add {label(join)!r}", "add", ())
    shapes = Shapes(ir_version)
    rank = shapes.rank(join.outputs[0]) or shapes.rank(join.inputs[0])
    axis = join.attributes.get_int("axis", 1)
    return JoinSpec(f"Concat {label(join)!r}", "cat", (), axis, rank)


def _linear_terms(join: ir.Node, ir_version: int, options: MatchOptions) -> list[LinearOp]:
    """The linear op behind every input of ``join``, each read by ``join`` alone."""
    terms: list[LinearOp] = []
    for value in join.inputs:
        producer = None if value is None else value.producer()
        if producer is None or producer.op_type not in TERM_OPS:
            what = (
                "a graph input" if producer is None else f"{producer.op_type} {label(producer)!r}"
            )
            raise Refused(
                Code.NOT_LINEAR_TERM,
                f"{join.op_type} {label(join)!r} reads {what}, not a Conv, ConvTranspose or Gemm",
            )
        if any(t.node is producer for t in terms):
            raise Refused(Code.NOT_LINEAR_TERM, f"{label(producer)!r} is read twice")
        linear = describe_linear(producer, ir_version, options)
        require_single_consumer(producer)
        terms.append(linear)
    return terms
