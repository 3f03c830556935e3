"""The ``recorded`` finder's graph: the data flow of one eager run, op by op, for models
no tracer can follow whole.

Detectors and segmenters branch in Python on values they computed, read scores with
``.tolist()`` and sort boxes: neither ``torch.export`` nor ``torch.fx`` traces them. Their
forward still runs, and :func:`record_run` writes down what one run did:

* forward pre-hooks and hooks on the linear and BN modules say which module call is
  running (the innermost one owns each op, as export's ``nn_module_stack`` says), and
  count every watched module's calls with their shapes (:class:`Calls`);
* a :class:`torch.overrides.TorchFunctionMode` sees each torch function the run calls,
  inside modules and between them (``F.conv2d``, ``x + y``, ``x.flatten(1)``, ``.tolist()``);
  the functions those call in turn are not seen (the mode is off inside its handler);
* data flow is read from tensor identity: each tensor an op returns is remembered, by a
  weak reference, with the op's node, and an op that reads it is that node's user. An op
  that writes into a tensor it was given (``relu_``, ``+=``, ``x[i] = v``,
  ``F.relu(x, inplace=True)``, ``out=``) is a new node the tensor stands for from then on.

The graph is the one export and fx traces are reduced to
(:class:`~bnfold.torch_front.site_graph.Traced`), so one matcher
(:func:`~bnfold.torch_front.eager_match.match_graph`) finds the pairs in all three: a BN
whose input in this run is only a conv/linear module's output (no other reader of that
output, nothing in between) is a site, and so are the joins, pools, reshapes and taps.

Looked through, as in the traces: eval-mode dropout, ``t + 0``, and the ops that hand back
their input unchanged (``x.contiguous()``, ``x.float()`` of a float ``x``). Reading a tensor's
shape, dtype or device reads no value. Every other read counts, ``.tolist()`` and
``bool(x)`` included: a BN is refused ``branching`` rather than folded past a reader.

Limitations: one run, at the example inputs; a forward that wires modules differently
for other values is checked where verification runs it. Work that bypasses Python's
torch function dispatch (a TorchScript function, a C++ extension called directly) is not
seen: a tensor only it reads looks unread, and a fold that changes what it reads is
caught by verification, not here.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bnfold.torch_front.modules import LINEAR, Calls, Roles, eval_mode
from bnfold.torch_front.pools import pool_of_call
from bnfold.torch_front.site_graph import Join, Node, Traced, link_users

FINDER = "recorded"


@dataclass
class Recording:
    """One recorded run: its node graph and the calls of the watched modules."""

    traced: Traced
    calls: Calls


def record_run(
    root: nn.Module, args: tuple[Any, ...], roles: Roles, watched: list[str]
) -> Recording:
    """Run ``root`` once (eval mode, no grad) and record its ops, module calls and shapes.

    Args:
        root: the model.
        args: its positional inputs.
        roles: its linear and BN modules; the innermost one running owns each op.
        watched: module paths whose calls are counted (roles and plain Sequentials).

    Raises:
        Exception: whatever the forward raises (the caller tells the user).
    """
    recorder = _Recorder(roles, _linear_parameters(root, roles))
    handles = []
    for path in watched:
        module = root.get_submodule(path)
        owns = roles.of(path) is not None
        handles.append(module.register_forward_pre_hook(recorder.entered(path, owns)))
        handles.append(module.register_forward_hook(recorder.left(path, owns), always_call=True))
    try:
        recorder.take_inputs(args)
        with eval_mode(root), torch.no_grad(), recorder:
            out = root(*args)
        recorder.mark_outputs(out)
    finally:
        for h in handles:
            h.remove()
    link_users(recorder.traced.nodes)
    return Recording(recorder.traced, recorder.calls)


def _linear_parameters(root: nn.Module, roles: Roles) -> dict[int, tuple[str, str]]:
    """id of each linear module's own parameter -> (its name, the module's path)."""
    owned = {}
    for path, kind in roles.kind.items():
        if kind == LINEAR:
            for name, p in root.get_submodule(path).named_parameters(recurse=False):
                owned[id(p)] = (f"{path}.{name}", path)
    return owned


# Functions whose result says nothing about a tensor's values (shape, dtype, layout).
_METADATA = frozenset({
    "__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "element_size",
    "get_device", "data_ptr", "__len__", "is_same_size", "has_names", "is_inference",
    "_is_view", "is_set_to",
})  # fmt: skip
# Functions that may hand back the tensor they were given, unchanged.
_PASS_SELF = frozenset({
    "contiguous", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu",
    "cuda", "requires_grad_", "detach_", "__get__",
})  # fmt: skip
# The functional dropouts (looked through in eval), each with its ``training`` argument's
# default: torch.nn.functional's alpha dropouts default to False, the others to True.
_DROPOUT_TRAINING_DEFAULT = {
    "dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
    "alpha_dropout": False, "feature_alpha_dropout": False,
}  # fmt: skip
_ADDS = frozenset({"add", "add_", "__add__", "__iadd__", "__radd__"})
_SUBS = frozenset({"sub", "sub_", "__sub__", "__isub__"})
_CATS = frozenset({"cat", "concat", "concatenate"})
# x.reshape_as(y) reads y's shape or dtype only (as site_graph.metadata_only_inputs).
_LIKE_OTHER = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


class _Recorder(TorchFunctionMode):
    """The mode and the hooks of one recorded run; :func:`record_run` drives it."""

    def __init__(self, roles: Roles, parameters: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self.roles = roles
        self.parameters = parameters
        self.traced = Traced({})
        self.calls = Calls()
        self.running: list[tuple[str, int]] = []  # (module, call) of the role modules running
        # id of a tensor -> (weak reference, the node it stands for); the reference tells
        # a live tensor from a new one that took a freed one's id.
        self.made: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}

    # --- module calls ----------------------------------------------------------------

    def entered(self, path: str, owns: bool) -> Callable[..., None]:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            call = self.calls.count.get(path, 0)
            self.calls.count[path] = call + 1
            if inputs and isinstance(inputs[0], torch.Tensor):
                self.calls.in_shapes.setdefault(path, set()).add(tuple(inputs[0].shape))
            if owns:
                self.running.append((path, call))

        return hook

    def left(self, path: str, owns: bool) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, torch.Tensor):
                self.calls.out_shapes.setdefault(path, set()).add(tuple(out.shape))
            if owns and self.running and self.running[-1][0] == path:
                self.running.pop()

        return hook

    # --- ops -------------------------------------------------------------------------

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._note(_op_name(func), args, kwargs, out)
        return out

    def _note(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        given = list(_tensors((args, kwargs)))
        results = list(_tensors(out))
        if not results:
            if op in _METADATA:
                return
            if _writes_first_argument(op):
                results = given[:1]
        if _eval_dropout(op, args, kwargs) or _adds_zero(op, args):
            self._alias(results, given[0])
            return
        fresh = [t for t in results if not any(t is g for g in given)]
        if results and not fresh and op in _PASS_SELF:
            return  # x.contiguous(), x.float(): the same tensor, the same values
        self._add_node(op, args, kwargs, given, results)

    def _add_node(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        given: list[torch.Tensor],
        results: list[torch.Tensor],
    ) -> None:
        read = given[:1] if op in _LIKE_OTHER else given
        owner, call = self.running[-1] if self.running else (None, 0)
        name = f"{op.strip('_')}_{len(self.traced.nodes)}"  # "getitem_7", not "__getitem___7"
        inputs = [n for t in read if (n := self._node_of(t)) is not None]
        node = Node(owner, op, list(dict.fromkeys(inputs)), call)
        if owner is None:
            node.join = self._join(op, args, kwargs)
            node.pool = pool_of_call(op, args, kwargs)
        self._note_parameter_reads(given, owner)
        self.traced.nodes[name] = node
        for t in results:
            self.made[id(t)] = (weakref.ref(t), name)

    def _alias(self, results: list[torch.Tensor], source: torch.Tensor) -> None:
        """The op's result is ``source``'s value: it stands for the same node."""
        node = self._node_of(source)
        for t in results:
            if node is None:
                self.made.pop(id(t), None)
            else:
                self.made[id(t)] = (weakref.ref(t), node)

    def _node_of(self, t: torch.Tensor) -> str | None:
        entry = self.made.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _join(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Join | None:
        """``a + b`` or ``a - b`` (alpha 1), or ``cat([a, ...], dim)``, of recorded tensors."""
        tensors: Any
        dim: Any
        if op in _ADDS or op in _SUBS:
            extra = {k: v for k, v in kwargs.items() if k != "alpha"}
            if len(args) != 2 or extra or kwargs.get("alpha", 1) != 1:
                return None
            tensors, dim, kind = list(args), 1, "add" if op in _ADDS else "sub"
        elif op in _CATS:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if not isinstance(tensors, list | tuple) or not isinstance(dim, int):
                return None
            kind = "cat"
        else:
            return None
        names = [self._node_of(t) if isinstance(t, torch.Tensor) else None for t in tensors]
        if not names or None in names:
            return None
        return Join(kind, tuple(names), dim)  # type: ignore[arg-type]

    def _note_parameter_reads(self, given: list[torch.Tensor], owner: str | None) -> None:
        """A linear module's weight or bias read outside that module: SHARED_WEIGHT."""
        for t in given:
            entry = self.parameters.get(id(t))
            if entry is not None and entry[1] != owner:
                self.traced.outside_reads.add(entry[0])

    # --- the run's inputs and outputs ------------------------------------------------

    def take_inputs(self, args: tuple[Any, ...]) -> None:
        for i, t in enumerate(_held_tensors(args)):
            name = f"input_{i}"
            self.traced.nodes[name] = Node(None, "input", [])
            self.made[id(t)] = (weakref.ref(t), name)

    def mark_outputs(self, out: Any) -> None:
        """Every tensor the forward returns is an output, wherever it is held (a tuple,
        a dict, a dataclass's field, an attribute of a plain object)."""
        for t in _held_tensors(out):
            if (name := self._node_of(t)) is not None:
                self.traced.nodes[name].is_output = True


