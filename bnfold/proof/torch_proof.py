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
import re
import time
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from bnfold.proof.certificate import Certificate, SiteProof, Uncovered
from bnfold.proof.onnx_proof import prove_onnx
from bnfold.proof.regions import ReportLike
from bnfold.proof.torch_aten import torch_epsilon
from bnfold.proof.torch_graph import align_names, program_model, to_numpy

PAIRING_ASSUMED = (
    "which module feeds which BatchNorm is taken from the fold report (the forward was "
    "not traced): the folds' arithmetic is proven, the pairing is not"
)
NO_INPUTS = "no example inputs: give example_inputs to trace the pairing"
CHILDREN_ASSUMED = (
    "{path} ({kind}) is taken to run its children (kept in its place) after its affine"
)
FROZEN_ASSUMED = (
    "{path} ({kind}) holds BatchNorm's weight, bias, running_mean, running_var and eps "
    "and is taken to compute inference batch_norm with them (its forward was not traced)"
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
        original: the unfolded ExportedProgram (or a trusted ``.pt2`` path), or its
            ``module()``.
        folded: the folded ExportedProgram, or the folded graph module.
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
    untraced: str = NO_INPUTS,
) -> Certificate:
    """Prove an eager fold: the folded module computes the original's function.

    With ``example_inputs`` both modules are exported and proven as programs (what each
    BN read and who else reads each conv come from the trace). Without, each site the
    report names is proven from the parameters of its modules before and after, the
    other parameters and modules must be unchanged, and the pairing is an assumption.
    ``untraced``: why the forward was not traced, said among the assumptions when
    ``example_inputs`` is None (the fold run's: export failed). Both modules are
    exported in eval mode and left in the mode they were in.
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
        certificate.assumptions.append(untraced)
    certificate.front = "torch eager"
    certificate.seconds = time.perf_counter() - start
    return certificate


def _export(module: Any, example_inputs: tuple[Any, ...]) -> Any:
    """``module`` exported in eval mode, its modules' own modes restored after.

    The settings are those of the fold's ``bnfold.torch_front.trace.export_program``
    (non-strict, eval, grad as the caller has it), written out here because the prover
    imports nothing of the fold: a test holds the two to the same graph.
    """
    import torch

    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        return torch.export.export(module, tuple(example_inputs), strict=False)
    finally:
        for m, training in modes:
            m.training = training


# -- module level (no example inputs) ------------------------------------------------------


def _is_torch_bn(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def _is_bn(module: Any) -> bool:
    return _is_torch_bn(module) or _frozen_bn(module)


_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _frozen_bn(module: Any) -> bool:
    """A module that is no ``_BatchNorm`` but holds its state: torchvision's
    FrozenBatchNorm2d (its forward is not read: :data:`FROZEN_ASSUMED`)."""
    import torch

    if isinstance(module, torch.nn.modules.conv._ConvNd | torch.nn.Linear):
        return False
    tensors = [getattr(module, name, None) for name in _BN_TENSORS]
    return all(isinstance(t, torch.Tensor) for t in tensors) and isinstance(
        getattr(module, "eps", None), float
    )


def _same_tensor(a: Any, b: Any) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bytes_a = np.ascontiguousarray(to_numpy(a)).view(np.uint8)
    bytes_b = np.ascontiguousarray(to_numpy(b)).view(np.uint8)
    return bool(np.array_equal(bytes_a, bytes_b))


def _module_level(original: Any, folded: Any, report: ReportLike | None) -> Certificate:
    certificate = Certificate(
        front="torch eager", assumptions=[PAIRING_ASSUMED], pairing_assumed=True
    )
    mods_o = dict(original.named_modules())
    mods_f = dict(folded.named_modules())
    removed = _module_differences(mods_o, mods_f, certificate)
    changed = _parameter_differences(original, folded, removed, certificate)
    covered: set[str] = set()
    entries = list(report.folded) if report is not None else []
    # A module that also takes a join or tap fold carries more than its adjacent BNs.
    shared = {p for e in entries if not _adjacent(e) for p in e.linear.split(", ")}
    for group in _by_linear(entries):
        site = _module_site(group, mods_o, mods_f, shared)
        if isinstance(site, SiteProof):
            certificate.sites.append(site)
        else:
            certificate.uncovered.append(site)
        for entry in group:
            covered |= {*entry.linear.split(", "), entry.affine}  # a join: "a, b"
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
        if _is_bn(module) and type(other).__name__ in _BN_REMAINS:
            removed.add(path)
            kind = type(module).__name__
            if not _is_torch_bn(module):
                certificate.assumptions.append(FROZEN_ASSUMED.format(path=repr(path), kind=kind))
            if type(other).__name__ == "Sequential":
                certificate.assumptions.append(CHILDREN_ASSUMED.format(path=repr(path), kind=kind))
        elif type(other) is not type(module):
            certificate.differences.append(
                f"module {path!r}: {type(module).__name__} became {type(other).__name__}"
            )
        elif _settings(module) != _settings(other) or module.training != other.training:
            certificate.differences.append(f"module {path!r}: settings differ")
    for path in mods_f.keys() - mods_o.keys():
        certificate.differences.append(f"module {path!r} is new")
    return removed


_BN_REMAINS = ("Identity", "Sequential")
"""What a folded BN leaves: nothing, or the children it ran after its affine (timm's
BatchNormAct2d), which stay at their paths and are compared there."""


def _settings(module: Any) -> str:
    """A module's settings, but whether it has a bias: a fold gives a conv one."""
    return re.sub(r",?\s*bias=(False|True)", "", module.extra_repr())


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


