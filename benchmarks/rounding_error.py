"""Fold error of each rounding on the generated ResNet-50, over several models and inputs.

For every model seed (weights and BN statistics) and input seed, each folded model's
max relative error against the original is measured two ways, as in compare_tools:
``f64`` evaluates both in float64 (f64eval), so only the rounding of the stored
weights counts; ``ort`` runs the folded model in onnxruntime at ORT_DISABLE_ALL in its
own dtype. The ratios are those of issue 5's targets:

  fp16: bnfold (nearest, balanced) / a fold computed in fp16      target <= 0.6
  fp32: bnfold (nearest, balanced) / the exact float64 fold        target <= 1.5

Printed as median [min, max] over all (model, input) pairs; --out writes the JSON.

Usage:
  python benchmarks/rounding_error.py [--models 3] [--inputs 3] [--size 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROUNDINGS = ("nearest", "balanced")
# The reference each dtype's target divides by: the variant make_big_models writes.
BASELINE = {"fp16": "naive", "fp32": "nobn"}
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def measure(models: int, inputs: int, size: int) -> dict[str, Any]:
    """Errors of every (dtype, model seed, input seed), and the ratios to each baseline."""
    import onnxruntime as ort
    from f64eval import max_rel_error, run_f64
    from make_big_models import resnet50

    from bnfold import bench, fold

    rows = []
    for label, dtype in DTYPES.items():
        for model_seed in range(models):
            original = resnet50("bn", dtype, size, model_seed)
            candidates = {r: fold(original.clone(), rounding=r).model for r in ROUNDINGS} | {
                BASELINE[label]: resnet50(BASELINE[label], dtype, size, model_seed)
            }
            protos = {name: ir.serde.serialize_model(m) for name, m in candidates.items()}
            sessions = {
                name: ort.InferenceSession(
                    proto.SerializeToString(), _disable_all(ort), providers=["CPUExecutionProvider"]
                )
                for name, proto in protos.items()
            }
            reference_proto = ir.serde.serialize_model(original)
            for input_seed in range(inputs):
                feeds = bench.random_feeds(sessions[BASELINE[label]], seed=input_seed)
                ref = run_f64(reference_proto, feeds)
                errors = {
                    name: {
                        "f64": max_rel_error(run_f64(protos[name], feeds), ref),
                        "ort": max_rel_error(sessions[name].run(None, feeds), ref),
                    }
                    for name in protos
                }
                rows.append(
                    {"dtype": label, "model_seed": model_seed, "input_seed": input_seed,
                     "errors": errors}
                )  # fmt: skip
                print(label, model_seed, input_seed, _ratios_line(errors, BASELINE[label]))
    return {"rows": rows, "summary": summarise(rows)}


def _disable_all(ort: Any) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return options


def _ratios_line(errors: dict[str, dict[str, float]], baseline: str) -> str:
    return "  ".join(
        f"{r}/{baseline} {kind} {errors[r][kind] / errors[baseline][kind]:.3f}"
        for r in ROUNDINGS
        for kind in ("f64", "ort")
    )


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range of each ratio, per dtype, rounding and error kind."""
    out = []
    for label, baseline in BASELINE.items():
        mine = [r["errors"] for r in rows if r["dtype"] == label]
        for rounding in ROUNDINGS:
            for kind in ("f64", "ort"):
                ratios = [e[rounding][kind] / e[baseline][kind] for e in mine if e[baseline][kind]]
                if not ratios:
                    continue
                out.append(
                    {"dtype": label, "rounding": rounding, "error": kind, "vs": baseline,
                     "median": statistics.median(ratios), "min": min(ratios),
                     "max": max(ratios), "pairs": len(ratios)}
                )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3, help="model seeds")
    parser.add_argument("--inputs", type=int, default=3, help="input seeds per model")
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    result = measure(args.models, args.inputs, args.size)
    print("\n| dtype | rounding | error | vs | median | [min, max] | pairs |")
    print("|---|---|---|---|---|---|---|")
    for s in result["summary"]:
        print(
            f"| {s['dtype']} | {s['rounding']} | {s['error']} | {s['vs']} | {s['median']:.3f} "
            f"| [{s['min']:.3f}, {s['max']:.3f}] | {s['pairs']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
