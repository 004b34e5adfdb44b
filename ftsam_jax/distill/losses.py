"""Distillation losses: logit KD, feature KD and IKD's adversarial feature augmentation loss.

The teacher side of every loss is wrapped in `stop_gradient`: no gradient reaches the teacher.
Features are NHWC arrays (as the models sow them into "intermediates"); per-level inputs are
dicts `{level name: array}` (or sequences aligned with the level list).

- Logit KD (Hinton et al., 2015), PyTorch's `kl_div(log_softmax(s/T), softmax(t/T),
  reduction="batchmean") * T^2`:
      L_kd = T^2 / N * sum_i KL(softmax(t_i / T) || softmax(s_i / T)).
- Feature KD, per level l with weight w_l:
  - "mse": w_l * mean((A_l(F_S^l) - F_T^l)^2) over all elements (FitNets-style hint), with the
    optional 1x1 align conv A_l when the channel counts differ;
  - "attention": NAD's attention transfer (Li et al., ICLR 2021; same formula as
    `ftsam_jax.defenses.nad.attention_loss`), w_l * mean((a(F_S) - a(F_T))^2) with
    a(F) = s / (||s||_2 + 1e-6), s = sum_c |F_c|^p, the norm over the H x W positions.
- Adversarial feature augmentation (IKD, `mmdet/distillation/losses/adv_feature_loss.py`,
  `AdvFeatureLoss` with `loss_type='mse'`, the only one the configs use), on the features of the
  *adversarial* images, summed over the chosen levels:
      L_adv = alpha_adv * sum_l sum_{n,h,w,c} (A_l(F_S^l(x_adv)) - F_T^l(x_adv))^2 / N,
  a sum-reduced squared error divided by the batch size N (no focal or attention weighting);
  A_l is a 1x1 conv with bias (`nn.Conv2d(C_s, C_t, 1)`), created only when C_s != C_t,
  trained with the student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["afa_loss", "align_features", "attention_loss", "attention_map", "feature_kd_loss",
           "init_align", "kd_loss"]

Params = Any
Features = Mapping[str, jax.Array] | Sequence[jax.Array]


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0
            ) -> jax.Array:
    """T^2 * batch-mean KL(softmax(teacher / T) || softmax(student / T))."""
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return temperature * temperature * jnp.mean(kl)


def init_align(rng: jax.Array, in_channels: int, out_channels: int) -> dict[str, jax.Array]:
    """A 1x1 conv C_s -> C_t with PyTorch's default init (kernel and bias ~ U(+-1/sqrt(C_s)))."""
    k_w, k_b = jax.random.split(rng)
    bound = 1.0 / float(in_channels) ** 0.5
    return {
        "kernel": jax.random.uniform(k_w, (in_channels, out_channels), jnp.float32,
                                     -bound, bound),
        "bias": jax.random.uniform(k_b, (out_channels,), jnp.float32, -bound, bound),
    }


def align_features(params: Mapping[str, jax.Array] | None, features: jax.Array) -> jax.Array:
    """Applies a 1x1 align conv (None: identity) to NHWC features."""
    if params is None:
        return features
    return (jnp.einsum("...c,cd->...d", features.astype(jnp.float32), params["kernel"],
                       precision=jax.lax.Precision.HIGHEST) + params["bias"])


def _levels(feats: Features, levels: Sequence[str] | None) -> list[jax.Array]:
    if isinstance(feats, Mapping):
        return [feats[k] for k in (levels if levels is not None else feats)]
    return list(feats)


def _names(feats: Features, levels: Sequence[str] | None) -> list[str | int]:
    if levels is not None:
        return list(levels)
    return list(feats) if isinstance(feats, Mapping) else list(range(len(feats)))


def attention_map(features: jax.Array, p: float = 2.0, eps: float = 1e-6) -> jax.Array:
    """NAD's attention map (N, H, W): sum_c |F|^p divided by its spatial L2 norm (+ eps)."""
    am = jnp.sum(jnp.abs(features.astype(jnp.float32)) ** p, axis=-1)
    norm = jnp.sqrt(jnp.sum(am * am, axis=(1, 2), keepdims=True))
    return am / (norm + eps)


def attention_loss(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
    """Mean squared difference of the attention maps (teacher side frozen)."""
    diff = attention_map(student, p) - jax.lax.stop_gradient(attention_map(teacher, p))
    return jnp.mean(diff * diff)


def feature_kd_loss(student: Features, teacher: Features, weights: Sequence[float],
                    levels: Sequence[str] | None = None, kind: str = "mse", p: float = 2.0,
                    align: Mapping[Any, Params] | None = None) -> jax.Array:
    """sum_l w_l * D(F_S^l, F_T^l), D = element-mean squared error ("mse", with the optional
    align conv `align[level]`) or NAD's attention loss ("attention")."""
    if kind not in ("mse", "attention"):
        raise ValueError(f"unknown feature KD kind {kind!r}; choose 'mse' or 'attention'")
    fs, ft = _levels(student, levels), _levels(teacher, levels)
    names = _names(student, levels)
    if not len(fs) == len(ft) == len(weights):
        raise ValueError(f"{len(fs)} student / {len(ft)} teacher levels, {len(weights)} weights")
    total = jnp.zeros((), jnp.float32)
    for name, s, t, w in zip(names, fs, ft, weights, strict=True):
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        if kind == "attention":
            term = attention_loss(s, t, p)
        else:
            d = align_features((align or {}).get(name), s) - t
            term = jnp.mean(d * d)
        total = total + w * term
    return total


def afa_loss(student: Features, teacher: Features, alpha_adv: float,
             levels: Sequence[str] | None = None, align: Mapping[Any, Params] | None = None
             ) -> jax.Array:
    """IKD's adversarial feature loss: alpha_adv * sum_l sum((A_l(F_S^l) - F_T^l)^2) / N."""
    fs, ft = _levels(student, levels), _levels(teacher, levels)
    names = _names(student, levels)
    if len(fs) != len(ft):
        raise ValueError(f"{len(fs)} student levels but {len(ft)} teacher levels")
    total = jnp.zeros((), jnp.float32)
    for name, s, t in zip(names, fs, ft, strict=True):
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        s = align_features((align or {}).get(name), s).astype(jnp.float32)
        if s.shape != t.shape:
            raise ValueError(f"level {name}: student {s.shape} vs teacher {t.shape}")
        d = s - t
        total = total + jnp.sum(d * d) / t.shape[0]
    return alpha_adv * total
