"""Load a ``.pt2`` archive without running code from it.

``torch.export.load`` is not safe on untrusted files, whatever its docs imply by
using ``weights_only`` in places:

* example inputs are read with ``torch.load(weights_only=True)`` but, when that
  fails, *retried with full unpickling* (``deserialize_torch_artifact``);
  pickled weights and constants are read with ``weights_only=False``, opaque
  constants with ``pickle.loads`` and torchbind objects with TorchScript's
  unpickler, so a ``__reduce__`` payload in any of those members runs;
* a symbolic shape's ``expr_str`` goes through ``sympy.sympify``, which
  ``eval``s the string (``exec(chr(..)+..)`` is a valid "expression");
* members under ``data/aotinductor/`` are compiled shared libraries that the
  loader ``dlopen``s.

:func:`load_untrusted` therefore refuses AOTInductor archives outright (bnfold
folds the exported program, never the compiled code), and runs the loader
inside :func:`_no_code_from_file`, which for the duration makes every
unpickling entry point torch's loader reaches refuse anything but plain data
(``torch.load`` only with ``weights_only=True``, ``pickle`` with no globals at
all, TorchScript's unpickler not at all) and lets ``sympify`` parse only
arithmetic on symbols. A refusal anywhere aborts the load, even if torch catches
the exception and carries on. ``trust_code=True`` (CLI ``--trust-pickle``) is
the user's explicit choice to load the file as torch would.

The patches are process-wide while a load runs (a lock serialises loads): a
thread unpickling at the same moment is refused too, never let through.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import keyword
import logging
import pickle
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bnfold.errors import BnfoldError, first_line

AOTI_DIR = "data/aotinductor/"
TORCH_LOGGERS = ("torch.export", "torch._export")

# Callables a symbolic shape expression may name: sympy's relations and
# arithmetic plus torch's own sympy functions (the deserializer passes those).
_SYMPY_CALLS = frozenset(
    {
        "Abs", "Add", "And", "Eq", "Float", "Ge", "Gt", "ITE", "Integer", "Le", "Lt", "Max",
        "Min", "Mod", "Mul", "Ne", "Not", "Or", "Piecewise", "Pow", "Rational", "Xor",
        "Symbol", "ceiling", "floor", "sqrt",
    }
)  # fmt: skip
_EXPRESSION_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Name, ast.Load,
    ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)  # fmt: skip

# Dotted names of attributes: identifiers and indices (nn.Sequential's "0").
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")

_SYMBOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?inf|nan")

_load_lock = threading.Lock()


class UntrustedCodeError(BnfoldError):
    """Loading the file would run code it carries; ``--trust-pickle`` allows it."""


@dataclass
class _Guard:
    """What the patched entry points saw during one load."""

    refusals: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # torch logged and went on

    def refuse(self, what: str) -> UntrustedCodeError:
        self.refusals.append(what)
        return UntrustedCodeError(what)


def load_untrusted(path: str, trust_code: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.load(path)`` that runs no code from the file unless ``trust_code``.

    torch's log output and warnings are held back either way: a corrupt file is
    one line, the first error torch met.

    Raises:
        UntrustedCodeError: the file needs code to load and ``trust_code`` is False.
        BnfoldError: not a readable ``.pt2`` archive, or an AOTInductor package.
    """
    _refuse_unsafe_members(path)
    guard = _Guard()
    with _load_lock, _quiet_torch(guard):
        try:
            if trust_code:
                program = torch.export.load(path)
            else:
                with _no_code_from_file(guard):
                    program = torch.export.load(path)
        except UntrustedCodeError:
            pass
        except Exception as e:  # torch raises many types on corrupt archives
            if not guard.refusals:
                raise BnfoldError(f"not a loadable .pt2 archive ({_reason(guard, e)})") from None
    if not trust_code and not guard.refusals:
        _require_plain_names(program, guard)
    if guard.refusals:
        raise UntrustedCodeError(
            f"loading it would run code from the file ({guard.refusals[0]}); "
            "pass --trust-pickle if you trust it"
        )
    if not trust_code:
        _drop_guard_code(program)
    return program


