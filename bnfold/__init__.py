"""bnfold: fold inference BatchNorm into neighbouring linear ops, verify, measure."""

from __future__ import annotations

from bnfold.api import fold, inspect, verify
from bnfold.errors import BnfoldError, NotSupportedError
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

__all__ = [
    "BatchNormCount",
    "BnfoldError",
    "Code",
    "FoldReport",
    "FoldResult",
    "Folded",
    "LowerForm",
    "Lowered",
    "NotSupportedError",
    "Refusal",
    "VerifyResult",
    "fold",
    "inspect",
    "verify",
]
__version__ = "0.1.0"
