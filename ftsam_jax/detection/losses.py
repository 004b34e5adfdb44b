"""FCOS losses: sigmoid focal classification, GIoU box regression, centre-ness BCE.

    L = (1/N_pos) sum_points FL(p, y)                       (FCOS Eq. 2, RetinaNet's focal loss)
      + (1/sum c*) sum_pos c* (1 - GIoU(box(l,t,r,b), box(l*,t*,r*,b*)))
      + (1/N_pos) sum_pos BCE(centerness logit, c*)

with GIoU = IoU - |C \\ (A u B)| / |C| (Rezatofighi et al., CVPR 2019, arXiv 1902.09630, Alg. 1),
C the smallest box enclosing A and B; both boxes share their anchor point, so they are given as
distances (l, t, r, b) from it. The regression term is weighted by the centre-ness target, as in
the FCOS implementation. Focal loss is optax's (alpha 0.25, gamma 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["detection_loss", "giou_ltrb"]


def giou_ltrb(pred: jax.Array, target: jax.Array, eps: float = 1e-7) -> jax.Array:
    """GIoU of boxes given as non-negative distances (..., 4) = (l, t, r, b) from one point."""
    pl, pt, pr, pb = (pred[..., i] for i in range(4))
    tl, tt, tr, tb = (target[..., i] for i in range(4))
    area_p, area_t = (pl + pr) * (pt + pb), (tl + tr) * (tt + tb)
    inter = (jnp.minimum(pl, tl) + jnp.minimum(pr, tr)) * (jnp.minimum(pt, tt)
                                                           + jnp.minimum(pb, tb))
    union = area_p + area_t - inter
    enclose = (jnp.maximum(pl, tl) + jnp.maximum(pr, tr)) * (jnp.maximum(pt, tt)
                                                             + jnp.maximum(pb, tb))
    return inter / (union + eps) - (enclose - union) / (enclose + eps)


def focal_sum(cls_logits: jax.Array, labels: jax.Array, num_classes: int, *,
              alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """sum over points and classes of the sigmoid focal loss (RetinaNet Eq. 5); label -1
    (background) is the all-zero target."""
    onehot = jax.nn.one_hot(labels, num_classes)  # -1 -> all zeros
    return optax.sigmoid_focal_loss(cls_logits, onehot, alpha=alpha, gamma=gamma).sum()


def detection_loss(cls_logits: jax.Array, ltrb: jax.Array, ctr_logits: jax.Array,
                   targets: dict[str, jax.Array], num_classes: int, *,
                   alpha: float = 0.25, gamma: float = 2.0) -> dict[str, jax.Array]:
    """FCOS loss of a batch: cls_logits (B, P, K), ltrb (B, P, 4) >= 0 pixels, ctr_logits
    (B, P); `targets` from `fcos_targets` (vmapped). Returns {"loss", "cls", "box", "ctr"}."""
    pos = targets["positive"]
    n_pos = jnp.maximum(pos.sum(), 1).astype(jnp.float32)
    cls = focal_sum(cls_logits, targets["labels"], num_classes, alpha=alpha, gamma=gamma) / n_pos
    c_star = targets["centerness"]
    weight = jnp.where(pos, c_star, 0.0)
    giou = giou_ltrb(ltrb, targets["ltrb"])
    box = jnp.sum(weight * (1.0 - giou)) / jnp.maximum(weight.sum(), 1e-6)
    bce = optax.sigmoid_binary_cross_entropy(ctr_logits, c_star)
    ctr = jnp.sum(jnp.where(pos, bce, 0.0)) / n_pos
    return {"loss": cls + box + ctr, "cls": cls, "box": box, "ctr": ctr}
