"""Property: any graph of linear ops, BatchNorms and affines folds to the same function.

Hypothesis builds random chains and branches of Conv (1/2/3-d, groups, dilation,
strides, padding), ConvTranspose, Gemm, MatMul, BatchNormalization, Relu and
constant Mul/Add, in float32, float16 or float64 (onnxruntime's CPU Conv has no
float64 kernel, so float64 graphs are the dense kind), with tiny shapes. Each
one is folded with ``bnfold.fold`` and both models run in onnxruntime at
ORT_DISABLE_ALL on the same input; the outputs must agree within
``DEFAULT_RTOL`` of the output's scale.

Examples: 100 by default, 1000 with the "ci" profile (CI=true or
HYPOTHESIS_PROFILE=ci, see conftest.py).
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold
from bnfold.report import Code

DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "float64": onnx.TensorProto.DOUBLE}  # fmt: skip
# A fixed rtol per output dtype, of the output's scale: fp32 folds typically land
# near 1e-7; 1e-5 leaves room for deep nets while a 1e-3 planted error still fails.
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
MAX_SPATIAL = 9
# Refusals that would be a bug for these graphs: every constant is an initializer
# used once, shapes and groups are consistent, statistics finite with var > 0.
# (Structural refusals such as standalone, nonlinear_input, branching or
# zero_padding are expected.) fp16 may overflow, hence bad_values is allowed there.
UNEXPECTED_REFUSALS = {
    Code.BAD_SHAPE, Code.BAD_GROUPS, Code.UNSUPPORTED_DTYPE, Code.NOT_CONSTANT,
    Code.SHARED_WEIGHT, Code.TRAINING_MODE, Code.NOT_PER_CHANNEL, Code.BAD_VALUES,
}  # fmt: skip

# Worst error seen per dtype, as a fraction of the output's scale (printed at the end).
WORST: dict[str, float] = defaultdict(float)
# Examples beyond DEFAULT_RTOL but within TERM_ULPS ulps of the largest intermediate
# value: (error / output scale, error / largest term), printed at the end.
CANCELLATION: dict[str, list[tuple[float, float]]] = defaultdict(list)
TERM_ULPS = 4
SEEN: Counter[str] = Counter()


@dataclass
class Builder:
    """Accumulates nodes and initializers while a random graph is drawn."""

    dtype: str
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    counter: Counter = field(default_factory=Counter)

    def name(self, kind: str) -> str:
        self.counter[kind] += 1
        return f"{kind}{self.counter[kind]}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array.astype(DTYPES[self.dtype]), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        name = self.name(op.lower() if op != "BatchNormalization" else "bn")
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        SEEN[op] += 1
        return f"{name}_out"


# --- layers: each draws its parameters, adds nodes, returns (value, channels, spatial) ----


@st.composite
def bn_params(draw: st.DrawFn) -> dict:
    return {
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1]) | st.floats(1e-6, 0.5)),
        "var_low": draw(st.sampled_from([1e-3, 0.1, 0.5])),
        "negative_gamma": draw(st.booleans()),
    }


def add_bn(b: Builder, x: str, c: int, p: dict) -> str:
    gamma = b.rng.uniform(0.5, 1.5, c)
    if p["negative_gamma"]:
        gamma *= b.rng.choice([-1.0, 1.0], c)
    params = [
        b.const(f"{x}.gamma", gamma),
        b.const(f"{x}.beta", b.rng.normal(0, 0.5, c)),
        b.const(f"{x}.mean", b.rng.normal(0, 0.5, c)),
        b.const(f"{x}.var", b.rng.uniform(p["var_low"], 2.0, c)),
    ]
    return b.node("BatchNormalization", [x, *params], epsilon=p["eps"])


def add_affine(
    b: Builder, op: str, x: str, c: int, rank: int, form: str, channel_last: bool
) -> str:
    values = b.rng.uniform(0.5, 1.5, c) if op == "Mul" else b.rng.normal(0, 0.5, c)
    if form == "scalar":
        array = np.asarray(values[0])
    elif channel_last:
        array = values.reshape([1] * (rank - 1) + [c]) if form == "full" else values
    else:  # channels on axis 1: [1, C, 1, ...] or the shorter broadcast [C, 1, ...]
        trailing = [1] * (rank - 2)
        array = values.reshape([1, c, *trailing] if form == "full" else [c, *trailing])
    return b.node(op, [x, b.const(b.name(f"{op.lower()}_k"), array)])


@st.composite
def conv_layer(draw: st.DrawFn, c_in: int, spatial: list[int]) -> dict:
    c_out = draw(st.integers(1, 6))
    divisors = [g for g in range(1, c_in + 1) if c_in % g == 0 and c_out % g == 0]
    return {
        "c_out": c_out,
        "k": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "pad": draw(st.integers(0, 1)),
        "groups": draw(st.sampled_from(divisors)),
        "bias": draw(st.booleans()),
    }


def add_conv(
    b: Builder, x: str, c_in: int, spatial: list[int], p: dict
) -> tuple[str, int, list[int]]:
    k, s, dil, pad, g = p["k"], p["stride"], p["dilation"], p["pad"], p["groups"]
    out = [(n + 2 * pad - dil * (k - 1) - 1) // s + 1 for n in spatial]
    if min(out) < 1:  # too small for this kernel: fall back to a "same" conv
        k, s, dil, pad = 1, 1, 1, 0
        out = list(spatial)
    d = len(spatial)
    fan_in = c_in // g * k**d
    w = b.rng.normal(0, 1 / math.sqrt(fan_in), [p["c_out"], c_in // g] + [k] * d)
    inputs = [x, b.const(b.name("conv_w"), w)]
    if p["bias"]:
        inputs.append(b.const(b.name("conv_b"), b.rng.normal(0, 0.5, p["c_out"])))
    y = b.node("Conv", inputs, kernel_shape=[k] * d, strides=[s] * d, dilations=[dil] * d,
               pads=[pad] * (2 * d), group=g)  # fmt: skip
    return y, p["c_out"], out


def add_conv_transpose(
    b: Builder, x: str, c_in: int, spatial: list[int], p: dict
) -> tuple[str, int, list[int]]:
    k, s, g = p["k"], p["stride"], p["groups"]
    out_pad = min(p["pad"], s - 1)
    out = [(n - 1) * s + k + out_pad for n in spatial]
    if max(out) > MAX_SPATIAL:
        k, s, out_pad = 1, 1, 0
        out = list(spatial)
    d = len(spatial)
    w = b.rng.normal(0, 1 / math.sqrt(c_in // g * k**d), [c_in, p["c_out"] // g] + [k] * d)
    inputs = [x, b.const(b.name("deconv_w"), w)]
    if p["bias"]:
        inputs.append(b.const(b.name("deconv_b"), b.rng.normal(0, 0.5, p["c_out"])))
    y = b.node("ConvTranspose", inputs, kernel_shape=[k] * d, strides=[s] * d,
               output_padding=[out_pad] * d, group=g)  # fmt: skip
    return y, p["c_out"], out


@st.composite
def conv_graph(draw: st.DrawFn, b: Builder) -> tuple[str, list[int]]:
    """A chain (with optional two-way branches) over [1, C, *spatial], d = 1, 2 or 3."""
    d = draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(2, 5 if d < 3 else 3)) for _ in range(d)]
    shape = [draw(st.integers(1, 2)), c, *spatial]
    x = "x"
    for _ in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["conv", "conv", "deconv", "bn", "relu", "mul", "add",
                                     "branch", "fanout"]))  # fmt: skip
        if kind in ("conv", "deconv"):
            p = draw(conv_layer(c, spatial))
            add = add_conv if kind == "conv" else add_conv_transpose
            x, c, spatial = add(b, x, c, spatial, p)
            if draw(st.integers(0, 3)) > 0:  # most convs in real nets are followed by a BN
                x = add_bn(b, x, c, draw(bn_params()))
        elif kind == "bn":
            x = add_bn(b, x, c, draw(bn_params()))
        elif kind == "relu":
            x = b.node("Relu", [x])
        elif kind in ("mul", "add"):
            form = draw(st.sampled_from(["full", "short", "scalar"]))
            x = add_affine(b, kind.capitalize(), x, c, 2 + d, form, channel_last=False)
        else:
            # branch: two conv(+BN) paths summed; fanout: a conv read by a BN and a
            # Relu (the BN must be refused as BRANCHING, nothing else changes).
            c_out = draw(st.integers(1, 5))
            same = {"c_out": c_out, "k": 1, "stride": 1, "dilation": 1, "pad": 0, "groups": 1}
            left, _, _ = add_conv(b, x, c, spatial, {**same, "bias": draw(st.booleans())})
            if kind == "branch":
                right, _, _ = add_conv(b, x, c, spatial, {**same, "bias": draw(st.booleans())})
                right = add_bn(b, right, c_out, draw(bn_params()))
            else:
                right = b.node("Relu", [left])
            x = b.node("Add", [add_bn(b, left, c_out, draw(bn_params())), right])
            c = c_out
    return x, shape


@st.composite
def dense_graph(draw: st.DrawFn, b: Builder) -> tuple[str, list[int]]:
    """A chain (with optional branches) over [N, F]: Gemm, MatMul, BN, Relu, Mul, Add."""
    f = draw(st.integers(1, 8))
    shape = [draw(st.integers(1, 4)), f]
    x = "x"
    for _ in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["gemm", "gemm", "matmul", "bn", "relu", "mul", "add",
                                     "branch"]))  # fmt: skip
        if kind in ("gemm", "matmul", "branch"):
            f_out = draw(st.integers(1, 8))
            paths = []
            for _ in range(2 if kind == "branch" else 1):
                if kind == "matmul":
                    w = b.rng.normal(0, 1 / math.sqrt(f), [f, f_out])
                    y = b.node("MatMul", [x, b.const(b.name("mm_w"), w)])
                else:
                    y = add_gemm(b, draw, x, f, f_out)
                if kind == "branch" or draw(st.integers(0, 3)) > 0:
                    y = add_bn(b, y, f_out, draw(bn_params()))
                paths.append(y)
            x = paths[0] if len(paths) == 1 else b.node("Add", paths)
            f = f_out
        elif kind == "bn":
            x = add_bn(b, x, f, draw(bn_params()))
        elif kind == "relu":
            x = b.node("Relu", [x])
        else:
            form = draw(st.sampled_from(["full", "short", "scalar"]))
            x = add_affine(b, kind.capitalize(), x, f, 2, form, channel_last=True)
    return x, shape


def add_gemm(b: Builder, draw: st.DrawFn, x: str, f: int, f_out: int) -> str:
    trans_b = draw(st.booleans())
    w = b.rng.normal(0, 1 / math.sqrt(f), [f_out, f] if trans_b else [f, f_out])
    inputs = [x, b.const(b.name("gemm_w"), w)]
    beta = draw(st.sampled_from([1.0, 0.5, 0.0, 1.3]))
    if draw(st.booleans()):
        c_shape = draw(st.sampled_from([[f_out], [1, f_out], []]))
        c = b.rng.normal(0, 0.5, f_out if c_shape != [] else 1).reshape(c_shape)
        inputs.append(b.const(b.name("gemm_c"), c))
    alpha = draw(st.sampled_from([1.0, 0.7, 2.0]))
    return b.node("Gemm", inputs, transB=int(trans_b), alpha=alpha, beta=beta)


@st.composite
def random_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, str, list[int]]:
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "float64"]))
    family = "dense" if dtype == "float64" else draw(st.sampled_from(["conv", "conv", "dense"]))
    b = Builder(dtype, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    out, shape = draw(conv_graph(b) if family == "conv" else dense_graph(b))
    b.nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
    graph = helper.make_graph(
        b.nodes,
        "random",
        [helper.make_tensor_value_info("x", ONNX_DTYPE[dtype], shape)],
        [helper.make_tensor_value_info("y", ONNX_DTYPE[dtype], None)],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    event(f"{dtype} {family}")
    return model, dtype, shape


def run(model: onnx.ModelProto, x: np.ndarray, *, all_values: bool = False) -> list[np.ndarray]:
    """[y], or with ``all_values`` [y, every intermediate value] (made graph outputs)."""
    names = ["y"]
    if all_values:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        elem = model.graph.input[0].type.tensor_type.elem_type
        names += [o for n in model.graph.node for o in n.output if o and o != "y"]
        model.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in names[1:])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(names, {"x": x})


@pytest.fixture(scope="module", autouse=True)
def print_worst_errors():
    yield
    worst = ", ".join(f"{k}: {v:.3g} (rtol {DEFAULT_RTOL[k]:g})" for k, v in sorted(WORST.items()))
    print(f"\nworst |folded - original| / max|original| by dtype: {worst}")
    print(f"ops drawn: {dict(SEEN)}")
    for dtype, cases in sorted(CANCELLATION.items()):
        worst_out, worst_term = max(c[0] for c in cases), max(c[1] for c in cases)
        print(f"{dtype}: {len(cases)} examples beyond DEFAULT_RTOL ({DEFAULT_RTOL[dtype]:g}) "
              f"of the output scale; worst {worst_out:.3g} of the output, "
              f"{worst_term:.3g} of the largest term")  # fmt: skip


def _unknown_rank_matmul(refusal: bnfold.Refusal) -> bool:
    """MatMul -> BN needs the MatMul's input rank, known only from shape annotations."""
    return refusal.code == Code.NOT_PER_CHANNEL and (
        "unknown" in refusal.detail or "rank-?" in refusal.detail
    )