def _kind(entry: Any) -> str:
    return str(getattr(entry.kind, "value", entry.kind))


def _adjacent(entry: Any) -> bool:
    return _kind(entry) == "adjacent" and len(entry.site.split("->")) == 2


def _by_linear(entries: list[Any]) -> list[list[Any]]:
    """The report's sites, adjacent folds into one module together (a chain: BN -> conv
    -> BN1 -> BN2 leaves one conv carrying three BNs), every other site alone."""
    groups: dict[str, list[Any]] = {}
    alone: list[list[Any]] = []
    for entry in entries:
        if _adjacent(entry):
            groups.setdefault(entry.linear, []).append(entry)
        else:
            alone.append([entry])
    return [*groups.values(), *alone]


def _module_site(
    group: list[Any], mods_o: dict[str, Any], mods_f: dict[str, Any], shared: set[str]
) -> SiteProof | Uncovered:
    """Prove the adjacent folds into one linear module (Linear/Conv/ConvTranspose) from
    its parameters and its BNs'.

    Folded in order, BNs after the module apply in that order; BNs before it apply to
    its input, the last folded nearest the module.
    """
    name = "; ".join(e.site for e in group)
    kind = _kind(group[0])
    if not _adjacent(group[0]):
        return Uncovered(name, f"a {kind} site needs example inputs to trace what surrounds it")
    if group[0].linear in shared:
        return Uncovered(name, f"{group[0].linear} also takes a join or tap fold")
    before = [e.affine for e in group if e.site.split("->")[0].strip() == e.affine]
    after = [e.affine for e in group if e.affine not in before]
    linear = group[0].linear
    try:
        bns_before = [mods_o[path] for path in reversed(before)]
        model_o = _site_model(mods_o[linear], bns_before, [mods_o[path] for path in after])
        model_f = _site_model(mods_f[linear], [], [])
    except (KeyError, ValueError) as exc:
        return Uncovered(name, str(exc))
    proof = prove_onnx(model_o, model_f)
    site = (
        proof.sites[0]
        if proof.sites
        else SiteProof(name, kind, True, 0.0, notes=["nothing changed"])
    )
    site.name, site.kind = name, kind
    if not proof.rest_unchanged:
        site.proven, site.unsupported = False, False
        site.reason = "; ".join(proof.differences)
    return site


def _site_model(linear: Any, before: list[Any], after: list[Any]) -> ir.Model:
    """``after(linear(before(x)))``, each BN list applied in order, as a small ONNX model."""
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
    epsilons: dict[str, float] = {}
    x = "x"
    for i, bn in enumerate(before):
        x = _bn_node(bn, x, f"bn_before{i}", nodes, const, epsilons)
    y = "y" if not after else "linear_out"
    nodes.append(_linear_node(linear, x, y, const))
    for i, bn in enumerate(after):
        last = i == len(after) - 1
        y = _bn_node(bn, y, f"bn_after{i}", nodes, const, epsilons, "y" if last else "")
    dims: list[int | str] = ["N", channels_in, *[f"S{i}" for i in range(rank)]]
    graph = helper.make_graph(
        nodes, "site", [helper.make_tensor_value_info("x", _onnx_dtype(linear.weight), dims)],
        [helper.make_tensor_value_info("y", _onnx_dtype(linear.weight), None)], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    site = ir.serde.deserialize_model(model)
    # An ONNX float attribute is a float32: give each BN the float64 epsilon it stores
    # (1e-5 is not 1e-5f: a float64 fold would be refuted by millions of ulps).
    for node in site.graph:
        if node.name in epsilons:
            node.attributes["epsilon"] = ir.AttrFloat32("epsilon", epsilons[node.name])
    return site


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
    bn: Any,
    x: str,
    name: str,
    nodes: list[onnx.NodeProto],
    const: Any,
    epsilons: dict[str, float],
    output: str = "",
) -> str:
    """The BN as an ONNX node named ``name`` (its constants ``name.weight``, ...), with
    the epsilon the module stores (also kept in ``epsilons``: the node's float32
    attribute cannot hold a float64 one). Returns its output (``name.out``
    unless ``output`` is given)."""
    import torch

    if bn.running_mean is None:
        raise ValueError("a BatchNorm without running statistics")
    c = bn.running_mean.numel()
    weight = bn.weight if bn.weight is not None else torch.ones(c, dtype=bn.running_mean.dtype)
    bias = bn.bias if bn.bias is not None else torch.zeros(c, dtype=bn.running_mean.dtype)
    inputs = [
        x, const(f"{name}.weight", weight), const(f"{name}.bias", bias),
        const(f"{name}.mean", bn.running_mean), const(f"{name}.var", bn.running_var),
    ]  # fmt: skip
    output = output or f"{name}.out"
    eps = epsilons[name] = torch_epsilon(bn.eps)
    nodes.append(helper.make_node("BatchNormalization", inputs, [output], name=name, epsilon=eps))
    return output


__all__ = ["prove_eager", "prove_program"]
