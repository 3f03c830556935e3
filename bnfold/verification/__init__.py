"""Verification: compare a folded model with its original, at its outputs and fold sites.

``driver`` runs two ONNX models on the same inputs (``inputs``, ``files``) in
``runtimes`` and hands every compared tensor to ``verdict``, whose bounds come
from ``tolerance`` over the reductions ``cones`` finds; ``plan`` reads what is
worth comparing; ``wellformed`` refuses a graph that cannot run as written.
A proof for all inputs (:mod:`bnfold.proof`), when one was made, is judged first
(:func:`~bnfold.verification.verdict.with_proof`).
The torch front compares with the same verdict (:mod:`bnfold.torch_front.verify`).
"""

from __future__ import annotations

from bnfold.options import DEFAULT_VERIFY, VerifyOptions
from bnfold.verification.driver import not_sampled, site_values, verify_fold, verify_onnx
from bnfold.verification.inputs import InputsTooLarge, parse_shapes
from bnfold.verification.runtimes import OriginalFails
from bnfold.verification.verdict import Certificate, SiteValue, with_proof
from bnfold.verification.wellformed import require_well_formed

__all__ = [
    "DEFAULT_VERIFY",
    "Certificate",
    "InputsTooLarge",
    "OriginalFails",
    "SiteValue",
    "VerifyOptions",
    "not_sampled",
    "parse_shapes",
    "require_well_formed",
    "site_values",
    "verify_fold",
    "verify_onnx",
    "with_proof",
]
