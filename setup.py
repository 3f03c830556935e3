"""Which packages a wheel holds: every package under bnfold/, and cli/ as bnfold.cli.

All metadata lives in pyproject.toml. Only the package list is here, because
pyproject.toml cannot say it without a hand-kept list: `packages.find` ignores a
package-dir mapping, and the hand-kept list left bnfold.onnx_front.rules out of
every wheel. cli/ sits at the top level but installs as bnfold.cli, since a bare
`cli` package in site-packages would collide with other projects.
"""

from setuptools import find_packages, setup

LIBRARY = find_packages(include=["bnfold", "bnfold.*"])
CLI = ["bnfold." + name for name in find_packages(include=["cli", "cli.*"])]

setup(
    packages=LIBRARY + CLI,
    package_dir={"bnfold.cli": "cli"},
    package_data={"bnfold": ["py.typed"]},
)
