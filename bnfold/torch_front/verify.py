"""Compare the original and the folded module, and roll back folds that broke outputs.

Both run in eval mode under ``no_grad`` on the example inputs plus a few random
draws of the same shapes. An output passes when
``max|folded - original| <= atol + rtol * max|original|`` (the rule of
:mod:`bnfold.compare`), with rtol taken from the output dtype unless given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bnfold.compare import VerifyOptions, abs_error, summarize
from bnfold.report import Code, Refusal, VerifyResult
from bnfold.torch_front.eager import Undo
from bnfold.torch_front.modules import eval_mode
from bnfold.torch_front.tensors import to_float64

EAGER_LEVEL = "eager"


@dataclass(frozen=True)
class Reference:
    """The original module's outputs on each sample, computed once."""

    samples: list[tuple[Any, ...]]
    outputs: list[list[tuple[str, torch.Tensor]]]


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


def reference(module: nn.Module, args: tuple[Any, ...], draws: int, seed: int) -> Reference:
    """Run the original on ``args`` and random draws, dropping draws it cannot run."""
    samples, outputs = [], []
    for i, sample in enumerate(make_samples(args, draws, seed)):
        try:
            outputs.append(run(module, sample))
        except Exception:
            if i == 0:
                raise
            continue
        samples.append(sample)
    return Reference(samples, outputs)


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

    @classmethod
    def of(cls, original: nn.Module, args: tuple[Any, ...], options: VerifyOptions) -> Check:
        """Run ``original`` once on ``args`` and ``options.samples`` random draws."""
        return cls(reference(original, args, options.samples, options.seed), options)

    def __call__(self, folded: nn.Module) -> VerifyResult:
        return compare(self.reference, folded, self.options.rtol, self.options.atol)


def compare(ref: Reference, module: nn.Module, rtol: float | None, atol: float) -> VerifyResult:
    """Worst error per output of ``module`` against ``ref`` over all samples."""
    worst: dict[str, tuple[float, float, str]] = {}
    try:
        for sample, expected in zip(ref.samples, ref.outputs, strict=True):
            got = dict(run(module, sample))
            for name, want in expected:
                err, scale = _errors(want, got.get(name))
                old = worst.get(name, (0.0, 0.0, dtype_name(want.dtype)))
                worst[name] = (max(old[0], err), max(old[1], scale), dtype_name(want.dtype))
    except Exception as e:  # a fold that breaks forward() is a failed fold
        return VerifyResult("failed", atol, rtol or 0.0, len(ref.samples), reason=f"{e!r}")
    return summarize(worst, atol, rtol, len(ref.samples), EAGER_LEVEL)


def _errors(want: torch.Tensor, got: torch.Tensor | None) -> tuple[float, float]:
    ref = to_float64(want)
    if got is None or got.shape != want.shape:
        return float("inf"), abs_error(ref, ref)[1]
    return abs_error(ref, to_float64(got))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the key of :data:`bnfold.compare.DEFAULT_RTOL`."""
    return str(dtype).removeprefix("torch.")


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


def describe_failure(result: VerifyResult) -> str:
    """One line naming the worst output and its measured difference."""
    if result.reason:
        return f"forward failed after the fold: {result.reason}"
    worst = max(result.outputs, key=lambda o: o.max_rel)
    return (
        f"{worst.name}: max_abs={worst.max_abs:.3g} max_rel={worst.max_rel:.3g} "
        f"> rtol={result.rtol:g}, atol={result.atol:g}"
    )
