"""One fold run on an eager module: find pairs, check, apply, verify, report."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from bnfold.affine import Unfoldable
from bnfold.errors import BnfoldError
from bnfold.layouts import LayoutError
from bnfold.report import Code, Folded, FoldReport, FoldResult, Refusal
from bnfold.torch_front import eager, graph
from bnfold.torch_front import verify as checking
from bnfold.torch_front.modules import Roles, find_roles, leaf_type_counts, observe


def fold(
    module: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool,
    verify: bool,
    rtol: float | None,
    atol: float | None,
    samples: int = checking.RANDOM_DRAWS,
    seed: int = 0,
) -> FoldResult:
    """See :func:`bnfold.torch_front.fold_module`."""
    args = as_args(example_inputs)
    work = module if inplace else _copy(module)
    report = FoldReport(front="torch", ops_before=leaf_type_counts(work))
    pairs = _checked_pairs(work, args, report)
    # Reference outputs before any fold: with inplace=True the module itself changes.
    ref = checking.reference(module, args, samples, seed) if verify else None
    undos = _apply_all(work, pairs, report)
    result = FoldResult(work, report)
    if ref is not None:
        result.verification, undos, failed = checking.verify_with_rollback(
            ref, work, undos, lambda u: eager.apply_fold(work, u.pair), rtol, atol
        )
        report.refused += failed
    report.folded = [_folded(u) for u in undos]
    report.ops_after = leaf_type_counts(work)
    return result


def _copy(module: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as e:
        raise BnfoldError(
            f"cannot deep-copy the module ({type(e).__name__}: {e}); fold it with inplace=True"
        ) from None


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Positional inputs as a tuple; a single tensor (or other value) becomes ``(x,)``."""
    return tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)


def _checked_pairs(work: nn.Module, args: tuple[Any, ...], report: FoldReport) -> list[graph.Pair]:
    roles = find_roles(work)
    calls = observe(work, args, _watched(work, roles))
    scan = graph.find_pairs(work, args, roles, calls)
    report.refused += scan.refused
    pairs = []
    for pair in scan.pairs:
        if refusal := eager.why_not(work, pair, roles, calls):
            report.refused.append(refusal)
        else:
            pairs.append(pair)
    return pairs


def _watched(root: nn.Module, roles: Roles) -> list[str]:
    """Paths whose calls are counted: linear and BN modules, and plain Sequentials."""
    seqs = [p for p, m in root.named_modules() if isinstance(m, nn.Sequential)]
    return list(roles.kind) + seqs


def _apply_all(work: nn.Module, pairs: list[graph.Pair], report: FoldReport) -> list[eager.Undo]:
    undos = []
    for pair in pairs:
        try:
            undos.append(eager.apply_fold(work, pair))
        except Unfoldable as e:
            report.refused.append(Refusal(pair.site, Code.BAD_VALUES, str(e)))
        except LayoutError as e:
            report.refused.append(Refusal(pair.site, Code.BAD_GROUPS, str(e)))
    return undos


def _folded(undo: eager.Undo) -> Folded:
    lin = undo.root.get_submodule(undo.pair.linear)
    pattern = f"{type(lin).__name__}+{type(undo.bn).__name__}"
    return Folded(undo.pair.site, pattern, undo.pair.linear, undo.pair.bn, undo.pair.finder)
