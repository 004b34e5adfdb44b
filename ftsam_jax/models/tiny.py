"""A tiny conv net for tests and smoke runs: two conv-BN-ReLU stages, pool, dense."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftsam_jax.models.common import Conv, normalize_input, torch_kernel_init

Dtype = Any


class TinyCNN(nn.Module):
    """conv(w)-BN-ReLU -> conv(2w, stride 2)-BN-ReLU -> global pool -> dense.

    Intermediate features: `stage1`, `stage2` and `features`.
    """

    num_classes: int = 10
    width: int = 8
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = normalize_input(x, self.mean, self.std).astype(self.dtype)
        for i, (feats, stride) in enumerate(((self.width, 1), (2 * self.width, 2))):
            x = Conv(feats, (3, 3), strides=stride, padding=((1, 1), (1, 1)),
                     dtype=self.dtype, name=f"conv{i + 1}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, name=f"bn{i + 1}")(x)
            x = nn.relu(x)
            self.sow("intermediates", f"stage{i + 1}", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_kernel_init,
                     name="linear")(x)
        return x.astype(jnp.float32)
