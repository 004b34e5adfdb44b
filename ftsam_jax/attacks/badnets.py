"""BadNets (Gu et al., 2017): a small white square stamped into the image.

BackdoorBench's CIFAR-10 trigger is a 3x3 white (255) patch in the bottom-right corner (rows and
columns 29-31 of a 32x32 image); pixels under the patch are replaced. `badnets` is all-to-one
(label -> target); `badnets_a2a` is all-to-all (label y -> (y + 1) mod C).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftsam_jax.attacks.base import Attack


class BadNets(Attack):
    """A `size` x `size` patch of value `value` at the bottom-right corner (any H, W, C)."""

    name = "badnets"

    def __init__(self, *, size: int = 3, value: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        h, w, _ = self.image_shape
        if not 1 <= size <= min(h, w):
            raise ValueError(f"badnets: patch size {size} does not fit a {h}x{w} image")
        self.size, self.value = int(size), int(value)

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        out = self._check_images(images).copy()
        out[:, -self.size:, -self.size:, :] = self.value
        return out

    def config(self) -> dict[str, Any]:
        return {**super().config(), "size": self.size, "value": self.value}


class BadNetsAllToAll(BadNets):
    """BadNets with the all-to-all labelling y -> (y + 1) mod C."""

    name = "badnets_a2a"

    def __init__(self, **kwargs: Any) -> None:
        kwargs["all_to_all"] = True
        super().__init__(**kwargs)
