"""The files a fold writes besides its model, and the checks before any is written.

The fronts check their model outputs against their inputs; the API adds the
JSON report (never over an input, an input's external data or another output)
and lists the external data each saved model names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnfold import paths
from bnfold.errors import BnfoldError
from bnfold.onnx_front import io


def data_file_of(model_file: str | os.PathLike[str]) -> paths.Named:
    """The external data file a saved ONNX model may write beside itself.

    Its name is predictable (``<model>.data``), so a ``--report`` there would
    replace the data of the model just written: it counts as an output.
    """
    path = Path(model_file)
    return paths.Named("output's external data", path.with_name(io.data_file_name(path.name)))


def write_report(path: str | os.PathLike[str] | None, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    paths.write_text_atomic(path, json.dumps(payload, indent=2), "report")


def require_safe_report(
    report_path: str | os.PathLike[str] | None,
    writes: Sequence[paths.Named | None],
    reads: Sequence[paths.Named | None],
    in_place: tuple[paths.PathArg, paths.PathArg] | None = None,
) -> None:
    """Before folding: the report must be writable and none of the other files (any spelling).

    The fronts check their model outputs against their inputs themselves; this
    adds the report, and the ONNX inputs' external data, which it must not replace.
    """
    if report_path is None:
        return
    data = [
        paths.Named("input's external data", path)
        for named in reads
        if named is not None and named.path.suffix == ".onnx"
        for path in io.external_data_files(named.path)
    ]
    report = paths.Named("--report", Path(report_path))
    paths.require_safe_outputs([*writes, report], [*reads, *data], in_place=in_place)
    for named in writes:
        if named is not None and named.path.suffix == ".onnx":
            _require_not_the_data_of(report, named.path)


def _require_not_the_data_of(report: paths.Named, model_file: Path) -> None:
    """The report must not take the name the model's external data will be saved under."""
    data = data_file_of(model_file)
    if paths.same_file(report.path, data.path):
        raise BnfoldError(f"--report {str(report.path)!r} is the {data.role} {str(data.path)!r}")


def require_safe_folder_report(
    report_path: str | os.PathLike[str] | None, model_dir: Path, out_dir: Path
) -> None:
    """Folder mode: the report must not be one of the models found, their data or outputs.

    Its folder may be OUTDIR, created by the run: then only the names are compared.
    """
    if report_path is None:
        return
    from bnfold.batch import find_models

    report = paths.Named("--report", Path(report_path))
    models = find_models(model_dir, out_dir)
    reads = [paths.Named("input", model_dir / rel) for rel in models]
    reads += [
        paths.Named("input's external data", data)
        for rel in models
        for data in io.external_data_files(model_dir / rel)
    ]
    writes = [paths.Named("output", out_dir / rel) for rel in models]
    for other in (*reads, *writes):
        if paths.same_file(report.path, other.path):
            raise BnfoldError(
                f"--report {os.fspath(report_path)!r} is the {other.role} {str(other.path)!r}"
            )
    if not paths.same_file(report.path.parent, out_dir):  # OUTDIR may not exist yet
        paths.require_safe_outputs([report], [])
