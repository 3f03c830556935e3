"""Which parts of two graphs differ: unchanged nodes, changed regions, other differences.

The regions come from the two graphs alone, never from a fold report. Nodes are matched
by their output names (each value has one producer in a graph); a pair is unchanged
when op, domain, name, attributes, input and output names are equal and every constant
input holds the same bytes. If/Loop/Scan bodies are diffed recursively: a node whose
only difference is inside its bodies is unchanged here, and its bodies' regions are
proven in their own scope.

Constants are not nodes to match: an initializer, a ``Constant`` or a constant
subexpression (a weight's Transpose, say) is a value, compared by content wherever an
unchanged node reads it. Every other node left unmatched on either side is changed;
changed nodes connected through a value (on one side, or across sides by a shared
output name) form one region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from bnfold.proof.graphs import Scope, same_tensor, subgraphs


@dataclass
class Region:
    """One connected set of changed nodes: what the fold replaced, and with what."""

    original: list[ir.Node]
    folded: list[ir.Node]
    inputs: list[str] = field(default_factory=list)  # boundary values (not constants)
    outputs: list[str] = field(default_factory=list)  # values read outside the region


@dataclass
class BodyPair:
    """Matching If/Loop/Scan bodies, diffed on their own."""

    original: Scope
    folded: Scope
    diff: GraphDiff


@dataclass
class GraphDiff:
    """The diff of one graph of the original and the folded model."""

    path: str
    unchanged: int = 0
    regions: list[Region] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    bodies: list[BodyPair] = field(default_factory=list)
    twins: list[tuple[ir.Node, ir.Node]] = field(default_factory=list)  # unchanged pairs
    index: dict[str, _ReadIndex] = field(default_factory=dict)

    def grown(
        self, region: Region, failed: list[str], original: Scope, folded: Scope
    ) -> Region | None:
        """``region`` grown over the unchanged nodes that read ``failed`` outputs.

        A fold can change a value that an unchanged node reads under the same name (a
        flatten after a conv whose BN folded behind it; a partial sum of branches that
        only add up to the same map): the region then has to take those readers in,
        with every region they connect to, and be proven as one. Returns None when
        nothing modelled reads the failed outputs. The grown region takes ``region``'s
        place in ``regions``; the regions merged into it leave the list.
        """
        from bnfold.proof.ops import OPS

        absorbed = [
            (o, f)
            for o, f in self.twins
            if o.op_type in OPS and o.domain in ("", "ai.onnx")
            and any(v is not None and v.name in failed for v in o.inputs)
        ]  # fmt: skip
        if not absorbed:
            return None
        grown = Region(
            region.original + [o for o, _ in absorbed], region.folded + [f for _, f in absorbed]
        )
        self.twins = [t for t in self.twins if t not in absorbed]
        self.regions[self.regions.index(region)] = grown
        self._merge_connected(grown)
        order_o = {id(n): i for i, n in enumerate(original.graph)}
        order_f = {id(n): i for i, n in enumerate(folded.graph)}
        grown.original.sort(key=lambda n: order_o[id(n)])
        grown.folded.sort(key=lambda n: order_f[id(n)])
        _boundaries(grown, original, folded, self.index)
        return grown

    def _merge_connected(self, grown: Region) -> None:
        """Fold into ``grown`` every other region it reads from or feeds."""
        while True:
            produced = {v.name for n in grown.original + grown.folded for v in n.outputs}
            reads = {
                name for side, nodes in (("o", grown.original), ("f", grown.folded))
                for n in nodes for name in self.index[side].reads[id(n)]
            }  # fmt: skip
            connected = [
                r for r in self.regions
                if r is not grown and (set(r.inputs) & produced or set(r.outputs) & reads)
            ]  # fmt: skip
            if not connected:
                return
            for r in connected:
                grown.original.extend(n for n in r.original if n not in grown.original)
                grown.folded.extend(n for n in r.folded if n not in grown.folded)
                self.regions.remove(r)


def _where(path: str) -> str:
    return f"in body {path}: " if path else ""


def diff_graphs(original: Scope, folded: Scope) -> GraphDiff:
    """Match the nodes of two graphs and group the rest into regions."""
    result = GraphDiff(original.path)
    _compare_interface(original, folded, result)
    matcher = _Matcher(original, folded, result)
    changed_o, changed_f = matcher.run()
    result.index = {"o": _ReadIndex(original), "f": _ReadIndex(folded)}
    result.regions = _regions(original, folded, changed_o, changed_f, result.index)
    return result


def _type_text(value: ir.Value) -> str:
    return f"{value.type}{value.shape}" if value.shape is not None else str(value.type)


def _compare_interface(original: Scope, folded: Scope, result: GraphDiff) -> None:
    where = _where(original.path)
    ins_o = [(v.name, _type_text(v)) for v in original.true_inputs()]
    ins_f = [(v.name, _type_text(v)) for v in folded.true_inputs()]
    if ins_o != ins_f:
        result.differences.append(f"{where}graph inputs differ: {ins_o} vs {ins_f}")
    for value in original.true_inputs():
        name = value.name or ""
        default_o, default_f = original.stored_tensor(name), folded.stored_tensor(name)
        if (default_o is None) != (default_f is None) or (
            default_o is not None
            and default_f is not None
            and not same_tensor(default_o, default_f)
        ):
            result.differences.append(f"{where}the default value of input {name!r} differs")
    outs_o = [(v.name, _type_text(v)) for v in original.graph.outputs]
    outs_f = [(v.name, _type_text(v)) for v in folded.graph.outputs]
    if outs_o != outs_f:
        result.differences.append(f"{where}graph outputs differ: {outs_o} vs {outs_f}")


def _attr_key(attr: ir.Attr) -> object:
    value = attr.value
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return "<graph>"
    if attr.type == ir.AttributeType.TENSOR:
        return ("tensor", str(value.dtype), tuple(value.shape.numpy()), value.tobytes())
    if attr.type == ir.AttributeType.TENSORS:
        return tuple(("tensor", str(t.dtype), t.tobytes()) for t in value)
    if isinstance(value, list | tuple):
        return tuple(value)
    return (attr.type, value)


def _signature(node: ir.Node) -> tuple[object, ...]:
    return (
        node.domain or "",
        node.op_type,
        node.overload or "",
        node.name or "",
        tuple(v.name if v is not None else None for v in node.inputs),
        tuple(v.name for v in node.outputs),
        tuple(sorted((k, _attr_key(a)) for k, a in node.attributes.items())),
    )


class _Matcher:
    """Pairs each compute node of the folded graph with its twin in the original."""

    def __init__(self, original: Scope, folded: Scope, result: GraphDiff) -> None:
        self.original, self.folded, self.result = original, folded, result
        self.index_o = {id(n): i for i, n in enumerate(original.graph)}
        self.index_f = {id(n): i for i, n in enumerate(folded.graph)}

    def compute_nodes(self, scope: Scope) -> list[ir.Node]:
        """Nodes whose outputs are not all constants."""
        return [
            n for n in scope.graph if not all(scope.is_const(v.name) for v in n.outputs if v.name)
        ]

    def run(self) -> tuple[list[ir.Node], list[ir.Node]]:
        """Match every compute node; return the changed ones of each side."""
        by_outputs = {
            tuple(v.name for v in n.outputs): n for n in self.compute_nodes(self.original)
        }
        matched: set[int] = set()
        changed_f: list[ir.Node] = []
        for node in self.compute_nodes(self.folded):
            twin = by_outputs.get(tuple(v.name for v in node.outputs))
            if twin is not None and self.same(twin, node):
                matched.add(id(twin))
                self.result.unchanged += 1
                self.result.twins.append((twin, node))
            else:
                changed_f.append(node)
        changed_o = [n for n in self.compute_nodes(self.original) if id(n) not in matched]
        return changed_o, changed_f

    def same(self, a: ir.Node, b: ir.Node) -> bool:
        if _signature(a) != _signature(b):
            return False
        # Equal signatures: the same input names on both sides.
        for name in (v.name for v in a.inputs if v is not None and v.name):
            const_a, const_b = self.original.is_const(name), self.folded.is_const(name)
            if const_a != const_b or (const_a and not self.same_constant(name)):
                return False
        return self.same_bodies(a, b)

    def same_constant(self, name: str) -> bool:
        ta, tb = self.original.stored_tensor(name), self.folded.stored_tensor(name)
        if ta is not None and tb is not None:
            return same_tensor(ta, tb)
        a, b = self.original.const_array(name), self.folded.const_array(name)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    def same_bodies(self, a: ir.Node, b: ir.Node) -> bool:
        """Equal bodies up to regions, which are proven in the body's own scope."""
        bodies_a, bodies_b = subgraphs(a), subgraphs(b)
        if [n for n, _ in bodies_a] != [n for n, _ in bodies_b]:
            return False
        for (name, ga), (_, gb) in zip(bodies_a, bodies_b, strict=True):
            sa = self.original.child(self.index_o[id(a)], name, ga)
            sb = self.folded.child(self.index_f[id(b)], name, gb)
            self.result.bodies.append(BodyPair(sa, sb, diff_graphs(sa, sb)))
        return True


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _regions(
    original: Scope,
    folded: Scope,
    changed_o: list[ir.Node],
    changed_f: list[ir.Node],
    index: dict[str, _ReadIndex],
) -> list[Region]:
    """Group changed nodes into connected regions; find each region's inputs and outputs."""
    nodes = [("o", n) for n in changed_o] + [("f", n) for n in changed_f]
    uf = _UnionFind()
    producer: dict[tuple[str, str], int] = {}
    by_output: dict[str, list[int]] = {}
    for i, (side, node) in enumerate(nodes):
        uf.find(i)
        for v in node.outputs:
            if v.name:
                producer[(side, v.name)] = i
                by_output.setdefault(v.name, []).append(i)
    for i, (side, node) in enumerate(nodes):
        for name in _reads(node):  # few changed nodes: no index needed
            j = producer.get((side, name))
            if j is not None:
                uf.union(i, j)
    for ids in by_output.values():
        for j in ids[1:]:
            uf.union(ids[0], j)
    groups: dict[int, list[int]] = {}
    for i in range(len(nodes)):
        groups.setdefault(uf.find(i), []).append(i)
    regions = []
    for members in groups.values():
        region = Region(
            [nodes[i][1] for i in members if nodes[i][0] == "o"],
            [nodes[i][1] for i in members if nodes[i][0] == "f"],
        )
        _boundaries(region, original, folded, index)
        regions.append(region)
    order = {id(n): i for i, n in enumerate(original.graph)}
    regions.sort(
        key=lambda r: min((order.get(id(n), 1 << 30) for n in r.original), default=1 << 30)
    )
    return regions


