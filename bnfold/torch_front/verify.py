"""Compare the original and the folded module, and roll back folds that broke outputs.

Both run in eval mode under ``no_grad`` on the example inputs plus a few random
draws of the same shapes, or on the user's input files. An output passes when
``max|folded - original| <= atol + rtol * max|original|`` (the rule of
:mod:`bnfold.verification.verdict`), with rtol taken from the output dtype unless given.

Each eager fold site is compared too, with forward hooks: the output of the
module that now carries the fold (the ``nn.Identity`` left in the BN's place,
which passes the linear module's output on; folding before, the linear module
itself) against the same module path's output in the original. Its bound is
derived as in :mod:`bnfold.verification.tolerance`, with the reductions of every reducing
module that ran before it (an upper bound of those on its path).
"""

from __future__ import annotations

import inspect as pyinspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.options import VerifyOptions
from bnfold.report import Code, OutputDiff, Refusal, VerifyResult
from bnfold.torch_front.eager import Undo
from bnfold.torch_front.modules import eval_mode
from bnfold.torch_front.tensors import to_float64
from bnfold.verification.files import Expected, InputFiles
from bnfold.verification.tolerance import Reductions, derived_rtol, describe_basis, dtype_name
from bnfold.verification.verdict import abs_error, measured, summarize

EAGER_LEVEL = "eager"


@dataclass(frozen=True)
class Reference:
    """The original module's outputs on each sample, computed once.

    ``taps`` holds, per sample, the output of every BN and linear module by
    path (a fold site is one of them); ``reductions`` the reductions run
    before each path's output, for its bound.
    """

    samples: list[tuple[Any, ...]]
    outputs: list[list[tuple[str, torch.Tensor]]]
    taps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    reductions: dict[str, Reductions] = field(default_factory=dict)
    inputs: str = ""


def make_samples(args: tuple[Any, ...], draws: int, seed: int) -> list[tuple[Any, ...]]:
    """``args`` plus ``draws`` random copies: same shapes, dtypes, mean and std.

    Non-floating tensors (indices, masks) and non-tensors are kept as given.
    """
    gen = torch.Generator().manual_seed(seed)
    return [args] + [tuple(_draw(a, gen) for a in args) for _ in range(draws)]


def _draw(a: Any, gen: torch.Generator) -> Any:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return a
    x = torch.randn(a.shape, generator=gen, dtype=torch.float64)
    ref = a.detach().to(torch.float64)
    std = float(ref.std()) if ref.numel() > 1 else 1.0
    mean = float(ref.mean()) if ref.numel() else 0.0
    return (x * (std or 1.0) + mean).to(dtype=a.dtype, device=a.device)


def reference(
    module: nn.Module,
    args: tuple[Any, ...],
    draws: int,
    seed: int,
    inputs: str | os.PathLike[str] | None = None,
) -> Reference:
    """Run the original on ``args`` and random draws (or on the files ``inputs``).

    Random draws the original cannot run are dropped; a file it cannot run is
    the user's to know about, and raises.
    """
    if inputs is not None:
        files = InputFiles.open(inputs)
        candidates = file_samples(files, module, args)
        described = files.describe()
    else:
        candidates = make_samples(args, draws, seed)
        described = f"example inputs and {draws} random draws (seed {seed})"
    samples, outputs, taps = [], [], []
    reductions: dict[str, Reductions] = {}
    for i, sample in enumerate(candidates):
        try:
            with tapped(module, _tap_paths(module)) as (taken, reductions):
                outputs.append(run(module, sample))
        except Exception:
            if i == 0 or inputs is not None:
                raise
            continue
        taps.append(taken)
        samples.append(sample)
    return Reference(samples, outputs, taps, reductions, described)


def file_samples(
    files: InputFiles, module: nn.Module, args: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    """The samples of ``files`` as positional arguments shaped like ``args``.

    An ``.npz`` names each argument by ``forward()``'s parameter names (or
    numpy's ``arr_0, arr_1, ...`` from ``np.savez(a, b)``); an ``.npy`` is
    the single argument of a one-argument module.
    """
    names = _argument_names(module, len(args))
    expected = [
        Expected(n, np.dtype(str(a.dtype).removeprefix("torch.")), tuple(a.shape))
        for n, a in zip(names, args, strict=True)
    ]
    out = []
    for file in files.files:
        positional = [f"arr_{i}" for i in range(len(args))]
        sample = files.samples_of(file, expected, aliases=dict(zip(positional, names, strict=True)))
        out.append(tuple(torch.from_numpy(sample[n].copy()) for n in names))
    return out


def _argument_names(module: nn.Module, count: int) -> list[str]:
    try:
        params = list(pyinspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:count] if len(names) >= count else [f"arr_{i}" for i in range(count)]


_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d, nn.Linear)  # fmt: skip


