"""Refuse an original whose graph cannot be evaluated as written: bad input, not a fold.

Two checks, both before anything runs: the main graph's dataflow (outputs exist,
every value read is defined before it is read) and each standard node's input
count against its operator schema. The second would otherwise surface as a
traceback from whichever pass or runtime first indexes the missing input.
"""

from __future__ import annotations

import onnx_ir as ir

from bnfold.errors import BnfoldError


def require_well_formed(graph: ir.Graph) -> None:
    """Refuse an original whose main graph cannot be evaluated as written.

    Raises:
        BnfoldError: the graph has no outputs (nothing to compute or compare), a
            node reads a value nothing defines, or reads one a later node computes
            (a cycle, or nodes out of order), or a standard node has more or fewer
            inputs than its operator takes.
    """
    if not graph.outputs:
        raise BnfoldError("the original model has no graph outputs: nothing to compute")
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx"))
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
        if opset is not None:
            _require_arity(node, opset)


def _require_arity(node: ir.Node, opset: int) -> None:
    """Refuse a standard node with more or fewer inputs than its schema at ``opset`` takes."""
    if node.domain not in ("", "ai.onnx"):
        return
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:  # an op onnx does not know: the runtime will say so
        return
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:  # trailing optional inputs left out
        inputs.pop()
    if schema.min_input <= len(inputs) <= schema.max_input:
        return
    takes = (
        str(schema.min_input)
        if schema.min_input == schema.max_input
        else f"{schema.min_input} to {schema.max_input}"
    )
    raise BnfoldError(
        f"the original model is malformed: node {node.name or node.op_type!r} "
        f"({node.op_type}) has {len(inputs)} inputs; opset {opset} takes {takes}"
    )
