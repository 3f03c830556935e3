"""Mutation fuzz: whatever bytes a model file holds, the CLI never shows a traceback.

Sample models are mutated at the byte level (flips, cuts, splices) and at the
protobuf level (fields dropped, dims/dtypes/attributes changed, nodes removed
or rewired), then folded and inspected through click's CliRunner. The CLI must
exit 0, 1 or 2; exit 2 is exactly one ``bnfold: error:`` line; a failure writes
nothing; the input file is never modified. A few cases also run as real
subprocesses.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "sample_models").glob("*.onnx"))
SAMPLE_BYTES = {p.name: p.read_bytes() for p in SAMPLES}
# verify draws random inputs of the declared shape: keep that affordable.
MAX_INPUT_ELEMENTS = 1 << 20
OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "Add", "Mul",
       "Identity", "Flatten", "GlobalAveragePool", "NoSuchOp"]  # fmt: skip

fuzz_settings = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)


def check_cli_contract(cli, model: Path, out: Path) -> None:
    """The CLI contract for any input file."""
    before = model.read_bytes()
    for args in (["fold", model, "-o", out], ["inspect", model], ["verify", model, model]):
        result = cli(args)
        assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output)
        assert "Traceback" not in result.output, result.output
        if not isinstance(result.exception, SystemExit | type(None)):
            raise AssertionError(f"exception escaped: {result.exception!r}")
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
        if args[0] == "fold":
            written = "wrote " in result.stdout
            assert out.exists() == written, result.output
            if written:
                out.unlink()
                for data_file in out.parent.glob(f"{out.name}*.data"):
                    data_file.unlink()
            assert list(out.parent.iterdir()) == [], "leftovers beside the output"
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir()) == [model.name]


def _declared_input_elements(data: bytes) -> float:
    """Elements of the inputs verify would generate, or 0 if the bytes do not parse."""
    try:
        proto = onnx.ModelProto.FromString(data)
    except Exception:
        return 0
    total = 0.0
    for value in proto.graph.input:
        dims = [
            d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim
        ]
        total += math.prod(max(d, 1) for d in dims)
    return total


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(SAMPLE_BYTES[draw(st.sampled_from(sorted(SAMPLE_BYTES)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x08, 0x12, 0x1A]))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            other = SAMPLE_BYTES[draw(st.sampled_from(sorted(SAMPLE_BYTES)))]
            start = draw(st.integers(0, len(other) - 1))
            data[at:] = other[start:]
    return bytes(data)


def _pick(draw: st.DrawFn, seq):  # type: ignore[no-untyped-def]
    return seq[draw(st.integers(0, len(seq) - 1))] if len(seq) else None


@st.composite
def proto_mutations(draw: st.DrawFn) -> bytes:
    """Structured damage: the kind a buggy exporter or a hand edit produces."""
    m = onnx.ModelProto.FromString(SAMPLE_BYTES[draw(st.sampled_from(sorted(SAMPLE_BYTES)))])
    g = m.graph
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from([
            "drop_node", "drop_init", "drop_input", "drop_output", "drop_attr", "clear_opsets",
            "ir_version", "opset_version", "op_type", "dtype", "dims", "raw_truncate",
            "rewire", "dangling", "epsilon", "attr_value", "external", "dup_output",
            "clear_graph", "domain",
        ]))  # fmt: skip
        node = _pick(draw, g.node)
        init = _pick(draw, g.initializer)
        if kind == "drop_node" and node is not None:
            g.node.remove(node)
        elif kind == "drop_init" and init is not None:
            g.initializer.remove(init)
        elif kind == "drop_input" and len(g.input):
            del g.input[draw(st.integers(0, len(g.input) - 1))]
        elif kind == "drop_output" and len(g.output):
            del g.output[draw(st.integers(0, len(g.output) - 1))]
        elif kind == "drop_attr" and node is not None and len(node.attribute):
            del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
        elif kind == "clear_opsets":
            del m.opset_import[:]
        elif kind == "ir_version":
            m.ir_version = draw(st.integers(-2, 30))
        elif kind == "opset_version" and len(m.opset_import):
            m.opset_import[0].version = draw(st.sampled_from([0, 1, 5, 6, 9, 13, 25, 10**6]))
        elif kind == "op_type" and node is not None:
            node.op_type = draw(st.sampled_from(OPS))
        elif kind == "dtype" and init is not None:
            init.data_type = draw(st.integers(0, 26))
        elif kind == "dims" and init is not None and len(init.dims):
            init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(
                st.sampled_from([0, 1, 2, 3, 7, -1, 1 << 20])
            )
        elif kind == "dims" and len(g.input):
            dims = g.input[0].type.tensor_type.shape.dim
            if len(dims):
                dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.integers(0, 64))
        elif kind == "raw_truncate" and init is not None and init.raw_data:
            init.raw_data = init.raw_data[: draw(st.integers(0, len(init.raw_data) - 1))]
        elif kind == "rewire" and node is not None and len(node.input):
            names = [i.name for i in g.initializer] + [v.name for v in g.input] + ["", "nowhere"]
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "dangling" and node is not None and len(node.output):
            node.output[0] = draw(st.sampled_from(["", "y", node.input[0] if node.input else "z"]))
        elif kind == "epsilon" and node is not None:
            node.attribute.append(
                onnx.helper.make_attribute(
                    "epsilon", draw(st.sampled_from([-1.0, 0.0, np.nan, 1e30]))
                )
            )
        elif kind == "attr_value" and node is not None and len(node.attribute):
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = draw(st.sampled_from([0, -1, 3, 1 << 40]))
            elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(
                    st.sampled_from([0, -1, 9])
                )
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = draw(st.sampled_from([0.0, -1.0, np.inf]))
        elif kind == "external" and init is not None:
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            location = draw(st.sampled_from(["../x.data", "/etc/hostname", "missing.data", ""]))
            init.external_data.add(key="location", value=location)
        elif kind == "dup_output" and node is not None and len(g.node) > 1:
            g.node[0].output[0] = node.output[0] if node.output else "dup"
        elif kind == "clear_graph":
            m.ClearField("graph")
            g = m.graph
        elif kind == "domain" and node is not None:
            node.domain = draw(st.sampled_from(["com.microsoft", "custom", "ai.onnx"]))
    return m.SerializeToString()


@fuzz_settings
@given(data=byte_mutations())
def test_byte_mutations_never_traceback(cli, tmp_path_factory, data):
    assume(_declared_input_elements(data) <= MAX_INPUT_ELEMENTS)
    folder = tmp_path_factory.mktemp("bytes")
    model = folder / "model.onnx"
    model.write_bytes(data)
    check_cli_contract(cli, model, tmp_path_factory.mktemp("out") / "folded.onnx")


@fuzz_settings
@given(data=proto_mutations())
def test_proto_mutations_never_traceback(cli, tmp_path_factory, data):
    assume(_declared_input_elements(data) <= MAX_INPUT_ELEMENTS)
    folder = tmp_path_factory.mktemp("proto")
    model = folder / "model.onnx"
    model.write_bytes(data)
    check_cli_contract(cli, model, tmp_path_factory.mktemp("out") / "folded.onnx")


@pytest.mark.parametrize("seed", range(4))
def test_real_subprocess_on_mutated_models(tmp_path, seed):
    """The installed entry point (not CliRunner) on damaged files: exit 0/1/2, no traceback."""
    rng = np.random.default_rng(seed)
    name = sorted(SAMPLE_BYTES)[seed * 5 % len(SAMPLE_BYTES)]
    data = bytearray(SAMPLE_BYTES[name])
    for at in rng.integers(0, len(data), 3):
        data[at] ^= 0xFF
    cases = {"flipped.onnx": bytes(data), "cut.onnx": SAMPLE_BYTES[name][: len(data) // 2]}
    for file, content in cases.items():
        model = tmp_path / file
        model.write_bytes(content)
        out = tmp_path / f"out_{file}"
        proc = subprocess.run(
            [sys.executable, "-m", "bnfold", "fold", str(model), "-o", str(out)],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode in (0, 1, 2), proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert not out.exists()
        assert model.read_bytes() == content
