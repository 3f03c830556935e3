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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bnfold.errors import BnfoldError
from bnfold.options import VerifyOptions
from bnfold.report import FedInput, FoldReport, NotVerified, VerifyResult
from bnfold.verification.calibrate import rounding_noise
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
from bnfold.verification.shapes import choices, inference_problem
from bnfold.verification.verdict import (
    Certificate,
    Compared,
    SiteValue,
    TensorDiff,
    judge,
    needs_calibration,
    same_values,
    with_proof,
)


def verify_onnx(
    original: Any,
    folded: Any,
    options: VerifyOptions | None = None,
    sites: Sequence[SiteValue] | None = None,
    certificate: Certificate | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output and every fold site.

    A tensor passes when ``max|folded - original| <= atol + rtol * max|original|``,
    rtol derived per tensor unless given (:mod:`bnfold.verification.tolerance`),
    and widened to the rounding noise the original shows where a tensor goes past
    it (:mod:`bnfold.verification.calibrate`). An output downstream of a
    discontinuous op (NonMaxSuppression, TopK, ...) that differs beyond its bound
    passes when every fold site was compared and lies within its own bound, and so
    does every continuous value feeding such an op: a box kept or dropped by a
    rounding error says nothing about the fold (see :func:`judge`); a site beyond
    its bound fails. Random inputs give every dynamic dimension a size that makes
    the model compute (:mod:`bnfold.verification.shapes`).

    Args:
        original: path or onnx_ir.Model of the unfolded model.
        folded: path or onnx_ir.Model of the folded model.
        options: tolerances, inputs (random draws or the user's files), shapes.
        sites: the fold sites to compare (from the fold report); None finds
            them: BatchNormalization outputs of the original that the folded
            model still names.
        certificate: a proof of the folds (see :class:`Certificate`), judged
            first (:func:`~bnfold.verification.verdict.with_proof`): a difference
            it found fails the result; where it holds, differences within a
            rounding envelope do not fail, and a fold that cannot be sampled passes.

    Returns:
        A VerifyResult; status "not_verified" (with ``reason_code``) when no
        runtime can load the original (a custom op, an opset neither knows), one
        sample of random inputs would exceed ``options.max_input_bytes``, the
        original runs on none of the random inputs tried, or every compared
        tensor was constant (no evidence).

    Raises:
        OriginalFails: the original failed on the user's input files, or is
            malformed (strict shape inference says so) and failed on every input.
        BnfoldError: the original is malformed (no outputs, an undefined input,
            a cycle, a node with the wrong number of inputs), the folded model
            cannot be run, the models' interfaces differ, ``options.shapes``
            names no input, or an input file does not fit.
    """
    return with_proof(_sampled(original, folded, options, sites, certificate), certificate)


def not_sampled(options: VerifyOptions | None, certificate: Certificate | None) -> VerifyResult:
    """The result when the models are not run at all: the proof alone judges.

    Passed when ``certificate`` holds, failed when it found a difference, else
    "not_verified" (``not_sampled``): nothing was established.
    """
    o = options or VerifyOptions()
    reason = "not sampled (the models were not run)"
    return with_proof(_not_verified(NotVerified.NOT_SAMPLED, reason, o), certificate)


def _sampled(
    original: Any,
    folded: Any,
    options: VerifyOptions | None,
    sites: Sequence[SiteValue] | None,
    certificate: Certificate | None,
) -> VerifyResult:
    """:func:`verify_onnx` before the proof's own verdict is applied."""
    o = options or VerifyOptions()
    with _as_path(original) as ref_path, _as_path(folded) as new_path:
        plan = Plan.of(ref_path, new_path, sites)
        try:
            ref, runtime_kind, level = original_runtime(ref_path, plan.extra)
        except RuntimeFailure as err:
            return _not_verified(NotVerified.ORIGINAL_NOT_RUNNABLE, str(err), o)
        inputs, names = ref.inputs(), ref.output_names()
        wanted = names + [v for v in dict.fromkeys(plan.extra) if v not in names]
        with Held(o.max_input_bytes // HELD_SHARE) as expected:
            try:
                feeds = _feed_original(ref, ref_path, inputs, wanted, o, expected)
            except InputsTooLarge as err:
                return _not_verified(NotVerified.INPUTS_TOO_LARGE, str(err), o)
            except _Unusable as err:
                return _not_verified(NotVerified.INPUTS_UNUSABLE, str(err), o, err.fed)
            # One model in memory at a time: a multi-GB model and its fold would need twice.
            del ref
            new = folded_runtime(runtime_kind, new_path, plan.extra)
            _require_same_inputs(inputs, new.inputs())
            try:
                diffs = _compare_folded(new, wanted, feeds, expected, plan.sites)
            except FoldedFailed as err:
                return _fed(VerifyResult(
                    "failed", o.atol, o.rtol or 0.0, feeds.count, reason=str(err),
                    inputs=feeds.describe(),
                ), feeds)  # fmt: skip
            del new
            plan.rescale(diffs)
            verdict = _Verdict(plan, names, diffs, o, feeds, level, certificate)
            result = verdict()
            if needs_calibration(result):
                noise = rounding_noise(
                    ref_path, runtime_kind, plan.extra, wanted, feeds.samples(), expected
                )
                result = verdict(noise)
    return _fed(result, feeds)


def verify_fold(
    original: Any,
    folded: Any,
    report: FoldReport,
    options: VerifyOptions | None = None,
    certificate: Certificate | None = None,
) -> VerifyResult | None:
    """Verify what one fold run wrote against what it read; None if the run changed nothing.

    A model in which nothing was folded or lowered is written as it was read:
    there is no fold to check (:func:`require_runnable` only refuses a malformed
    one). Otherwise :func:`verify_onnx` compares the fold sites the report names.
    """
    if not (report.folded or report.lowered):
        require_runnable(original, options)
        return None
    return verify_onnx(original, folded, options, site_values(report), certificate)


def require_runnable(original: Any, options: VerifyOptions | None = None) -> None:
    """Refuse a malformed original, or one that fails on the user's input files.

    Runs it on one sample, as verification would. A well-formed model that no
    runtime loads, or that refuses every random input, is no concern here: it
    is passed on as it is.

    Raises:
        OriginalFails: it fails on the user's files, or is malformed (strict
            shape inference says so) and failed on every random input.
    """
    o = replace(options or VerifyOptions(), samples=1)
    with _as_path(original) as path:
        try:
            ref, _, _ = original_runtime(path)
        except RuntimeFailure:
            return
        names = ref.output_names()
        budget = o.max_input_bytes // HELD_SHARE
        with Held(budget) as expected, contextlib.suppress(InputsTooLarge, _Unusable):
            _feed_original(ref, path, ref.inputs(), names, o, expected)


def site_values(report: FoldReport) -> list[SiteValue]:
    """The fold sites verification compares, from what the pass folded."""
    return [SiteValue(f.value, f.site) for f in report.folded if f.value]


@dataclass(frozen=True)
class _Verdict:
    """The judgement of one comparison, with or without calibrated noise."""

    plan: Plan
    names: list[str]
    diffs: dict[str, TensorDiff]
    options: VerifyOptions
    feeds: FeedSource
    level: str
    certificate: Certificate | None

    def __call__(self, noise: dict[str, float] | None = None) -> VerifyResult:
        d, plan = self.diffs, self.plan
        compared = Compared(
            [(n, d[n]) for n in self.names], [(s, d[s.value]) for s in plan.sites],
            [(n, d[n]) for n in plan.frontier], plan.every_site,
        )  # fmt: skip
        return judge(
            compared, plan.cones, self.options, samples=self.feeds.count, level=self.level,
            inputs=self.feeds.describe(), noise=noise, certificate=self.certificate,
        )  # fmt: skip


# At most this many input shapes are tried before random inputs are given up on.
MAX_ATTEMPTS = 4


class _Unusable(Exception):
    """The original failed on every random input tried (the message says which, and why)."""

    def __init__(self, message: str, fed: list[FedInput]) -> None:
        super().__init__(message)
        self.fed = fed


def _feed_original(
    ref: Any,
    ref_path: Path,
    inputs: list[InputSpec],
    wanted: list[str],
    options: VerifyOptions,
    expected: Held,
) -> FeedSource:
    """Run the original on every sample, its results into ``expected``; the inputs used.

    The user's files must run (:class:`OriginalFails` otherwise). Random inputs
    try the shapes :func:`~bnfold.verification.shapes.choices` lists, in order,
    and keep the first the original runs on.

    Raises:
        OriginalFails: on the user's files; or on random inputs when strict
            shape inference finds the model malformed.
        InputsTooLarge: no shape to try fits ``options.max_input_bytes``.
        _Unusable: a well-formed original failed on every shape tried.
    """
    if options.inputs is not None:
        feeds = FeedSource(inputs, options)
        try:
            _run_all(ref, wanted, feeds, expected)
        except OriginalFailed as err:
            raise OriginalFails(str(err), random=False) from None
        return feeds
    proto = _Proto(ref_path)
    failures: list[tuple[FeedSource, OriginalFailed]] = []
    too_large: InputsTooLarge | None = None
    for choice in choices(inputs, options.shapes or {}, proto.when_needed(inputs, options)):
        try:
            feeds = FeedSource(inputs, options, choice.shapes, choice.note)
        except InputsTooLarge as err:
            too_large = too_large or err
            continue
        try:
            _run_all(ref, wanted, feeds, expected)
            return feeds
        except OriginalFailed as err:
            expected.clear()
            failures.append((feeds, err))
            if len(failures) == MAX_ATTEMPTS:
                break
    if not failures:
        assert too_large is not None
        raise too_large
    raise _given_up(failures, proto.load())


def _given_up(failures: list[tuple[FeedSource, OriginalFailed]], model: Any) -> Exception:
    """Malformed (bad input) when shape inference says so, else unusable random inputs."""
    first = str(failures[0][1])
    problem = inference_problem(model) if model is not None else None
    if problem is not None:
        return OriginalFails(f"the original model is malformed: {problem}; {first}", random=False)
    tried = ", ".join(" ".join(i.line() for i in feeds.fed) for feeds, _ in failures)
    return _Unusable(
        f"the original model failed on every random input bnfold made ({tried}); first: "
        f"{first}. Pass --shape NAME:DIMS or --inputs FILES with inputs it accepts",
        failures[0][0].fed,
    )


class _Proto:
    """The original as an onnx proto without external data, read once and only if needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._model: Any = None
        self._read = False

    def load(self) -> Any:
        if not self._read:
            self._read = True
            import onnx

            try:
                self._model = onnx.load(str(self.path), load_external_data=False)
            except Exception:  # protobuf raises assorted types; shapes then come from a ladder
                self._model = None
        return self._model

    def when_needed(self, inputs: list[InputSpec], options: VerifyOptions) -> Any:
        """The proto if some input has a dynamic dimension ``--shape`` leaves open, else None."""
        given = options.shapes or {}
        open_dims = any(None in i.dims for i in inputs if i.name not in given)
        return self.load() if open_dims else None


def _run_all(ref: Any, wanted: list[str], feeds: FeedSource, expected: Held) -> None:
    """Run the original on every sample, keeping its results in ``expected``."""
    for feed in feeds.samples():
        expected.append(run_model(ref, wanted, feed, OriginalFailed, "original"))
        del feed  # before the next sample is made


def _compare_folded(
    new: Any,
    wanted: list[str],
    feeds: FeedSource,
    expected: Held,
    sites: Sequence[SiteValue],
) -> dict[str, TensorDiff]:
    """Run the fold on every sample and compare each result with the original's.

    The original's results stay in ``expected``: calibration compares with them again.
    """
    axes = {s.value: s.channel_axis for s in sites}
    diffs = {name: TensorDiff(channel_axis=axes.get(name)) for name in wanted}
    for i, feed in enumerate(feeds.samples()):
        got = run_model(new, wanted, feed, FoldedFailed, "folded")
        del feed
        firsts = expected.get(0)
        for name, r, n, first in zip(wanted, expected.get(i), got, firsts, strict=True):
            diffs[name].add(r, n)
            if i:
                diffs[name].note_sample(not same_values(r, first))
        del got
    return diffs


def _fed(result: VerifyResult, feeds: FeedSource) -> VerifyResult:
    result.fed, result.shapes_note = feeds.fed, feeds.note
    return result


def _not_verified(
    code: NotVerified, reason: str, o: VerifyOptions, fed: list[FedInput] | None = None
) -> VerifyResult:
    return VerifyResult(
        "not_verified", o.atol, o.rtol or 0.0, 0, reason=reason, reason_code=code, fed=fed or []
    )


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
