"""FCOS targets, GIoU and the detection loss against slow NumPy references from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.detection import (
    DEFAULT_RANGES,
    DEFAULT_STRIDES,
    detection_loss,
    fcos_targets,
    giou_ltrb,
    level_points,
)


def reference_targets(boxes, labels, mask, size, center_radius):
    """FCOS Sec. 3.1-3.2 as loops: inside (and centre region), level range, least area."""
    pts, lvl = level_points(size, DEFAULT_STRIDES)
    out = {"labels": [], "ltrb": [], "centerness": [], "positive": []}
    for (x, y), k in zip(pts, lvl, strict=True):
        s, (lo, hi) = DEFAULT_STRIDES[k], DEFAULT_RANGES[k]
        best, best_area = None, np.inf
        for j, (x1, y1, x2, y2) in enumerate(boxes):
            if not mask[j]:
                continue
            d = np.array([x - x1, y - y1, x2 - x, y2 - y])
            if d.min() <= 0 or not lo < d.max() <= hi:
                continue
            if center_radius is not None:
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                if abs(x - cx) >= center_radius * s or abs(y - cy) >= center_radius * s:
                    continue
            area = (x2 - x1) * (y2 - y1)
            if area < best_area:
                best, best_area = (j, d), area
        if best is None:
            out["labels"].append(-1)
            out["ltrb"].append(np.zeros(4))
            out["centerness"].append(0.0)
            out["positive"].append(False)
        else:
            j, (l_, t, r, b) = best
            out["labels"].append(labels[j])
            out["ltrb"].append([l_, t, r, b])
            out["centerness"].append(np.sqrt(min(l_, r) / max(l_, r) * min(t, b) / max(t, b)))
            out["positive"].append(True)
    return {k: np.asarray(v) for k, v in out.items()}


def random_boxes(rng, m, size):
    side = np.exp(rng.uniform(np.log(6), np.log(100), (m, 2)))
    xy = rng.uniform(0, size - side)
    return np.concatenate([xy, xy + side], 1).astype(np.float32)


@pytest.mark.parametrize("center_radius", [None, 1.5])
def test_targets_match_the_loop_reference(center_radius):
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda b, lab, m: fcos_targets(b, lab, m, 128, center_radius=center_radius))
    for _ in range(4):
        boxes = random_boxes(rng, 6, 128)
        labels = rng.integers(0, 10, 6).astype(np.int32)
        mask = rng.random(6) < 0.8
        got = jax.device_get(fn(boxes, labels, mask))
        ref = reference_targets(boxes, labels, mask, 128, center_radius)
        np.testing.assert_array_equal(got["positive"], ref["positive"])
        np.testing.assert_array_equal(got["labels"], ref["labels"])
        np.testing.assert_allclose(got["ltrb"], ref["ltrb"], atol=1e-4)
        np.testing.assert_allclose(got["centerness"], ref["centerness"], atol=1e-5)
        assert got["positive"].sum() > 0


def test_no_valid_box_gives_no_positive_and_batched_vmap():
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[1, 0] = [10, 10, 40, 50]
    mask = np.array([[False] * 3, [True, False, False]])
    t = jax.vmap(lambda b, m: fcos_targets(b, jnp.zeros(3, jnp.int32), m, 64))(boxes, mask)
    assert not bool(t["positive"][0].any()) and bool(t["positive"][1].any())
    assert (np.asarray(t["labels"][0]) == -1).all()


def reference_giou(a, b):
    """Rezatofighi et al. Alg. 1 from corner coordinates."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (c - union) / c


def test_giou_matches_the_corner_formula():
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(0.5, 30, (50, 4)), rng.uniform(0.5, 30, (50, 4))
    got = np.asarray(giou_ltrb(jnp.asarray(pred), jnp.asarray(target)))
    x, y = 0.0, 0.0  # both boxes hang on the same point
    corners = lambda d: (x - d[0], y - d[1], x + d[2], y + d[3])
    want = [reference_giou(corners(p), corners(t)) for p, t in zip(pred, target, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(giou_ltrb(jnp.asarray(pred), jnp.asarray(pred)), 1.0, rtol=1e-5)


def test_detection_loss_terms():
    rng = np.random.default_rng(2)
    boxes = np.array([[[8, 8, 40, 30], [60, 60, 120, 110]]], np.float32)
    t = jax.vmap(lambda b: fcos_targets(b, jnp.array([1, 3]), jnp.array([True, True]), 128))(
        boxes)
    p = t["positive"].shape[1]
    logits = jnp.asarray(rng.normal(size=(1, p, 4)), jnp.float32)
    ctr = jnp.asarray(rng.normal(size=(1, p)), jnp.float32)
    out = detection_loss(logits, t["ltrb"], ctr, t, 4)  # perfect boxes: GIoU loss 0
    assert float(out["box"]) == pytest.approx(0.0, abs=1e-5)
    # focal loss: -alpha_t (1 - p_t)^gamma log p_t, summed, over the positives' count
    prob = 1 / (1 + np.exp(-np.asarray(logits)))
    y = np.eye(4)[np.maximum(np.asarray(t["labels"]), 0)] * np.asarray(t["positive"])[..., None]
    p_t = np.where(y == 1, prob, 1 - prob)
    alpha_t = np.where(y == 1, 0.25, 0.75)
    focal = (-alpha_t * (1 - p_t) ** 2 * np.log(p_t)).sum() / np.asarray(t["positive"]).sum()
    assert float(out["cls"]) == pytest.approx(focal, rel=1e-4)
    # an image with no boxes: finite, only the focal term
    empty = jax.vmap(lambda b: fcos_targets(b, jnp.zeros(2, jnp.int32), jnp.zeros(2, bool),
                                            128))(boxes)
    out = detection_loss(logits, t["ltrb"], ctr, empty, 4)
    assert np.isfinite(float(out["loss"])) and float(out["box"]) == 0 and float(out["ctr"]) == 0
    grads = jax.grad(lambda lg: detection_loss(lg, t["ltrb"] * 0.5 + 1, ctr, t, 4)["loss"])(
        logits)
    assert np.isfinite(np.asarray(grads)).all()


def test_random_hflip_moves_boxes_with_their_pixels():
    """A box drawn into an image lands where the mirrored image has its pixels; about half of
    the images are flipped; other keys pass through."""
    from ftsam_jax.detection.step import random_hflip

    n, size = 64, 32
    rng = np.random.default_rng(0)
    images = np.zeros((n, size, size, 3), np.uint8)
    boxes = np.zeros((n, 2, 4), np.float32)
    for i in range(n):
        x1, y1 = rng.integers(0, 20, 2)
        w, h = rng.integers(3, 12, 2)
        boxes[i, 0] = (x1, y1, x1 + w, y1 + h)
        images[i, y1:y1 + h, x1:x1 + w] = 255
    batch = {"image": jnp.asarray(images), "boxes": jnp.asarray(boxes),
             "labels": jnp.zeros((n, 2), jnp.int32), "mask": jnp.asarray(np.eye(2, dtype=bool)[
                 np.zeros(n, int)])}
    out = jax.device_get(jax.jit(random_hflip)(batch, jax.random.key(3)))
    flipped = 0
    for i in range(n):
        x1, y1, x2, y2 = out["boxes"][i, 0].astype(int)
        ys, xs = np.nonzero(out["image"][i, :, :, 0])
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
        flipped += not np.array_equal(out["image"][i], images[i])
    assert 16 < flipped < 48
    np.testing.assert_array_equal(out["mask"], batch["mask"])
