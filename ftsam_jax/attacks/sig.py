"""SIG (Barni et al., 2019): a clean-label attack with an additive sinusoidal signal.

x'[i, j, c] = clip(x[i, j, c] + delta * sin(2 pi j f / W), 0, 255): stripes that vary along the
width, on every channel (BackdoorBench: delta = 40, f = 6). Only target-class training images are
poisoned and they keep their labels; at test time the signal is added to non-target images.
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
