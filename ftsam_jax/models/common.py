"""Pieces shared by the models: input normalisation and PyTorch-like initialisation."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's default conv/linear kernel init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the reference models train from that init.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def normalize_input(
    x: jnp.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> jnp.ndarray:
    """Maps images in [0, 1] (or uint8 in [0, 255]) to (x - mean) / std, in float32.

    Models take [0, 1] images and normalise inside, so attacks and adversarial examples live in
    pixel space (as RobustBench models do).
    """
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    x = x.astype(jnp.float32)
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x / jnp.asarray(std, jnp.float32)
    return x
