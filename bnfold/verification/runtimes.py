"""The runtimes both models run in, and where the original's results wait.

onnxruntime on CPU at ``ORT_DISABLE_ALL``: at its default level it fuses
Conv+BatchNorm itself, so the "original" would already be folded and a wrong
fold could pass unnoticed. When onnxruntime cannot load the original (opsets
below 7, say), both models run in ONNX's reference evaluator instead, if they
are small enough for it. The folded model always runs in the runtime that ran
the original: the same kernels.

The original's results are held in memory up to a budget and spilled to disk
past it (:class:`Held`), so verifying a large model does not hold every sample's
outputs at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bnfold.errors import BnfoldError, first_line
from bnfold.verification.inputs import InputSpec

# The reference evaluator is plain numpy: fine for small models, hours for big ones.
REFERENCE_MAX_BYTES = 64 << 20


# The original's results are held in memory up to this share of the input cap
# (the rest wait on disk): with one sample's inputs (at most the cap) and the
# runtime's own activations, verification's peak stays near the cap it prints.
HELD_SHARE = 4

ORT_LEVEL = "ORT_DISABLE_ALL"
REFERENCE_LEVEL = "onnx.reference (onnxruntime cannot run the original)"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(bfloat16)": ml_dtypes.bfloat16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}  # fmt: skip


class RuntimeFailure(Exception):
    """A runtime could not load or run a model; the message is one line."""


class OriginalFailed(RuntimeFailure):
    """The original model failed on the inputs: nothing to compare against."""


class OriginalFails(BnfoldError):
    """The original runs in no runtime that loaded it: bad input, not a fold to judge.

    A model that onnxruntime (or the reference evaluator) loads but that fails
    on its inputs is broken (a Conv weight of the wrong rank, parameters of the
    wrong shape), or the random inputs are not ones it accepts; either way there
    is nothing to compare a fold with, and publishing it would pass a broken
    model on as checked.
    """

    def __init__(self, reason: str, random: bool) -> None:
        hint = " (if the random inputs are the cause, pass --inputs with ones it accepts)"
        text = reason.rstrip(".")
        super().__init__(f"{text}; nothing to compare the fold with{hint if random else ''}")


class FoldedFailed(RuntimeFailure):
    """The folded model failed where the original ran: the fold broke it."""


def original_runtime(path: Path, extra: Sequence[str] = ()) -> tuple[Any, type, str]:
    """onnxruntime at ORT_DISABLE_ALL, else the reference evaluator for small models."""
    try:
        return _OrtRuntime(path, extra), _OrtRuntime, ORT_LEVEL
    except RuntimeFailure as ort_error:
        reason = f"onnxruntime cannot run the original model: {ort_error}"
        if _model_bytes(path) > REFERENCE_MAX_BYTES:
            raise RuntimeFailure(f"{reason}; too large for the reference evaluator") from None
        try:
            return _ReferenceRuntime(path, extra), _ReferenceRuntime, REFERENCE_LEVEL
        except RuntimeFailure as ref_error:
            raise RuntimeFailure(f"{reason}; reference evaluator: {ref_error}") from None


def folded_runtime(kind: type, path: Path, extra: Sequence[str] = ()) -> Any:
    """The folded model in the runtime that ran the original: the same kernels."""
    try:
        return kind(path, extra)
    except RuntimeFailure as err:
        raise BnfoldError(f"the runtime cannot load the folded model: {err}") from None


def run_model(
    runtime: Any,
    names: list[str],
    feeds: dict[str, np.ndarray],
    failure: type[RuntimeFailure],
    which: str,
) -> list[Any]:
    try:
        return runtime.run(names, feeds)  # type: ignore[no-any-return]
    except Exception as err:  # runtimes raise their own exception types
        raise failure(f"the {which} model failed to run: {first_line(err)}") from None


def _with_outputs(path: Path, extra: Sequence[str]) -> tuple[Any, list[str]]:
    """The model at ``path`` as a proto (external data left on disk) that also outputs
    ``extra``, and the names of its own outputs.

    The values get no declared type: both runtimes infer it, and a wrong
    declaration would be one more way to fail. Read once: parsing a 100 MB model
    costs about 0.1 s.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises assorted types
        raise RuntimeFailure(first_line(err)) from None
    declared = [o.name for o in proto.graph.output]
    present = set(declared)
    for name in extra:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return proto, declared


class _OrtRuntime:
    """onnxruntime on CPU with every graph optimization off (and no memory arena).

    The arena would keep the peak of every run reserved for the session's life;
    verification runs a few large samples, not many small ones, so it gains
    nothing from it and would hold several copies of the largest activation.
    """

    def __init__(self, path: Path, extra: Sequence[str] = ()) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # Fatal only: a kernel that fails logs an ANSI-coloured error line of its own,
        # and the exception it raises says the same in the one line bnfold prints.
        options.log_severity_level = 4
        options.enable_cpu_mem_arena = False
        source: str | bytes = str(path)
        self.declared: list[str] | None = None
        if extra:
            proto, self.declared = _with_outputs(path, extra)
            source = proto.SerializeToString()
            # Loaded from bytes, external data resolves against the model's folder only if told.
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(path.parent)
            )
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise RuntimeFailure(first_line(err)) from None

    def inputs(self) -> list[InputSpec]:
        return ort_input_specs(self.session)

    def output_names(self) -> list[str]:
        """The model's own outputs, without the sites added for verification."""
        names = [o.name for o in self.session.get_outputs()]
        return names if self.declared is None else [n for n in names if n in self.declared]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        return self.session.run(names, feeds)  # type: ignore[no-any-return]


