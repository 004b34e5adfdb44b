"""Pieces shared by the models: input normalisation and PyTorch-like initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftsam_jax.models.conv import conv_general_dilated


def torch_kernel_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
                      ) -> jax.Array:
    """PyTorch's default conv/linear kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt(5)), which the reference models train from.

    Drawn flat and reshaped: XLA:CPU compiles 4-D random draws several times slower.
    """
    fan_in = math.prod(shape[:-1])
    limit = 1.0 / math.sqrt(fan_in)
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -limit, limit)
    return flat.reshape(shape)


def Conv(features: int, kernel_size: Sequence[int], **kwargs: Any) -> nn.Conv:  # noqa: N802
    """`flax.linen.Conv` with PyTorch's kernel init and `ftsam_jax.models.conv`'s convolution
    (same parameters and names as `nn.Conv`; on CPU its weight gradient follows the policy)."""
    kwargs.setdefault("kernel_init", torch_kernel_init)
    return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


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
