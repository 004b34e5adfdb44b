"""FCOS point assignment on device (Tian et al., FCOS, ICCV 2019, arXiv 1904.01355, Sec. 3.1-3.3).

Every feature location of an FPN level with stride s is the image point
(floor(s/2) + s*j, floor(s/2) + s*i). A point is a positive of ground-truth box (x1, y1, x2, y2)
when it lies inside the box (optionally inside its centre region of radius
`center_radius * s`, FCOS's centre sampling), and the largest of its regression distances

    l = x - x1,  t = y - y1,  r = x2 - x,  b = y2 - y        (FCOS Eq. 1)

lies in the level's range (m_{i-1}, m_i] (Sec. 3.2). A point claimed by several boxes takes the
one of least area. Its centre-ness target is sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))
(Eq. 3). Boxes are padded with a validity mask, so shapes are static and everything jits; `vmap`
over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DEFAULT_RANGES", "DEFAULT_STRIDES", "fcos_targets", "level_points"]

DEFAULT_STRIDES = (8, 16, 32)
# FCOS's ranges (0, 64], (64, 128], ... at ~800 px images, rescaled for a 128 px canvas whose
# objects are 8-96 px: P3 up to 32 px, P4 up to 64, P5 the rest.
DEFAULT_RANGES = ((0.0, 32.0), (32.0, 64.0), (64.0, float("inf")))


def level_points(image_size: int, strides: Sequence[int] = DEFAULT_STRIDES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(points (P, 2) as (x, y), level index (P,)) over all levels, row-major per level."""
    points, levels = [], []
    for k, s in enumerate(strides):
        n = -(-image_size // s)
        c = s // 2 + s * np.arange(n, dtype=np.float32)
        yy, xx = np.meshgrid(c, c, indexing="ij")
        points.append(np.stack([xx.ravel(), yy.ravel()], -1))
        levels.append(np.full(n * n, k, np.int32))
    return np.concatenate(points), np.concatenate(levels)


def fcos_targets(boxes: jax.Array, labels: jax.Array, mask: jax.Array, image_size: int, *,
                 strides: Sequence[int] = DEFAULT_STRIDES,
                 ranges: Sequence[tuple[float, float]] = DEFAULT_RANGES,
                 center_radius: float | None = 1.5) -> dict[str, jax.Array]:
    """Targets of one image: boxes (M, 4) pixels, labels (M,), mask (M,) of valid boxes.

    Returns {"labels": (P,) class or -1 for background, "ltrb": (P, 4) distances in pixels
    (0 for background), "centerness": (P,), "positive": (P,) bool, "box_index": (P,) the
    matched box or -1}.
    """
    pts, lvl = level_points(image_size, strides)
    stride = jnp.asarray(np.asarray(strides, np.float32)[lvl])[:, None]  # (P, 1)
    lo = jnp.asarray(np.asarray([r[0] for r in ranges], np.float32)[lvl])[:, None]
    hi = jnp.asarray(np.asarray([r[1] for r in ranges], np.float32)[lvl])[:, None]
    x, y = jnp.asarray(pts[:, 0])[:, None], jnp.asarray(pts[:, 1])[:, None]  # (P, 1)
    boxes = boxes.astype(jnp.float32)
    x1, y1, x2, y2 = (boxes[None, :, i] for i in range(4))  # (1, M)
    ltrb = jnp.stack([x - x1, y - y1, x2 - x, y2 - y], -1)  # (P, M, 4)
    inside = ltrb.min(-1) > 0
    if center_radius is not None:
        cx, cy, rad = (x1 + x2) / 2, (y1 + y2) / 2, center_radius * stride
        inside &= (jnp.abs(x - cx) < rad) & (jnp.abs(y - cy) < rad)
    reach = ltrb.max(-1)
    ok = inside & (reach > lo) & (reach <= hi) & mask[None, :].astype(bool)
    area = jnp.where(ok, ((x2 - x1) * (y2 - y1)), jnp.inf)  # (P, M)
    idx = jnp.argmin(area, axis=1)
    positive = jnp.isfinite(jnp.min(area, axis=1))
    chosen = jnp.take_along_axis(ltrb, idx[:, None, None], axis=1)[:, 0]  # (P, 4)
    chosen = jnp.where(positive[:, None], chosen, 0.0)
    lr_, tb_ = chosen[:, 0::2], chosen[:, 1::2]  # (l, r), (t, b)
    ratio = lambda d: d.min(-1) / jnp.maximum(d.max(-1), 1e-9)
    ctr = jnp.sqrt(jnp.clip(ratio(lr_), 0, 1) * jnp.clip(ratio(tb_), 0, 1))
    return {"labels": jnp.where(positive, labels[idx], -1).astype(jnp.int32),
            "ltrb": chosen, "centerness": jnp.where(positive, ctr, 0.0),
            "positive": positive, "box_index": jnp.where(positive, idx, -1).astype(jnp.int32)}
