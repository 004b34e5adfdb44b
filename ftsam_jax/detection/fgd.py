"""FGD: focal and global feature distillation for detectors (Yang et al., CVPR 2022,
arXiv 2111.11837), per FPN level, as in the official loss (yzd-v/FGD `fgd_loss.py`, which IKD
copies).

With F_T, F_S (N, H, W, C) the teacher's and student's features, T = 0.5:

    A^S(F) = H W softmax_hw( mean_c |F| / T )        spatial attention   (FGD Eq. 4)
    A^C(F) = C   softmax_c ( mean_hw |F| / T )       channel attention   (FGD Eq. 5)
    M_fg(i, j) = max over boxes b containing cell (i, j) of 1 / (H_b W_b)   (cells, Eq. 2)
    M_bg = 1[M_fg = 0] / sum 1[M_fg = 0]                                     (Eq. 3)
    L_fg = sum M_fg A^S_T A^C_T (F_T - F_S)^2 / N,   L_bg the same with M_bg  (Eq. 6)
    L_at = (sum |A^C_S - A^C_T| + sum |A^S_S - A^S_T|) / N                    (Eq. 7)
    L_gl = sum (G(F_S) - G(F_T))^2 / N                                        (Eq. 9)
    L_FGD = alpha L_fg + beta L_bg + gamma L_at + lambda L_gl

The teacher's attentions weight both features in L_fg/L_bg. A box (x1, y1, x2, y2) in image
pixels covers the cells floor(y1 H / img_h) .. ceil(y2 H / img_h) (inclusive) and likewise in
x, and its area counts those cells: the official code's floor/ceil and inclusive `+1`.
G is a GcBlock (Cao et al., GCNet, 2019): softmax attention pooling through a 1x1 conv, then
1x1 conv (C -> C/2) -> LayerNorm -> ReLU -> 1x1 conv (C/2 -> C), added to every position; the
student and the teacher have separate, trainable copies (`FGDRelation`, the last layer
zero-initialised as in the official code). N is the batch size.

Default weights: the official RetinaNet config's (alpha 1e-3, beta 5e-4, gamma 5e-4,
lambda 5e-6), set for 256-channel P3-P7 features of ~800 px images; the smaller features of
`ftsam_jax.models.fcos` make every term smaller (`experiments.detect`'s `fgd_scale` rescales
them; REPRODUCTION.md has the held-out check).

`FGDConfig` is a base distiller (`ftsam_jax.detection.base.FeatureDistiller`, name "fgd"): one
student/teacher `FGDRelation` pair per level, the loss summed over the levels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["FGDConfig", "FGDRelation", "fgd_attention", "fgd_loss", "fgd_masks"]


@dataclasses.dataclass(frozen=True)
class FGDConfig:
    """FGD's weights; a base distiller (`FeatureDistiller`) of `make_detect_distill_step`."""

    name: ClassVar[str] = "fgd"
    alpha: float = 1e-3
    beta: float = 5e-4
    gamma: float = 5e-4
    lam: float = 5e-6
    temperature: float = 0.5

    def init(self, rng: jax.Array, levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[Any]) -> dict[str, Any]:
        """{level: {"student", "teacher"}}: FGDRelation params sized from the student's
        features (the teacher's must have the same channels)."""
        del teacher
        keys = jax.random.split(rng, 2 * len(levels))
        return {name: {side: FGDRelation().init(keys[2 * i + j], jnp.zeros_like(f))["params"]
                       for j, side in enumerate(("student", "teacher"))}
                for i, (name, f) in enumerate(zip(levels, student, strict=True))}

    def loss(self, params: dict[str, Any], levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[jax.Array], inputs: Any) -> jax.Array:
        """sum over the levels of `fgd_loss(...)["loss"]` (the ground truth's masks)."""
        return sum(fgd_loss(s, t, inputs.boxes, inputs.valid, inputs.image_hw, params[name],
                            self)["loss"]
                   for name, s, t in zip(levels, student, teacher, strict=True))