def _op_name(func: Any) -> str:
    """``F.conv2d`` -> "conv2d", ``Tensor.add_`` -> "add_", a property getter -> "__get__"."""
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else type(func).__name__


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a nest of tuples, lists and dicts (args, kwargs, an op's result)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


# How deep :func:`_held_tensors` looks into objects holding objects.
_HELD_DEPTH = 8


def _held_tensors(value: Any, depth: int = _HELD_DEPTH) -> Iterator[torch.Tensor]:
    """The tensors a forward's inputs or result hold: as :func:`_tensors`, and also in
    dataclass fields and plain objects' attributes (``vars()``), each object walked
    once (cycles end), at most :data:`_HELD_DEPTH` levels deep.

    Only the run's inputs and result are walked so: an op's arguments are tensors and
    nests of them, and walking every object there would cost on every call.
    """
    seen: set[int] = set()

    def walk(v: Any, left: int) -> Iterator[torch.Tensor]:
        if isinstance(v, torch.Tensor):
            yield v
            return
        if left == 0 or id(v) in seen:
            return
        seen.add(id(v))
        for child in _parts(v):
            yield from walk(child, left - 1)

    return walk(value, depth)


def _parts(value: Any) -> list[Any]:
    """What a container or object holds: items, dict values, dataclass fields, vars()."""
    if isinstance(value, tuple | list | set | frozenset):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    if isinstance(value, type | nn.Module):
        return []  # a class, or a module's parameters: not values this run computed
    attributes = getattr(value, "__dict__", None)
    return list(attributes.values()) if isinstance(attributes, dict) else []


def _writes_first_argument(op: str) -> bool:
    """``x[i] = v`` or an in-place method that returns nothing (``add_``, not ``__bool__``)."""
    return op == "__setitem__" or (op.endswith("_") and not op.endswith("__"))


def _eval_dropout(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A functional dropout called with ``training`` False, given or by that function's
    default (:data:`_DROPOUT_TRAINING_DEFAULT`): it hands its input back."""
    if op not in _DROPOUT_TRAINING_DEFAULT:
        return False
    default = _DROPOUT_TRAINING_DEFAULT[op]
    return not (args[2] if len(args) > 2 else kwargs.get("training", default))


def _adds_zero(op: str, args: tuple[Any, ...]) -> bool:
    """``t + 0`` or ``t - 0`` with a Python zero (``0 + t`` arrives as ``add(t, 0)``)."""
    if (op not in _ADDS and op not in _SUBS) or len(args) != 2:
        return False
    zero = args[1]
    number = isinstance(zero, int | float) and not isinstance(zero, bool)
    return isinstance(args[0], torch.Tensor) and number and zero == 0
