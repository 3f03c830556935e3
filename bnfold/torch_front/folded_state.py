"""A folded eager module saved as a ``.pt`` state_dict, and loaded back into a fresh model.

A fold changes the module tree as well as the weights: each folded BatchNorm
becomes ``nn.Identity`` (its state_dict keys go), a lowered one a
:class:`~bnfold.torch_front.lower_modules.LoweredBatchNorm` or a 1x1 depthwise
conv, and a linear module that had no bias gains one. The bare state_dict fits
no model the user can build: ``load_state_dict`` on a freshly built model fails
on the missing BatchNorm keys, and with ``strict=False`` it drops the new biases,
keeps the BatchNorms at their initial values and computes something else.

:func:`save_folded` writes the folded state_dict with a record of those changes
attached as an attribute of the OrderedDict (the way torch keeps ``_metadata``):
``torch.load(path, weights_only=True)`` reads it, its keys are the folded
module's, and plain ``load_state_dict`` into a model of the folded shape still
works. :func:`load_folded` makes the recorded changes to a freshly built model,
then loads the weights strictly: it fits, or it raises and leaves the model as
it was.

A ``.pt2`` (``bnfold fold ... -o model.pt2``) needs none of this:
``torch.export.load(path).module()`` runs it without the model's code. Prefer
it wherever an exported program serves (inference, serving, ONNX export); the
``.pt`` is for code that builds the model class itself (fine-tuning, a training
codebase).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, first_line, quoted
from bnfold.paths import staged_file
from bnfold.report import FoldResult
from bnfold.torch_front.lower_modules import LoweredBatchNorm
from bnfold.torch_front.modules import is_bn_like

RECORD_ATTRIBUTE = "bnfold_fold"  # the attribute of the saved OrderedDict holding the record
RECORD_FORMAT = 1
IDENTITY, MUL_ADD, DEPTHWISE_CONV = "identity", "mul_add", "depthwise_conv"
_CONV_OF_RANK: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclass(frozen=True)
class FoldRecord:
    """The structural changes of one fold: what replaced each BatchNorm, which modules got a bias.

    ``replaced`` maps a BatchNorm's module path to what stands there now
    (``"identity"``, ``"mul_add"`` or ``"depthwise_conv"``); ``biased`` lists the
    linear modules the fold wrote a bias to (created where there was none).
    Stored as plain dicts, lists and strings, which ``weights_only`` loading reads.
    """

    replaced: Mapping[str, str]
    biased: tuple[str, ...]

    @classmethod
    def of_result(cls, result: FoldResult) -> FoldRecord:
        """The record of an eager fold, from its report and the folded module."""
        module = result.model
        report = result.report
        paths = [f.affine for f in report.folded] + [lowered.site for lowered in report.lowered]
        replaced = {path: _kind_at(module, path) for path in paths}
        # A join folds into every term: its report names them "a, b".
        biased = sorted({linear for f in report.folded for linear in f.linear.split(", ")})
        return cls(replaced, tuple(biased))

    def to_plain(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "replaced": dict(self.replaced),
            "biased": list(self.biased),
        }

    @classmethod
    def of_state(cls, state: Mapping[str, Any]) -> FoldRecord | None:
        """The record a state_dict carries, None if it carries none.

        Raises:
            BnfoldError: a record of another format, or malformed.
        """
        plain = getattr(state, RECORD_ATTRIBUTE, None)
        if plain is None:
            return None
        if not isinstance(plain, Mapping) or plain.get("format") != RECORD_FORMAT:
            found = plain.get("format") if isinstance(plain, Mapping) else type(plain).__name__
            raise BnfoldError(
                f"fold record of format {found!r}; this bnfold reads format {RECORD_FORMAT}"
            )
        replaced, biased = plain.get("replaced"), plain.get("biased")
        kinds = (IDENTITY, MUL_ADD, DEPTHWISE_CONV)
        if not (
            isinstance(replaced, Mapping)
            and all(isinstance(p, str) and k in kinds for p, k in replaced.items())
            and isinstance(biased, list)
            and all(isinstance(p, str) for p in biased)
        ):
            raise BnfoldError("malformed fold record")
        return cls(dict(replaced), tuple(biased))


def folded_state_dict(result: FoldResult) -> dict[str, Any]:
    """The folded module's state_dict, carrying the record :func:`load_folded` needs.

    Raises:
        BnfoldError: ``result`` is not the fold of an eager ``nn.Module``.
    """
    module = result.model
    if not isinstance(module, nn.Module):
        raise BnfoldError(
            f"save_folded writes the fold of an eager nn.Module, not a {type(module).__name__}; "
            "save an ExportedProgram with torch.export.save (.pt2)"
        )
    state = module.state_dict()
    setattr(state, RECORD_ATTRIBUTE, FoldRecord.of_result(result).to_plain())
    return state


def save_folded(result: FoldResult, path: str | os.PathLike[str]) -> Path:
    """Save the folded module of ``result`` as a ``.pt`` that :func:`load_folded` reads back.

    The file is the folded state_dict (``torch.load(path, weights_only=True)``
    reads it) with the record of what the fold changed in the module tree;
    written atomically, with the mode the umask gives a new file. Where an
    exported program serves, a ``.pt2`` loads without the model's code (see
    the module docstring).

    Returns:
        The path written.

    Raises:
        BnfoldError: ``result`` is not an eager fold, or the file cannot be written.
    """
    state = folded_state_dict(result)
    target = Path(path)
    with staged_file(target) as tmp:
        torch.save(state, tmp)
    return target


def load_folded(model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Any]) -> nn.Module:
    """Load a ``.pt`` written by :func:`save_folded` (or ``bnfold fold -o x.pt``) into ``model``.

    ``model`` is freshly built, the same architecture that was folded (any
    weights). The fold's record is applied first: each folded BatchNorm becomes
    ``nn.Identity``, each lowered one the module it was lowered to, and each
    linear module the fold gave a bias gets one; then the weights load with
    ``strict=True``, so every key must fit.

    Args:
        model: the model to load into; changed in place.
        source: the file, or its state_dict already loaded with ``torch.load``.

    Returns:
        ``model``, now computing what the folded module computed.

    Raises:
        BnfoldError: the file cannot be read, carries no fold record (a plain
            state_dict: use ``model.load_state_dict``), or does not fit
            ``model``; ``model`` is then left as it was.
    """
    if isinstance(source, Mapping):
        state, shown = source, "the state_dict"
    else:
        state, shown = _read(source), quoted(source)
    load_into(model, state, shown)
    return model


def load_into(model: nn.Module, state: Mapping[str, Any], shown: str) -> None:
    """Apply the record ``state`` carries to ``model``, then load ``state`` strictly.

    Raises:
        BnfoldError: as :func:`load_folded`; ``model`` is then left as it was.
    """
    record = FoldRecord.of_state(state)
    if record is None:
        raise BnfoldError(
            f"{shown} has no fold record (not written by bnfold.save_folded); "
            "a plain state_dict loads with model.load_state_dict"
        )
    undo = _apply(model, record, state, shown)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        undo()
        raise BnfoldError(f"{shown} does not fit the model: {mismatch(err)}") from None


def mismatch(err: RuntimeError, limit: int = 300) -> str:
    """torch's ``load_state_dict`` error on one line: the missing, unexpected and misfit keys.

    Its first line only says "Error(s) in loading state_dict for Net:"; the keys follow.
    """
    details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return "; ".join(details)[:limit] if details else first_line(err, limit)


def _read(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    if not Path(path).is_file():
        raise BnfoldError(f"{quoted(path)} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise BnfoldError(f"cannot load {quoted(path)}: {first_line(err)}") from None
    if not isinstance(state, Mapping):
        raise BnfoldError(f"{quoted(path)} holds a {type(state).__name__}, not a state_dict")
    return state


def _kind_at(module: nn.Module, path: str) -> str:
    """What a fold left at a BatchNorm's path, as the record names it."""
    try:
        found = module.get_submodule(path)
    except AttributeError:  # a graph-level fold names aten nodes, not modules
        raise BnfoldError(
            f"the fold's report names {path!r}, no module of the folded model: "
            "save_folded writes eager folds (save a graph-level fold as .pt2)"
        ) from None
    kind = _kind_of(found)
    if kind is not None:
        return kind
    raise BnfoldError(
        f"the folded module has a {type(found).__name__} at {path!r}, where its fold left "
        "none: was it changed after the fold?"
    )


