"""How many BatchNorms a torch fold found, folded and left, and the code of each one left.

Both torch finders report one refusal per BatchNorm they could not fold, its
site naming the BN by module path ("conv -> bn", "bn", "bn -> conv"); each BN
still in the model takes the code of a refusal that names it.
"""

from __future__ import annotations

from torch import nn

from bnfold.report import BatchNormCount, Code, Refusal
from bnfold.torch_front.modules import BN, find_roles, is_bn_like


def module_batchnorms(root: nn.Module) -> tuple[list[str], int]:
    """(paths of the inference-mode BN modules, number of the others) of ``root``.

    A BN in training mode, or one without running statistics, normalizes with
    batch statistics (``torch.export`` makes both ``batch_norm(training=True)``):
    never folded, counted apart.
    """
    paths = [path for path, kind in find_roles(root).kind.items() if kind == BN]
    inference = [p for p in paths if _uses_running_stats(root.get_submodule(p))]
    return inference, len(paths) - len(inference)


def _uses_running_stats(bn: nn.Module) -> bool:
    return not bn.training and getattr(bn, "running_mean", None) is not None


def modules_left(root: nn.Module, paths: list[str]) -> list[str]:
    """Which of ``paths`` are still BatchNorm modules (a folded BN is an ``nn.Identity``)."""
    return [p for p in paths if is_bn_like(root.get_submodule(p))]


def refusal_naming(bn: str, refused: list[Refusal]) -> Refusal | None:
    """The first refusal whose site names the BN at path ``bn``."""
    return next((r for r in refused if bn in r.site.split(" -> ")), None)


def batchnorm_count(
    found: int, training: int, left: list[str], refused: list[Refusal], lowered: int = 0
) -> BatchNormCount:
    """Counts for a run that lowered ``lowered`` BNs and left the BNs named ``left``.

    A BN no refusal names (none should be) is counted as ``untraceable``: nothing
    said why it stayed.
    """
    unclaimed = list(refused)
    codes = []
    for bn in left:
        refusal = refusal_naming(bn, unclaimed)
        if refusal is None:
            codes.append(Code.UNTRACEABLE)
            continue
        unclaimed.remove(refusal)
        codes.append(refusal.code)
    return BatchNormCount.of(found, training, lowered, codes)
