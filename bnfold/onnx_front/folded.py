"""What a fold writes into a model, and the exact float64 value behind it.

A folded weight is its original times one factor per fold (:class:`DeferredWeight`),
computed when it is needed; a merged kernel (:mod:`.rules.branch_sum`) is a
weight whose original is itself a float64 value (:meth:`DeferredWeight.of_exact`).
A folded bias keeps its float64 value beside the cast one (:class:`ExactBias`).
The tensors the pass puts into the graph carry both (:class:`FoldedTensor`,
:class:`FoldedBias`), so a later fold of the same op (Conv -> BN -> Mul,
BN -> Conv -> BN, a Mul after a merged block, or another pass over the folded
model) starts from the exact values: every folded value is still rounded once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.core.cast import (
    Factors,
    cannot_overflow,
    cast_checked,
    cast_weight,
    product64,
    scaled,
    scaled_blocks,
)
from bnfold.core.layouts import WeightLayout
from bnfold.onnx_front.io import evict_pages, start_writeback


@dataclass(frozen=True)
class DeferredWeight:
    """A folded weight ``W * factors``: kept as computed, or recomputed when read.

    Planning checks it (an overflow refuses the fold). The pass computes and
    keeps the values while they fit its memory budget; past it the check bounds
    the products without computing them (:meth:`check`), and the weight is
    computed when the model is saved, streamed a block at a time into the file
    (:meth:`blocks`). Holding every folded weight until the save would cost the
    size of all of them at once, which on a multi-GB model is more than the model.
    """

    factors: Factors  # float64, each broadcastable onto W (see bnfold.affine.Factors)
    dtype: np.dtype
    shape: tuple[int, ...]
    # The layout whose output channels the cast balances (bnfold.affine.scaled);
    # None rounds each product to nearest.
    balance: WeightLayout | None = None
    # Where the original W is read from: its tensor (an external one stays
    # memory-mapped), or, for a weight that is no tensor (a Constant
    # subexpression), its values.
    source: ir.TensorProtocol | None = None
    source_values: np.ndarray | None = None
    values: np.ndarray | None = None
    # A weight the model never held in its dtype (a merged kernel): the float64
    # original the factors multiply. ``source_values`` then holds it cast once,
    # for what needs only W's shape and dtype (see :meth:`of_exact`).
    exact_source: np.ndarray | None = None

    @classmethod
    def of_exact(
        cls, exact: np.ndarray, dtype: np.dtype, balance: WeightLayout | None
    ) -> DeferredWeight:
        """A weight computed in float64 (a merged kernel), cast once and held.

        A later fold of the same op multiplies ``exact``, not its rounding, so
        the weight is still rounded once. Small by nature (a block's kernels),
        so it is held, never streamed.

        Raises:
            Unfoldable: a value overflows ``dtype``.
        """
        values = cast_weight(exact, dtype, balance)
        return cls(
            (), values.dtype, tuple(values.shape), balance,
            source_values=values, values=values, exact_source=exact,
        )  # fmt: skip

    def then(self, factor: np.ndarray, balance: WeightLayout | None) -> DeferredWeight:
        """This weight folded once more: the same original times one more factor."""
        return replace(self, factors=(*self.factors, factor), balance=balance, values=None)

    def computed(self, original: np.ndarray) -> DeferredWeight:
        """The same weight with its values, computed from ``original`` (W in hand).

        Raises:
            Unfoldable: a folded value overflows the dtype.
        """
        return replace(self, values=self._cast(original))

    def check(self, original: np.ndarray) -> None:
        """Prove the folded values finite, keeping none (``original``: W in hand).

        A bound on the products settles almost every weight; only one it cannot
        clear has its values computed, block by block. A merged kernel is small:
        its values are computed.

        Raises:
            Unfoldable: a folded value overflows the dtype.
        """
        if self.exact_source is not None:
            self._cast(original)
            return
        if cannot_overflow(original, self.factors):
            return
        for _ in scaled_blocks(original, self.factors):
            pass

    def compute(self) -> np.ndarray:
        """The folded values, recomputed from the source unless they are held."""
        if self.values is not None:
            return self.values
        try:
            return self._cast(self.original())
        finally:
            evict_pages(self.source)

    def _cast(self, original: np.ndarray) -> np.ndarray:
        """The folded values from ``original`` (W in hand), cast once.

        A merged kernel starts from its float64 value instead: ``original`` is
        only that value's rounding.
        """
        if self.exact_source is not None:
            return cast_weight(self.exact(), self.dtype, self.balance)
        return scaled(original, self.factors, self.balance)

    def blocks(self, buffers: int = 1) -> Iterator[np.ndarray]:
        """The folded values as consecutive row blocks (see :func:`bnfold.affine.scaled_blocks`).

        Raises:
            ValueError: the weight is not :attr:`streamable`.
        """
        try:
            yield from scaled_blocks(self.original(), self.factors, buffers, self.balance)
        finally:
            evict_pages(self.source)

    def exact(self) -> np.ndarray:
        """The folded values in float64, before the cast (a whole float64 copy)."""
        if self.exact_source is not None:
            exact = self.exact_source
            return product64(exact, self.factors) if self.factors else exact.copy()
        return product64(self.original(), self.factors)

    def original(self) -> np.ndarray:
        """W before any fold (a merged kernel's: its float64 value cast once)."""
        if self.source is not None:
            return self.source.numpy()
        assert self.source_values is not None
        return self.source_values

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def streamable(self) -> bool:
        """:meth:`blocks` can compute it: W is the model's (no merged kernel) and no
        balanced output channel spans several rows."""
        if self.exact_source is not None:
            return False
        return self.balance is None or self.balance.rows_are_out_channels

    @property
    def mapped(self) -> bool:
        """W is read from a memory-mapped external data file."""
        return isinstance(self.source, ir.ExternalTensor)


@dataclass(frozen=True)
class ExactBias:
    """A folded bias: its float64 value, and that value cast once to the model's dtype."""

    exact: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, exact: np.ndarray, dtype: np.dtype) -> ExactBias:
        """Cast ``exact`` to ``dtype``.

        Raises:
            Unfoldable: a value overflows ``dtype``.
        """
        return cls(exact, cast_checked(exact, dtype, "bias"))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


# What a fold writes into an input: small arrays now, weights computed when read.
ConstantData = np.ndarray | DeferredWeight | ExactBias


def as_tensor(data: ConstantData, name: str | None) -> ir.TensorProtocol:
    """The ir tensor for ``data``: a folded weight or bias keeps its exact value."""
    if isinstance(data, DeferredWeight):
        return FoldedTensor(data, name)
    if isinstance(data, ExactBias):
        return FoldedBias(data, name)
    return ir.tensor(data, name=name)


def earlier_weight(value: ir.Value) -> DeferredWeight | None:
    """The folded weight a fold wrote into ``value``, if one did."""
    tensor = value.const_value
    return tensor.weight if isinstance(tensor, FoldedTensor) else None


def earlier_bias(value: ir.Value | None) -> np.ndarray | None:
    """The float64 value of the bias a fold wrote into ``value``, if one did."""
    tensor = None if value is None else value.const_value
    return tensor.exact if isinstance(tensor, FoldedBias) else None


class FoldedBias(ir.Tensor):
    """A folded bias in the graph; ``exact`` is its value before the cast."""

    def __init__(self, bias: ExactBias, name: str | None) -> None:
        super().__init__(bias.values, name=name)
        self.exact = bias.exact


class FoldedTensor(ir.LazyTensor):
    """A folded weight in the graph, computed when read; written to a file a block at a time.

    onnx_ir writes external data with ``tofile``: streaming the blocks there means
    a multi-GB weight is computed and written without ever being whole in
    memory, each block computed while the one before is written (see
    :func:`_write_behind`). Everything else (``numpy``, ``tobytes``) computes it
    whole (or returns it, when held), and so does ``tofile`` for a held weight
    or one that is not :attr:`DeferredWeight.streamable`.
    """

    def __init__(self, weight: DeferredWeight, name: str | None) -> None:
        super().__init__(
            lambda: ir.tensor(weight.compute(), name=name),
            dtype=ir.DataType.from_numpy(weight.dtype),
            shape=ir.Shape(weight.shape),
            name=name,
        )
        self.weight = weight

    def tofile(self, file: Any) -> None:
        # Blocks go out as they lie in memory: that needs a little-endian host
        # (ONNX stores little-endian; ir.Tensor byte-swaps elsewhere), and a
        # weight that comes in blocks of rows.
        weight = self.weight
        if sys.byteorder != "little" or weight.values is not None or not weight.streamable:
            super().tofile(file)
            return
        _write_behind(weight.blocks(buffers=2), file)


# The writes of a streamed weight are sent on to disk this many bytes at a time.
WRITEBACK_BYTES = 64 << 20


class _EarlyWriteback:
    """Writes to ``file``, starting the disk writing every WRITEBACK_BYTES.

    See :func:`bnfold.onnx_front.io.start_writeback` for why.
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        try:
            self.start: int | None = file.tell()  # onnx_ir seeks to the tensor's offset first
        except (OSError, ValueError):  # a pipe or socket: nothing to send on
            self.start = None
        self.unsent = 0

    def write(self, data: memoryview) -> None:
        self.file.write(data)
        self.unsent += len(data)
        if self.start is not None and self.unsent >= WRITEBACK_BYTES:
            start_writeback(self.file, self.start, self.unsent)
            self.start += self.unsent
            self.unsent = 0


def _write_behind(blocks: Iterator[np.ndarray], file: Any) -> None:
    """Write each block on a second thread while the next one is computed.

    numpy's multiply and a file write both release the GIL, so on two cores the
    fold math of a multi-GB weight hides behind its write (saving the 2.42 GB
    benchmark model to tmpfs, 5 alternating runs: fastest 1.30 s against 1.63 s
    writing block after block, median 1.43 s against 2.84 s). The writes go
    through :class:`_EarlyWriteback`, so the disk works meanwhile too. ``blocks``
    must keep at least two buffers in turn: the block being written is never the
    one being computed.
    """
    sink = _EarlyWriteback(file)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[Any] | None = None
        for block in blocks:
            data = block.reshape(-1).view(np.uint8).data
            if pending is not None:
                pending.result()  # the buffer the next block will fill is free again
            pending = writer.submit(sink.write, data)
        if pending is not None:
            pending.result()
