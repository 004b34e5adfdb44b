"""Alias of `ftsam_jax.training.stage` (its former name; the same module object)."""

import sys

from ftsam_jax.training import stage as _module

sys.modules[__name__] = _module
