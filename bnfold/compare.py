"""Verification under its first name (``bnfold.compare``), for code that imports it: it
lives in :mod:`bnfold.verification` now."""

from __future__ import annotations

from bnfold.verification import *  # noqa: F403
from bnfold.verification import __all__  # noqa: F401
