"""``verify``: compare a folded model with its original, proof first and sampling second.

:func:`bnfold.api.verify` and :func:`bnfold.api.verify_models` (re-exported there) live
here. ONNX pairs are proven by :mod:`bnfold.proof` (``prove``) and compared in
onnxruntime; a ``.pt2`` pair goes to :mod:`bnfold.api_torch`, which imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from bnfold.errors import BnfoldError
from bnfold.onnx_front import io
from bnfold.options import MAX_INPUT_BYTES, VerifyOptions
from bnfold.report import VerifyResult
from bnfold.sources import SourceKind, kind_of
from bnfold.verification import not_sampled, verify_onnx


def verify(  # noqa: PLR0913 -- public API: keyword options, one per CLI flag
    original: Any,
    folded: Any,
    *,
    atol: float = 0.0,
    rtol: float | None = None,
    samples: int = 3,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    max_input_bytes: int = MAX_INPUT_BYTES,
    inputs: str | os.PathLike[str] | None = None,
    prove: bool = False,
    sample: bool = True,
) -> VerifyResult:
    """Compare two ONNX models (paths or onnx_ir.Model) at ORT_DISABLE_ALL.

    ``inputs`` is an input file or folder (see :mod:`bnfold.verification.files`); without it
    ``samples`` random draws are fed. rtol None derives each tensor's bound
    (:mod:`bnfold.verification.tolerance`). Not verified (status "not_verified") when the
    original cannot run or one sample of random inputs would need more than
    ``max_input_bytes``.

    ``prove`` first proves the pair for all inputs (:mod:`bnfold.proof`), without
    running either model; the certificate is the result's ``proof``. A difference
    it finds fails the result, a proof that holds passes a pair no runtime can
    run, and a region it cannot model leaves the verdict to sampling.
    ``sample=False`` (with ``prove``) runs neither model: the proof alone judges.
    """
    options = VerifyOptions(atol, rtol, samples, seed, shapes, max_input_bytes, inputs)
    return verify_models(original, folded, options, prove=prove, sample=sample)


def verify_models(
    original: Any,
    folded: Any,
    options: VerifyOptions | None,
    trust_pickle: bool = False,
    *,
    prove: bool = False,
    sample: bool = True,
) -> VerifyResult:
    """:func:`verify` for files a user named: each is checked like a loaded model first.

    A ``.pt2`` original or a module factory (:func:`bnfold.api.module_source`) is compared
    with a folded ``.pt2`` by the torch front, eagerly, and proven as programs;
    ``trust_pickle`` as in :class:`~bnfold.options.FoldOptions`.

    Raises:
        BnfoldError: bad input, a model the prover cannot read, or ``sample``
            off without ``prove`` (nothing would be checked).
    """
    if not (sample or prove):
        raise BnfoldError("not sampling checks nothing: --no-sample needs --prove")
    if kind_of(original) in (SourceKind.TORCH_FILE, SourceKind.FACTORY):
        from bnfold.torch_front import require_torch

        require_torch()
        from bnfold import api_torch

        return api_torch.verify_programs(
            original, folded, options, trust_pickle, prove=prove, sample=sample
        )
    for source in (original, folded):
        if isinstance(source, str | os.PathLike):
            io.load_model(source)  # one-line errors for bad files, before onnxruntime sees them
    certificate = None
    if prove:
        from bnfold.verification.proving import prove_models

        certificate = prove_models(original, folded)
    if not sample:
        return not_sampled(options, certificate)
    return verify_onnx(original, folded, options, certificate=certificate)
