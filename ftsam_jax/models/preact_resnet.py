"""PreAct-ResNet18 in the layout used by BackdoorBench and the FT-SAM paper.

Stem: 3x3 conv (no BN/ReLU). Four stages of two pre-activation blocks (64/128/256/512 x width
factor); a block computes relu(bn1(x)) once, feeds it to conv1 and, when the shape changes, to a
1x1 shortcut conv (no BN); otherwise the shortcut is the raw input. No final BN+ReLU: global
average pool and a dense layer follow layer4. 11,171,146 parameters for 10 classes at width 64.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftsam_jax.models.common import Conv, normalize_input, torch_kernel_init

Dtype = Any


class PreActBlock(nn.Module):
    """relu(bn1(x)) -> conv1 -> relu(bn2) -> conv2, plus the (possibly 1x1-conv) shortcut."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        norm = partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
            dtype=self.dtype,
        )
        conv = partial(Conv, use_bias=False, dtype=self.dtype)
        out = nn.relu(norm(name="bn1")(x))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=self.stride, padding="VALID",
                            name="shortcut")(out)
        else:
            shortcut = x
        out = conv(self.features, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
                   name="conv1")(out)
        out = nn.relu(norm(name="bn2")(out))
        out = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(out)
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images (NHWC input in [0, 1]).

    Attributes:
      num_classes: output classes.
      stage_sizes: blocks per stage ((2, 2, 2, 2) for PreAct-ResNet18).
      width: channels of the first stage (64 in the paper); stages use width * (1, 2, 4, 8).
      mean, std: per-channel input normalisation applied inside the model.
      dtype: compute dtype (e.g. bfloat16); parameters stay float32.

    Intermediate features are sown into the `intermediates` collection as `stage1`..`stage4`
    and `features` (the pooled vector before the classifier).
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = normalize_input(x, self.mean, self.std).astype(self.dtype)
        x = Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                 dtype=self.dtype, name="conv1")(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(self.width * 2**i, stride, dtype=self.dtype,
                                name=f"layer{i + 1}_{j}")(x, train=train)
            self.sow("intermediates", f"stage{i + 1}", x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_kernel_init,
                     name="linear")(x)
        return x.astype(jnp.float32)


PreActResNet18 = partial(PreActResNet, stage_sizes=(2, 2, 2, 2))
