"""Front-neutral fold decisions: one module per pattern family, each check written once.

A front (ONNX, eager torch, ``.pt2``) reads its graph into the small specs these
modules take, asks the check, and edits its own graph; a check returns
:data:`Found` (None, or a :class:`~bnfold.report.Code` and a detail). Every module
docstring says what the family matches, produces and refuses.

- :mod:`.adjacent`     an affine right after a linear op; what every family reads
- :mod:`.batch_merge`  through a reshape merging the batch axis, channels last
- :mod:`.pool`         through a pool that commutes with the BN
- :mod:`.branch_sum`   a tree of convs and identity BNs on one input, merged into one conv
- :mod:`.join`         after an add or channel concat of linear ops
- :mod:`.before`       before the linear op reading the BN
- :mod:`.lower`        a BN no fold removed, as plain ops
- :mod:`.precedence`   the order families are asked in, and which refusal explains best
"""

from bnfold.rules import adjacent, batch_merge, before, branch_sum, join, lower, pool
from bnfold.rules.family import Family, Found, Refused
from bnfold.rules.precedence import ORDER

FAMILIES: tuple[Family, ...] = (
    adjacent.FAMILY,
    batch_merge.FAMILY,
    pool.FAMILY,
    branch_sum.FAMILY,
    join.FAMILY,
    before.FAMILY,
    lower.FAMILY,
)
"""Every family, in the order a BN is asked about (:data:`.precedence.ORDER`), then ``lower``."""

assert tuple(f.name for f in FAMILIES[:-1]) == ORDER

__all__ = ["FAMILIES", "Family", "Found", "Refused"]