class _ReferenceRuntime:
    """onnx's reference evaluator: slow, but it implements every opset."""

    def __init__(self, path: Path, extra: Sequence[str] = ()) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        try:
            self.proto = onnx.load(str(path))
        except Exception as err:
            raise RuntimeFailure(first_line(err)) from None
        _drop_absent_outputs(self.proto.graph)
        self.outputs = [o.name for o in self.proto.graph.output]
        newest = onnx.defs.onnx_opset_version()
        for opset in self.proto.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version > newest:
                # Unknown future semantics: running it with today's kernels proves nothing.
                raise RuntimeFailure(f"opset {opset.version} is newer than onnx knows ({newest})")
        from bnfold.verification.reference_ops import batch_normalization, read_values

        try:
            new_ops = [batch_normalization(read_values(self.proto.graph))]
            self.evaluator = ReferenceEvaluator(self.proto, new_ops=new_ops)
        except Exception as err:  # the evaluator raises assorted types
            raise RuntimeFailure(first_line(err)) from None

    def inputs(self) -> list[InputSpec]:
        import onnx

        graph = self.proto.graph
        initializers = {t.name for t in graph.initializer}
        specs = []
        for value in graph.input:
            if value.name in initializers:
                continue  # IR < 4 lists initializers as inputs: not for callers to feed
            tensor = value.type.tensor_type
            dtype = (
                onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else None
            )
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            symbols = tuple(d.dim_param or None for d in tensor.shape.dim)
            specs.append(InputSpec(value.name, dtype, dims, str(tensor.elem_type), symbols))
        return specs

    def output_names(self) -> list[str]:
        return list(self.outputs)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        # The evaluator keeps every intermediate result: a site is asked for by name.
        return list(self.evaluator.run(names, feeds))


def _drop_absent_outputs(graph: Any) -> None:
    """Drop the trailing empty output names of every node, subgraphs included.

    An empty name is an optional output left out (old exporters write a
    BatchNormalization's as ``["Y", ""]``), but the reference evaluator counts
    it: a BatchNormalization with two outputs runs in training mode there.
    """
    for node in graph.node:
        while node.output and not node.output[-1]:
            node.output.pop()
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _drop_absent_outputs(sub)


def ort_input_specs(session: Any) -> list[InputSpec]:
    """What an onnxruntime session wants fed: name, numpy dtype, dims (None if dynamic)."""
    return [
        InputSpec(i.name, _ORT_TYPES.get(i.type), _dims(i.shape), i.type, _symbols(i.shape))
        for i in session.get_inputs()
    ]


def _dims(shape: Sequence[Any]) -> list[int | None]:
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _symbols(shape: Sequence[Any]) -> tuple[str | None, ...]:
    # onnxruntime names an unnamed dynamic dim "unk__N": unique, like no name at all.
    return tuple(d if isinstance(d, str) and d else None for d in shape)


def _model_bytes(path: Path) -> int:
    folder = path.parent
    return path.stat().st_size + sum(p.stat().st_size for p in folder.glob(f"{path.name}*.data"))


class Held:
    """The original's results per sample: in memory up to a byte budget, on disk past it.

    Verification would otherwise hold every sample's outputs (and sites) at once;
    past the budget each array waits in a temporary .npy file and is read back
    memory-mapped, one sample at a time.
    """

    def __init__(self, budget: int) -> None:
        self.budget = self._whole = budget
        self.samples: list[list[Any]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.samples.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def append(self, results: list[Any]) -> None:
        kept = []
        for j, value in enumerate(results):
            if _spillable(value) and value.nbytes <= self.budget:
                self.budget -= value.nbytes
                kept.append(value)
            elif _spillable(value):
                kept.append(self._spill(value, f"{len(self.samples)}_{j}.npy"))
            else:
                kept.append(value)  # a sequence or map output: small, kept as is
        self.samples.append(kept)

    def pop(self, i: int) -> list[Any]:
        """Sample ``i``'s results (spilled ones memory-mapped), no longer held here."""
        values, self.samples[i] = self.samples[i], []
        return [np.load(v, mmap_mode="r") if isinstance(v, Path) else v for v in values]

    def get(self, i: int) -> list[Any]:
        """Sample ``i``'s results (spilled ones memory-mapped), still held for a later reader."""
        return [np.load(v, mmap_mode="r") if isinstance(v, Path) else v for v in self.samples[i]]

    def clear(self) -> None:
        """Forget every sample (a failed run's partial results); the budget is whole again."""
        self.samples.clear()
        self.budget = self._whole

    def _spill(self, value: np.ndarray, name: str) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bnfold-verify-")
        path = Path(self._tmp.name) / name
        np.save(path, value, allow_pickle=False)
        return path


def _spillable(value: Any) -> bool:
    # bfloat16 (ml_dtypes) would come back from .npy as raw bytes: kept in memory.
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc"
