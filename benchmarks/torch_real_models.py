"""bnfold on real PyTorch architectures, tried as a user would: eager ``bnfold.fold(model, x)``
and, where the model exports, ``bnfold.fold(torch.export.export(model, (x,)))``.

Issue 24's yardstick. Needs torch, torchvision, timm and segmentation-models-pytorch
(a venv of their own; bnfold on PYTHONPATH). Weights are random (nothing is
downloaded) and every BN-like module gets trained-like statistics and affine, so a
wrong fold cannot hide behind gamma=1, var=1. The detectors get the FrozenBatchNorm2d
backbones torchvision's pretrained builders give them, and ``box_score_thresh=0`` /
``score_thresh=0`` so random weights still give boxes.

Per model:

- ``BN``: BN-like modules (``nn.BatchNorm*d`` and subclasses such as timm's
  ``BatchNormAct2d``, frozen BNs), by kind.
- ``after linear``: BN calls whose input, in one eager run, is the very tensor a
  conv/linear module returned, unchanged since (forward hooks and the tensor's
  version counter, independent of bnfold's finders). A BN module counts if all its
  calls are such.
- ``eager`` and ``pt2``: BNs folded, what is left and why (codes), which finder,
  verification (the proof's regions proven, then the sampled check), seconds;
  ``.pt2`` only where ``torch.export`` takes the model.
- ``fresh input``: the folded model against the original on an input neither saw
  (not a verification sample): the largest difference relative to the output's largest
  magnitude; detector outputs compared as box sets (each folded box's distance to the
  nearest original box of its label) and sorted scores, since near-tied scores may
  reorder boxes, and their backbone's feature maps and one-stage heads' outputs (the
  scores and box deltas before the box selection) too: random weights saturate
  scores, leave no box or make near-ties whose selection flips, so the detections
  alone can prove little.
- ``unverified`` (detectors): the eager fold without verification, compared the same
  way: whether folds that verification rolls back were correct.
- ``recorded = export`` (models export traces, ``--parity``): the eager fold path
  with only the ``recorded`` finder against the same with ``export``: the same folds
  and, per BN, the same refusal code.

Usage:
  python benchmarks/torch_real_models.py [--models a,b] [--det-size 512] [--threads 1]
      [--front eager --front pt2] [--json OUT.json] [--md OUT.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_fold_vs_fx import trained_like

DETECTORS = ("fasterrcnn", "retinanet", "maskrcnn", "fcos", "ssdlite")
MODELS = (
    *DETECTORS,
    "cspdarknet53",
    "fastvit_t8",
    "timm_resnet50",
    "mobilenetv3_large_100",
    "mixnet_s",
    "unet_resnet18",
)


# --- models --------------------------------------------------------------------------


def frozen_fpn_backbone(extra_p6p7: bool) -> nn.Module:
    """ResNet-50 FPN with FrozenBatchNorm2d, as the pretrained detection builders make it."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if not extra_p6p7:
        return _resnet_fpn_extractor(body, 3)
    return _resnet_fpn_extractor(body, 3, [2, 3, 4], LastLevelP6P7(256, 256))


def build(name: str, det_size: int) -> tuple[nn.Module, Any]:
    """The model (random weights, trained-like BNs, eval) and one example input."""
    from torchvision.models import detection

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    size = dict(min_size=det_size, max_size=det_size)
    model: nn.Module
    if name == "fasterrcnn":
        model = detection.FasterRCNN(frozen_fpn_backbone(False), 91, box_score_thresh=0.0, **size)
    elif name == "maskrcnn":
        model = detection.MaskRCNN(frozen_fpn_backbone(False), 91, box_score_thresh=0.0, **size)
    elif name == "retinanet":
        model = detection.RetinaNet(frozen_fpn_backbone(True), 91, score_thresh=0.0, **size)
    elif name == "fcos":
        model = detection.FCOS(frozen_fpn_backbone(True), 91, score_thresh=0.0, **size)
    elif name == "ssdlite":
        model = detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, score_thresh=0.0
        )
    elif name == "unet_resnet18":
        import segmentation_models_pytorch as smp

        model = smp.Unet("resnet18", encoder_weights=None)
        return trained_like(model), torch.randn(1, 3, 256, 256, generator=gen)
    else:
        import timm

        model = timm.create_model(name.removeprefix("timm_"), pretrained=False)
        side = int(model.default_cfg["input_size"][-1])  # type: ignore[index]
        return trained_like(model), torch.randn(1, 3, side, side, generator=gen)
    side = 320 if name == "ssdlite" else det_size
    return trained_like(model), [torch.rand(3, side, side, generator=gen)]


