"""Detections from FCOS outputs: top-k scoring (device), class-aware greedy NMS (host)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax.detection.targets import DEFAULT_STRIDES, level_points

__all__ = ["decode_topk", "nms"]


def decode_topk(outputs: dict[str, jax.Array], image_size: int, *, topk: int = 200,
                strides: Sequence[int] = DEFAULT_STRIDES
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(boxes (B, k, 4) pixels clipped to the image, scores (B, k), classes (B, k)).

    Score = sqrt(sigmoid(class logit) * sigmoid(centre-ness)), FCOS's test-time ranking.
    """
    pts = jnp.asarray(level_points(image_size, strides)[0])  # (P, 2)
    prob = jax.nn.sigmoid(outputs["cls"]) * jax.nn.sigmoid(outputs["ctr"])[..., None]
    b, p, k = prob.shape
    scores, flat = jax.lax.top_k(jnp.sqrt(prob).reshape(b, p * k), min(topk, p * k))
    point, cls = flat // k, flat % k
    ltrb = jnp.take_along_axis(outputs["ltrb"], point[..., None], axis=1)
    xy = pts[point]
    boxes = jnp.concatenate([xy - ltrb[..., :2], xy + ltrb[..., 2:]], -1)
    return jnp.clip(boxes, 0, image_size), scores, cls.astype(jnp.int32)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, *, iou: float = 0.6,
        score_threshold: float = 0.05, max_detections: int = 100
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy non-maximum suppression per class for one image (numpy): the kept boxes, scores,
    classes, best first."""
    keep = []
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold]
    area = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == max_detections:
            break
        lt = np.maximum(boxes[i, :2], boxes[:, :2])
        rb = np.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        overlap = inter / np.maximum(area[i] + area - inter, 1e-9)
        suppressed |= (overlap > iou) & (classes == classes[i])
    keep = np.asarray(keep, int)
    return boxes[keep], scores[keep], classes[keep]
