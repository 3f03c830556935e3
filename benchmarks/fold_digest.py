"""Digest of what bnfold writes for each model: to check that a speed-up changes no byte.

For every model given (files, or folders searched for ``*.onnx``) the fold is
written twice, file to file: once with the default memory budget (folded weights
held from planning to saving) and once with none (every folded weight recomputed
lazily during the save). Each output is reduced to one SHA-256 over its graph
(nodes, names, attributes; external-data locations excluded: they name the written
file, ``<model>.data``, which differs between the two writes) and the raw bytes of
every initializer, in order.

Usage:
  python benchmarks/fold_digest.py MODEL_OR_DIR... [--out digests.json]
  python benchmarks/fold_digest.py MODEL_OR_DIR... --check digests.json   # exit 1 on a change
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from bnfold.onnx_front import io
from bnfold.onnx_front.passes import FoldAffinePass


def models(paths: list[Path]) -> Iterator[Path]:
    """The given model files, and every ``*.onnx`` under the given folders, sorted."""
    for path in paths:
        yield from sorted(path.rglob("*.onnx")) if path.is_dir() else [path]


def digest(path: Path) -> str:
    """SHA-256 of a saved model's graph and initializer bytes, external data resolved."""
    proto = onnx.load(str(path), load_external_data=True)
    hasher = hashlib.sha256()
    for tensor in proto.graph.initializer:
        hasher.update(tensor.name.encode())
        hasher.update(onnx.numpy_helper.to_array(tensor).tobytes())
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    hasher.update(proto.graph.SerializeToString(deterministic=True))
    return hasher.hexdigest()


def fold_digests(model: Path, work: Path) -> dict[str, str]:
    """Digests of the fold of ``model`` with held and with lazily recomputed weights."""
    out = {}
    for mode, held in (("held", None), ("lazy", 0)):
        loaded = io.load_model(model)
        keep_external = any(True for _ in io.external_tensors(loaded))
        fold = FoldAffinePass() if held is None else FoldAffinePass(held_bytes=held)
        target = work / f"{model.stem}.{mode}.onnx"
        io.save_model(fold(loaded).model, target, external_data=keep_external)
        out[mode] = digest(target)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="write the digests here (JSON)")
    parser.add_argument("--check", type=Path, help="compare with digests written before")
    args = parser.parse_args()
    found: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-digest-") as tmp:
        for model in models(args.paths):
            found[str(model)] = fold_digests(model, Path(tmp))
            print(model, found[str(model)]["held"][:16], found[str(model)]["lazy"][:16])
    if args.out:
        args.out.write_text(json.dumps(found, indent=2) + "\n")
    if args.check:
        expected = json.loads(args.check.read_text())
        changed = [m for m, d in found.items() if expected.get(m) != d]
        missing = [m for m in expected if m not in found]
        for name in changed + missing:
            print(f"CHANGED: {name}", file=sys.stderr)
        print("identical" if not changed and not missing else "DIFFERENT", file=sys.stderr)
        return 1 if changed or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