def _apply(
    model: nn.Module, record: FoldRecord, state: Mapping[str, Any], shown: str
) -> Callable[[], None]:
    """Make the recorded changes to ``model``; return what undoes them.

    Everything is checked and built before the first change, so a model that
    does not fit is refused untouched.
    """
    swaps: list[tuple[str, nn.Module, nn.Module]] = []  # path, old, new
    for path, kind in record.replaced.items():
        old = _submodule(model, path, shown)
        if _kind_of(old) == kind:
            continue  # loaded into once already
        if not is_bn_like(old):
            raise BnfoldError(
                f"{shown} folded a BatchNorm at {path!r}; the model has a {type(old).__name__}"
            )
        swaps.append((path, old, _replacement(kind, path, old, state, shown)))
    biases: list[tuple[Any, nn.Parameter]] = []  # Conv/Linear modules, duck-typed
    for path in record.biased:
        linear = _submodule(model, path, shown)
        if getattr(linear, "bias", 0) is None and f"{path}.bias" in state:
            biases.append((linear, _new_bias(linear, _saved(state, f"{path}.bias", shown))))
    for path, _, new in swaps:
        _set_submodule(model, path, new)
    for linear, bias in biases:
        linear.bias = bias

    def undo() -> None:
        for path, old, _ in swaps:
            _set_submodule(model, path, old)
        for linear, _ in biases:
            linear.bias = None

    return undo


