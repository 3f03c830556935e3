"""The PyTorch front: fold inference BatchNorm into the Conv/ConvTranspose/Linear before it.

torch is imported only inside these functions, so ``import bnfold`` works
without torch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold.affine import Rounding
from bnfold.errors import NotSupportedError
from bnfold.report import FoldReport, FoldResult, LowerForm

if TYPE_CHECKING:
    from torch import nn

__all__ = ["fold_module", "inspect_module", "require_torch"]


def require_torch() -> None:
    """Raise a one-line NotSupportedError if torch is not installed.

    Call it before importing :mod:`bnfold.torch_front.io` (which imports torch).
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise NotSupportedError("PyTorch is not installed: pip install 'bnfold[torch]'") from None


def fold_module(  # noqa: PLR0913 -- public API: keyword options, one per CLI flag
    module: nn.Module,
    example_inputs: Any,
    *,
    inplace: bool = False,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    samples: int = 3,
    seed: int = 0,
    rounding: Rounding = Rounding.NEAREST,
) -> FoldResult:
    """Fold every foldable BatchNorm of ``module`` into the linear module feeding it.

    Matches:  Conv{1,2,3}d | ConvTranspose{1,2,3}d | Linear (2-D input)
              -> BatchNorm{1,2,3}d, a subclass, a frozen-BN style module (matched
              by its weight/bias/running_mean/running_var/eps), or one that runs
              children after its affine (timm's BatchNormAct2d, FrozenBatchNormAct2d);
              for a BN that cannot fold so (after a ReLU, say), BN -> that linear
              module. Either also through one view/flatten/unflatten/(un)squeeze
              when each channel of the linear module lies inside one BN channel
              (Linear -> view(N, C, H, W) -> BN2d; BN -> flatten -> Linear).
              Also conv -> avg/adaptive avg/max pool -> BN (the pool kept),
              BN(L_a(x) + L_b(y)) and BN(cat([L_a, L_b, ...], 1)) into every
              term, and an identity BN of a branch sum, conv(x) + ... + bn(x),
              as a centred tap into that conv (:mod:`bnfold.torch_front.eager_match`).
              A pair that runs together on every call (a block in a loop) folds.
              Folds repeat until none is new: Conv -> BN -> BN and
              BN -> Conv -> BN fold completely, and an identity BN taps a
              conv once that conv's own BN has folded.
    Produces: the linear modules with the BN's affine in their weights and
              biases (a bias Parameter is created where there was none) and the
              BN replaced by ``nn.Identity``, or by an ``nn.Sequential`` of the
              children it ran after its affine (an activation, a drop-out), under
              their names; every other state_dict key unchanged, and forward
              unchanged (no branch is merged). Pairs are found in a trace of the
              whole module (export, fx) or, where none can follow forward(), in
              one recorded eager run (:mod:`bnfold.torch_front.recorded`).
              The math runs in float64 and is cast once to each parameter's dtype.
    Refuses (site unchanged): TRAINING_MODE, NO_RUNNING_STATS, REUSED_MODULE
      (a linear module that also runs apart from its BN has one weight for all
      its calls; fold an exported program to give the BN's call a copy),
      BRANCHING, NONLINEAR_INPUT, OP_BETWEEN, STANDALONE, UNTRACEABLE, HOOKED,
      PARAMETRIZED, UNSUPPORTED_DTYPE, BAD_SHAPE, NOT_PER_CHANNEL, BAD_VALUES,
      BAD_GROUPS, ZERO_PADDING (BN -> zero-padded Conv or ConvTranspose with a
      nonzero shift), POOL_PADDING / NEGATIVE_SCALE (a pool the BN does not
      commute with), NOT_LINEAR_TERM (a join term that is no linear module),
      BRANCH_MISMATCH / UNCENTRED_TAP (a conv that cannot take an identity
      tap), and VERIFICATION_FAILED (folded, measured, rolled back).

    Args:
        module: the model; not changed unless ``inplace``.
        example_inputs: positional inputs, a tuple (or a single tensor).
        inplace: fold ``module`` itself instead of a deep copy.
        verify: compare with the original on the inputs and random draws of the
            same shapes, and roll back any fold that changes outputs beyond tolerance.
        rtol: relative tolerance, on the scale of each output; None picks it
            from the output dtype.
        atol: absolute tolerance; None means 0.
        samples: random draws compared besides ``example_inputs`` itself.
        seed: seed of the random draws.
        rounding: how folded weights are cast to their dtype.

    Returns:
        FoldResult: ``model`` (same class as ``module``), ``report`` (each
        ``Folded.finder`` says which finder found the pair) and ``verification``.

    Raises:
        BnfoldError: the module cannot run on ``example_inputs``.
    """
    require_torch()
    from bnfold.options import VerifyOptions
    from bnfold.torch_front import run

    options = VerifyOptions(0.0 if atol is None else atol, rtol, samples, seed) if verify else None
    return run.fold(module, example_inputs, inplace=inplace, verify=options, rounding=rounding)


def inspect_module(
    module: nn.Module, example_inputs: Any, lower: LowerForm | None = None
) -> FoldReport:
    """Report the folds :func:`fold_module` would make and every refusal; ``module`` is untouched.

    Folds a copy without verification, so values that cannot fold (BAD_VALUES,
    BAD_GROUPS) are reported too; only VERIFICATION_FAILED needs :func:`fold_module`.
    With ``lower``, the copy is lowered too (what ``lower_standalone`` would do).
    """
    require_torch()
    from bnfold.torch_front import run

    report = run.fold(module, example_inputs, inplace=False, verify=None, lower=lower).report
    report.dry_run = True
    return report