def _tap_paths(module: nn.Module) -> list[str]:
    """Every module a fold site can be read at: BNs and linear modules (and their stand-ins)."""
    return [
        name
        for name, m in module.named_modules()
        # Frozen-BN modules (torchvision's FrozenBatchNorm2d) are no _BatchNorm.
        if name and (isinstance(m, _LINEAR) or "BatchNorm" in type(m).__name__)
    ]


def _reduction_length(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return int(m.in_features)
    if isinstance(m, nn.modules.conv._ConvNd):
        return int(m.in_channels // m.groups) * math.prod(m.kernel_size)
    return 1


@contextmanager
def tapped(
    module: nn.Module, paths: Sequence[str]
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Reductions]]]:
    """Record the outputs of the modules at ``paths`` during the runs inside the block.

    Also counts, per path, the reductions of every reducing module that
    finished before it (call order): an upper bound of those on its path.
    """
    taken: dict[str, torch.Tensor] = {}
    reductions: dict[str, Reductions] = {}
    wanted = set(paths)
    so_far = [Reductions()]
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, _args: Any, out: Any) -> None:
            so_far[0] = so_far[0].then(_reduction_length(mod))
            if name in wanted and isinstance(out, torch.Tensor):
                taken[name] = out.detach().clone()  # an in-place ReLU after it would change it
                reductions[name] = so_far[0]

        return record

    for name, m in module.named_modules():
        if name and not list(m.children()):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield taken, reductions
    finally:
        for h in handles:
            h.remove()


def run(module: nn.Module, sample: tuple[Any, ...]) -> list[tuple[str, torch.Tensor]]:
    """Floating-point tensor outputs of ``module(*sample)``, named by their pytree path."""
    with eval_mode(module), torch.no_grad():
        out = module(*sample)
    leaves, _ = pytree.tree_flatten_with_path(out)
    return [
        (f"output{pytree.keystr(path)}", t)
        for path, t in leaves
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]


@dataclass(frozen=True)
class Check:
    """The original's outputs and the tolerances a folded module is held to."""

    reference: Reference
    options: VerifyOptions
    # (module path, fold site): where each eager fold's result is read in both models.
    sites: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, original: nn.Module, args: tuple[Any, ...], options: VerifyOptions) -> Check:
        """Run ``original`` once on ``args`` and ``options.samples`` random draws (or the files)."""
        ref = reference(original, args, options.samples, options.seed, options.inputs)
        return cls(ref, options)

    def at_sites(self, sites: Sequence[tuple[str, str]]) -> Check:
        """The same check, also comparing these fold sites."""
        return replace(self, sites=tuple(sites))

    def __call__(self, folded: nn.Module) -> VerifyResult:
        o = self.options
        return compare(self.reference, folded, o.rtol, o.atol, self.sites)


def compare(
    ref: Reference,
    module: nn.Module,
    rtol: float | None,
    atol: float,
    sites: Sequence[tuple[str, str]] = (),
) -> VerifyResult:
    """Worst error per output (and per fold site) of ``module`` against ``ref`` over all samples."""
    worst: dict[str, tuple[float, float, str]] = {}
    at_sites: dict[str, list[float]] = {}
    paths = [p for p, _ in sites if ref.taps and p in ref.taps[0]]
    try:
        for sample, expected, taps in zip(ref.samples, ref.outputs, ref.taps, strict=True):
            with tapped(module, paths) as (taken, _):
                got = dict(run(module, sample))
            for name, want in expected:
                err, scale = _errors(want, got.get(name))
                old = worst.get(name, (0.0, 0.0, dtype_name(want.dtype)))
                worst[name] = (max(old[0], err), max(old[1], scale), dtype_name(want.dtype))
            for path in paths:
                err, scale = _errors(taps[path], taken.get(path))
                old_site = at_sites.get(path, [0.0, 0.0, 0])
                at_sites[path] = [
                    max(old_site[0], err),
                    max(old_site[1], scale),
                    taps[path].numel(),
                ]
    except Exception as e:  # a fold that breaks forward() is a failed fold
        return VerifyResult("failed", atol, rtol or 0.0, len(ref.samples), reason=f"{e!r}")
    result = summarize(worst, atol, rtol, len(ref.samples), EAGER_LEVEL)
    labels = dict(sites)
    result.sites = [_site_row(ref, p, labels[p], at_sites[p], rtol, atol) for p in paths]
    result.inputs = ref.inputs
    if not all(s.passed for s in result.sites):
        result.status = "failed"
    return result