def _reads(node: ir.Node) -> list[str]:
    """Names a node reads, its bodies' references to enclosing scopes included."""
    names = [v.name for v in node.inputs if v is not None and v.name]
    for _, body in subgraphs(node):
        names.extend(_outer_reads(body))
    return names


def _outer_reads(graph: ir.Graph) -> list[str]:
    inner = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        inner.update(v.name for v in node.outputs if v.name)
    found: list[str] = []
    for node in graph:
        found.extend(n for n in _reads(node) if n not in inner)
    return found


class _ReadIndex:
    """For one graph: the names each node reads (bodies' outer references included)."""

    def __init__(self, scope: Scope) -> None:
        self.reads = {id(n): _reads(n) for n in scope.graph}
        self.outputs = {v.name for v in scope.graph.outputs}


def _boundaries(
    region: Region, original: Scope, folded: Scope, index: dict[str, _ReadIndex]
) -> None:
    inside = {
        side: {v.name for n in nodes for v in n.outputs if v.name}
        for side, nodes in (("o", region.original), ("f", region.folded))
    }
    inputs: list[str] = []
    for side, nodes, scope in (("o", region.original, original), ("f", region.folded, folded)):
        for node in nodes:
            for name in index[side].reads[id(node)]:
                if name not in inside[side] and not scope.is_const(name) and name not in inputs:
                    inputs.append(name)
    region.inputs = inputs
    region_nodes = {id(n) for n in region.original} | {id(n) for n in region.folded}
    produced = inside["o"] | inside["f"]
    needed: list[str] = []
    for side in ("o", "f"):
        for node_id, names in index[side].reads.items():
            if node_id in region_nodes:
                continue
            needed.extend(n for n in names if n in produced and n not in needed)
        needed.extend(n for n in index[side].outputs if n in produced and n not in needed)
    region.outputs = needed
