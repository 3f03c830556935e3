"""Peak RSS of verification against the size of its input (issue 16, item 3).

Builds Conv -> BN with one declared float32 input of ``--mib`` MiB (default
256, a quarter of the default --max-input-mib) and as many output as input
channels, then in a fresh child process per measurement folds it file to file
with and without verification. Peak RSS is the child's ``ru_maxrss``
(``resource.getrusage(RUSAGE_CHILDREN)``), so imports and the model load are
included in both; the difference is what verification adds.

    python benchmarks/verify_memory.py [--mib 256] [--samples 3] [--checkout DIR]

``--checkout DIR`` runs another checkout's bnfold (e.g. a worktree of the
commit before a change) for a before/after pair on the same machine.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHILD = """
import sys
sys.path.insert(0, {root!r})
import bnfold.api as api
from bnfold.options import VerifyOptions
assert api.__file__.startswith({root!r}), api.__file__
result, written = api.fold_file({src!r}, {out!r}, verify={verify},
                                verify_options=VerifyOptions(samples={samples}))
print(result.verification.status if result.verification else "no verification", written)
"""


def conv_bn(path: Path, mib: int, channels: int = 16) -> tuple[int, ...]:
    side = int((mib * 2**20 / 4 / channels) ** 0.5)
    shape = (1, channels, side, side)
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(channels, channels, 3, 3)).astype("f4"), "w"),
        numpy_helper.from_array(rng.normal(size=channels).astype("f4"), "b"),
    ] + [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype("f4"), name)
        for name in ("g", "beta", "mean", "var")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
            helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return shape


def peak_rss_mib(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS in MiB and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN holds the largest child so far: measure from small to large.
    return max(after, before) / 1024, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bnfold-mem-") as tmp:
        src, out = Path(tmp) / "m.onnx", Path(tmp) / "out.onnx"
        shape = conv_bn(src, args.mib)
        print(f"Conv->BN, input {'x'.join(map(str, shape))} float32 = {args.mib} MiB")
        print(f"bnfold from {args.checkout}")
        rows = []
        for verify in (False, True):
            code = CHILD.format(
                root=args.checkout, src=str(src), out=str(out), verify=verify, samples=args.samples
            )
            rss, said = peak_rss_mib(code)
            rows.append(rss)
            label = f"verify, {args.samples} samples" if verify else "no verification"
            print(f"  {label:<22} peak RSS {rss:8.0f} MiB = {rss / args.mib:5.1f}x input  ({said})")
        added = rows[1] - rows[0]
        print(f"  verification adds {added:.0f} MiB = {added / args.mib:.1f}x input")


if __name__ == "__main__":
    main()
