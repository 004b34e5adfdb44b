"""IKD's sample-specific data augmentation (SSA), jit- and vmap-friendly, with fixed shapes.

**The official rule** (JWLiang007/IKD @ 2c7d605b, `mmdet/datasets/pipelines/transforms.py`:
`InstanceAug(prob=0.3, subst_full=True, subst_stg='2', corruption=['gaussian_noise'],
severity=[1, 1])` and `RandomCrop(crop_size=(0.8, 0.8), crop_type='relative_range',
adaptive=True, bbox_size=(32, 32), subst_stg='2')` in every `configs/{fgd,mgd}/DFA_*.py`).
Per image, with its ground-truth boxes B:

- all_small = for every b in B: area(b) < small_area (COCO's 32 * 32 = 1024 px^2, measured on
  the original image).
- all_small: with probability p = 0.3 the *clean* image becomes
  clip(x + N(0, sigma^2), 0, 1) with sigma = 0.08 (imagecorruptions' `gaussian_noise`,
  severity 1, on the [0, 1] scale); the adversarial image is not touched; **no crop**.
- otherwise: no noise, and a random crop of relative size u_h, u_w ~ U[0.8, 1) per side
  (crop side floor(side * u + 0.5), offset uniform over the valid positions), applied with the
  same window to the clean and the adversarial image (and to the boxes).

Fixed shapes: the official crop changes the image size (mmdet pads batches afterwards); under
`jit` every image keeps its shape, so the crop window is resized back to the full size with
bilinear interpolation (PyTorch `F.interpolate(mode='bilinear', align_corners=False)`
semantics, built as two small interpolation matrices, exact and differentiable). mmdet
re-samples another image when no box survives the crop (`allow_negative_crop=False`); that is
impossible under `jit`: such boxes are only marked invalid. Empty box lists count as
"all small" (Python's `all([]) is True`).

**Classification analogue (not the official code).** Classification has no boxes, so the
per-sample switch is a Fourier statistic, following the paper's frequency view: the share of
spectral energy outside a centred low-frequency square,

    s(x) = 1 - sum_{|u - u0| , |v - v0| in the square} |F(x)|^2 / sum_{u, v} |F(x)|^2,
    F = fftshift(DFT2(x)) per channel, energies summed over channels, DC included,

with the square rows/cols [c - r, c + r) around c = side // 2 (the slice `crow-30:crow+30` of
the official `tools/aug_tools.py:split_freq`, an offline analysis tool there). Images with a
large high-frequency share (fine detail: the analogue of "only small objects") take the noise
branch, the others the crop branch. Choices made here, not in the paper: the square's
half-width defaults to max(1, min(H, W) // 8) (the official 60 x 60 box on ~800 x 1333 COCO
images would be a 2 x 2 box on a 32 x 32 image, i.e. little more than DC), and the threshold
is a per-dataset quantile of s (`fourier_threshold`, median by default), so that the split
does not depend on the dataset's overall brightness or texture level.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax.data.augment import crop_flip
from ftsam_jax.training.epoch import to_float

__all__ = [
    "SSAConfig",
    "all_small",
    "bilinear_matrix",
    "crop_resize",
    "fourier_threshold",
    "high_freq_share",
    "joint_preprocess",
    "resize_window",
    "ssa_boxes",
    "ssa_classification",
    "ssa_one",
]

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SSAConfig:
    """Sample-specific augmentation settings (defaults: the official values).

    Attributes:
      p_noise: probability of the noise branch for an all-small sample (0.3).
      sigma: Gaussian noise std on the [0, 1] scale (0.08, imagecorruptions severity 1).
      crop_min, crop_max: relative crop side range U[crop_min, crop_max) (0.8, 1.0).
      small_area: box-area threshold of "small" in the boxes' pixel units (32 * 32).
      half_width: Fourier rule: half-width r of the low-frequency square (None: min(H,W)//8).
      threshold: Fourier rule: s(x) > threshold counts as "small" (noise branch).
    """

    p_noise: float = 0.3
    sigma: float = 0.08
    crop_min: float = 0.8
    crop_max: float = 1.0
    small_area: float = 32.0 * 32.0
    half_width: int | None = None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_noise <= 1.0 or self.sigma < 0:
            raise ValueError("p_noise must lie in [0, 1] and sigma be >= 0")
        if not 0.0 < self.crop_min <= self.crop_max <= 1.0:
            raise ValueError("need 0 < crop_min <= crop_max <= 1")


# ----------------------------------------------------------------------------------------------
# Bilinear resampling with fixed output shapes


def bilinear_matrix(out_size: int, in_size: int, dst_start: jax.Array, dst_len: jax.Array,
                    src_start: jax.Array, src_len: jax.Array) -> jax.Array:
    """(out_size, in_size) matrix that bilinearly resamples the input window
    [src_start, src_start + src_len) onto the output window [dst_start, dst_start + dst_len)
    (zero rows elsewhere), with PyTorch's `align_corners=False` rule:
    src = max((j + 0.5) * src_len / dst_len - 0.5, 0), neighbours floor(src) and
    min(floor(src) + 1, src_len - 1). Window starts and lengths may be traced integers.
    """
    j = jnp.arange(out_size, dtype=jnp.float32) - dst_start
    inside = (j >= 0) & (j < dst_len)
    src_len_f = jnp.asarray(src_len, jnp.float32)
    src = jnp.clip((j + 0.5) * src_len_f / dst_len - 0.5, 0.0, src_len_f - 1.0)
    i0 = jnp.floor(src)
    frac = src - i0
    i1 = jnp.minimum(i0 + 1.0, src_len_f - 1.0)
    cols = jnp.arange(in_size, dtype=jnp.float32)[None, :] - src_start
    m = ((cols == i0[:, None]) * (1.0 - frac)[:, None]
         + (cols == i1[:, None]) * frac[:, None])
    return jnp.where(inside[:, None], m, 0.0)


def resize_window(image: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Applies row and column resampling matrices to one HWC image: rows @ image @ cols^T."""
    out = jnp.einsum("ah,hwc->awc", rows, image.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bw,awc->abc", cols, out, precision=jax.lax.Precision.HIGHEST)


def crop_resize(image: jax.Array, top: jax.Array, left: jax.Array, height: jax.Array,
                width: jax.Array) -> jax.Array:
    """Crops the window (top, left, height, width) of an HWC image and resizes it back to the
    image's own size (bilinear, align_corners=False)."""
    h, w = image.shape[0], image.shape[1]
    rows = bilinear_matrix(h, h, 0, h, top, height)
    cols = bilinear_matrix(w, w, 0, w, left, width)
    return resize_window(image, rows, cols)


# ----------------------------------------------------------------------------------------------
# The per-sample rule


def _crop_window(u: jax.Array, h: int, w: int, cfg: SSAConfig) -> jax.Array:
    """(top, left, height, width) from four U[0, 1) draws: sides floor(side * r + 0.5) with
    r = crop_min + (crop_max - crop_min) u ~ U[crop_min, crop_max), offsets uniform over the
    valid positions (mmdet `RandomCrop`, 'relative_range')."""
    sides = jnp.array([h, w], jnp.float32)
    rel = cfg.crop_min + (cfg.crop_max - cfg.crop_min) * u[:2]
    size = jnp.clip(jnp.floor(sides * rel + 0.5), 1, sides)
    offset = jnp.minimum(jnp.floor(u[2:4] * (sides - size + 1)), sides - size)
    return jnp.concatenate([offset, size]).astype(jnp.int32)


def ssa_one(u: jax.Array, noise: jax.Array, clean: jax.Array, adv: jax.Array,
            small: jax.Array, cfg: SSAConfig
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The official rule for one HWC sample whose "all small" decision is `small`, driven by
    five U[0, 1) draws `u` (coin, two crop sizes, two crop offsets) and standard-normal `noise`
    of the image's shape.

    Returns (clean, adv, noised, cropped, window): noise on the clean image only, with
    probability p_noise when small; otherwise the same crop window (top, left, height, width)
    for both images, resized back. `window` is the full image when not cropped.
    """
    h, w = clean.shape[0], clean.shape[1]
    small = jnp.asarray(small, bool)
    noised = small & (u[0] < cfg.p_noise)
    clean = jnp.where(noised, jnp.clip(clean + cfg.sigma * noise, 0.0, 1.0), clean)
    cropped = ~small
    window = jnp.where(cropped, _crop_window(u[1:], h, w, cfg), jnp.array([0, 0, h, w]))
    rows = bilinear_matrix(h, h, 0, h, window[0], window[2])
    cols = bilinear_matrix(w, w, 0, w, window[1], window[3])
    clean = jnp.where(cropped, resize_window(clean, rows, cols), clean)
    adv = jnp.where(cropped, resize_window(adv, rows, cols), adv)
    return clean, adv, noised, cropped, window


def _ssa_batch(rng: jax.Array, clean: jax.Array, adv: jax.Array, small: jax.Array,
               cfg: SSAConfig) -> tuple[jax.Array, ...]:
    """`ssa_one` over a batch. The random numbers are drawn for the whole batch in two flat
    calls (XLA:CPU compiles batched or multi-dimensional random draws several times slower);
    with JAX's partitionable threefry they do not depend on how the batch is sharded."""
    n = clean.shape[0]
    k_u, k_noise = jax.random.split(rng)
    u = jax.random.uniform(k_u, (n * 5,)).reshape(n, 5)
    noise = jax.random.normal(k_noise, (clean.size,), jnp.float32).reshape(clean.shape)
    return jax.vmap(lambda uu, z, c, a, s: ssa_one(uu, z, c, a, s, cfg))(
        u, noise, clean, adv, small)


# ----------------------------------------------------------------------------------------------
# Detection-style inputs: the official box rule


def all_small(boxes: jax.Array, valid: jax.Array, small_area: float) -> jax.Array:
    """(N,) bool: every valid box (x1, y1, x2, y2) has area < small_area (True if none)."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return jnp.all(jnp.where(valid, area < small_area, True), axis=-1)


def _crop_boxes(boxes: jax.Array, valid: jax.Array, window: jax.Array, h: int, w: int
                ) -> tuple[jax.Array, jax.Array]:
    """Shifts boxes into the crop window, clips them to it, rescales to the full size and
    invalidates boxes left empty (mmdet's RandomCrop box handling, plus the resize back)."""
    top, left, ch, cw = (window[i].astype(jnp.float32) for i in range(4))
    x = jnp.clip(boxes[..., 0::2] - left, 0.0, cw) * (w / cw)
    y = jnp.clip(boxes[..., 1::2] - top, 0.0, ch) * (h / ch)
    out = jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
    keep = valid & (out[..., 2] > out[..., 0]) & (out[..., 3] > out[..., 1])
    return out, keep


def ssa_boxes(rng: jax.Array, clean: jax.Array, adv: jax.Array, boxes: jax.Array,
              valid: jax.Array, cfg: SSAConfig = SSAConfig()) -> dict[str, jax.Array]:
    """The official SSA on a batch of detection-style inputs (NHWC in [0, 1], boxes (N, M, 4)
    as x1, y1, x2, y2 in the images' pixels, `valid` (N, M) bool).

    Returns {"image", "adv", "boxes", "valid", "noised", "cropped", "window"}.
    """
    h, w = clean.shape[1], clean.shape[2]
    small = all_small(boxes, valid, cfg.small_area)
    img, adv_out, noised, cropped, window = _ssa_batch(
        rng, clean.astype(jnp.float32), adv.astype(jnp.float32), small, cfg)
    new_boxes, new_valid = jax.vmap(lambda b, v, win: _crop_boxes(b, v, win, h, w))(
        boxes.astype(jnp.float32), valid, window)
    boxes_out = jnp.where(cropped[:, None, None], new_boxes, boxes.astype(jnp.float32))
    valid_out = jnp.where(cropped[:, None], new_valid, valid)
    return {"image": img, "adv": adv_out, "boxes": boxes_out, "valid": valid_out,
            "noised": noised, "cropped": cropped, "window": window}


# ----------------------------------------------------------------------------------------------
# Classification: the Fourier analogue


def high_freq_share(images: jax.Array, half_width: int | None = None) -> jax.Array:
    """(N,) share of spectral energy outside the centred low-frequency square (see module
    docstring) of NHWC images."""
    x = jnp.asarray(images, jnp.float32)
    h, w = x.shape[1], x.shape[2]
    r = max(1, min(h, w) // 8) if half_width is None else int(half_width)
    spec = jnp.fft.fftshift(jnp.fft.fft2(x, axes=(1, 2)), axes=(1, 2))
    energy = jnp.sum(jnp.abs(spec) ** 2, axis=-1)                      # (N, H, W)
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    mask = (((rows >= h // 2 - r) & (rows < h // 2 + r))[:, None]
            & ((cols >= w // 2 - r) & (cols < w // 2 + r))[None, :])
    total = jnp.sum(energy, axis=(1, 2))
    low = jnp.sum(jnp.where(mask, energy, 0.0), axis=(1, 2))
    return jnp.where(total > 0, 1.0 - low / jnp.where(total > 0, total, 1.0), 0.0)


def fourier_threshold(images: np.ndarray, quantile: float = 0.5, half_width: int | None = None,
                      chunk: int = 1024) -> float:
    """The `quantile` of `high_freq_share` over a data set (uint8 or [0, 1] floats): the
    threshold above which a sample counts as "small" (noise branch)."""
    stats = []
    fn = jax.jit(lambda x: high_freq_share(x, half_width))
    for start in range(0, len(images), chunk):
        part = np.asarray(images[start:start + chunk])
        part = part.astype(np.float32) / 255.0 if part.dtype == np.uint8 else part
        stats.append(np.asarray(fn(part)))
    return float(np.quantile(np.concatenate(stats), quantile))


def ssa_classification(rng: jax.Array, clean: jax.Array, adv: jax.Array | None = None,
                       cfg: SSAConfig = SSAConfig(), small: jax.Array | None = None
                       ) -> dict[str, jax.Array]:
    """SSA for classification batches (NHWC in [0, 1]); the branch is `small` if given (e.g.
    precomputed from scale tags), else high_freq_share(clean) > cfg.threshold.

    Returns {"image", "adv" (clean's crop if adv is None), "noised", "cropped", "window"}.
    """
    clean = clean.astype(jnp.float32)
    if small is None:
        small = high_freq_share(clean, cfg.half_width) > cfg.threshold
    adv = clean if adv is None else adv.astype(jnp.float32)
    img, adv_out, noised, cropped, window = _ssa_batch(rng, clean, adv,
                                                       jnp.asarray(small, bool), cfg)
    return {"image": img, "adv": adv_out, "noised": noised, "cropped": cropped,
            "window": window}


# ----------------------------------------------------------------------------------------------
# Joint geometric preprocessing of (clean, adv) pairs


def joint_preprocess(augment: bool = True, padding: int = 4, flip: bool = True,
                     adv_key: str = "adv"):
    """`make_epoch_fn` preprocess for batches that carry an adversarial image under `adv_key`:
    uint8 -> [0, 1] floats for both, then the same random crop (zero padding) and horizontal
    flip for both (the official pipeline gives `adv` the clean image's Resize/Flip/Crop draws).
    """
    def preprocess(batch: Batch, rng: jax.Array) -> Batch:
        out = {**batch, "image": to_float(batch["image"])}
        if adv_key in batch:
            out[adv_key] = to_float(batch[adv_key])
        if augment:
            # crop_flip draws its offsets and flips from `rng` and the batch size only, so the
            # same key gives the same geometry for both images.
            out["image"] = crop_flip(rng, out["image"], padding=padding, flip=flip)
            if adv_key in batch:
                out[adv_key] = crop_flip(rng, out[adv_key], padding=padding, flip=flip)
        return out

    return preprocess
