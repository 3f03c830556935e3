"""The eager finders' name for the torch pool specs; they live in :mod:`.pools` now.

Kept for :mod:`bnfold.torch_front.graph`, whose imports switch to :mod:`.pools`
once the split of that file lands.
"""

from bnfold.rules.pool import commute_refusal
from bnfold.torch_front.pools import Pool, pool_of_call, pool_of_module

__all__ = ["Pool", "commute_refusal", "pool_of_call", "pool_of_module"]
