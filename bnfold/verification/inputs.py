"""The inputs verification feeds: random draws of planned shapes, or the user's files.

Each input a model declares (:class:`InputSpec`) gets a :class:`FeedPlan`: its
concrete shape (``--shape`` for dynamic dimensions, else 1) and dtype, sized
before anything is allocated (:class:`InputsTooLarge` past the cap). A
:class:`FeedSource` makes the samples one at a time, random draws from the seed
or the files of ``--inputs`` (:mod:`bnfold.verification.files`), so only one sample
is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from bnfold.errors import BnfoldError
from bnfold.options import VerifyOptions
from bnfold.report import FedInput
from bnfold.verification.files import InputFiles, expected_of
from bnfold.verification.tolerance import dtype_name

# Elements drawn at a time: the float64/int64 draw behind a narrower input
# dtype then takes one block beside the result, not a second full-size array.
_DRAW_BLOCK = 1 << 20


@dataclass(frozen=True)
class InputSpec:
    """One input a caller must feed: name, numpy dtype (None if unsupported), dims.

    ``symbols`` names each dynamic dimension (its ``dim_param``; None where the
    model gives none): dimensions named alike are fed one size.
    """

    name: str
    dtype: Any
    dims: list[int | None]
    type_name: str
    symbols: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class FeedPlan:
    """One random input array to be made: name, concrete shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class InputsTooLarge(BnfoldError):
    """One sample of random inputs would need more than the cap; nothing was allocated."""

    def __init__(self, largest: FeedPlan, total: int, limit: int) -> None:
        self.largest, self.total, self.limit = largest, total, limit
        super().__init__(self._describe())

    def _describe(self) -> str:
        big = self.largest
        dims = "x".join(str(d) for d in big.shape)
        text = f"input {big.name!r} of shape {dims} ({big.dtype}) needs {_size(big.nbytes)}"
        if self.total != big.nbytes:
            text += f", all inputs of one sample {_size(self.total)}"
        return (
            f"{text}, over the {_size(self.limit)} limit for random inputs; "
            f"pass a smaller --shape {big.name}:DIMS (or raise --max-input-mib)"
        )


