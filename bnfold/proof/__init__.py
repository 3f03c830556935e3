"""A proof for all inputs: certify a fold without running the model.

A fold rewrites linear pieces of a graph. The prover diffs the original and the folded
model, checks that everything outside the changed regions is identical, and shows that
each region computes the same affine map in both, coefficient by coefficient, within one
ulp of the folded model's stored dtype, for every input and every input size. It derives
both maps from operator semantics of its own (:mod:`bnfold.proof.ops`), never from
bnfold's fold code, so a bug in the fold math cannot hide behind the same bug here.

Entry points: :func:`prove_onnx` (ONNX models), :func:`prove_eager` (PyTorch modules),
:func:`prove_program` (``torch.export`` programs). Each returns a :class:`Certificate`.
"""

from bnfold.proof.certificate import Certificate, SiteProof, Uncovered
from bnfold.proof.graphs import ModelError
from bnfold.proof.onnx_proof import prove_onnx
from bnfold.proof.torch_proof import prove_eager, prove_program

__all__ = [
    "Certificate",
    "ModelError",
    "SiteProof",
    "Uncovered",
    "prove_eager",
    "prove_onnx",
    "prove_program",
]
