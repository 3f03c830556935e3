"""Conv geometry under its first name; it lives in :mod:`bnfold.core.geometry` now."""

from bnfold.core.geometry import *  # noqa: F403
