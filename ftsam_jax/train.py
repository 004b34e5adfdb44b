"""Alias of `ftsam_jax.training.step` (its former name; the same module object)."""

import sys

from ftsam_jax.training import step as _module

sys.modules[__name__] = _module
