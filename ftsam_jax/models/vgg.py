"""VGG-19 with BatchNorm for 32x32 inputs (the CIFAR variant: 16 conv-BN-ReLU layers, five
max-pools, global pooling and one dense classifier)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftsam_jax.models.common import Conv, normalize_input, torch_kernel_init

Dtype = Any

VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


class VGG(nn.Module):
    """Plain VGG with BatchNorm after every conv (NHWC input in [0, 1]).

    Attributes:
      cfg: conv widths, "M" for a 2x2 max-pool (VGG19_CFG by default).
      width: scales every conv width by width / 64 (64 = the standard network).
      Intermediate features: `block1`..`block5` (after each pool) and `features`.
    """

    num_classes: int = 10
    cfg: Sequence[int | str] = VGG19_CFG
    width: int = 64
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = normalize_input(x, self.mean, self.std).astype(self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype)
        conv_i, pool_i = 0, 0
        for v in self.cfg:
            if v == "M":
                pool_i += 1
                if x.shape[1] >= 2:
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
                self.sow("intermediates", f"block{pool_i}", x)
                continue
            feats = max(1, int(v) * self.width // 64)
            x = Conv(feats, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                     name=f"conv{conv_i}")(x)
            x = nn.relu(norm(name=f"bn{conv_i}")(x))
            conv_i += 1
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_kernel_init,
                     name="linear")(x)
        return x.astype(jnp.float32)


VGG19_BN = partial(VGG, cfg=VGG19_CFG)
