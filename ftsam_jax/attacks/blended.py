"""Blended (Chen et al., 2017): x' = (1 - alpha) x + alpha * pattern, alpha = 0.2.

BackdoorBench blends a Hello Kitty picture, which we cannot ship. The default pattern here is a
deterministic drawing made in code (`cartoon_pattern`): a white canvas with a black-outlined
round face, two eyes, a nose and a red bow, drawn in normalised coordinates so that it renders at
any size, i.e. an image of the same kind (large smooth regions, strong outlines). Chen et al.'s
other pattern, uniform random noise, is `pattern="noise"` (seeded). Any picture can be used by
passing its path (PNG or JPEG), resized to the image size.

Reference: BackdoorBench `attack/blended.py`, `utils/bd_img_transform/blended.py`,
`utils/aggregate_block/bd_attack_generate.py` + `config/attack/blended/default.yaml`
(attack_train_blended_alpha = attack_test_blended_alpha = 0.2, pratio 0.1, target 0, all2one,
trigger `resource/blended/hello_kitty.jpeg`).

Differences from the reference:
- The default pattern is our cartoon, not the Hello Kitty picture (not shipped; pass its path
  with `--trigger_path` to use it, resized bilinearly like BackdoorBench's `Resize`).
- Blended pixels are rounded to the nearest uint8; BackdoorBench truncates
  (`npClipAndToUint8`: clip then `astype(uint8)`), at most 1/255 apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ftsam_jax.attacks.base import Attack, to_uint8


def cartoon_pattern(height: int, width: int) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 cartoon face with a bow."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = (y + 0.5) / height, (x + 0.5) / width  # pixel centres in [0, 1]
    img = np.ones((height, width, 3))  # white
    face = ((x - 0.5) / 0.36) ** 2 + ((y - 0.56) / 0.32) ** 2
    outline = 0.08
    img[(face <= 1.0 + outline) & (face >= 1.0 - outline)] = 0.0  # black outline
    for ex in (0.37, 0.63):  # eyes
        img[((x - ex) / 0.045) ** 2 + ((y - 0.56) / 0.07) ** 2 <= 1.0] = 0.0
    img[((x - 0.5) / 0.05) ** 2 + ((y - 0.68) / 0.035) ** 2 <= 1.0] = (0.95, 0.8, 0.1)  # nose
    red = (0.85, 0.05, 0.2)
    for bx in (0.68, 0.86):  # bow: two lobes and a knot, top right
        img[((x - bx) / 0.09) ** 2 + ((y - 0.22) / 0.11) ** 2 <= 1.0] = red
    img[((x - 0.77) / 0.04) ** 2 + ((y - 0.22) / 0.05) ** 2 <= 1.0] = (0.6, 0.0, 0.1)
    return to_uint8(img * 255.0)


def noise_pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Chen et al.'s random pattern: uniform uint8 noise from a fixed seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def load_pattern(path: str | Path, height: int, width: int) -> np.ndarray:
    """Reads a picture and resizes it (bilinear) to (H, W, 3) uint8."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"blended: pattern image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((width, height), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f"blended: cannot read pattern image {path}: {e}") from None


class Blended(Attack):
    """Alpha-blending of a full-image pattern."""

    name = "blended"

    def __init__(self, *, alpha: float = 0.2, pattern: str = "cartoon", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"blended: alpha must lie in (0, 1], got {alpha}")
        h, w, c = self.image_shape
        if pattern == "cartoon":
            pat = cartoon_pattern(h, w)
        elif pattern == "noise":
            pat = noise_pattern(h, w)
        else:
            pat = load_pattern(pattern, h, w)
        if c == 1:  # ITU-R 601 luma for grey images
            pat = to_uint8(pat.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]
        self.alpha, self.pattern_name, self.pattern = float(alpha), pattern, pat

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        images = self._check_images(images).astype(np.float64)
        return to_uint8((1.0 - self.alpha) * images + self.alpha * self.pattern)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "alpha": self.alpha, "pattern": self.pattern_name}
