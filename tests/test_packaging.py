"""The installed package holds every module of the source tree.

An editable install reads the source tree, so it hides a package that the wheel
leaves out (bnfold.onnx_front.rules was missing from every wheel once). .ci/run
runs this suite a second time against the built wheel, from a copy of the tests
outside the clone, with BNFOLD_SOURCE_TREE naming the clone (and checks there
that `bnfold` is imported from site-packages).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

import pytest

SOURCE_TREE = Path(os.environ.get("BNFOLD_SOURCE_TREE", Path(__file__).resolve().parents[1]))

# Source folder -> the dotted name it installs under.
INSTALLED_AS = {"bnfold": "bnfold", "cli": "bnfold.cli"}


def source_modules() -> list[str]:
    """Dotted installed names of every .py file under bnfold/ and cli/ in the source tree."""
    names = []
    for folder, prefix in INSTALLED_AS.items():
        root = SOURCE_TREE / folder
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((prefix, *parts)))
    return names


def test_the_source_tree_is_found() -> None:
    assert (SOURCE_TREE / "bnfold" / "__init__.py").is_file(), SOURCE_TREE
    assert len(source_modules()) > 40


@pytest.mark.parametrize("name", source_modules())
def test_every_source_module_is_installed(name: str) -> None:
    assert importlib.util.find_spec(name) is not None, f"{name} is not in the installed package"


def test_the_package_says_it_is_typed() -> None:
    assert importlib.resources.files("bnfold").joinpath("py.typed").is_file()

