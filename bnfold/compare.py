"""Re-exports the names the README gives ``bnfold.compare``: see :mod:`bnfold.verification`."""

from __future__ import annotations

from bnfold.verification import *  # noqa: F403
from bnfold.verification import __all__  # noqa: F401
