"""The proof for all inputs (:mod:`bnfold.proof`) as ``fold`` and ``verify --prove`` make it.

``verify --prove`` proves two files a user named (:func:`prove_models`): a model the
prover cannot read is bad input. ``fold`` proves what it staged against the untouched
original before the sampled check (:func:`prove_fold`): there nothing the prover does
may stop a fold that sampling would pass, so a model it cannot read, or a failure of
its own, becomes a certificate that is "not proven" with the reason, and sampling
decides (:func:`bnfold.verification.verdict.with_proof`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnfold.errors import BnfoldError, first_line
from bnfold.proof import Certificate, ModelError, Uncovered, prove_onnx
from bnfold.report import FoldReport


def prove_models(original: Any, folded: Any, report: FoldReport | None = None) -> Certificate:
    """Prove an ONNX pair (paths, so tensors are memory-mapped, or onnx_ir models).

    Raises:
        BnfoldError: the prover cannot read a model (one line).
    """
    try:
        return prove_onnx(original, folded, report)
    except ModelError as err:
        raise BnfoldError(str(err)) from None


def prove_fold(original: Any, folded: Any, report: FoldReport) -> Certificate:
    """Prove one ONNX fold: ``folded`` (staged or in memory) against the untouched ``original``.

    Never raises: see :func:`attempt`.
    """
    return attempt(lambda: prove_onnx(original, folded, report), "onnx")


def attempt(prove: Callable[[], Certificate], front: str) -> Certificate:
    """``prove()``, or a certificate that is not proven and says why the prover stopped.

    A fold must not fail because the prover cannot read a model or meets a case it
    trips over: it is then "not proven" (``uncovered``, with the error), never
    refuted, and sampled verification decides alone.
    """
    try:
        return prove()
    except ModelError as err:
        return not_proven(front, str(err))
    except Exception as err:  # the prover's own failure must not cost the user the fold
        return not_proven(front, f"the prover failed: {type(err).__name__}: {first_line(err)}")


def not_proven(front: str, reason: str) -> Certificate:
    """A certificate that covers nothing, for ``reason``."""
    return Certificate(front=front, uncovered=[Uncovered("the models", reason)])