def fresh_input(x: Any) -> Any:
    gen = torch.Generator().manual_seed(12345)
    if isinstance(x, list):
        return [torch.rand(t.shape, generator=gen) for t in x]
    return torch.randn(x.shape, generator=gen)


# --- counting BNs right after a linear module, independently of bnfold ---------------------


def bn_kinds(model: nn.Module) -> dict[str, int]:
    from bnfold.torch_front.modules import is_bn_like

    return dict(Counter(type(m).__name__ for m in model.modules() if is_bn_like(m)))


_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d, nn.Linear)  # fmt: skip


def bns_after_linear(model: nn.Module, x: Any) -> int:
    """BN modules every call of which reads a linear module's output, unchanged since."""
    from bnfold.torch_front.modules import is_bn_like

    made: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
    verdicts: dict[str, list[bool]] = {}

    def linear_out(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            made[id(out)] = (weakref.ref(out), out._version)

    def made_unchanged(t: torch.Tensor) -> bool:
        entry = made.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == t._version

    def bn_in(path: str) -> Any:
        def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            t = inputs[0] if inputs else None
            verdicts.setdefault(path, []).append(isinstance(t, torch.Tensor) and made_unchanged(t))

        return hook

    handles = []
    for path, m in model.named_modules():
        if isinstance(m, _LINEAR):
            handles.append(m.register_forward_hook(linear_out))
        elif is_bn_like(m):
            handles.append(m.register_forward_pre_hook(bn_in(path)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return sum(all(v) for v in verdicts.values())


# --- comparing outputs on a fresh input ----------------------------------------------------


def run(model: Any, x: Any) -> Any:
    with torch.no_grad():
        return model(x)


def compare(want: Any, got: Any) -> dict[str, Any]:
    """The worst relative difference over tensor outputs; detections as box sets."""
    if isinstance(want, list | tuple) and want and isinstance(want[0], dict):
        return compare_detections(want[0], got[0])
    if isinstance(want, dict):
        want, got = list(want.values()), list(got.values())
    if isinstance(want, torch.Tensor):
        want, got = [want], [got]
    worst = 0.0
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape:
            return {"max_rel": float("inf"), "note": f"shape {tuple(a.shape)} -> {tuple(b.shape)}"}
        scale = float(a.abs().max()) or 1.0
        worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    return {"max_rel": worst}


def compare_detections(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    """Boxes as sets (nearest original box of the same label), scores sorted, counts."""
    out: dict[str, Any] = {"boxes": [len(want["boxes"]), len(got["boxes"])]}
    if len(want["boxes"]) == 0 or len(got["boxes"]) == 0:
        out["max_rel"] = 0.0 if len(want["boxes"]) == len(got["boxes"]) else float("inf")
        return out
    scale = float(want["boxes"].abs().max()) or 1.0
    gaps = []
    for box, label in zip(got["boxes"], got["labels"], strict=True):
        same = want["boxes"][want["labels"] == label]
        if len(same) == 0:
            gaps.append(float("inf"))
            continue
        gaps.append(float((same.double() - box.double()).abs().amax(1).min()))
    n = min(len(want["scores"]), len(got["scores"]))
    a = want["scores"].sort(descending=True).values[:n].double()
    b = got["scores"].sort(descending=True).values[:n].double()
    out["box_rel"] = max(gaps) / scale
    out["score_rel"] = float((a - b).abs().max()) / (float(a.abs().max()) or 1.0)
    out["max_rel"] = max(out["box_rel"], out["score_rel"])
    if "masks" in want and len(want["masks"]) == len(got["masks"]):
        out["mask_rel"] = float((want["masks"].double() - got["masks"].double()).abs().max())
    return out


# --- folding ----------------------------------------------------------------------------


def summarize(result: Any, seconds: float) -> dict[str, Any]:
    report = result.report
    counts = report.batchnorm
    entry: dict[str, Any] = {
        "found": counts.found,
        "folded": counts.folded,
        "left": counts.left,
        "left_by_code": counts.left_by_code,
        "finders": dict(Counter(f.finder for f in report.folded)),
        "kinds": dict(Counter(str(f.kind.value) for f in report.folded)),
        "seconds": round(seconds, 1),
        "refusals": [f"{r.code.value}: {r.site}: {r.detail}"[:240] for r in report.refused],
    }
    if result.verification is not None:
        entry["verification"] = result.verification.status
        proof = result.verification.proof
        if proof is not None:  # made inside the fold, before the sampled check
            entry["proof"] = {
                "proven": proof.proven, "sites": len(proof.sites), "holds": proof.holds,
                "refuted": proof.refuted, "module_level": any(
                    "taken from the fold report" in a for a in proof.assumptions
                ),
            }  # fmt: skip
    return entry


def fold_eager(model: nn.Module, x: Any, fresh: Any) -> dict[str, Any]:
    import bnfold

    start = time.perf_counter()
    result = bnfold.fold(model, (x,))
    return checked(summarize(result, time.perf_counter() - start), model, result.model, fresh)


def fold_unverified(model: nn.Module, x: Any, fresh: Any) -> dict[str, Any]:
    from bnfold.torch_front import fold_module

    start = time.perf_counter()
    result = fold_module(model, (x,), verify=False)
    return checked(summarize(result, time.perf_counter() - start), model, result.model, fresh)


def checked(entry: dict[str, Any], model: Any, folded: Any, fresh: Any) -> dict[str, Any]:
    entry["fresh_input"] = compare(run(model, fresh), run(folded, fresh))
    if hasattr(model, "backbone") and hasattr(model, "transform"):
        entry["fresh_input"]["features_rel"] = compare_features(model, folded, fresh)
    return entry


def compare_features(model: Any, folded: Any, images: list[torch.Tensor]) -> float:
    """The worst relative difference of a detector's backbone feature maps and, for a
    one-stage detector, of its head's outputs: the values that feed its box selection."""
    with torch.no_grad():
        batch = model.transform(images)[0].tensors
        want, got = model.backbone(batch), folded.backbone(batch)
        if isinstance(want, torch.Tensor):
            want, got = {"0": want}, {"0": got}
        worst = max(compare(want[k], got[k])["max_rel"] for k in want)
        if hasattr(model, "head"):  # SSD, RetinaNet, FCOS: scores and box deltas, pre-NMS
            heads = model.head(list(want.values())), folded.head(list(got.values()))
            worst = max(worst, *(compare(heads[0][k], heads[1][k])["max_rel"] for k in heads[0]))
    return worst


def fold_pt2(model: nn.Module, x: Any, fresh: Any) -> dict[str, Any]:
    import bnfold

    try:
        ep = torch.export.export(model, (x,), strict=False)
    except Exception as e:  # a detector's forward does not export: that is the answer
        return {"error": f"export: {type(e).__name__}: {str(e).splitlines()[0][:150]}"}
    start = time.perf_counter()
    result = bnfold.fold(ep)
    entry = summarize(result, time.perf_counter() - start)
    entry["fresh_input"] = compare(run(ep.module(), fresh), run(result.model.module(), fresh))
    return entry


def parity(model: nn.Module, x: Any) -> str:
    """Whether the ``recorded`` finder finds what ``export`` finds: folds, and each BN's code."""
    from torch_fold_vs_fx import recorded_finder_only

    from bnfold.torch_front import fold_module

    def seen(report: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        folds = sorted((f.site, f.kind.value) for f in report.folded)
        codes = sorted((r.site.rpartition(" -> ")[2], r.code.value) for r in report.refused)
        return folds, codes

    traced = fold_module(model, (x,), verify=False).report
    if {f.finder for f in traced.folded} - {"export"}:
        return "-"  # export did not trace it: the recorded finder decided already
    with recorded_finder_only():
        recorded = fold_module(model, (x,), verify=False).report
    (folds_a, codes_a), (folds_b, codes_b) = seen(traced), seen(recorded)
    if (folds_a, codes_a) == (folds_b, codes_b):
        return "same"
    return f"differs: {sorted(set(folds_a) ^ set(folds_b))} {sorted(set(codes_a) ^ set(codes_b))}"


def measure(name: str, fronts: list[str], det_size: int, check_parity: bool) -> dict[str, Any]:
    model, x = build(name, det_size)
    fresh = fresh_input(x)
    row: dict[str, Any] = {
        "model": name,
        "bn": bn_kinds(model),
        "after_linear": bns_after_linear(model, x),
    }
    if check_parity and name not in DETECTORS:
        row["recorded = export"] = parity(model, x)
    if name in DETECTORS:
        fronts = [*fronts, "unverified"]
    folds = {"eager": fold_eager, "pt2": fold_pt2, "unverified": fold_unverified}
    for front in fronts:
        try:
            row[front] = folds[front](model, x, fresh)
        except Exception as e:  # a failure is a row, not a crash
            row[front] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return row


# --- output -----------------------------------------------------------------------------


def cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if "error" in entry:
        return entry["error"].split(":")[0] + ": " + entry["error"].split(":", 1)[1][:60]
    codes = ", ".join(f"`{c}` {n}" for c, n in entry["left_by_code"].items())
    finders = ", ".join(f"{f} {n}" for f, n in entry["finders"].items())
    fresh = entry.get("fresh_input", {})
    rel = fresh.get("max_rel")
    text = f"{entry['folded']}/{entry['found']}"
    text += f" ({finders})" if finders else ""
    text += f"; left {codes}" if codes else ""
    text += f"; {entry.get('verification', '-')}"
    if (proof := entry.get("proof")) is not None:
        level = ", module level" if proof["module_level"] else ""
        text += f" (proven {proof['proven']}/{proof['sites']}{level})"
    text += f", {entry['seconds']} s"
    text += "" if rel is None else f"; fresh {rel:.1e}"
    if (features := fresh.get("features_rel")) is not None:
        text += f" (features/head {features:.1e}, boxes {fresh.get('boxes')})"
    return text


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# bnfold on real PyTorch models ({meta['date']})",
        "",
        f"`{meta['command']}`; torch {meta['torch']}, torchvision {meta['torchvision']}, "
        f"timm {meta['timm']}, smp {meta['smp']}; {meta['threads']} thread(s). Random weights, "
        "trained-like BN statistics. `fresh`: the largest difference of the folded model's "
        "outputs from the original's on an input neither saw, relative to the output's "
        "largest magnitude (detections: boxes as sets, scores sorted). `proven a/b`: the "
        "proof for all inputs made inside the fold before the sampled check (regions "
        "proven of regions changed; `module level`: the model does not export, each "
        "linear module's folds proven from its parameters, the pairing the fold's).",
        "",
        "| model | BN (kinds) | after a conv/linear in the run | eager: folded/found "
        "(finder); left; verification; fresh | .pt2 | eager, unverified | recorded = export |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in row["bn"].items())
        lines.append(
            f"| {row['model']} | {kinds} | {row['after_linear']} | {cell(row.get('eager'))} | "
            f"{cell(row.get('pt2'))} | {cell(row.get('unverified'))} | "
            f"{row.get('recorded = export', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--front", action="append", choices=("eager", "pt2"))
    parser.add_argument("--det-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parity", action="store_true", help="recorded finder against export")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import datetime

    import segmentation_models_pytorch
    import timm
    import torchvision

    fronts = args.front or ["eager", "pt2"]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/torch_real_models.py --det-size "
        f"{args.det_size} --threads {args.threads} "
        + " ".join(f"--front {f}" for f in fronts)
        + (" --parity" if args.parity else ""),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "smp": segmentation_models_pytorch.__version__,
        "threads": args.threads,
    }
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, fronts, args.det_size, args.parity))
        print(json.dumps(rows[-1], indent=1), flush=True)
    text = markdown(rows, meta)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": meta, "models": rows}, indent=1))
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
