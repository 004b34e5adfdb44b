"""Alias of `ftsam_jax.training.recipe` (its former name; the same module object)."""

import sys

from ftsam_jax.training import recipe as _module

sys.modules[__name__] = _module
