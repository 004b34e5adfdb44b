"""SIG (Barni et al., 2019): a clean-label attack with an additive sinusoidal signal.

x'[i, j, c] = clip(x[i, j, c] + delta * sin(2 pi j f / W), 0, 255): stripes that vary along the
width, on every channel (BackdoorBench: delta = 40, f = 6). Only target-class training images are
poisoned and they keep their labels; at test time the signal is added to non-target images.

Reference: BackdoorBench `attack/sig.py`, `utils/bd_img_transform/sig.py` (`sigTriggerAttack`)
+ `config/attack/sig/default.yaml` (sig_delta 40, sig_f 6, pratio 0.1, target 0); clean-label
indices from `utils/backdoor_generate_poison_index.py` (round(pratio * N) drawn from the target
class: all 5,000 class-0 images of CIFAR-10).

Differences from the reference:
- Pixels are rounded to the nearest uint8; BackdoorBench truncates (`np.uint8(np.clip(...))`),
  at most 1/255 apart.
- If round(pratio * N) exceeds the target class, we poison the whole class (BackdoorBench's
  `np.random.choice(..., replace=False)` raises); on the 5,170-image slice 517 of 521.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftsam_jax.attacks.base import Attack, to_uint8


def sig_pattern(height: int, width: int, delta: float = 40.0, freq: float = 6.0) -> np.ndarray:
    """The (H, W, 1) float pattern delta * sin(2 pi j f / W)."""
    j = np.arange(width, dtype=np.float64)
    row = delta * np.sin(2.0 * np.pi * j * freq / width)
    return np.broadcast_to(row[None, :, None], (height, width, 1)).copy()


class SIG(Attack):
    """Sinusoidal-signal clean-label backdoor."""

    name = "sig"
    clean_label = True

    def __init__(self, *, delta: float = 40.0, freq: float = 6.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delta, self.freq = float(delta), float(freq)
        h, w, _ = self.image_shape
        self.pattern = sig_pattern(h, w, self.delta, self.freq)

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        images = self._check_images(images)
        return to_uint8(images.astype(np.float64) + self.pattern)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "delta": self.delta, "freq": self.freq}
