"""The prover stands apart from the fold: it imports none of bnfold's fold code or math.

A bug in the fold math must not be able to hide behind the same bug in the check, so
every module of bnfold/proof may import only the standard library, numpy, onnx,
onnx_ir (and ml_dtypes, torch for the torch fronts) and bnfold.proof itself.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import bnfold.proof

PROOF = Path(bnfold.proof.__file__).parent
THIRD_PARTY = {"numpy", "onnx", "onnx_ir", "ml_dtypes", "torch"}


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            found.append(node.module or "")
    return found


def test_proof_imports_nothing_of_the_fold() -> None:
    files = sorted(PROOF.rglob("*.py"))
    assert len(files) >= 10
    for path in files:
        for module in _imports(path):
            top = module.split(".")[0]
            if top == "bnfold":
                assert module == "bnfold.proof" or module.startswith("bnfold.proof."), (
                    f"{path.name} imports {module}"
                )
            else:
                assert top in sys.stdlib_module_names or top in THIRD_PARTY, (
                    f"{path.name} imports {module}"
                )
