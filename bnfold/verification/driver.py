"""Compare an original and a folded ONNX model on the same inputs: outputs and fold sites.

Both run in onnxruntime with ``ORT_DISABLE_ALL`` (or both in the reference
evaluator: :mod:`bnfold.verification.runtimes`); otherwise the result is
"not_verified" with the reason. So is a model whose declared input shapes would
need more than ``VerifyOptions.max_input_bytes`` of random inputs per sample:
the sizes are checked before anything is allocated. An original that a runtime
loads but that fails on the inputs, or whose graph is malformed, is bad input
(:class:`~bnfold.verification.runtimes.OriginalFails`,
:func:`~bnfold.verification.wellformed.require_well_formed`).

Inputs are random draws or the user's files (:mod:`bnfold.verification.inputs`), made
one sample at a time. Besides the outputs, each fold site and each continuous
value feeding a discontinuous op is compared (extra graph outputs of both
copies, in memory: :mod:`bnfold.verification.plan`); each tensor's bound comes from
:mod:`bnfold.verification.tolerance`, the verdict from :mod:`bnfold.verification.verdict`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.options import VerifyOptions
from bnfold.report import NotVerified, VerifyResult
from bnfold.verification.inputs import FeedSource, InputSpec, InputsTooLarge
from bnfold.verification.plan import Plan
from bnfold.verification.runtimes import (
    HELD_SHARE,
    FoldedFailed,
    Held,
    OriginalFailed,
    OriginalFails,
    RuntimeFailure,
    folded_runtime,
    original_runtime,
    run_model,
)
from bnfold.verification.verdict import SiteValue, TensorDiff, judge


def verify_onnx(
    original: Any,
    folded: Any,
    options: VerifyOptions | None = None,
    sites: Sequence[SiteValue] | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output and every fold site.

    A tensor passes when ``max|folded - original| <= atol + rtol * max|original|``,
    rtol derived per tensor unless given (:mod:`bnfold.verification.tolerance`). An output
    downstream of a discontinuous op (NonMaxSuppression, TopK, ...) that differs
    beyond its bound passes when every fold site was compared and lies within its
    own bound, and so does every continuous value feeding such an op: a box kept
    or dropped by a rounding error says nothing about the fold (see :func:`judge`);
    a site beyond its bound fails.

    Args:
        original: path or onnx_ir.Model of the unfolded model.
        folded: path or onnx_ir.Model of the folded model.
        options: tolerances, inputs (random draws or the user's files), shapes.
        sites: the fold sites to compare (from the fold report); None finds
            them: BatchNormalization outputs of the original that the folded
            model still names.

    Returns:
        A VerifyResult; status "not_verified" (with ``reason_code``) when no
        runtime can load the original (a custom op, an opset neither knows),
        or one sample of random inputs would exceed ``options.max_input_bytes``.

    Raises:
        OriginalFails: a runtime loaded the original but it failed on the inputs.
        BnfoldError: the original is malformed (no outputs, an undefined input,
            a cycle), the folded model cannot be run, the models' inputs differ,
            ``options.shapes`` names no input, or an input file does not fit.
    """
    o = options or VerifyOptions()
    with _as_path(original) as ref_path, _as_path(folded) as new_path:
        plan = Plan.of(ref_path, new_path, sites)
        try:
            ref, runtime_kind, level = original_runtime(ref_path, plan.extra)
            inputs = ref.inputs()
            feeds = FeedSource.of(inputs, o)
        except RuntimeFailure as err:
            return _not_verified(NotVerified.ORIGINAL_NOT_RUNNABLE, str(err), o)
        except InputsTooLarge as err:
            return _not_verified(NotVerified.INPUTS_TOO_LARGE, str(err), o)
        names = ref.output_names()
        wanted = names + [v for v in dict.fromkeys(plan.extra) if v not in names]
        with Held(o.max_input_bytes // HELD_SHARE) as expected:
            _run_original(ref, wanted, feeds, expected)
            # One model in memory at a time: a multi-GB model and its fold would need twice.
            del ref
            new = folded_runtime(runtime_kind, new_path, plan.extra)
            _require_same_inputs(inputs, new.inputs())
            try:
                diffs = _compare_folded(new, wanted, feeds, expected)
            except FoldedFailed as err:
                return VerifyResult(
                    "failed", o.atol, o.rtol or 0.0, feeds.count, reason=str(err),
                    inputs=feeds.describe(),
                )  # fmt: skip
    plan.rescale(diffs)
    return judge(
        [(n, diffs[n]) for n in names], [(s, diffs[s.value]) for s in plan.sites], plan.cones,
        o, feeds.count, level, feeds.describe(), every_site=plan.every_site,
        frontier=[(n, diffs[n]) for n in plan.frontier],
    )  # fmt: skip


def _run_original(ref: Any, wanted: list[str], feeds: FeedSource, expected: Held) -> None:
    """Run the original on every sample, keeping its results in ``expected``."""
    try:
        for feed in feeds.samples():
            expected.append(run_model(ref, wanted, feed, OriginalFailed, "original"))
            del feed  # before the next sample is made
    except OriginalFailed as err:
        raise OriginalFails(str(err), random=feeds.files is None) from None


def _compare_folded(
    new: Any, wanted: list[str], feeds: FeedSource, expected: Held
) -> dict[str, TensorDiff]:
    """Run the fold on every sample and compare each result with the original's, then drop both."""
    diffs = {name: TensorDiff() for name in wanted}
    for i, feed in enumerate(feeds.samples()):
        got = run_model(new, wanted, feed, FoldedFailed, "folded")
        del feed
        for name, r, n in zip(wanted, expected.pop(i), got, strict=True):
            diffs[name].add(r, n)
        del got
    return diffs


def _not_verified(code: NotVerified, reason: str, o: VerifyOptions) -> VerifyResult:
    return VerifyResult("not_verified", o.atol, o.rtol or 0.0, 0, reason=reason, reason_code=code)


@contextlib.contextmanager
def _as_path(source: Any) -> Iterator[Path]:
    """A file path for the runtimes; in-memory models are saved to a temp folder."""
    if isinstance(source, str | os.PathLike):
        yield Path(source)
        return
    if not isinstance(source, ir.Model):
        raise BnfoldError(f"cannot verify a {type(source).__name__}; pass a path or onnx_ir.Model")
    from bnfold.onnx_front.io import save_model

    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(source, path)
        yield path


def _require_same_inputs(a: list[InputSpec], b: list[InputSpec]) -> None:
    names_a, names_b = sorted(i.name for i in a), sorted(i.name for i in b)
    if names_a != names_b:
        raise BnfoldError(f"the models have different inputs: {names_a} vs {names_b}")
