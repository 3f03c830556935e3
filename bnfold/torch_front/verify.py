"""Compare the original and the folded module (the rollback of folds that fail is
:mod:`bnfold.torch_front.rollback`'s).

Both run in eval mode under ``no_grad`` on the example inputs plus a few random
draws of the same shapes, or on the user's input files. Every output, each eager
fold site and each continuous value feeding a discontinuous op is judged as on the
ONNX front (:func:`bnfold.verification.verdict.judge`): a bound derived from its
dtype and the reductions behind it, which a :class:`~bnfold.verification.torch_flow.FlowTracer`
reads from the original's run, widened to the rounding noise the original shows
where a tensor goes past it (calibration, computed once per check); an output
behind a jump (NMS, topk, sort, a comparison) that differs passes when the sites
and the values feeding the jump hold; a constant output is no evidence.

Each eager fold site is read with forward hooks: the output of the module that
now carries the fold (the ``nn.Identity`` left in the BN's place, which passes
the linear module's output on; folding before, the linear module itself) against
the same module path's output in the original.

Cost: the original runs once per sample (traced), the fold once per sample per
check. Differences are measured in torch in each tensor's own precision (fp16 and
bf16 in float32): the difference of two nearly equal floats is exact, and a
float64 copy of every activation cost more than the forwards.
"""

from __future__ import annotations

import contextlib
import enum
import inspect as pyinspect
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
from bnfold.proof import Certificate
from bnfold.report import FedInput, NotVerified, OutputDiff, VerifyResult
from bnfold.torch_front.modules import eval_mode
from bnfold.verification.calibrate import SEED
from bnfold.verification.cones import Cones
from bnfold.verification.files import Expected, InputFiles
from bnfold.verification.tolerance import dtype_name
from bnfold.verification.torch_flow import Captured, Flow, FlowTracer, RoundingNudger
from bnfold.verification.torch_measure import Known, difference, known_of, nudged_copy
from bnfold.verification.verdict import (
    Compared,
    Measure,
    SiteValue,
    TensorDiff,
    judge,
    needs_calibration,
)

EAGER_LEVEL = "eager"


