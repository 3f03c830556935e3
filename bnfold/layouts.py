"""Weight layouts under their first name; they live in :mod:`bnfold.core.layouts` now."""

from bnfold.core.layouts import *  # noqa: F403
