"""Find (linear module, BatchNorm module) pairs whose output feeds straight into the BN.

Four finders, tried in order; the first that sees the module decides:

1. ``export``: ``torch.export.export(strict=False)``; each aten node is owned by
   the innermost linear/BN module in its ``nn_module_stack``, and by that
   module's call (``"...conv@1"`` is the second).
2. ``fx``: ``torch.fx`` symbolic tracing with linear and BN modules as leaves
   (one node per call).
3. ``recorded``: the ops of one eager run, recorded with module hooks and a
   ``TorchFunctionMode`` (:mod:`bnfold.torch_front.recorded`). It follows what
   neither tracer can: data-dependent control flow, ``.tolist()``, NMS and
   sorting around a conv+BN backbone, as in detectors.
4. ``sequential``: a linear module directly followed by a BN (or with an
   ``nn.Flatten``/``nn.Unflatten`` between) inside an ``nn.Sequential`` whose
   forward is not overridden (:mod:`bnfold.torch_front.sequential`), when even
   the recorded run failed (a forward that cannot run under a torch function mode).

A tracer that failed on a module is not tried again on it (:class:`Tracers`):
folds change weights and turn BNs into ``nn.Identity``, not the code that could
not be traced, and a failed export costs as much as several forwards.

Export and fx graphs are reduced here to one small node graph
(:class:`~bnfold.torch_front.site_graph.Traced`): ``nn.Identity`` (what a folded
BN becomes), eval-mode dropout and ``t + 0`` are looked through, weights are left
out, and a parameter read outside its own module is noted. One function
(:func:`bnfold.torch_front.eager_match.match_graph`) then finds the pairs in it.

Limitation: the wiring is read from one trace at the example inputs' shapes. A
forward that wires conv and BN differently for other shapes (branching on
``x.shape``) is checked only for the example's shapes, as verification is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import first_line
from bnfold.quiet import quiet_loggers
from bnfold.torch_front import recorded
from bnfold.torch_front.eager_match import match_graph
from bnfold.torch_front.eager_pairs import Scan
from bnfold.torch_front.modules import BN, Calls, Roles, eval_mode, observe
from bnfold.torch_front.pools import Pool, pool_of_call, pool_of_module
from bnfold.torch_front.recorded import FINDER as RECORDED
from bnfold.torch_front.sequential import match_sequential
from bnfold.torch_front.site_graph import (
    Node,
    Traced,
    adds_zero,
    input_names,
    is_eval_dropout,
    join_of,
    link_users,
    mark_outputs,
    without_calls_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seen:
    """The graph a search matched in, by whom, with the calls and BN modules it saw."""

    finder: str
    traced: Traced
    calls: Calls
    bns: frozenset[str]


@dataclass
class Finders:
    """The finders of one fold run, and what each search leaves the next.

    A fold changes weights and turns a BN into ``nn.Identity``; it never changes
    the code of forward(). So a tracer that failed is not tried again
    (``failed``), and the graph of the last search is used again, its folded BNs
    passed through (:func:`~bnfold.torch_front.site_graph.without_calls_of`), as
    long as every BN folded since became an ``nn.Identity``: a later round of
    the fixpoint neither traces nor runs the module. A BN that kept its children
    in its place (timm's act) makes the next search start afresh.
    """

    failed: dict[str, str] = field(default_factory=dict)
    seen: _Seen | None = None
    calls: Calls | None = None  # the module calls the last search read (shapes do not change)
    # The first program export made, before any fold: the original the proof starts from.
    program: Any = None

    def search(self, root: nn.Module, args: tuple[Any, ...], roles: Roles) -> tuple[Scan, Calls]:
        """Candidate pairs and refusals (:func:`find_pairs`) and the module calls they read."""
        if (again := self._seen_again(root, roles)) is not None:
            self.seen = again
            scan = match_graph(again.traced, roles, again.calls, again.finder, root)
            return self._scan(scan), again.calls
        calls, recording = self._run(root, args, roles)
        self.calls = calls
        found = self._trace(root, args, roles, recording)
        if found is None:
            self.seen = None
            return self._scan(match_sequential(root, roles, calls)), calls
        finder, traced = found
        self.seen = _Seen(finder, traced, calls, frozenset(roles.bns()))
        return self._scan(match_graph(traced, roles, calls, finder, root)), calls

    def _seen_again(self, root: nn.Module, roles: Roles) -> _Seen | None:
        """The last search's graph with the BNs folded since passed through, if it can be."""
        seen = self.seen
        if seen is None:
            return None
        folded = {bn for bn in seen.bns if roles.of(bn) != BN}
        if not folded:
            return seen
        if any(type(root.get_submodule(bn)) is not nn.Identity for bn in folded):
            return None
        traced = without_calls_of(seen.traced, folded)
        return None if traced is None else replace(seen, traced=traced, bns=seen.bns - folded)

    def _run(
        self, root: nn.Module, args: tuple[Any, ...], roles: Roles
    ) -> tuple[Calls, Traced | None]:
        """One forward that counts module calls, recorded op by op for the ``recorded`` finder.

        A forward that fails under the recorder (and not plainly) is run without
        it from then on, and the finders that need no record decide.

        Raises:
            BnfoldError: the module cannot run on the example inputs.
        """
        seqs = [p for p, m in root.named_modules() if isinstance(m, nn.Sequential)]
        watched = list(roles.kind) + seqs
        if RECORDED not in self.failed:
            try:
                recording = recorded.record_run(root, args, roles, watched)
            except Exception as e:  # the plain run below says whether the module itself fails
                self.failed[RECORDED] = f"{type(e).__name__}: {first_line(e)}"
            else:
                return recording.calls, recording.traced
        return observe(root, args, watched), None

    def _trace(
        self, root: nn.Module, args: tuple[Any, ...], roles: Roles, recording: Traced | None
    ) -> tuple[str, Traced] | None:
        """The first finder's graph: export's, else fx's, else the recorded run's.

        A run whose ops hand tensor values to Python or make shapes from values
        (:data:`DATA_DEPENDENT`: a detector's ``.item()``, NMS) is not exported: export
        traces the whole forward before it stops there (17 s of SSDlite's 22 s fold),
        and the recorded run already holds the graph.
        """
        if recording is not None and (read := _data_dependent(recording)):
            self.failed.setdefault("export", f"not tried: the run calls {read}")
        for name, tracer in (("export", self._export), ("fx", _fx_graph)):
            if name in self.failed:
                continue
            try:
                return name, tracer(root, args, roles)
            except Exception as e:  # tracers fail in many ways; the next finder may work
                self.failed[name] = f"{type(e).__name__}: {first_line(e)}"
                log.info("torch front: %s could not trace the module: %s", name, e)
        return None if recording is None else (RECORDED, recording)

    def _export(self, root: nn.Module, args: tuple[Any, ...], roles: Roles) -> Traced:
        """The export finder's graph, keeping the first program exported (:attr:`program`)."""
        kept: list[Any] = []
        traced = _export_graph(root, args, roles, kept)
        if self.program is None and kept:
            self.program = kept[0]
        return traced

    def _scan(self, scan: Scan) -> Scan:
        scan.failures = [f"{name}: {why}" for name, why in self.failed.items()]
        return scan


DATA_DEPENDENT = frozenset(
    ["item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "argwhere", "unique",
     "unique_consecutive", "masked_select", "nms", "batched_nms"]
)  # fmt: skip
"""Recorded ops that read tensor values into Python or size a result by its values."""

_MASKS = frozenset(
    ["gt", "ge", "lt", "le", "eq", "ne", "__gt__", "__ge__", "__lt__", "__le__", "__eq__",
     "__ne__", "__and__", "__or__", "__invert__", "logical_and", "logical_or", "isfinite"]
)  # fmt: skip
"""Ops whose result is a boolean mask: indexing with one sizes the result by values."""


def _data_dependent(recording: Traced) -> str:
    """The data-dependent ops one recorded run called ("item, nms"), or "".

    Besides :data:`DATA_DEPENDENT`: ``torch.where(mask)`` with one argument (nonzero's
    twin) and indexing by a boolean mask (``boxes[scores > t]``), which detectors
    call on every run (a first run may also cache what later runs only index).
    """
    nodes = recording.nodes
    found = {n.op for n in nodes.values()} & DATA_DEPENDENT
    for node in nodes.values():
        if node.op == "where" and len(node.inputs) == 1:
            found.add("where(mask)")
        elif node.op == "__getitem__" and any(
            nodes[i].op in _MASKS for i in node.inputs if i in nodes
        ):
            found.add("x[mask]")
    return ", ".join(sorted(found))


def find_pairs(root: nn.Module, args: tuple[Any, ...], roles: Roles) -> Scan:
    """Find candidate pairs with the first finder that can see ``root``.

    One search of a fresh :class:`Finders`; a fold run keeps one for all its rounds.

    Matches:  linear -> BN (after); else BN -> linear (before); either directly
              or through one flatten/view/reshape/(un)squeeze. A module pair that
              runs several times (a block in a loop) matches if every call does.
    Refuses:
      REUSED_MODULE   the linear module also runs where it does not feed (or is not
                      fed by) the BN, or the BN runs beside different modules: an
                      eager module has one weight for every call (a .pt2 folds per call)
      BRANCHING       the linear op's output is read by something besides the BN
      SHARED_WEIGHT   the linear weight or bias is also read outside the module
      NONLINEAR_INPUT a nonlinearity sits between the linear op and the BN
      OP_BETWEEN      another op sits between them
      STANDALONE      nothing linear feeds the BN
      UNTRACEABLE     the BN did not run, or no finder can see its input
    """
    return Finders().search(root, args, roles)[0]


def export_program(root: nn.Module, args: tuple[Any, ...]) -> Any:
    """``torch.export`` (non-strict, eval mode) with its warnings and partial graphs quiet."""
    quiet = quiet_loggers(*_EXPORT_LOGGERS)
    with eval_mode(root), quiet, contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(root, args, strict=False)


def _export_graph(
    root: nn.Module, args: tuple[Any, ...], roles: Roles, kept: list[Any] | None = None
) -> Traced:
    """The export finder's graph of ``root``; the program itself goes to ``kept``."""
    ep = export_program(root, args)
    if kept is not None:
        kept.append(ep)
    sig = ep.graph_signature
    user_inputs = set(sig.user_inputs)
    params = dict(sig.inputs_to_parameters)
    traced = Traced({})
    nodes = traced.nodes
    alias: dict[str, str] = {}  # eval-mode dropout -> the node it passes on
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            nodes[n.name] = Node(None, "input", [])
        elif (_eval_dropout_module(root, n) or adds_zero(n)) and len(
            ins := input_names(n, nodes, alias)
        ) == 1:
            alias[n.name] = ins[0]
        elif n.op == "call_function":
            owner, call = _export_owner(n, roles)
            node = Node(owner, str(n.target), input_names(n, nodes, alias), call)
            if owner is None:
                node.join = join_of(n, nodes, alias)
                node.pool = pool_of_call(str(n.target), n.args, n.kwargs)
            nodes[n.name] = node
            traced.outside_reads |= _params_read_outside(n, owner, params, roles)
        elif n.op == "output":
            mark_outputs(n, nodes, alias)
    link_users(nodes)
    return traced


def _eval_dropout_module(root: nn.Module, n: fx.Node) -> bool:
    """An eval dropout, and (export traces in eval mode) not from a module left training."""
    if not is_eval_dropout(n):
        return False
    stack = list((n.meta.get("nn_module_stack") or {}).values())
    owner = root.get_submodule(stack[-1][0]) if stack else None
    return not (isinstance(owner, nn.modules.dropout._DropoutNd) and owner.training)


def _params_read_outside(
    n: fx.Node, owner: str | None, params: dict[str, str], roles: Roles
) -> set[str]:
    read = [params[a.name] for a in n.all_input_nodes if a.name in params]
    return {p for p in read if roles.canonical.get(p.rpartition(".")[0]) != owner}


# A failed export (the fallback then takes over) logs a warning and prints the
# partial graph to stderr; neither helps someone whose model still folds.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


def _export_owner(n: fx.Node, roles: Roles) -> tuple[str | None, int]:
    """The innermost linear/BN module an aten op ran in, and which call of it.

    Export keys the module stack by call: the second call of ``conv`` is
    ``"L__self___conv@1"``.
    """
    stack = n.meta.get("nn_module_stack") or {}
    for key, (path, _type) in reversed(list(stack.items())):
        if roles.of(path) is not None:
            _, at, index = str(key).rpartition("@")
            return roles.canonical[path], int(index) if at and index.isdigit() else 0
    return None, 0


class _LeafTracer(fx.Tracer):
    """fx tracer that stops at linear and BN modules, so each is one call_module node."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


def _fx_graph(root: nn.Module, args: tuple[Any, ...], roles: Roles) -> Traced:
    leaves = {p for p in roles.canonical if roles.of(p) is not None}
    graph = _LeafTracer(leaves).trace(root)
    traced = Traced({})
    nodes = traced.nodes
    alias: dict[str, str] = {}  # nn.Identity node -> the node it passes on
    calls_so_far: dict[str, int] = {}  # owner -> call_module nodes seen (a node is one call)
    shape_reads: set[str] = set()
    for n in graph.nodes:
        if n.op == "get_attr":  # leaf modules read their own weights without get_attr
            traced.outside_reads.add(str(n.target))
        elif _reads_shape(n, shape_reads):
            # x.shape[0] / x.size(1) in y.view(x.shape[0], -1): metadata, not a reader
            # of x's values, so neither an input of the view nor a second consumer.
            shape_reads.add(n.name)
        elif n.op == "placeholder":
            nodes[n.name] = Node(None, "input", [])
        elif (_is_identity(root, n) or adds_zero(n)) and len(
            ins := input_names(n, nodes, alias)
        ) == 1:
            alias[n.name] = ins[0]
        elif n.op in ("call_module", "call_function", "call_method"):
            owner = roles.canonical.get(str(n.target)) if n.op == "call_module" else None
            if owner is not None and roles.of(owner) is None:
                owner = None
            call = 0
            if owner is not None:
                call = calls_so_far[owner] = calls_so_far.get(owner, -1) + 1
            node = Node(owner, _fx_op_name(root, n), input_names(n, nodes, alias), call)
            if owner is None:
                node.join = join_of(n, nodes, alias)
                node.pool = _fx_pool(root, n)
            nodes[n.name] = node
        elif n.op == "output":
            mark_outputs(n, nodes, alias)
    link_users(nodes)
    return traced


def _fx_pool(root: nn.Module, n: fx.Node) -> Pool | None:
    """A pooling module or ``torch.nn.functional`` pool call of an fx graph, if ``n`` is one."""
    if n.op == "call_module":
        return pool_of_module(root.get_submodule(str(n.target)))
    if n.op == "call_function":
        return pool_of_call(getattr(n.target, "__name__", ""), n.args, dict(n.kwargs))
    return None


def _reads_shape(n: fx.Node, shape_reads: set[str]) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``, or an item of one of those."""
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.target is getattr:
        return n.args[1] in ("shape", "ndim")
    return n.target is operator.getitem and n.args[0].name in shape_reads


def _fx_op_name(root: nn.Module, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(root.get_submodule(str(n.target))).__name__
    target: Any = n.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_identity(root: nn.Module, n: fx.Node) -> bool:
    """An ``nn.Identity`` (a folded BN) or a dropout module in eval mode."""
    if n.op != "call_module":
        return False
    m = root.get_submodule(str(n.target))
    dropout = isinstance(m, nn.modules.dropout._DropoutNd) and not m.training
    return type(m) is nn.Identity or dropout
