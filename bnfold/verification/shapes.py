"""Sizes for the dynamic dimensions of random inputs: sizes that make the model compute.

A dynamic dimension fed as 1 can leave a model nothing to do: a text detector fed a
1x1 image outputs exact zeros, which agree with any fold, and a Pad or Resize may
refuse an input of size 1. So the batch is 2 (which also catches a fold that mixes
samples) and every other dynamic dimension the smallest size of :data:`LADDER` at
which each strided, pooling or wider-than-1 kernel still sees more than one
position, as ONNX shape inference reads the model's strides and pools. Dimensions
that share a name (``dim_param``) share a size.

Which dimension is which, for unnamed ones: the first axis of an input of rank 2 or
more is a batch, and so is the second of a rank-3+ input (a recurrent state's
batch; channels are static in practice); the rest (image height and width, a
sequence) are extents. :func:`choices` lists the shapes to try, best first: the
driver keeps the first the model runs on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bnfold.verification.inputs import InputSpec

BATCH = 2
LADDER = (32, 64, 128, 256, 512)
# Initializers and Constant tensors up to this many elements stay in the copy
# shape inference reads: shapes, axes and pads that data propagation needs.
_KEPT_ELEMENTS = 4096
_SPATIAL_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


@dataclass(frozen=True)
class ShapeChoice:
    """Concrete shapes for the inputs with dynamic dimensions, and how they were chosen."""

    shapes: dict[str, list[int]]
    note: str = ""


def choices(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]], model: Any
) -> list[ShapeChoice]:
    """The shapes to try for ``specs``, best first (one choice when nothing is dynamic).

    Args:
        specs: the inputs, as the runtime reports them.
        given: the user's ``--shape`` per input: kept as they are.
        model: the original as an ``onnx.ModelProto`` (weights may be absent),
            for shape inference; None sizes by the ladder alone.
    """
    given_shapes = {name: list(shape) for name, shape in given.items()}
    dims = _dynamic_dims(specs, given)
    if not dims:
        return [ShapeChoice(given_shapes)]
    batches = {symbol for symbol, kind in dims.values() if kind == "batch"}
    extents = {symbol for symbol, _ in dims.values()} - batches
    if not extents:
        return [
            _choice(specs, given_shapes, dims, {s: b for s in batches}, f"batch {b}")
            for b in (BATCH, 1)
        ]
    seen = {r: _fewest_positions(model, _sized(specs, given_shapes, dims, r)) for r in LADDER}
    order = _ladder_order(seen)
    out = []
    for r in order:
        sizes = {**{s: BATCH for s in batches}, **{s: r for s in extents}}
        out.append(
            _choice(specs, given_shapes, dims, sizes, _note(BATCH, r, seen[r], bool(batches)))
        )
    first = order[0]
    sizes = {**{s: 1 for s in batches}, **{s: first for s in extents}}
    if batches:
        out.append(_choice(specs, given_shapes, dims, sizes, _note(1, first, seen[first], True)))
    return out


def _dynamic_dims(
    specs: Sequence[InputSpec], given: Mapping[str, Sequence[int]]
) -> dict[tuple[str, int], tuple[str, str]]:
    """(input, axis) -> (symbol, "batch" or "extent") for every dynamic dim the user left open."""
    out: dict[tuple[str, int], tuple[str, str]] = {}
    for spec in specs:
        if spec.name in given:
            continue
        rank = len(spec.dims)
        for axis, dim in enumerate(spec.dims):
            if dim is not None:
                continue
            named = spec.symbols[axis] if axis < len(spec.symbols) else None
            symbol = named or f"{spec.name}:{axis}"
            batch = (rank >= 2 and axis == 0) or (rank >= 3 and axis == 1)
            out[(spec.name, axis)] = (symbol, "batch" if batch else "extent")
    # A name shared with a batch dimension is a batch wherever it appears.
    batches = {symbol for symbol, kind in out.values() if kind == "batch"}
    return {
        key: (symbol, "batch" if symbol in batches else kind) for key, (symbol, kind) in out.items()
    }


def _sized(
    specs: Sequence[InputSpec],
    given: dict[str, list[int]],
    dims: dict[tuple[str, int], tuple[str, str]],
    extent: int,
) -> dict[str, list[int]]:
    sizes = {symbol: BATCH if kind == "batch" else extent for symbol, kind in dims.values()}
    return _choice(specs, given, dims, sizes, "").shapes


def _choice(
    specs: Sequence[InputSpec],
    given: dict[str, list[int]],
    dims: dict[tuple[str, int], tuple[str, str]],
    sizes: Mapping[str, int],
    note: str,
) -> ShapeChoice:
    shapes = dict(given)
    for spec in specs:
        if spec.name in given or all(d is not None for d in spec.dims):
            continue
        shapes[spec.name] = [
            d if d is not None else sizes[dims[(spec.name, axis)][0]]
            for axis, d in enumerate(spec.dims)
        ]
    return ShapeChoice(shapes, note)


def _ladder_order(seen: dict[int, int | None]) -> list[int]:
    """Sizes where every spatial op sees more than one position (or none could be read)
    first, smallest first; then the rest, most positions first."""
    good = [r for r, fewest in seen.items() if fewest is None or fewest > 1]
    rest = sorted((r for r in seen if r not in good), key=lambda r: -(seen[r] or 0))
    return good + rest


def _note(batch: int, extent: int, fewest: int | None, has_batch: bool) -> str:
    head = f"batch {batch}, " if has_batch else ""
    if fewest is None:
        why = "shape inference could not tell: the first size the model runs on"
    elif fewest > 1:
        why = "every strided or pooling op sees more than one position"
    else:
        why = f"the most positions the ladder gives: {max(fewest, 0)} at the deepest op"
    return f"{head}other dynamic dims {extent}: {why}"


def _fewest_positions(model: Any, shapes: Mapping[str, list[int]]) -> int | None:
    """The fewest positions any spatial op's input has with inputs of ``shapes``.

    None when shape inference cannot tell (no model, a failure, no such op with
    known dims). A size shape inference finds impossible counts as 0.
    """
    if model is None:
        return None
    import onnx

    skeleton = _with_input_shapes(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # an input too small for a kernel, say: this size cannot run
        return 0
    counts = list(_positions(inferred.graph, {}))
    return min(counts) if counts else None


def _positions(graph: Any, outer: dict[str, list[int | None]]) -> Iterator[int]:
    """Positions seen by each spatial op whose input dims are all known, subgraphs included."""
    known = dict(outer)
    for info in [*graph.input, *graph.value_info, *graph.output]:
        known[info.name] = _dims_of(info)
    for node in graph.node:
        if node.op_type in _SPATIAL_OPS and _looks_around(node, known):
            dims = known.get(node.input[0]) or []
            if len(dims) >= 3 and all(d is not None for d in dims[2:]):
                yield math.prod(dims[2:])  # type: ignore[arg-type]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _positions(sub, known)


def _looks_around(node: Any, known: dict[str, list[int | None]]) -> bool:
    """The op combines several positions: a kernel or a stride above 1."""
    attrs = {a.name: list(a.ints) for a in node.attribute}
    kernel = attrs.get("kernel_shape")
    if kernel is None and node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        weight = known.get(node.input[1]) or []
        kernel = [d or 1 for d in weight[2:]]
    return any(k > 1 for k in (kernel or [])) or any(s > 1 for s in attrs.get("strides", []))


def _dims_of(info: Any) -> list[int | None]:
    shape = info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _with_input_shapes(model: Any, shapes: Mapping[str, list[int]]) -> Any:
    """A copy of ``model`` without its large tensors, its inputs set to ``shapes``.

    Large initializers and Constant tensors become typed graph inputs: shape
    inference needs their dims, not their values, and copying a model's weights
    for each size would cost as much as the model.
    """
    from onnx import helper

    graph = model.graph
    inputs = [_sized_input(i, shapes.get(i.name)) for i in graph.input]
    listed = {i.name for i in inputs}
    kept, weights = [], []
    for tensor in graph.initializer:
        if _elements(tensor.dims) <= _KEPT_ELEMENTS:
            kept.append(tensor)
        elif tensor.name not in listed:
            weights.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    nodes = []
    for node in graph.node:
        big = _large_constant(node)
        if big is not None:
            weights.append(helper.make_tensor_value_info(node.output[0], big.data_type, big.dims))
        else:
            nodes.append(node)
    skeleton = helper.make_graph(nodes, graph.name, inputs + weights, list(graph.output), kept)
    out = helper.make_model(skeleton, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _sized_input(info: Any, shape: list[int] | None) -> Any:
    if shape is None:
        return info
    from onnx import helper

    tensor = info.type.tensor_type
    return helper.make_tensor_value_info(info.name, tensor.elem_type, shape)


def _large_constant(node: Any) -> Any:
    """The tensor of a Constant node holding more than a few elements, else None."""
    if node.op_type != "Constant":
        return None
    for attr in node.attribute:
        if attr.name == "value" and _elements(attr.t.dims) > _KEPT_ELEMENTS:
            return attr.t
    return None


def _elements(dims: Sequence[int]) -> int:
    return math.prod(dims) if dims else 1


def inference_problem(model: Any) -> str | None:
    """What strict ONNX shape inference finds wrong with ``model`` as declared, or None.

    It tells a malformed model (a Conv weight of the wrong rank, BatchNorm
    parameters of the wrong length) from one whose inputs were merely not ones
    it accepts; custom-domain ops it does not know pass.
    """
    import onnx

    from bnfold.errors import first_line

    try:
        onnx.shape_inference.infer_shapes(
            _with_input_shapes(model, {}), strict_mode=True, data_prop=True
        )
    except Exception as err:  # onnx raises its own InferenceError and others
        return first_line(err)
    return None
