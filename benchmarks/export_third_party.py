"""Export third-party architectures (random weights) to ONNX with their BatchNorm kept.

bnfold is meant for models it has never seen; this writes a set of them for the
benchmarks and for trying bnfold as a new user would. Weights are random
(``pretrained=False``: nothing is downloaded). Both torch exporters fold BN by
default, so this uses the TorchScript exporter on an eval model with
``training=PRESERVE`` and ``do_constant_folding=False``.

Needs torch and timm, which this project does not depend on; torchvision from
PyPI does not import beside the CPU build of torch 2.13.0, so use a venv of its
own, e.g. ``pip install torch==2.14.1 torchvision==0.29.1 timm onnx``.

Usage:
  python benchmarks/export_third_party.py OUT_DIR [--models a,b,c]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# From about 0.2 MB to 100 MB of weights, the kinds of CNN that carry BN.
MODELS = (
    "test_resnet",
    "test_efficientnet",
    "test_byobnet",
    "lcnet_035",
    "mobilenetv3_small_050",
    "mnasnet_small",
    "regnetx_002",
    "mobilenetv2_100",
    "ghostnet_100",
    "efficientnet_b0",
    "resnet18",
    "densenet121",
    "resnet50",
)


def export(name: str, out_dir: Path) -> Path:
    """Write ``out_dir/name.onnx``: the timm model in eval mode, BN kept."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False).eval()
    size = model.default_cfg.get("test_input_size") or model.default_cfg["input_size"]
    example = torch.randn(1, *size)
    path = out_dir / f"{name}.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in filter(None, args.models.split(",")):
        path = export(name, args.out_dir)
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
