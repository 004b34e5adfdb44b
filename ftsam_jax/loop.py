"""Alias of `ftsam_jax.training.epoch` (its former name; the same module object)."""

import sys

from ftsam_jax.training import epoch as _module

sys.modules[__name__] = _module