def _site_row(
    ref: Reference, path: str, site: str, seen: list[float], rtol: float | None, atol: float
) -> OutputDiff:
    max_abs, scale, elements = seen[0], seen[1], int(seen[2])
    dtype = dtype_name(ref.taps[0][path].dtype)
    reductions = ref.reductions.get(path, Reductions())
    if rtol is None:
        bound, basis = (
            derived_rtol(dtype, reductions, elements),
            describe_basis(dtype, reductions, elements),
        )
    else:
        bound, basis = rtol, "--rtol"
    return measured(path, max_abs, scale, atol, bound, basis, site)


def _errors(want: torch.Tensor, got: torch.Tensor | None) -> tuple[float, float]:
    ref = to_float64(want)
    if got is None or got.shape != want.shape:
        return float("inf"), abs_error(ref, ref)[1]
    return abs_error(ref, to_float64(got))


def verify_with_rollback(
    check: Check,
    folded: nn.Module,
    undos: list[Undo],
    redo: Callable[[Undo], Undo],
) -> tuple[VerifyResult, list[Undo], list[Refusal]]:
    """Verify all folds at once; if that fails, keep only the folds that pass one by one.

    On failure every fold is undone, then re-applied in order, each kept only if
    the outputs still pass with it.

    Returns:
        (final verification, folds kept, VERIFICATION_FAILED refusals with the
        difference measured with that fold applied).
    """
    result = check(folded)
    if result.passed:
        return result, undos, []
    for undo in reversed(undos):
        undo()
    kept, refused = [], []
    for undo in undos:
        again = redo(undo)
        trial = check(folded)
        if trial.passed:
            kept.append(again)
        else:
            again()
            refused.append(
                Refusal(undo.pair.site, Code.VERIFICATION_FAILED, describe_failure(trial))
            )
    return check(folded), kept, refused


def site_paths(pairs: Sequence[Any]) -> list[tuple[str, str]]:
    """(module path, site) at which each linear module's folds are compared.

    Folding after, the last BN folded into the module (Conv -> BN1 -> BN2: BN2)
    leaves the ``nn.Identity`` whose output is the whole chain's; an earlier
    BN's place now carries the later folds too, so it is no evidence. A module
    with only folds before it (BN -> Conv) is compared at its own output. A
    fold into several modules (a join) is evidence only while it is the last
    on each of them; an identity tap is none (``result_at`` None: its value is
    a term of a functional sum) and retires the conv's earlier sites.
    """
    latest: dict[str, Any] = {}
    for pair in pairs:  # in the order the folds were applied
        for linear in pair.linears:
            if linear not in latest or not pair.before:  # a fold after supersedes
                latest[linear] = pair
    chosen = dict.fromkeys(latest.values())
    return [
        (p.result_at, p.site)
        for p in chosen
        if p.result_at is not None and all(latest[linear] == p for linear in p.linears)
    ]


def _excess(row: OutputDiff) -> float:
    """How far past its bound a row is (failing rows first)."""
    if row.passed:
        return -1.0
    return row.needed_rtol / row.rtol if row.rtol > 0 else float("inf")


def describe_failure(result: VerifyResult) -> str:
    """One line naming the worst output and its measured difference."""
    if result.reason:
        return f"forward failed after the fold: {result.reason}"
    worst = max([*result.outputs, *[s for s in result.sites if not s.passed]], key=_excess)
    return (
        f"{worst.name}: max_abs={worst.max_abs:.3g} max_rel={worst.max_rel:.3g} "
        f"> rtol={worst.rtol:g}, atol={result.atol:g}"
    )
