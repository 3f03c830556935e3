"""Input files a user verifies (or benchmarks) with, instead of random inputs.

Three forms, read with ``allow_pickle=False`` (an input file cannot run code):

* ``inputs.npz``: one sample, one array per model input, keyed by input name;
* a folder of ``*.npz`` files: one sample each, in file-name order;
* ``input.npy``: one sample of a model with a single input.

Every sample is checked against what the model declares before it is fed: the
same names, the same dtype (never cast: a float64 image fed to a float32 model
is the user's mistake to see, not ours to hide), the same rank and every fixed
dimension. A mismatch is a :class:`BnfoldError` naming the file, the input and
both values. Samples are read one at a time, when they are fed, so a folder of
many large samples is never all in memory.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError, first_line

SUFFIXES = (".npz", ".npy")


@dataclass(frozen=True)
class Expected:
    """What one input must look like: name, numpy dtype, dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...] | None  # None: rank unknown, any shape


@dataclass(frozen=True)
class InputFiles:
    """The sample files behind ``--inputs``, in the order they are fed."""

    source: Path
    files: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> InputFiles:
        """List the samples of ``path`` (a file or a folder of .npz files), reading none.

        Raises:
            BnfoldError: the path is missing, not .npz/.npy, or a folder without .npz files.
        """
        source = Path(path)
        if source.is_dir():
            files = tuple(sorted(p for p in source.iterdir() if p.suffix == ".npz"))
            if not files:
                raise BnfoldError(f"--inputs {source}: the folder holds no .npz files")
            return cls(source, files)
        if not source.exists():
            raise BnfoldError(f"--inputs {source}: no such file or folder")
        if source.suffix not in SUFFIXES:
            raise BnfoldError(f"--inputs {source}: expected an .npz or .npy file, or a folder")
        return cls(source, (source,))

    def describe(self) -> str:
        """``"1 sample from file feeds.npz"``: what a report says was compared."""
        n = len(self.files)
        kind = "folder" if self.source.is_dir() else "file"
        return f"{n} sample{'s' if n != 1 else ''} from {kind} {self.source.name}"

    def samples(self, expected: Sequence[Expected]) -> Iterator[dict[str, np.ndarray]]:
        """Each sample as ``{input name: array}``, checked against ``expected`` as it is read.

        Raises:
            BnfoldError: a file cannot be read or does not fit the model.
        """
        for file in self.files:
            sample = read_sample(file, expected)
            check_sample(file, sample, expected)
            yield sample

    def samples_of(
        self, file: Path, expected: Sequence[Expected], aliases: dict[str, str]
    ) -> dict[str, np.ndarray]:
        """One file's sample; a key in ``aliases`` (``arr_0``) stands for its value's name.

        Raises:
            BnfoldError: the file cannot be read or does not fit.
        """
        sample = read_sample(file, expected)
        sample = {
            aliases.get(k, k) if aliases.get(k) not in sample else k: v for k, v in sample.items()
        }
        check_sample(file, sample, expected)
        return sample


def read_sample(file: Path, expected: Sequence[Expected]) -> dict[str, np.ndarray]:
    """The arrays of one file; a ``.npy`` is the single input's value."""
    try:
        if file.suffix == ".npy":
            if len(expected) != 1:
                names = ", ".join(e.name for e in expected)
                raise BnfoldError(
                    f"--inputs {file.name}: a .npy holds one input, the model has "
                    f"{len(expected)} ({names}); use an .npz keyed by input name"
                )
            return {expected[0].name: np.load(file, allow_pickle=False)}
        with np.load(file, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except BnfoldError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # ValueError is also numpy's answer to an object array (needs pickle).
        raise BnfoldError(f"--inputs {file.name}: cannot read it: {first_line(err)}") from None


def check_sample(file: Path, sample: dict[str, np.ndarray], expected: Sequence[Expected]) -> None:
    """Refuse a sample whose names, dtypes or shapes do not fit the model's inputs."""
    wanted = {e.name for e in expected}
    missing, extra = sorted(wanted - set(sample)), sorted(set(sample) - wanted)
    if missing or extra:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"no model input named {', '.join(extra)}"] if extra else []
        raise BnfoldError(
            f"--inputs {file.name}: {'; '.join(parts)} (the model's inputs: "
            f"{', '.join(e.name for e in expected)})"
        )
    for e in expected:
        _check_array(file, e, sample[e.name])


def _check_array(file: Path, e: Expected, array: np.ndarray) -> None:
    if array.dtype != e.dtype:
        raise BnfoldError(
            f"--inputs {file.name}: input {e.name!r} is {array.dtype}, the model wants {e.dtype}"
        )
    if e.dims is None or (not e.dims and array.ndim):  # unknown rank: any shape
        return
    declared = "x".join("?" if d is None else str(d) for d in e.dims)
    given = "x".join(map(str, array.shape)) or "scalar"
    fits = len(e.dims) == array.ndim and all(
        d is None or d == n for d, n in zip(e.dims, array.shape, strict=True)
    )
    if not fits:
        raise BnfoldError(
            f"--inputs {file.name}: input {e.name!r} has shape {given}, the model wants {declared}"
        )


def expected_of(specs: Sequence[Any]) -> list[Expected]:
    """:class:`Expected` entries from :class:`bnfold.verification.inputs.InputSpec`-like objects.

    onnxruntime reports an unknown rank and a scalar alike, as ``[]``: an empty
    dims list accepts any shape.
    """
    out = []
    for spec in specs:
        if spec.dtype is None:
            raise BnfoldError(f"input {spec.name!r} has type {spec.type_name}; cannot feed it")
        out.append(Expected(spec.name, np.dtype(spec.dtype), tuple(spec.dims)))
    return out