def _kind_of(module: nn.Module) -> str | None:
    """Which replacement ``module`` is, if it is one a fold leaves (None: any other module)."""
    if type(module) is nn.Identity:
        return IDENTITY
    if isinstance(module, LoweredBatchNorm):
        return MUL_ADD
    return DEPTHWISE_CONV if type(module) in _CONV_OF_RANK.values() else None


def _replacement(kind: str, path: str, bn: Any, state: Mapping[str, Any], shown: str) -> nn.Module:
    """The module the fold left at ``path``, shaped from the saved tensors, on ``bn``'s device.

    ``bn`` is read duck-typed: a BatchNorm or a frozen-BN style module.
    """
    device = bn.running_mean.device
    weight = getattr(bn, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else bn.running_mean.dtype
    new: nn.Module
    if kind == IDENTITY:
        new = nn.Identity()
    elif kind == MUL_ADD:
        scale, shift = (
            _saved(state, f"{path}.{name}", shown) for name in ("lowered_scale", "lowered_shift")
        )
        new = LoweredBatchNorm(
            nn.Parameter(torch.empty(scale.shape, dtype=dtype, device=device)),
            nn.Parameter(torch.empty(shift.shape, dtype=dtype, device=device)),
        )
    else:
        saved = _saved(state, f"{path}.weight", shown)
        conv_type = _CONV_OF_RANK.get(saved.ndim)
        if conv_type is None:
            raise BnfoldError(f"{shown}: {path}.weight of shape {tuple(saved.shape)} is no conv")
        channels = saved.shape[0]
        new = conv_type(channels, channels, 1, groups=channels, device=device, dtype=dtype)
    new.train(bn.training)
    return new


def _saved(state: Mapping[str, Any], key: str, shown: str) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise BnfoldError(f"{shown} has no tensor {key!r}, which its fold record needs")
    return value


def _new_bias(linear: nn.Module, saved: torch.Tensor) -> nn.Parameter:
    """A bias of the saved shape, with the weight's dtype, device and requires_grad."""
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    values = torch.zeros(saved.shape, dtype=weight.dtype, device=weight.device)
    return nn.Parameter(values, requires_grad=weight.requires_grad)


def _submodule(model: nn.Module, path: str, shown: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise BnfoldError(
            f"{shown} was folded from a model with a module {path!r}; this has none"
        ) from None


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
