"""The fold math under its first name; it lives in :mod:`bnfold.core` now."""

from bnfold.core.affine import *  # noqa: F403
from bnfold.core.cast import *  # noqa: F403
from bnfold.core.reparam import *  # noqa: F403
from bnfold.options import Rounding as Rounding
