"""Models: NHWC input in [0, 1], normalisation inside, `dtype` for compute, float32 params."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftsam_jax.models.preact_resnet import PreActBlock, PreActResNet, PreActResNet18
from ftsam_jax.models.tiny import TinyCNN
from ftsam_jax.models.vgg import VGG, VGG19_BN

__all__ = ["MODELS", "PreActBlock", "PreActResNet", "PreActResNet18", "TinyCNN", "VGG",
           "VGG19_BN", "create_model"]

MODELS = {
    "preactresnet18": PreActResNet18,
    "vgg19_bn": VGG19_BN,
    "tiny_cnn": TinyCNN,
}
DEFAULT_WIDTH = {"preactresnet18": 64, "vgg19_bn": 64, "tiny_cnn": 8}


def create_model(
    name: str,
    num_classes: int,
    *,
    width: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: Any = jnp.float32,
) -> nn.Module:
    """Builds a registered model by name; raises ValueError for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    w = DEFAULT_WIDTH[name] if width is None else int(width)
    if w < 1:
        raise ValueError(f"width must be >= 1, got {w}")
    return MODELS[name](num_classes=num_classes, width=w,
                        mean=None if mean is None else tuple(mean),
                        std=None if std is None else tuple(std), dtype=dtype)