@dataclass(frozen=True)
class Reference:
    """The original module's results on each sample, computed once.

    ``taps`` holds, per sample, the output of every BN and linear module by
    path (a fold site is one of them); ``flows`` what led to each output and
    tap (reductions, a jump upstream); ``frontier`` per sample the continuous
    inputs of each discontinuous call, in call order; ``uncompared`` the output leaves
    that are no tensor and may hold some (an object pytree cannot flatten).
    """

    samples: list[tuple[Any, ...]]
    outputs: list[list[tuple[str, torch.Tensor]]]
    taps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    flows: dict[str, Flow] = field(default_factory=dict)
    frontier: list[list[Captured]] = field(default_factory=list)
    inputs: str = ""
    fed: list[FedInput] = field(default_factory=list)
    uncompared: tuple[str, ...] = ()  # output leaves no tensor comparison reaches
    _known: dict[tuple[int, str], Known] = field(default_factory=dict)

    def known(
        self, sample: int, name: str, want: torch.Tensor, channel_axis: int | None = None
    ) -> Known:
        """What sample ``sample``'s original ``want`` (called ``name``) says by itself,
        worked out once for every check against this reference."""
        key = (sample, name)
        if key not in self._known:
            first = self._first(name) if sample else None
            self._known[key] = known_of(want, first, sample, channel_axis)
        return self._known[key]

    def _first(self, name: str) -> torch.Tensor | None:
        """The first sample's original value of an output, tap or frontier value."""
        for output, value in self.outputs[0]:
            if output == name:
                return value
        if name in self.taps[0]:
            return self.taps[0][name]
        return next(
            (w for n, w, _ in _paired(self.frontier[0], self.frontier[0]) if n == name), None
        )

    @property
    def cones(self) -> Cones:
        """The flows as the verdict reads them: reductions, and which names lie behind a jump."""
        return Cones(
            reductions={n: f.reductions for n, f in self.flows.items()},
            discontinuous={n for n, f in self.flows.items() if f.jump},
        )


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
    """Run the original on ``args`` and random draws (or on the files ``inputs``), traced.

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
    samples, outputs, taps, frontier = [], [], [], []
    flows: dict[str, Flow] = {}
    uncompared: list[str] = []
    paths = _tap_paths(module)
    for i, sample in enumerate(candidates):
        try:
            with FlowTracer(sample) as tracer, tapped(module, paths, tracer) as (taken, seen):
                got, opaque = ran(module, sample)
                flows.update({name: tracer.flow(t) or Flow() for name, t in got})
        except Exception:
            if i == 0 or inputs is not None:
                raise
            continue
        flows.update(seen)
        for k, captured in enumerate(tracer.frontier):
            flows.update(
                {frontier_name(captured.op, k, j): f for j, f in enumerate(captured.flows)}
            )
        outputs.append(got)
        taps.append(taken)
        frontier.append(tracer.frontier)
        samples.append(sample)
        uncompared += [n for n in opaque if n not in uncompared]
    fed = _fed(module, samples)
    return Reference(samples, outputs, taps, flows, frontier, described, fed, tuple(uncompared))


def _fed(module: nn.Module, samples: list[tuple[Any, ...]]) -> list[FedInput]:
    """Each positional tensor argument as fed: its name, dtype and distinct shapes."""
    if not samples:
        return []
    names = _argument_names(module, len(samples[0]))
    fed = []
    for k, name in enumerate(names):
        tensors = [s[k] for s in samples if isinstance(s[k], torch.Tensor)]
        if tensors:
            shapes = list(dict.fromkeys(tuple(t.shape) for t in tensors))
            fed.append(FedInput(name, dtype_name(tensors[0].dtype), [list(x) for x in shapes]))
    return fed


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


@contextmanager
def tapped(
    module: nn.Module, paths: Sequence[str], tracer: FlowTracer | None = None
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Flow]]]:
    """Record the outputs of the modules at ``paths`` during the runs inside the block.

    With ``tracer`` active in the block, also what led to each (its flow).
    """
    taken: dict[str, torch.Tensor] = {}
    flows: dict[str, Flow] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(_mod: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                taken[name] = out.detach().clone()  # an in-place ReLU after it would change it
                if tracer is not None:
                    flows[name] = tracer.flow(out) or Flow()

        return record

    modules = dict(module.named_modules())
    handles = [modules[p].register_forward_hook(hook(p)) for p in paths if p in modules]
    try:
        yield taken, flows
    finally:
        for h in handles:
            h.remove()


def run(module: nn.Module, sample: tuple[Any, ...]) -> list[tuple[str, torch.Tensor]]:
    """Floating-point tensor outputs of ``module(*sample)``, named by their pytree path."""
    return ran(module, sample)[0]


def ran(
    module: nn.Module, sample: tuple[Any, ...]
) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """``module(*sample)``'s floating-point tensor outputs, named by their pytree path,
    and the names of the output leaves that cannot be compared (:func:`_uncomparable`)."""
    with eval_mode(module), torch.no_grad():
        out = module(*sample)
    leaves, _ = pytree.tree_flatten_with_path(out)
    named = [(f"output{pytree.keystr(path)}", leaf) for path, leaf in leaves]
    tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return tensors, [f"{n} ({type(v).__name__})" for n, v in named if _uncomparable(v)]


# Output leaves that carry no tensor: constants of the forward, or values read into Python
# (a jump, judged by the frontier values that fed it).
_PLAIN = (bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def _uncomparable(leaf: Any) -> bool:
    """An output leaf that may hold tensors pytree cannot reach: an object of a class
    registered with no pytree flattening (a dataclass, a class of the user's). Its
    tensors are not compared, so the result cannot pass on sampling alone."""
    return not isinstance(leaf, (torch.Tensor, *_PLAIN)) and leaf is not None


@dataclass(frozen=True)
class Check:
    """The original's results and the bounds a folded module is held to.

    ``original`` is kept for calibration, which runs a nudged copy of it once,
    the first time a tensor goes past its derived bound; a module that changed
    since (folded in place) is not calibrated against.
    """

    reference: Reference
    options: VerifyOptions
    # (module path, fold site): where each eager fold's result is read in both models.
    sites: tuple[tuple[str, str], ...] = ()
    every_site: bool = True  # every fold is compared at one of ``sites``
    original: nn.Module | None = None
    _state: tuple[tuple[str, int, int], ...] = ()
    _noise: dict[str, float] = field(default_factory=dict)  # filled once, shared by copies
    _calibrated: list[bool] = field(default_factory=lambda: [False])

    @classmethod
    def of(cls, original: nn.Module, args: tuple[Any, ...], options: VerifyOptions) -> Check:
        """Run ``original`` once on ``args`` and ``options.samples`` random draws (or the files)."""
        ref = reference(original, args, options.samples, options.seed, options.inputs)
        return cls(ref, options, original=original, _state=_state_of(original))

    def at_sites(self, sites: Sequence[tuple[str, str]] | SitePaths) -> Check:
        """The same check, also comparing these fold sites."""
        if isinstance(sites, SitePaths):
            return replace(self, sites=sites.paths, every_site=sites.every)
        return replace(self, sites=tuple(sites))

    def __call__(self, folded: nn.Module, certificate: Certificate | None = None) -> VerifyResult:
        """Judge ``folded``; with a ``certificate`` that holds, proof first (``judge``)."""
        ref, paths = self.reference, self._paths()
        try:
            diffs = _measured(ref, folded, paths)
        except Exception as e:  # a fold that breaks forward() is a failed fold
            return VerifyResult(
                "failed", self.options.atol, self.options.rtol or 0.0, len(ref.samples),
                reason=f"{e!r}", inputs=ref.inputs, fed=ref.fed,
            )  # fmt: skip
        result = self._judge(diffs, certificate=certificate)
        if needs_calibration(result):
            result = self._judge(diffs, self._rounding_noise(), certificate)
        return result

    def _paths(self) -> list[str]:
        taps = self.reference.taps
        return [p for p, _ in self.sites if taps and p in taps[0]]

    def _judge(
        self,
        diffs: dict[str, TensorDiff],
        noise: dict[str, float] | None = None,
        certificate: Certificate | None = None,
    ) -> VerifyResult:
        ref, labels = self.reference, dict(self.sites)
        outputs = [(name, diffs[name]) for name, _ in ref.outputs[0]] if ref.outputs else []
        sites = [(SiteValue(p, labels[p], 1), diffs[p]) for p in self._paths()]
        frontier = [(n, d) for n, d in diffs.items() if n.startswith(_FRONTIER)]
        result = judge(
            Compared(outputs, sites, frontier, self.every_site), ref.cones, self.options,
            samples=len(ref.samples), level=EAGER_LEVEL, inputs=ref.inputs, noise=noise,
            certificate=certificate,
        )  # fmt: skip
        result.fed = ref.fed
        return _not_compared(result, ref.uncompared)

    def _rounding_noise(self) -> dict[str, float]:
        """How far the original moves when each parameter and each intermediate result is
        moved by one ulp (a correct fold's roundings, done another way)."""
        if not self._calibrated[0]:
            self._calibrated[0] = True
            original = self.original
            if original is not None and _state_of(original) == self._state:
                if not _reproduces(original, self.reference):
                    return self._noise  # its own reruns differ: no rounding to measure
                shadow = nudged_copy(original)
                paths = [
                    p
                    for p in _tap_paths(original)
                    if self.reference.taps and p in self.reference.taps[0]
                ]
                with contextlib.suppress(Exception):  # calibration only widens bounds
                    moved = _measured(self.reference, shadow, paths, nudge=True)
                    self._noise.update({n: d.max_abs for n, d in moved.items()})
        return self._noise


def _not_compared(result: VerifyResult, uncompared: Sequence[str]) -> VerifyResult:
    """``result``, "not_verified" (output_not_compared) if it passed while some output
    leaves were not compared: what they hold may have changed. A proof that holds
    still passes it (:func:`~bnfold.verification.verdict.with_proof`)."""
    if not uncompared or result.status == "failed":
        return result
    result.status, result.reason_code = "not_verified", NotVerified.OUTPUT_NOT_COMPARED
    result.reason = (
        f"output leaves no tensor comparison reaches: {', '.join(uncompared)}; register "
        "their class with torch.utils._pytree or return tensors, tuples, lists or dicts"
    )
    return result


def _reproduces(module: nn.Module, ref: Reference) -> bool:
    """Whether ``module`` gives the first sample's outputs again, bit for bit.

    A module that does not (dropout left on, ``torch.rand`` in forward) would pass
    its own noise off as rounding.
    """
    got = dict(run(module, ref.samples[0]))
    return all(name in got and torch.equal(got[name], want) for name, want in ref.outputs[0])


def _state_of(module: nn.Module) -> tuple[tuple[str, int, int], ...]:
    """Which tensors the module holds and their versions: a fold in place changes them."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return tuple((name, id(t), t._version) for name, t in tensors)


# Frontier values are named "frontier <op>#<call>[<input>]".
_FRONTIER = "frontier "


def _measured(
    ref: Reference, module: nn.Module, paths: Sequence[str], nudge: bool = False
) -> dict[str, TensorDiff]:
    """Run ``module`` on every sample: each output, tap at ``paths`` and frontier value
    against the reference's. ``nudge`` rounds every intermediate result another way
    (:class:`~bnfold.verification.torch_flow.RoundingNudger`), for calibration."""
    diffs: dict[str, TensorDiff] = {}
    capture = any(ref.frontier)
    for i, sample in enumerate(ref.samples):
        tracer = FlowTracer(sample) if capture else contextlib.nullcontext()
        nudger = RoundingNudger(sample, SEED + i) if nudge else contextlib.nullcontext()
        with tracer, nudger, tapped(module, paths) as (taken, _):
            got = dict(run(module, sample))
        for name, want in ref.outputs[i]:
            _include(diffs, ref, i, name, want, got.get(name))
        for path in paths:
            _include(diffs, ref, i, path, ref.taps[i][path], taken.get(path), channel_axis=1)
        if capture:
            assert isinstance(tracer, FlowTracer)
            for name, want, new in _paired(ref.frontier[i], tracer.frontier):
                _include(diffs, ref, i, name, want, new)
    return diffs


def _paired(
    want: list[Captured], got: list[Captured]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """The frontier values of both runs, call by call, while the calls still match."""
    for k, (a, b) in enumerate(zip(want, got, strict=False)):
        if a.op != b.op or [x.shape for x in a.values] != [y.shape for y in b.values]:
            return  # the runs took different paths after an earlier jump
        for j, (x, y) in enumerate(zip(a.values, b.values, strict=True)):
            yield frontier_name(a.op, k, j), x, y


def frontier_name(op: str, call: int, index: int) -> str:
    """``"frontier aten::topk#0[0]"``: input ``index`` of the ``call``-th discontinuous call."""
    return f"{_FRONTIER}{op}#{call}[{index}]"


def _include(
    diffs: dict[str, TensorDiff],
    ref: Reference,
    sample: int,
    name: str,
    want: torch.Tensor,
    got: torch.Tensor | None,
    channel_axis: int | None = None,
) -> None:
    """Add sample ``sample`` of one compared tensor to its row."""
    known = ref.known(sample, name, want, channel_axis)
    diff = diffs.setdefault(name, TensorDiff(channel_axis=channel_axis))
    measured = Measure(difference(want, got, known), known.scale, known.lowest, known.highest)
    diff.include(measured, dtype_name(want.dtype), want.numel(), known.peaks)
    if known.changed is not None:
        diff.note_sample(known.changed)


@dataclass(frozen=True)
class SitePaths:
    """Where fold sites are compared: (module path, site) pairs, and whether every fold is."""

    paths: tuple[tuple[str, str], ...]
    every: bool


def site_paths(pairs: Sequence[Any]) -> SitePaths:
    """(module path, site) at which each linear module's folds are compared.

    Folding after, the last BN folded into the module (Conv -> BN1 -> BN2: BN2)
    leaves the ``nn.Identity`` whose output is the whole chain's; an earlier
    BN's place now carries the later folds too, so it is no evidence. A module
    with only folds before it (BN -> Conv) is compared at its own output. A
    fold into several modules (a join) is evidence only while it is the last
    on each of them; an identity tap is none (``result_at`` None: its value is
    a term of a functional sum) and retires the conv's earlier sites. ``every``
    is False when some module's last fold is compared nowhere: then the sites
    cannot vouch for an output behind a jump.
    """
    latest: dict[str, Any] = {}
    for pair in pairs:  # in the order the folds were applied
        for linear in pair.linears:
            if linear not in latest or not pair.before:  # a fold after supersedes
                latest[linear] = pair
    chosen = [
        p
        for p in dict.fromkeys(latest.values())
        if p.result_at is not None and all(latest[linear] == p for linear in p.linears)
    ]
    every = all(latest[linear] in chosen for linear in latest)
    return SitePaths(tuple((p.result_at, p.site) for p in chosen), every)


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
