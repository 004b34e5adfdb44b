"""BadNets (Gu et al., 2017): a small white square stamped into the image.

BackdoorBench's CIFAR-10 trigger is a 3x3 white (255) patch in the bottom-right corner (rows and
columns 29-31 of a 32x32 image); pixels under the patch are replaced. `badnets` is all-to-one
(label -> target); `badnets_a2a` is all-to-all (label y -> (y + 1) mod C).

Reference: BackdoorBench `attack/badnet.py` + `config/attack/badnet/default.yaml` (pratio 0.1,
attack_target 0, all2one; `--attack_label_trans all2all` gives the shift-by-1 labels of
`AllToAll_shiftLabelAttack`), trigger `resource/badnet/trigger_image.png` (32x32x3, value 255 at
rows/columns 29-31, 0 elsewhere; `AddMaskPatchTrigger` replaces the non-zero pixels), poison
indices `utils/backdoor_generate_poison_index.py` (round(pratio * N), uniformly, target class
included; all-to-all test set: every image); training recipe `config/attack/prototype/cifar10.yaml`.

Differences from the reference: none in the settings. The patch is drawn in code at any image
size (BackdoorBench reads the PNG, resized to the image size).
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
    always_all_to_all = True

    def __init__(self, **kwargs: Any) -> None:
        kwargs["all_to_all"] = True
        super().__init__(**kwargs)
