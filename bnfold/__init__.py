"""bnfold: fold inference BatchNorm into neighbouring linear ops, verify, measure.

The public names load on first use (PEP 562): importing ``bnfold`` is what every
``bnfold`` command does first, and ``bnfold --help`` must not wait for numpy,
onnx and onnx_ir.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.api import fold, fold_path, inspect, verify
    from bnfold.errors import BnfoldError, NotSupportedError
    from bnfold.onnx_front.passes import FoldBatchNormPass, FoldPassResult
    from bnfold.options import FoldOptions
    from bnfold.report import (
        BatchNormCount,
        Code,
        Folded,
        FoldReport,
        FoldResult,
        Lowered,
        LowerForm,
        Refusal,
        VerifyResult,
    )
    from bnfold.torch_front.folded_state import load_folded, save_folded

_HOMES = {
    "fold": "bnfold.api",
    "fold_path": "bnfold.api",
    "FoldOptions": "bnfold.options",
    "inspect": "bnfold.api",
    "verify": "bnfold.api",
    "BnfoldError": "bnfold.errors",
    "FoldBatchNormPass": "bnfold.onnx_front.passes",
    "FoldPassResult": "bnfold.onnx_front.passes",
    "NotSupportedError": "bnfold.errors",
    "BatchNormCount": "bnfold.report",
    "Code": "bnfold.report",
    "Folded": "bnfold.report",
    "FoldReport": "bnfold.report",
    "FoldResult": "bnfold.report",
    "Lowered": "bnfold.report",
    "LowerForm": "bnfold.options",
    "Refusal": "bnfold.report",
    "VerifyResult": "bnfold.report",
    "load_folded": "bnfold.torch_front.folded_state",
    "save_folded": "bnfold.torch_front.folded_state",
}

__all__ = [
    "BatchNormCount",
    "BnfoldError",
    "Code",
    "FoldBatchNormPass",
    "FoldOptions",
    "FoldPassResult",
    "FoldReport",
    "FoldResult",
    "Folded",
    "LowerForm",
    "Lowered",
    "NotSupportedError",
    "Refusal",
    "VerifyResult",
    "fold",
    "fold_path",
    "inspect",
    "load_folded",
    "save_folded",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    else:  # a submodule (bnfold.api, ...), as an eager package would have bound it
        try:
            value = importlib.import_module(f"bnfold.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"bnfold.{name}":
                raise
            raise AttributeError(f"module 'bnfold' has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