@given(case=random_models(), seed=st.integers(0, 2**16), infer_shapes=st.booleans())
def test_folded_random_graph_matches_original(case, seed, infer_shapes):
    model, dtype, shape = case
    if infer_shapes:  # what exporters usually leave in the file; without it see the xfail below
        model = onnx.shape_inference.infer_shapes(model)
    x = np.random.default_rng(seed).standard_normal(shape).astype(DTYPES[dtype])
    reference, *values = run(model, x, all_values=True)
    terms = max((float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in values), default=0.0)
    # fp16 chains can overflow in the original itself; such a draw says nothing about folding.
    assume(np.all(np.isfinite(reference)))

    result = bnfold.fold(model)
    folded = ir.serde.serialize_model(result.model)
    report = result.report
    event(f"folds: {min(len(report.folded), 3)}{'+' if len(report.folded) >= 3 else ''}")

    assert [i.name for i in folded.graph.input] == ["x"]
    assert [o.name for o in folded.graph.output] == ["y"]
    # Every BatchNorm left in the graph is accounted for by a refusal naming it.
    named = {part for r in report.refused for part in r.site.split(" -> ")}
    bn_left = {n.name for n in folded.graph.node if n.op_type == "BatchNormalization"}
    assert bn_left <= named, report.summary()
    forbidden = UNEXPECTED_REFUSALS - ({Code.BAD_VALUES} if dtype == "float16" else set())
    unexpected = [
        r for r in report.refused
        if r.code in forbidden and (infer_shapes or not _unknown_rank_matmul(r))
    ]  # fmt: skip
    assert not unexpected, report.summary()
    assert len(folded.graph.node) <= len(model.graph.node)

    (actual,) = run(folded, x)
    assert actual.shape == reference.shape and actual.dtype == reference.dtype
    ref64, act64 = reference.astype(np.float64), actual.astype(np.float64)
    scale = float(np.abs(ref64).max(initial=0.0))
    error = float(np.abs(ref64 - act64).max(initial=0.0))
    if scale > 0:
        WORST[dtype] = max(WORST[dtype], error / scale)
    if error <= DEFAULT_RTOL[dtype] * scale:
        return
    # Beyond verify's default: allowed only as rounding of the folded parameters, a
    # few ulps of the largest value in the computation. When the output is a small
    # difference of large terms (y = 0.3125 - 0.3040), an fp16 bias rounded to
    # 2.4e-4 is 2% of the output. Counted and printed, not hidden.
    bound = TERM_ULPS * float(np.finfo(DTYPES[dtype]).eps) * terms
    CANCELLATION[dtype].append((error / scale, error / terms if terms else math.inf))
    event(f"{dtype}: beyond DEFAULT_RTOL, within {TERM_ULPS} ulps of the largest term")
    if error > DEFAULT_RTOL[dtype] * scale + bound and os.environ.get("BNFOLD_DUMP_DIR"):
        dump = Path(os.environ["BNFOLD_DUMP_DIR"])  # to study a failure outside hypothesis
        onnx.save(model, dump / "original.onnx")
        onnx.save(folded, dump / "folded.onnx")
        np.save(dump / "x.npy", x)
    assert error <= DEFAULT_RTOL[dtype] * scale + bound, (
        f"{dtype}: max error {error:.3g} > rtol {DEFAULT_RTOL[dtype]:g} x scale {scale:.3g}"
        f" + {TERM_ULPS} ulps x largest term {terms:.3g}\n" + report.summary()
    )


def test_matmul_bn_folds_without_shape_annotations():
    b = Builder("float32", np.random.default_rng(0))
    h = b.node("Relu", ["x"])
    y = b.node("MatMul", [h, b.const("w", b.rng.normal(size=(4, 3)))])
    y = add_bn(b, y, 3, {"eps": 1e-5, "var_low": 0.5, "negative_gamma": False})
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializer=b.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = bnfold.fold(model).report
    assert report.refused == [], report.summary()
