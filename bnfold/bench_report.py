"""What a latency run measured, and how it is printed and plotted.

:mod:`bnfold.bench` times the models; these are its results: per-level timings
(:class:`LevelTiming`, with a paired ratio and its interval), the environment the
run happened in, and the report that holds both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError


@dataclass(frozen=True)
class Stats:
    """Latency of one model over the timed runs, in milliseconds."""

    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    min_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Stats:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else [0.0] * 3
        return cls(
            median_ms=statistics.median(samples_ms),
            iqr_ms=max(q3 - q1, 0.0),
            min_ms=min(samples_ms),
            runs=len(samples_ms),
        )


@dataclass(frozen=True)
class PairedRatio:
    """Folded over original, run by run, with a 95 % confidence interval of the median.

    Each folded run is timed right beside an original run, so load that comes
    and goes on a shared machine hits both alike and cancels in their ratio.
    The interval is distribution-free (binomial order statistics): it needs
    no assumption about how noise is shaped, and it is honest about when a
    difference of 1 % cannot be told from noise (an interval wider than that).
    """

    median: float
    low: float
    high: float
    pairs: int

    @classmethod
    def of(cls, original_ms: Sequence[float], folded_ms: Sequence[float]) -> PairedRatio:
        ratios = sorted(f / o for o, f in zip(original_ms, folded_ms, strict=True) if o > 0)
        if not ratios:
            return cls(1.0, 1.0, 1.0, 0)
        k = _median_interval_rank(len(ratios))
        return cls(statistics.median(ratios), ratios[k], ratios[-1 - k], len(ratios))


def _median_interval_rank(n: int) -> int:
    """The largest k with P(Binomial(n, 1/2) <= k) <= 2.5 %; 0 below 6 samples.

    Then sorted[k] .. sorted[n-1-k] holds the true median with >= 95 %
    probability, whatever the distribution.
    """
    below, k = 1, 0  # C(n, 0): the ways for no sample to fall below the median
    while k + 1 < n // 2 and (below + math.comb(n, k + 1)) * 40 <= 2**n:
        k += 1
        below += math.comb(n, k)
    return k if below * 40 <= 2**n else 0


@dataclass(frozen=True)
class LevelTiming:
    """Both models timed at one optimisation level."""

    level: str
    original: Stats
    folded: Stats
    paired: PairedRatio
    ort_level: str = ""  # GraphOptimizationLevel member; "" for torch eager
    disabled_optimizers: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        level: str,
        original_ms: Sequence[float],
        folded_ms: Sequence[float],
        ort_level: str = "",
        disabled_optimizers: tuple[str, ...] = (),
    ) -> LevelTiming:
        return cls(
            level,
            Stats.of(original_ms),
            Stats.of(folded_ms),
            PairedRatio.of(original_ms, folded_ms),
            ort_level,
            disabled_optimizers,
        )

    @property
    def ratio(self) -> float:
        """Folded median over original median: below 1 means the fold made it faster."""
        return self.folded.median_ms / self.original.median_ms if self.original.median_ms else 1.0


@dataclass(frozen=True)
class Environment:
    """Where and how the timings were taken."""

    runtime: str  # "onnxruntime" or "torch-eager"
    versions: dict[str, str]
    python: str
    platform: str
    cpu: str
    cpu_count: int
    threads: int
    warmup: int
    runs: int
    seed: int

    @classmethod
    def capture(
        cls, runtime: str, threads: int, warmup: int, runs: int, seed: int, libs: Sequence[str]
    ) -> Environment:
        return cls(
            runtime=runtime,
            versions={name: _version(name) for name in libs},
            python=platform.python_version(),
            platform=platform.platform(),
            cpu=cpu_model(),
            cpu_count=os.cpu_count() or 1,
            threads=threads,
            warmup=warmup,
            runs=runs,
            seed=seed,
        )


@dataclass
class BenchReport:
    """Timings of an original and a folded model, per level, with the environment."""

    original: str
    folded: str
    environment: Environment
    levels: list[LevelTiming] = field(default_factory=list)
    folds: int | None = None  # sites folded in memory, when the harness did the fold
    # The shape fed to each input: a latency means little without its input size.
    inputs: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for entry, timing in zip(out["levels"], self.levels, strict=True):
            entry["ratio"] = timing.ratio
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        env = self.environment
        lines = [
            f"{env.runtime}: threads={env.threads} warmup={env.warmup} runs={env.runs} "
            f"(interleaved), {env.cpu} x{env.cpu_count}",
            f"  original: {self.original}",
            f"  folded:   {self.folded}"
            + (f" ({self.folds} folds)" if self.folds is not None else ""),
            f"  inputs:   {format_inputs(self.inputs)}",
            f"  {'level':<18} {'original ms':>18} {'folded ms':>18} {'ratio':>7}"
            f"  {'paired ratio':>30}",
        ]
        lines += [
            f"  {t.level:<18} {_fmt(t.original):>18} {_fmt(t.folded):>18} {t.ratio:>7.3f}"
            f"  {format_paired(t.paired):>30}"
            for t in self.levels
        ]
        return "\n".join(lines)


def _fmt(stats: Stats) -> str:
    return f"{stats.median_ms:.3f} ±{stats.iqr_ms:.3f}"


def format_inputs(inputs: dict[str, list[int]]) -> str:
    """ "input 1x3x224x224, mask 1x224": each fed input with its shape."""
    return ", ".join(
        f"{name} {'x'.join(map(str, dims)) or 'scalar'}" for name, dims in inputs.items()
    )


def format_paired(paired: PairedRatio) -> str:
    """ "0.981, 95% CI [0.975, 0.990]": median paired ratio and its interval."""
    return f"{paired.median:.3f}, 95% CI [{paired.low:.3f}, {paired.high:.3f}]"


def plot_report(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Write a bar chart of median latency (IQR as error bars) per level.

    Raises:
        BnfoldError: matplotlib is not installed (``pip install bnfold[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BnfoldError("--plot needs matplotlib: pip install 'bnfold[plot]'") from None
    names = [t.level for t in report.levels]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.5))
    for offset, label, pick in ((-0.2, "original", "original"), (0.2, "folded", "folded")):
        stats = [getattr(t, pick) for t in report.levels]
        ax.bar(
            x + offset,
            [s.median_ms for s in stats],
            0.4,
            yerr=[s.iqr_ms / 2 for s in stats],
            capsize=3,
            label=label,
        )
    for i, t in enumerate(report.levels):
        top = t.folded.median_ms + t.folded.iqr_ms / 2
        ax.annotate(
            f"x{t.ratio:.2f}",
            (x[i] + 0.2, top),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    env = report.environment
    ax.set_xticks(x, names)
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"{env.runtime}, {env.threads} thread(s), {env.runs} runs", fontsize=9)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as err:
        raise BnfoldError(f"cannot write {os.fspath(path)!r}: {err.strerror}") from None
    finally:
        plt.close(fig)


def _version(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except ImportError:
            return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else ``platform.processor()``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
