"""The same certificate for PyTorch folds: ``.pt2`` programs and eager modules.

A ``torch.export`` program is translated into the ONNX prover's graph
(:mod:`bnfold.proof.torch_graph`) and proven like an ONNX model: the rest of the graph
unchanged, each changed region the same affine map. An eager module is exported on
example inputs and proven the same way, so what feeds each BN and what else reads a
conv is checked, never taken from the fold report. Without example inputs an eager
fold is proven site by site from the parameters of the modules the report pairs, and
the certificate says that pairing is assumed.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from bnfold.proof.certificate import Certificate, SiteProof, Uncovered
from bnfold.proof.onnx_proof import prove_onnx
from bnfold.proof.regions import ReportLike
from bnfold.proof.torch_graph import align_names, program_model, to_numpy

PAIRING_ASSUMED = (
    "no example inputs: which module feeds which BatchNorm is taken from the fold report "
    "(the forward was not traced); give example_inputs to check it"
)


def _load_program(source: Any) -> Any:
    if isinstance(source, str | os.PathLike):
        import torch

        # torch.export.load unpickles the archive: only for files the caller trusts
        # (bnfold's CLI passes programs it loaded with its own safe loader).
        return torch.export.load(os.fspath(source))
    return source


def prove_program(original: Any, folded: Any, report: ReportLike | None = None) -> Certificate:
    """Prove a folded ``torch.export`` program against the original, for all inputs.

    Args:
        original: the unfolded ExportedProgram (or a trusted ``.pt2`` path).
        folded: the folded ExportedProgram.
        report: the fold's report, for site names only.

    Returns:
        A Certificate (front "torch program"). A call the prover does not model is
        compared as an opaque node: unchanged, it is fine; inside a changed region, the
        region is reported not proven with the call named.
    """
    start = time.perf_counter()
    model_o = program_model(_load_program(original))
    model_f = program_model(_load_program(folded))
    align_names(model_o, model_f)
    certificate = prove_onnx(model_o, model_f, report)
    certificate.front = "torch program"
    certificate.seconds = time.perf_counter() - start
    return certificate


def prove_eager(
    original_module: Any,
    folded_module: Any,
    report: ReportLike | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
) -> Certificate:
    """Prove an eager fold: the folded module computes the original's function.

    With ``example_inputs`` both modules are exported and proven as programs (what each
    BN read and who else reads each conv come from the trace). Without, each site the
    report names is proven from the parameters of its modules before and after, the
    other parameters and modules must be unchanged, and the pairing is an assumption.
    """
    start = time.perf_counter()
    if example_inputs is not None:
        try:
            programs = [_export(m, example_inputs) for m in (original_module, folded_module)]
        except Exception as exc:  # torch.export's many failure types: fall back, say why
            certificate = _module_level(original_module, folded_module, report)
            certificate.assumptions.append(f"torch.export failed ({type(exc).__name__}: {exc})")
        else:
            certificate = prove_program(programs[0], programs[1], report)
    else:
        certificate = _module_level(original_module, folded_module, report)
    certificate.front = "torch eager"
    certificate.seconds = time.perf_counter() - start
    return certificate


def _export(module: Any, example_inputs: tuple[Any, ...]) -> Any:
    import torch

    module.eval()
    with torch.no_grad():
        return torch.export.export(module, tuple(example_inputs))


# -- module level (no example inputs) ------------------------------------------------------


def _is_bn(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def _same_tensor(a: Any, b: Any) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bytes_a = np.ascontiguousarray(to_numpy(a)).view(np.uint8)
    bytes_b = np.ascontiguousarray(to_numpy(b)).view(np.uint8)
    return bool(np.array_equal(bytes_a, bytes_b))


def _module_level(original: Any, folded: Any, report: ReportLike | None) -> Certificate:
    certificate = Certificate(front="torch eager", assumptions=[PAIRING_ASSUMED])
    mods_o = dict(original.named_modules())
    mods_f = dict(folded.named_modules())
    removed = _module_differences(mods_o, mods_f, certificate)
    changed = _parameter_differences(original, folded, removed, certificate)
    covered: set[str] = set()
    for entry in report.folded if report is not None else []:
        site = _module_site(entry, mods_o, mods_f)
        certificate.sites.append(site) if isinstance(
            site, SiteProof
        ) else certificate.uncovered.append(site)
        covered |= {entry.linear, entry.affine}
    for path in sorted((changed | removed) - covered):
        certificate.differences.append(f"module {path!r} changed but no fold site names it")
    certificate.rest_unchanged = not certificate.differences
    return certificate


def _module_differences(
    mods_o: dict[str, Any], mods_f: dict[str, Any], certificate: Certificate
) -> set[str]:
    """Module tree: same types and settings, except BNs folded away. Returns those BNs."""
    removed: set[str] = set()
    for path, module in mods_o.items():
        other = mods_f.get(path)
        if other is None:
            if not any(path.startswith(f"{r}.") for r in removed):
                certificate.differences.append(f"module {path!r} is missing")
            continue
        if _is_bn(module) and type(other).__name__ == "Identity":
            removed.add(path)
        elif type(other) is not type(module):
            certificate.differences.append(
                f"module {path!r}: {type(module).__name__} became {type(other).__name__}"
            )
        elif module.extra_repr() != other.extra_repr() or module.training != other.training:
            certificate.differences.append(f"module {path!r}: settings differ")
    for path in mods_f.keys() - mods_o.keys():
        certificate.differences.append(f"module {path!r} is new")
    return removed


def _parameter_differences(
    original: Any, folded: Any, removed: set[str], certificate: Certificate
) -> set[str]:
    """Parameters and buffers: identical bit for bit, or owned by a fold site."""
    state_o, state_f = original.state_dict(), folded.state_dict()
    changed: set[str] = set()
    for key in state_o.keys() | state_f.keys():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if key in state_o and key in state_f:
            if not _same_tensor(state_o[key], state_f[key]):
                changed.add(owner)
        elif key in state_o and owner not in removed:
            certificate.differences.append(f"parameter {key!r} is missing")
        elif key in state_f and key not in state_o:
            changed.add(owner)
    return changed


def _module_site(
    entry: Any, mods_o: dict[str, Any], mods_f: dict[str, Any]
) -> SiteProof | Uncovered:
    """Prove one reported site from its modules (Linear/Conv/ConvTranspose next to a BN)."""
    kind = str(getattr(entry.kind, "value", entry.kind))
    parts = [p.strip() for p in entry.site.split("->")]
    if kind != "adjacent" or len(parts) != 2:
        return Uncovered(
            entry.site, f"a {kind} site needs example inputs to trace what surrounds it"
        )
    before = parts[0] == entry.affine
    try:
        model_o = _site_model(mods_o[entry.linear], mods_o[entry.affine], before)
        model_f = _site_model(mods_f[entry.linear], None, before)
    except (KeyError, ValueError) as exc:
        return Uncovered(entry.site, str(exc))
    proof = prove_onnx(model_o, model_f)
    site = (
        proof.sites[0]
        if proof.sites
        else SiteProof(entry.site, kind, True, 0.0, notes=["nothing changed"])
    )
    site.name, site.kind = entry.site, kind
    if not proof.rest_unchanged:
        site.proven, site.unsupported = False, False
        site.reason = "; ".join(proof.differences)
    return site


def _site_model(linear: Any, bn: Any | None, before: bool) -> ir.Model:
    """``linear(bn(x))`` or ``bn(linear(x))`` (or ``linear(x)``) as a small ONNX model."""
    import torch

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, tensor: Any) -> str:
        inits.append(onnx.numpy_helper.from_array(to_numpy(tensor), name))
        return name

    if isinstance(linear, torch.nn.Linear):
        rank, channels_in = 0, linear.in_features
    elif isinstance(linear, torch.nn.modules.conv._ConvNd):
        if linear.padding_mode != "zeros":
            raise ValueError(f"{linear.padding_mode} padding is not modelled")
        rank = linear.weight.dim() - 2
        channels_in = linear.in_channels
    else:
        raise ValueError(f"{type(linear).__name__} is not a linear module the prover models")
    x = "x"
    if bn is not None and before:
        x = _bn_node(bn, x, "bn", nodes, const)
    y = "y" if bn is None or before else "linear_out"
    nodes.append(_linear_node(linear, x, y, const))
    if bn is not None and not before:
        _bn_node(bn, y, "bn", nodes, const, output="y")
    dims: list[int | str] = ["N", channels_in, *[f"S{i}" for i in range(rank)]]
    graph = helper.make_graph(
        nodes, "site", [helper.make_tensor_value_info("x", _onnx_dtype(linear.weight), dims)],
        [helper.make_tensor_value_info("y", _onnx_dtype(linear.weight), None)], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.serde.deserialize_model(model)


def _onnx_dtype(tensor: Any) -> int:
    return int(helper.np_dtype_to_tensor_dtype(to_numpy(tensor[:0]).dtype))


def _linear_node(linear: Any, x: str, y: str, const: Any) -> onnx.NodeProto:
    import torch

    inputs = [x, const("linear.weight", linear.weight)]
    if linear.bias is not None:
        inputs.append(const("linear.bias", linear.bias))
    if isinstance(linear, torch.nn.Linear):
        return helper.make_node("Gemm", inputs, [y], name="linear", transB=1)
    rank = linear.weight.dim() - 2
    attrs: dict[str, Any] = {
        "strides": list(linear.stride), "dilations": list(linear.dilation), "group": linear.groups,
    }  # fmt: skip
    if isinstance(linear.padding, str):
        attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[linear.padding]
    else:
        attrs["pads"] = list(linear.padding) * 2
    if linear.transposed:
        attrs["output_padding"] = list(linear.output_padding)
        return helper.make_node("ConvTranspose", inputs, [y], name="linear", **attrs)
    assert len(attrs["strides"]) == rank
    return helper.make_node("Conv", inputs, [y], name="linear", **attrs)


def _bn_node(
    bn: Any, x: str, name: str, nodes: list[onnx.NodeProto], const: Any, output: str = "bn_out"
) -> str:
    import torch

    if bn.running_mean is None:
        raise ValueError("a BatchNorm without running statistics")
    c = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(c, dtype=bn.running_mean.dtype)
    bias = bn.bias if bn.bias is not None else torch.zeros(c, dtype=bn.running_mean.dtype)
    inputs = [
        x, const("bn.weight", weight), const("bn.bias", bias),
        const("bn.mean", bn.running_mean), const("bn.var", bn.running_var),
    ]  # fmt: skip
    nodes.append(
        helper.make_node("BatchNormalization", inputs, [output], name=name, epsilon=float(bn.eps))
    )
    return output


__all__ = ["prove_eager", "prove_program"]
