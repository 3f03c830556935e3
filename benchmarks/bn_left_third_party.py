"""Count the inference BatchNorms bnfold leaves in third-party models, per front.

Issue 13's yardstick: on architectures whose BNs do not all sit beside a linear
op (LeViT token MLPs, RepVGG/MobileOne/RepGhost/RepViT/FastViT train-time
blocks, DenseNet, a U-Net), how many BNs each rule removes and which are left,
with what code. Weights are random (nothing is downloaded) and every BN gets
random statistics, so a wrong fold cannot hide behind gamma=1, var=1.

Fronts (``--front``, repeatable):
  onnx   TorchScript export with BN kept (dynamo=False, training=PRESERVE,
         do_constant_folding=False), then ``bnfold fold M.onnx -o OUT --json``
  pt2    ``torch.export.export`` of the eval model, saved, then
         ``bnfold fold M.pt2 -o OUT.pt2 --json``
  eager  ``bnfold.fold(module, (x,))`` on the eval module itself

Verification stays on (3 random samples; ONNX at ORT_DISABLE_ALL). Needs
torch, torchvision, timm and segmentation-models-pytorch, which this project
does not depend on; use a venv of their own, e.g.
``pip install torch==2.14.1 torchvision==0.29.1 timm segmentation-models-pytorch``
with bnfold on PYTHONPATH.

Usage:
  python benchmarks/bn_left_third_party.py WORK_DIR [--front onnx] [--models a,b]
                                           [--lower-standalone] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODELS = (
    "levit_128s",
    "repvgg_a0",
    "repvgg_a2",
    "mobileone_s0",
    "densenet121",
    "unet_resnet18",
    "repvit_m0_9",
    "repghostnet_050",
    "fastvit_t8",
)


@dataclass
class Row:
    """What one fold run did to one model's inference BatchNorms."""

    model: str
    front: str
    found: int = 0
    folded: int = 0
    lowered: int = 0
    left: int = 0
    left_by_code: dict[str, int] = field(default_factory=dict)
    folds_by_kind: dict[str, int] = field(default_factory=dict)
    convs_before: int = 0
    convs_after: int = 0
    verification: str = ""
    max_rel: float | None = None
    error: str = ""


def build(name: str) -> tuple[Any, Any]:
    """The eval model with random BN statistics, and one example input."""
    import torch

    torch.manual_seed(0)
    if name == "densenet121":
        import torchvision

        model, size = torchvision.models.densenet121(weights=None), 224
    elif name == "unet_resnet18":
        import segmentation_models_pytorch as smp

        model, size = smp.Unet("resnet18", encoder_weights=None), 256
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        size = model.default_cfg["input_size"][-1]
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model, torch.randn(1, 3, size, size)


def export_onnx(model: Any, x: Any, path: Path) -> None:
    import torch

    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )  # fmt: skip


def export_pt2(model: Any, x: Any, path: Path) -> None:
    import torch

    torch.export.save(torch.export.export(model, (x,), strict=False), str(path))


def fold_with_cli(name: str, front: str, source: Path, out: Path, lower: bool) -> Row:
    """Run the bnfold CLI as a user would and read its JSON report."""
    cmd = [sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(out), "--json"]
    if lower:
        cmd.append("--lower-standalone")
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if not run.stdout.strip().startswith("{"):
        return Row(name, front, error=(run.stderr.strip().splitlines() or ["no output"])[-1])
    payload = json.loads(run.stdout)
    return row_of(name, front, payload["report"], payload.get("verification"))


def fold_eager(name: str, model: Any, x: Any, lower: bool) -> Row:
    import bnfold

    result = bnfold.fold(model, (x,), lower_standalone=lower)
    report = json.loads(result.report.to_json())
    verification = None if result.verification is None else result.verification.to_dict()
    return row_of(name, "eager", report, verification)


def row_of(name: str, front: str, report: dict[str, Any], verification: Any) -> Row:
    counts = report["batchnorm"]
    kinds = Counter(f.get("kind", "adjacent") for f in report["folded"])
    conv_ops = ("Conv", "aten.conv2d.default", "aten.convolution.default", "Conv2d")
    row = Row(
        name, front, counts["found"], counts["folded"], counts["lowered"], counts["left"],
        dict(counts["left_by_code"]), dict(sorted(kinds.items())),
        sum(report["ops_before"].get(op, 0) for op in conv_ops),
        sum(report["ops_after"].get(op, 0) for op in conv_ops),
    )  # fmt: skip
    if verification:
        row.verification = verification.get("status", "")
        rels = [
            t["max_rel"] for t in verification.get("outputs", []) if t.get("max_rel") is not None
        ]
        row.max_rel = max(rels) if rels else None
    return row


def measure(name: str, front: str, work: Path, lower: bool) -> Row:
    model, x = build(name)
    if front == "eager":
        return fold_eager(name, model, x, lower)
    suffix = ".onnx" if front == "onnx" else ".pt2"
    source = work / f"{name}{suffix}"
    if not source.exists():
        (export_onnx if front == "onnx" else export_pt2)(model, x, source)
    return fold_with_cli(name, front, source, work / f"{name}.folded{suffix}", lower)


def markdown(rows: list[Row]) -> str:
    head = (
        "| model | front | BN found | folded, by kind | left (codes) | convs | verify (max rel) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.front} | error: {r.error} | | | | |")
            continue
        kinds = ", ".join(f"{k} {n}" for k, n in r.folds_by_kind.items())
        codes = ", ".join(f"`{c}` {n}" for c, n in r.left_by_code.items())
        left = f"{r.left}" + (f" ({codes})" if codes else "")
        if r.lowered:
            left += f", lowered {r.lowered}"
        rel = "" if r.max_rel is None else f" ({r.max_rel:.1e})"
        convs = f"{r.convs_before} -> {r.convs_after}"
        lines.append(
            f"| {r.model} | {r.front} | {r.found} | {kinds} | {left} | {convs} "
            f"| {r.verification}{rel} |"
        )
    total = {f: sum(r.found for r in rows if r.front == f) for f in {r.front for r in rows}}
    left = {f: sum(r.left for r in rows if r.front == f) for f in total}
    lines.append("")
    lines += [f"{f}: {left[f]} of {total[f]} inference BN left" for f in sorted(total)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--front", action="append", choices=("onnx", "pt2", "eager"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--lower-standalone", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for front in args.front or ["onnx"]:
        for name in args.models.split(","):
            try:
                rows.append(measure(name, front, args.work, args.lower_standalone))
            except Exception as exc:  # a model that does not export is a row, not a crash
                rows.append(Row(name, front, error=f"{type(exc).__name__}: {exc}"[:200]))
            print(f"{name} [{front}] done", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