def _drop_guard_code(program: torch.export.ExportedProgram) -> None:
    """Make ``program.module()`` skip the file's guard code, which it would ``exec``.

    Guards assert input shapes at run time; bnfold runs the program only on
    inputs of its example shapes and re-exports the folded module, which gets
    guards of its own.
    """
    program._guards_code = []
    program.module = functools.partial(type(program).module, program, check_guards=False)  # type: ignore[method-assign]


def _require_plain_names(program: torch.export.ExportedProgram, guard: _Guard) -> None:
    """Refuse names that torch.fx would paste into generated code.

    ``module()`` turns each lifted parameter, buffer and constant into a
    ``get_attr`` whose name torch.fx writes into Python source between double
    quotes when it is not an identifier: a quote in a name is code. Keyword
    arguments (a higher-order op's come from the file) are written unquoted.
    """
    names = [*program.state_dict, *program.constants]
    names += [spec.target for spec in program.graph_signature.input_specs if spec.target]
    nodes = [
        node
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
    ]
    names += [str(n.target) for n in nodes if n.op in ("get_attr", "call_module")]
    for name in names:
        if not _PLAIN_NAME.fullmatch(name):
            guard.refuse(f"the attribute name {name[:60]!r} is not plain")
            return
    for node in nodes:  # the loader checked these as it built them; later graphs copy them
        if bad := _code_like_keywords(node.kwargs):
            guard.refuse(f"the keyword argument {bad[:60]!r} is not an identifier")
            return


def _code_like_keywords(kwargs: Any) -> str | None:
    """A keyword torch.fx would write as ``name = value`` into code that is not a name."""
    for key in kwargs or {}:
        if not (isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)):
            return str(key)
    return None


def _refuse_unsafe_members(path: str) -> None:
    """Refuse AOTInductor libraries (the loader would dlopen them) and odd member names.

    Nothing else is extracted to disk, but a member named ``../x`` or twice
    (zip-slip, shadowing) has no business in an archive torch wrote.
    """
    try:
        names = torch._C.PyTorchFileReader(path).get_all_records()
    except Exception:
        return  # the loader reads with the same reader: it cannot reach a library either
    if any(name.startswith(AOTI_DIR) for name in names):
        raise BnfoldError(
            "the archive holds AOTInductor compiled code, which loading would run; "
            "bnfold folds torch.export programs only (torch.export.save)"
        )
    if len(set(names)) != len(names):
        raise BnfoldError("the archive names one member twice")
    for name in names:
        if name.startswith("/") or ".." in name.split("/"):
            raise BnfoldError(f"the archive member {name[:60]!r} leaves the archive (zip-slip)")


def _reason(guard: _Guard, final: BaseException) -> str:
    # torch.export.load logs the real error and then fails on a fallback path
    # with "check the warnings above": the first logged one says what is wrong.
    err = guard.errors[0] if guard.errors else final
    sentence = first_line(err).split(". ")[0]  # miniz appends a paragraph of advice
    return f"{type(err).__name__}: {sentence}"


