"""Refuse an original whose main graph cannot be evaluated as written: bad input, not a fold."""

from __future__ import annotations

import onnx_ir as ir

from bnfold.errors import BnfoldError


def require_well_formed(graph: ir.Graph) -> None:
    """Refuse an original whose main graph cannot be evaluated as written.

    Raises:
        BnfoldError: the graph has no outputs (nothing to compute or compare), a
            node reads a value nothing defines, or reads one a later node computes
            (a cycle, or nodes out of order).
    """
    if not graph.outputs:
        raise BnfoldError("the original model has no graph outputs: nothing to compute")
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    later = {v.name for node in graph for v in node.outputs if v.name}
    for node in graph:
        for value in node.inputs:
            if value is None or not value.name or value.name in defined:
                continue
            where = f"node {node.name or node.op_type!r} reads {value.name!r}"
            if value.name in later:
                raise BnfoldError(
                    f"the original model is malformed: {where} before it is computed "
                    "(a cycle, or nodes out of order)"
                )
            raise BnfoldError(f"the original model is malformed: {where}, which nothing defines")
        defined.update(v.name for v in node.outputs if v.name)
