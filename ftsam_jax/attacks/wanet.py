"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible backdoor made of a fixed image warp.

The recipe as in BackdoorBench (`attack/wanet.py`, after VinAI's release), with k = 4,
s = 0.5, grid_rescale = 1, cross_ratio = 2 ("noise mode"):

- **Warp field.** `ins ~ U[-1, 1]` of shape (2, k, k) (seeded), `ins /= mean(|ins|)`, upsampled
  bicubically (PyTorch's `align_corners=True`, cubic coefficient A = -0.75, clamped borders) to
  `noise` of shape (H, W, 2); channel 0 moves x (width), channel 1 moves y (height).
- **Grid.** `identity[i, j] = (x_j, y_i)` on `linspace(-1, 1)` (grid_sample's convention,
  `align_corners=True`), and
  `grid = clamp((identity + s * noise / (W, H)) * grid_rescale, -1, 1)`
  (the reference divides both components by `input_height`; for square images this is the same).
- **Trigger.** `x' = grid_sample(x, grid)`: bilinear sampling with `align_corners=True` and zero
  padding (`bilinear_grid_sample`, written here with `jnp`; the grid is clamped, so no padding
  is ever read). Bilinear sampling commutes with the per-channel normalisation, so warping the
  [0, 1] pixels is the same as the reference's warping of normalised tensors.
- **Training** poisons each shuffled batch of B images on the fly (`make_train_transform`):
  the first `num_bd = int(ratio * B)` images are warped and relabelled (target, or y + 1 mod C
  for all-to-all); the next `num_cross = int(num_bd * cross_ratio)` images get the "noise" warp
  `clamp(grid + U[-1, 1] / (W, H), -1, 1)` (a fresh random field per image) and keep their
  labels; the rest stay clean. For `ratio * B < 1` the reference's `generalize_to_lower_pratio`
  is followed: one image is poisoned (and `int(cross_ratio)` noise images made) with
  probability `ratio * B`, else none. Shapes are static: every image is sampled once with its
  own grid and the clean ones are selected back with `where`.
- **Test** images (`apply`) are warped with the fixed grid (no noise) and rounded to uint8.

Reference: BackdoorBench `attack/wanet.py` + `config/attack/wanet/default.yaml` (k 4, s 0.5,
grid_rescale 1, cross_ratio 2, pratio 0.1, target 0, random_crop 5, random_rotation 10, and
MultiStepLR milestones 100..400 with gamma 0.1: a constant lr over 100 epochs, kept by the
`paper` preset of `experiments.ftsam`).

Differences from the reference:
- BackdoorBench's `PostTensorTransform` after poisoning (random crop with 5-px padding p = 0.8,
  random rotation 10 deg p = 0.5, flip, each drawn once per *batch*) is not reproduced; and
  where BackdoorBench's loader crops (4 px) and flips *before* the warp, here the training
  loop's per-image crop (4 px) + flip comes *after* it.
- Test images are rounded to the nearest uint8; BackdoorBench stores them through
  `ToPILImage` (truncation), at most 1/255 apart.
- The warp field comes from NumPy's generator (seed 0), not torch's.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax.attacks.base import Attack, TrainTransform, to_uint8

__all__ = ["WaNet", "bicubic_matrix", "bilinear_grid_sample", "identity_grid", "warp_grid"]


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """PyTorch's cubic convolution coefficients for the 4 taps at offsets -1, 0, 1, 2."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.array([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D bicubic upsampling with `align_corners=True` semantics:
    output i reads source position i (in - 1) / (out - 1), border taps clamped (as
    `torch.nn.functional.interpolate(mode="bicubic", align_corners=True)`)."""
    m = np.zeros((out_size, in_size))
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * scale
        base = math.floor(src)
        for tap, w in zip(range(base - 1, base + 3), _cubic_weights(src - base), strict=True):
            m[i, min(max(tap, 0), in_size - 1)] += w
    return m


def identity_grid(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float32 grid with `grid[i, j] = (x_j, y_i)` on linspace(-1, 1)."""
    ys, xs = np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width)
    return np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), -1).astype(np.float32)


def warp_grid(height: int, width: int, *, k: int = 4, s: float = 0.5,
              grid_rescale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """WaNet's fixed sampling grid and the upsampled noise field, both (H, W, 2) float32."""
    ins = np.random.default_rng(seed).uniform(-1.0, 1.0, (2, k, k))
    ins = ins / np.mean(np.abs(ins))
    mh, mw = bicubic_matrix(height, k), bicubic_matrix(width, k)
    noise = np.einsum("hk,ckl,wl->hwc", mh, ins, mw)  # (H, W, 2)
    scale = np.array([width, height], np.float64)  # x by W, y by H
    grid = np.clip((identity_grid(height, width) + s * noise / scale) * grid_rescale, -1.0, 1.0)
    return grid.astype(np.float32), noise.astype(np.float32)


def bilinear_grid_sample(images: jax.Array, grid: jax.Array) -> jax.Array:
    """`torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=True)` for NHWC images.

    Args:
      images: (N, H, W, C) float.
      grid: (N, H', W', 2) or (H', W', 2) sampling positions (x, y) in [-1, 1]; -1 and 1 are
        the centres of the first and last pixels.

    Returns:
      (N, H', W', C): at each output pixel, the bilinear interpolation of the 4 input pixels
      around (x, y), with zeros outside the image.
    """
    n, h, w, _ = images.shape
    grid = jnp.broadcast_to(grid, (n, *grid.shape[-3:])).astype(images.dtype)
    px = (grid[..., 0] + 1.0) * 0.5 * (w - 1)
    py = (grid[..., 1] + 1.0) * 0.5 * (h - 1)
    x0f, y0f = jnp.floor(px), jnp.floor(py)
    wx, wy = px - x0f, py - y0f
    x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
    batch = jnp.arange(n)[:, None, None]

    def tap(yi: jax.Array, xi: jax.Array, weight: jax.Array) -> jax.Array:
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = images[batch, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
        return vals * jnp.where(inside, weight, 0.0)[..., None]

    return (tap(y0, x0, (1 - wx) * (1 - wy)) + tap(y0, x0 + 1, wx * (1 - wy))
            + tap(y0 + 1, x0, (1 - wx) * wy) + tap(y0 + 1, x0 + 1, wx * wy))


_warp = jax.jit(bilinear_grid_sample)


class WaNet(Attack):
    """Warping-based backdoor, poisoned on the fly per batch (see the module docstring)."""

    name = "wanet"
    poisoned_set = False  # poisons each batch on the fly

    def __init__(self, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 2:
            raise ValueError(f"wanet: k must be >= 2, got {k}")
        if cross_ratio < 0:
            raise ValueError(f"wanet: cross_ratio must be >= 0, got {cross_ratio}")
        h, w, _ = self.image_shape
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.cross_ratio, self.seed = float(cross_ratio), int(seed)
        self.grid, self.noise = warp_grid(h, w, k=self.k, s=self.s,
                                          grid_rescale=self.grid_rescale, seed=self.seed)

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None,
              chunk: int = 1024) -> np.ndarray:
        images = self._check_images(images)
        grid = jnp.asarray(self.grid)
        out = [np.asarray(_warp(jnp.asarray(images[i:i + chunk], jnp.float32), grid))
               for i in range(0, len(images), chunk)]
        if not out:
            return images.copy()
        return to_uint8(np.concatenate(out))

    def batch_counts(self, batch_size: int, ratio: float) -> tuple[int, int, bool]:
        """(num_bd, num_cross, random): per-batch counts; `random` marks the low-ratio case
        where they apply only with probability ratio * batch_size."""
        expected = ratio * batch_size
        random = expected < 1.0
        num_bd = 1 if random else int(expected)
        num_cross = min(int(num_bd * self.cross_ratio), batch_size - num_bd)
        return num_bd, num_cross, random

    def make_train_transform(self, ratio: float) -> TrainTransform:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"poison ratio must lie in (0, 1], got {ratio}")
        grid = jnp.asarray(self.grid)
        h, w, _ = self.image_shape
        scale = jnp.asarray([w, h], jnp.float32)
        num_classes, target, a2a = self.num_classes, self.target, self.all_to_all

        def transform(batch: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
            images, labels = batch["image"], batch["label"]
            b = images.shape[0]
            num_bd, num_cross, random = self.batch_counts(b, ratio)
            noise_rng, gate_rng = jax.random.split(rng)
            idx = jnp.arange(b)
            bd = idx < num_bd
            cross = (idx >= num_bd) & (idx < num_bd + num_cross)
            if random:
                on = jax.random.bernoulli(gate_rng, ratio * b)
                bd, cross = bd & on, cross & on
            jitter = jax.random.uniform(noise_rng, (b, *grid.shape), minval=-1.0, maxval=1.0)
            grids = jnp.where(cross[:, None, None, None],
                              jnp.clip(grid + jitter / scale, -1.0, 1.0), grid)
            warped = bilinear_grid_sample(images.astype(jnp.float32), grids)
            images = jnp.where((bd | cross)[:, None, None, None], warped.astype(images.dtype),
                               images)
            bad = (labels + 1) % num_classes if a2a else jnp.full_like(labels, target)
            return {**batch, "image": images, "label": jnp.where(bd, bad, labels)}

        return transform

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale,
                "cross_ratio": self.cross_ratio, "seed": self.seed}