def _unpickling_refusal(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if found:
        return f"a pickled member imports {found[1]}"
    return "a pickled member needs full unpickling"


@contextlib.contextmanager
def _quiet_torch(guard: _Guard) -> Iterator[None]:
    """Hold back torch's log records (keeping their exceptions) and warnings."""
    handler = _KeepErrors(guard)
    loggers = [logging.getLogger(name) for name in TORCH_LOGGERS]
    saved = [(lg.propagate, lg.handlers) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.handlers = False, [handler]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.propagate, lg.handlers = propagate, handlers


class _KeepErrors(logging.Handler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__(logging.DEBUG)
        self.guard = guard

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.guard.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _no_code_from_file(guard: _Guard) -> Iterator[None]:
    """Patch every code-running loader ``torch.export.load`` reaches; restore on exit."""
    import sympy.parsing.sympy_parser as sympy_parser

    real_torch_load = torch.load
    real_parse_expr = sympy_parser.parse_expr

    def torch_load(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        try:
            return real_torch_load(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            raise guard.refuse(_unpickling_refusal(e)) from None

    def parse_expr(s: str, *args: Any, **kwargs: Any) -> Any:
        if not _is_plain_expression(s):
            raise guard.refuse(f"the shape expression {s[:60]!r} is not plain arithmetic")
        return real_parse_expr(s, *args, **kwargs)

    def no_torchscript(*_args: Any, **_kwargs: Any) -> Any:
        raise guard.refuse("a torchbind object needs TorchScript unpickling")

    real_format_target = torch.fx.graph._format_target

    def format_target(base: str, target: str) -> str:
        if not _PLAIN_NAME.fullmatch(target):
            raise guard.refuse(f"the attribute name {target[:60]!r} is not plain")
        return real_format_target(base, target)

    real_create_node = torch.fx.Graph.create_node

    def create_node(graph: torch.fx.Graph, op: str, target: Any, args: Any = None,
                    kwargs: Any = None, *rest: Any, **more: Any) -> torch.fx.Node:  # fmt: skip
        if bad := _code_like_keywords(kwargs):
            raise guard.refuse(f"the keyword argument {bad[:60]!r} is not an identifier")
        return real_create_node(graph, op, target, args, kwargs, *rest, **more)

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", torch_load),
        (torch.serialization, "load", torch_load),
        (pickle, "loads", _data_only(pickle.loads, guard)),
        (pickle, "load", _data_only(pickle.load, guard)),
        (pickle, "Unpickler", _data_only_unpickler(guard)),
        (torch._C, "_pickle_load_obj", no_torchscript),
        (sympy_parser, "parse_expr", parse_expr),
        (torch.fx.graph, "_format_target", format_target),
        (torch.fx.Graph, "create_node", create_node),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _data_only_unpickler(guard: _Guard) -> type[pickle.Unpickler]:
    """An Unpickler that resolves no global: plain containers, numbers and strings only."""

    class DataOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise guard.refuse(f"a pickled member imports {module}.{name}")

    return DataOnly


def _data_only(real: Callable[..., Any], guard: _Guard) -> Callable[..., Any]:
    unpickler = _data_only_unpickler(guard)

    def load(data: Any, *args: Any, **kwargs: Any) -> Any:
        file = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
        return unpickler(file, *args, **kwargs).load()

    load.__doc__ = real.__doc__
    return load


def _is_plain_expression(text: str) -> bool:
    """True if ``text`` is arithmetic/logic on names, numbers and sympy calls only.

    What sympify would ``eval`` must not be able to call anything but the
    functions in :data:`_SYMPY_CALLS` and torch's sympy functions: no
    attributes, subscripts, lambdas or other calls. torch writes srepr
    (``Symbol('s0', positive=True, integer=True)``, ``Float('1.5', precision=53)``):
    a string may only be that name or number, a keyword only a constant.
    """
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    allowed_calls = _SYMPY_CALLS | _torch_sympy_functions()
    literal_args: set[int] = set()  # ids of the string constants a call may take
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in allowed_calls):
                return False
            if not all(isinstance(k.value, ast.Constant) for k in node.keywords):
                return False
            literal_args.update(_literal_args(node))
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in literal_args:
                return False
            if not isinstance(node.value, int | float | bool | str):
                return False
        elif isinstance(node, ast.Name):
            if node.id.startswith("_"):
                return False
        elif not isinstance(node, (*_EXPRESSION_NODES, ast.keyword)):
            return False
    return True


def _literal_args(call: ast.Call) -> Iterator[int]:
    """The string arguments srepr gives Symbol (a name) and Float (a number)."""
    name = call.func.id if isinstance(call.func, ast.Name) else ""
    pattern = {"Symbol": _SYMBOL_NAME, "Float": _FLOAT_TEXT}.get(name)
    if pattern is None or not call.args:
        return
    first = call.args[0]
    text = first.value if isinstance(first, ast.Constant) else None
    if isinstance(text, str) and pattern.fullmatch(text):
        yield id(first)


@functools.cache
def _torch_sympy_functions() -> frozenset[str]:
    """Names of the sympy functions torch defines (FloorDiv, ModularIndexing, ...)."""
    import inspect

    import sympy
    from torch.utils._sympy import functions

    return frozenset(
        name
        for name, obj in vars(functions).items()
        if inspect.isclass(obj)
        and issubclass(obj, sympy.Basic)
        and obj.__module__ == functions.__name__
    )
