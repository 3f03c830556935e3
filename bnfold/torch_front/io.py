"""Loading and saving torch models for the CLI: module factories, ``.pt2`` files, ONNX export.

Every user mistake (bad spec, missing file, a checkpoint that needs full
unpickling) raises :class:`bnfold.errors.BnfoldError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, NotSupportedError, first_line, quoted
from bnfold.paths import staged_file

if TYPE_CHECKING:
    from bnfold.onnx_front.io import SavedModel


def load_module_factory(spec: str, weights: str | None, trust_pickle: bool) -> nn.Module:
    """Build a module from ``"pkg.mod:factory"`` and load its weights, in eval mode.

    Args:
        spec: import path and a callable (class or function) returning an nn.Module;
            the callable may be dotted (``"pkg.mod:Class.create"``).
        weights: a state_dict file (``torch.save``), or None to keep the factory's
            weights. A checkpoint dict holding ``"state_dict"`` or ``"model"`` is
            unwrapped, and a whole pickled module gives its state_dict.
        trust_pickle: allow full unpickling, which can run arbitrary code from the
            file. Without it, ``torch.load(weights_only=True)`` is used.

    Returns:
        The module in eval mode: bnfold folds for inference.

    Raises:
        BnfoldError: bad spec, the factory fails or returns no nn.Module, the file
            is missing, needs ``--trust-pickle``, or does not fit the module.
    """
    module = _call_factory(spec)
    if weights is not None:
        _load_weights(module, weights, trust_pickle)
    return module.eval()


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's code (a factory, a model's forward): ``sys.exit`` in it is an error.

    Without this a factory calling ``sys.exit(0)`` ends bnfold with exit 0 and
    nothing written.
    """
    try:
        yield
    except SystemExit as e:
        raise BnfoldError(f"{what} called sys.exit({e.code!r})") from None


def factory_source_file(spec: str) -> str | None:
    """The file defining the module of a ``pkg.mod:factory`` spec, if it has one.

    It is an input too: an output path naming it must be refused like any other.
    Finding a dotted module imports its parent packages (user code, hence
    :func:`user_code`); one that cannot be found is left for the load to report.
    """
    module = spec.partition(":")[0]
    try:
        with user_code(f"importing {module!r}"):
            found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.has_location else None


def _call_factory(spec: str) -> nn.Module:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise BnfoldError(f"module spec {spec!r} must look like 'package.module:factory'")
    try:
        with user_code(f"importing {mod_name!r}"):
            obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise BnfoldError(f"cannot import {mod_name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BnfoldError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    try:
        with user_code(spec):
            module = obj()
    except BnfoldError:
        raise
    except Exception as e:
        raise BnfoldError(f"{spec} failed: {type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise BnfoldError(f"{spec} returned {type(module).__name__}, not a torch nn.Module")
    return module


def _load_weights(module: nn.Module, path: str, trust_pickle: bool) -> None:
    if not Path(path).is_file():
        raise BnfoldError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise BnfoldError(f"cannot load {path!r}: {first_line(e)}") from None
        raise BnfoldError(
            f"{path!r} needs full unpickling, which can run code from the file; "
            "pass --trust-pickle if you trust it"
        ) from None
    except Exception as e:
        raise BnfoldError(f"cannot load {path!r}: {type(e).__name__}: {first_line(e)}") from None
    from bnfold.torch_front.folded_state import FoldRecord, load_into, mismatch

    state = _state_dict_of(obj, path)
    if FoldRecord.of_state(state) is not None:  # a folded .pt: the module takes its fold first
        load_into(module, state, repr(path))
        return
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise BnfoldError(f"{path!r} does not fit the module: {mismatch(e)}") from None


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        return obj
    raise BnfoldError(f"{path!r} holds a {type(obj).__name__}, not a state_dict")


def example_inputs_from_shapes(
    shapes: Sequence[Sequence[int]], dtype: str = "float32", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random example inputs for a factory-built module, one tensor per shape."""
    gen = torch.Generator().manual_seed(seed)
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise BnfoldError(f"unknown dtype {dtype!r}") from None
    return tuple(torch.randn(tuple(s), generator=gen).to(torch_dtype) for s in shapes)


def load_exported_program(
    path: str | os.PathLike[str], trust_pickle: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.load`` that runs no code from the file, with one-line errors.

    Without ``trust_pickle`` every pickled member of the archive is read as
    plain data (see :mod:`bnfold.torch_front.archive`); with it the file is
    loaded exactly as torch would, the user's explicit choice.

    Raises:
        BnfoldError: missing or unreadable file, not an ExportedProgram archive,
            or a file that would run code while ``trust_pickle`` is False.
    """
    from bnfold.torch_front.archive import load_untrusted

    shown = quoted(path)
    if not Path(path).is_file():
        raise BnfoldError(f"{shown} does not exist")
    try:
        return load_untrusted(os.fspath(path), trust_code=trust_pickle)
    except BnfoldError as e:
        raise type(e)(f"cannot load {shown} as an ExportedProgram: {e}") from None


def example_args(ep: torch.export.ExportedProgram) -> tuple[Any, ...]:
    user_inputs = [
        n
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    ]
    shapes = [getattr(n.meta.get("val"), "shape", ()) for n in user_inputs]
    if any(not isinstance(d, int) for s in shapes for d in s):
        raise NotSupportedError("folding a .pt2 with dynamic shapes is not supported")
    if ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        if kwargs:
            raise NotSupportedError("folding a .pt2 with keyword inputs is not supported")
        return tuple(args)
    vals = [n.meta.get("val") for n in user_inputs]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        raise BnfoldError("the .pt2 has no example inputs and non-tensor inputs")
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(tuple(v.shape), generator=gen).to(v.dtype) for v in vals)


def export_onnx(module: Any, example_inputs: Any, path: str | os.PathLike[str]) -> SavedModel:
    """Export a (folded) module or ExportedProgram to ONNX with torch's exporter, atomically.

    torch's ONNX exporter folds Conv+BatchNorm by itself when optimizing; after
    bnfold's fold there is nothing left for it to fold, and bnfold's report
    plus verification are what tell you the fold was right.

    Returns:
        The files written: the model, and ``<path>.data`` if it is too big for
        one protobuf (see :func:`bnfold.onnx_front.io.save_model_files`).

    Raises:
        BnfoldError: the export fails or the output cannot be written.
    """
    from bnfold.onnx_front.io import save_model_files
    from bnfold.quiet import quiet_loggers
    from bnfold.torch_front.run import as_args

    try:
        # The exporter warns on stderr about torchvision ops it cannot register when
        # torchvision is absent (torch >= 2.14): noise for a model that uses none.
        with quiet_loggers("torch.onnx"):
            program = torch.onnx.export(
                module, as_args(example_inputs), dynamo=True, verbose=False
            )
    except Exception as e:
        raise BnfoldError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from None
    if program is None:
        raise BnfoldError("ONNX export returned nothing")
    saved = save_model_files(program.model, path)
    assert saved is not None  # only a rejecting ``accept`` writes nothing
    return saved


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success it replaces ``path``.

    See :func:`bnfold.paths.staged_file`: the file is published with the mode
    the umask gives a new file, never a partial one.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise BnfoldError(f"output folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise BnfoldError(f"output {str(target)!r} is a folder")
    with staged_file(target) as tmp:
        yield str(tmp)