def random_feeds(
    inputs: list[InputSpec],
    rng: np.random.Generator,
    shapes: Mapping[str, Sequence[int]],
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """One random array per input: right dtype, dynamic dims from ``shapes`` or 1.

    Raises:
        InputsTooLarge: the arrays together would exceed ``max_bytes`` (None: no
            cap); checked before any is allocated.
        BnfoldError: ``shapes`` names no input, or an input type cannot be made.
    """
    plans = plan_feeds(inputs, shapes)
    if max_bytes is not None:
        require_within(plans, max_bytes)
    return {p.name: _random_array(rng, p.shape, p.dtype) for p in plans}


def plan_feeds(inputs: list[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[FeedPlan]:
    """The array each input needs, without allocating it: ``shapes`` override, dynamic dims 1.

    Raises:
        BnfoldError: ``shapes`` names no input or gives one a shape it cannot
            take (see :func:`require_fits`), or an input type cannot be made.
    """
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        raise BnfoldError(f"--shape names no input of the model: {', '.join(sorted(unknown))}")
    plans = []
    for spec in inputs:
        if spec.dtype is None:
            raise BnfoldError(
                f"input {spec.name!r} has type {spec.type_name}; verify cannot make it"
            )
        if spec.name in shapes:
            shape = tuple(shapes[spec.name])
            require_fits(spec, shape)
        else:
            shape = tuple(1 if d is None else d for d in spec.dims)
        plans.append(FeedPlan(spec.name, shape, np.dtype(spec.dtype)))
    return plans


def require_fits(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """Refuse a ``--shape`` the input cannot take, before onnxruntime does less clearly.

    Every dimension must be positive (a zero-size input compares nothing); the
    rank and every fixed dimension must be the model's.

    Raises:
        BnfoldError: naming the input, the dimension and both values.
    """
    if any(d < 1 for d in shape):
        text = "x".join(map(str, shape))
        raise BnfoldError(f"--shape {spec.name}: every dimension must be positive, got {text}")
    if not spec.dims:  # onnxruntime reports an unknown rank and a scalar alike, as []
        return
    declared = "x".join("?" if d is None else str(d) for d in spec.dims)
    if len(shape) != len(spec.dims):
        raise BnfoldError(
            f"--shape {spec.name}: the input has {len(spec.dims)} dimensions ({declared}), "
            f"the shape gives {len(shape)}"
        )
    for axis, (fixed, given) in enumerate(zip(spec.dims, shape, strict=True)):
        if fixed is not None and fixed != given:
            raise BnfoldError(
                f"--shape {spec.name}: dimension {axis} of the input is fixed at {fixed} "
                f"({declared}), the shape gives {given}"
            )


def require_within(plans: Sequence[FeedPlan], max_bytes: int) -> None:
    """Raise InputsTooLarge, naming the largest input, if ``plans`` need over ``max_bytes``."""
    total = sum(p.nbytes for p in plans)
    if total > max_bytes:
        raise InputsTooLarge(max(plans, key=lambda p: p.nbytes), total, max_bytes)


class FeedSource:
    """The inputs each sample feeds: random draws, or the user's files.

    Samples are made (or read) one at a time, and again for the second model,
    so only one sample is in memory at a time; random draws restart from the
    seed and come out the same.
    """

    def __init__(
        self,
        inputs: list[InputSpec],
        options: VerifyOptions,
        shapes: Mapping[str, Sequence[int]] | None = None,
        note: str = "",
    ) -> None:
        self.options = options
        self.files: InputFiles | None = None
        self.note = note
        self._seen: dict[str, FedInput] = {}
        if options.inputs is not None:
            if options.shapes:
                raise BnfoldError("--shape sets the shapes of random inputs; --inputs has its own")
            self.files = InputFiles.open(options.inputs)
            self.expected = expected_of(inputs)
        else:
            self.plans = plan_feeds(inputs, (options.shapes or {}) if shapes is None else shapes)
            require_within(self.plans, options.max_input_bytes)

    @property
    def fed(self) -> list[FedInput]:
        """Each input's shapes as fed so far (random: as planned)."""
        if self.files is None:
            return [FedInput(p.name, dtype_name(p.dtype), [list(p.shape)]) for p in self.plans]
        return list(self._seen.values())

    @property
    def count(self) -> int:
        return len(self.files.files) if self.files is not None else self.options.samples

    def describe(self) -> str:
        """``"3 random samples (seed 0)"`` or ``"1 sample from file x.npz"``."""
        if self.files is not None:
            return self.files.describe()
        n = self.options.samples
        return f"{n} random sample{'s' if n != 1 else ''} (seed {self.options.seed})"

    def samples(self) -> Iterator[dict[str, np.ndarray]]:
        if self.files is not None:
            for sample in self.files.samples(self.expected):
                self._record(sample)
                yield sample
            return
        rng = np.random.default_rng(self.options.seed)
        for _ in range(self.options.samples):
            yield {p.name: _random_array(rng, p.shape, p.dtype) for p in self.plans}

    def _record(self, sample: dict[str, np.ndarray]) -> None:
        for name, array in sample.items():
            entry = self._seen.setdefault(name, FedInput(name, dtype_name(array.dtype), []))
            if list(array.shape) not in entry.shapes:
                entry.shapes.append(list(array.shape))


def _random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Standard normal floats, 0/1 integers and bools, drawn block by block.

    Drawing in blocks gives the same values as one draw of the whole shape.
    """
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)  # a view: np.empty is contiguous
    for start in range(0, flat.size, _DRAW_BLOCK):
        n = min(_DRAW_BLOCK, flat.size - start)
        flat[start : start + n] = _draw(rng, n, dtype)
    return out


def _draw(rng: np.random.Generator, n: int, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f" or dtype == ml_dtypes.bfloat16:
        return rng.standard_normal(n).astype(dtype)
    # Integer inputs are usually indices or sizes, bools are masks: keep them 0/1.
    return rng.integers(0, 2, n).astype(dtype)


def _size(nbytes: int) -> str:
    """``51539607552`` -> ``"48.0 GiB"``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["input:1x3x224x224"]`` -> ``{"input": [1, 3, 224, 224]}``."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise BnfoldError(f"bad --shape {spec!r}; expected name:1x3x224x224") from None
    return shapes