def fgd_attention(features: jax.Array, temperature: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """(spatial (N, H, W), channel (N, C)) attention of NHWC features (Eq. 4-5)."""
    n, h, w, c = features.shape
    value = jnp.abs(features.astype(jnp.float32))
    spatial = jax.nn.softmax(value.mean(-1).reshape(n, -1) / temperature, axis=-1)
    channel = jax.nn.softmax(value.mean((1, 2)) / temperature, axis=-1)
    return (h * w * spatial).reshape(n, h, w), c * channel


def fgd_masks(boxes: jax.Array, valid: jax.Array, image_hw: tuple[int, int], height: int,
              width: int) -> tuple[jax.Array, jax.Array]:
    """(M_fg, M_bg), each (N, H, W), from boxes (N, M, 4) in pixels and valid (N, M)."""
    img_h, img_w = image_hw
    x1 = jnp.floor(boxes[..., 0] / img_w * width)
    x2 = jnp.ceil(boxes[..., 2] / img_w * width)
    y1 = jnp.floor(boxes[..., 1] / img_h * height)
    y2 = jnp.ceil(boxes[..., 3] / img_h * height)
    area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1))  # (N, M)
    rows = jnp.arange(height, dtype=jnp.float32)[None, None, :, None]
    cols = jnp.arange(width, dtype=jnp.float32)[None, None, None, :]
    inside = ((rows >= y1[..., None, None]) & (rows <= y2[..., None, None])
              & (cols >= x1[..., None, None]) & (cols <= x2[..., None, None])
              & valid[..., None, None].astype(bool))  # (N, M, H, W)
    fg = jnp.max(jnp.where(inside, area[..., None, None], 0.0), axis=1, initial=0.0)
    bg = (fg == 0).astype(jnp.float32)
    total = bg.sum((1, 2), keepdims=True)
    return fg, jnp.where(total > 0, bg / jnp.maximum(total, 1.0), bg)


class FGDRelation(nn.Module):
    """GcBlock of the global loss: x + channel_add(attention-pooled context), NHWC."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        logits = nn.Dense(1, name="conv_mask")(x).reshape(n, h * w)
        weights = jax.nn.softmax(logits, axis=-1)
        context = jnp.einsum("np,npc->nc", weights, x.reshape(n, h * w, c))
        y = nn.Dense(max(1, c // 2), name="add_conv1")(context)
        y = nn.relu(nn.LayerNorm(epsilon=1e-5, name="add_norm")(y))  # PyTorch eps
        y = nn.Dense(c, kernel_init=nn.initializers.zeros, name="add_conv2")(y)
        return x + y[:, None, None, :]


def fgd_loss(student: jax.Array, teacher: jax.Array, boxes: jax.Array, valid: jax.Array,
             image_hw: tuple[int, int], relation_params: dict[str, dict], config: FGDConfig,
             relation: FGDRelation | None = None) -> dict[str, jax.Array]:
    """FGD of one level. `relation_params` = {"student": ..., "teacher": ...} FGDRelation
    params. Returns {"loss", "fg", "bg", "attention", "global"} (unweighted parts)."""
    relation = relation or FGDRelation()
    fs, ft = student.astype(jnp.float32), jax.lax.stop_gradient(teacher.astype(jnp.float32))
    n, h, w, _ = fs.shape
    s_t, c_t = fgd_attention(ft, config.temperature)
    s_s, c_s = fgd_attention(fs, config.temperature)
    m_fg, m_bg = fgd_masks(boxes, valid, image_hw, h, w)
    weight = s_t[..., None] * c_t[:, None, None, :]  # (N, H, W, C)
    sq = weight * (ft - fs) ** 2
    fg = jnp.sum(m_fg[..., None] * sq) / n
    bg = jnp.sum(m_bg[..., None] * sq) / n
    att = (jnp.sum(jnp.abs(c_s - c_t)) + jnp.sum(jnp.abs(s_s - s_t))) / n
    gs = relation.apply({"params": relation_params["student"]}, fs)
    gt = relation.apply({"params": relation_params["teacher"]}, ft)
    glob = jnp.sum((gs - gt) ** 2) / n
    loss = config.alpha * fg + config.beta * bg + config.gamma * att + config.lam * glob
    return {"loss": loss, "fg": fg, "bg": bg, "attention": att, "global": glob}
