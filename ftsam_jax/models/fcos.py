"""A compact FCOS-style one-stage detector (Tian et al., FCOS, ICCV 2019, arXiv 1904.01355).

Backbone: a stride-2 stem and four stages of GroupNorm residual blocks (strides 4, 8, 16, 32;
widths `width` x (1, 2, 4, 8); the teacher is wider/deeper than the student by its `width` and
`blocks`). FPN (Lin et al., 2017): 1x1 laterals of C3-C5, top-down nearest upsampling, 3x3
outputs P3-P5 (strides 8, 16, 32), sown as `intermediates/p3..p5` for feature distillation.
Head, shared over levels: a classification tower (-> K logits, bias at the 0.01 prior) and a
box tower (-> l, t, r, b = relu(s_k * x) * stride with a learned scale s_k per level, and the
centre-ness logit, FCOS's "centre-ness on the regression branch"). GroupNorm everywhere, so
there are no batch statistics and a batch of one is fine.

Outputs are flattened over levels in the order of `ftsam_jax.detection.level_points`:
{"cls": (B, P, K), "ltrb": (B, P, 4) pixels, "ctr": (B, P)}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftsam_jax.models.common import Conv, normalize_input

Dtype = Any


def _gn(features: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(8, features), dtype=dtype, name=name)


class GNResBlock(nn.Module):
    """conv3x3-GN-ReLU-conv3x3-GN plus the (1x1 conv + GN when the shape changes) shortcut."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((1, 1), (1, 1))
        y = Conv(self.features, (3, 3), strides=self.stride, padding=pad, use_bias=False,
                 dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_gn(self.features, self.dtype, "gn1")(y))
        y = Conv(self.features, (3, 3), padding=pad, use_bias=False, dtype=self.dtype,
                 name="conv2")(y)
        y = _gn(self.features, self.dtype, "gn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), strides=self.stride, padding="VALID", use_bias=False,
                     dtype=self.dtype, name="shortcut")(x)
            x = _gn(self.features, self.dtype, "gn_shortcut")(x)
        return nn.relu(x + y)


class FCOS(nn.Module):
    """FCOS-style detector for NHWC images in [0, 1] (uint8 is accepted too).

    Attributes:
      num_classes: K object classes (no background class: sigmoid outputs).
      width: stem/stage-1 channels; stages use width x (1, 2, 4, 8).
      blocks: residual blocks per stage.
      fpn_channels: channels of P3-P5 and of the head towers.
      head_convs: conv3x3-GN-ReLU layers per head tower.
      strides: FPN strides (fixed by the backbone: 8, 16, 32).
    """

    num_classes: int = 10
    width: int = 16
    blocks: Sequence[int] = (1, 1, 1, 1)
    fpn_channels: int = 64
    head_convs: int = 2
    strides: Sequence[int] = (8, 16, 32)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train  # GroupNorm: the same computation in training and inference
        x = normalize_input(x, self.mean, self.std).astype(self.dtype)
        pad = ((1, 1), (1, 1))
        x = Conv(self.width, (3, 3), strides=2, padding=pad, use_bias=False, dtype=self.dtype,
                 name="stem")(x)
        x = nn.relu(_gn(self.width, self.dtype, "stem_gn")(x))
        feats = []
        for i, n in enumerate(self.blocks):
            for j in range(n):
                x = GNResBlock(self.width * 2**i, 2 if j == 0 else 1, self.dtype,
                               name=f"stage{i + 1}_{j}")(x)
            feats.append(x)
        c3, c4, c5 = feats[1:]
        c = self.fpn_channels
        lat = [Conv(c, (1, 1), dtype=self.dtype, name=f"lateral{k}")(f)
               for k, f in zip((3, 4, 5), (c3, c4, c5), strict=True)]
        tops = [lat[2]]
        for f in (lat[1], lat[0]):  # top-down: P5 -> P4 -> P3
            up = jnp.repeat(jnp.repeat(tops[-1], 2, axis=1), 2, axis=2)
            tops.append(f + up[:, :f.shape[1], :f.shape[2]])
        pyramid = []
        for k, f in zip((3, 4, 5), tops[::-1], strict=True):
            p = Conv(c, (3, 3), padding=pad, dtype=self.dtype, name=f"fpn{k}")(f)
            self.sow("intermediates", f"p{k}", p)
            pyramid.append(p)

        cls_tower = [Conv(c, (3, 3), padding=pad, dtype=self.dtype, name=f"cls_conv{i}")
                     for i in range(self.head_convs)]
        box_tower = [Conv(c, (3, 3), padding=pad, dtype=self.dtype, name=f"box_conv{i}")
                     for i in range(self.head_convs)]
        cls_norm = [_gn(c, self.dtype, f"cls_gn{i}") for i in range(self.head_convs)]
        box_norm = [_gn(c, self.dtype, f"box_gn{i}") for i in range(self.head_convs)]
        prior = -math.log((1 - 0.01) / 0.01)
        cls_out = Conv(self.num_classes, (3, 3), padding=pad, dtype=self.dtype,
                       bias_init=nn.initializers.constant(prior), name="cls_logits")
        box_out = Conv(4, (3, 3), padding=pad, dtype=self.dtype, name="box_ltrb")
        ctr_out = Conv(1, (3, 3), padding=pad, dtype=self.dtype, name="centerness")
        outs: dict[str, list[jax.Array]] = {"cls": [], "ltrb": [], "ctr": []}
        for k, (p, stride) in enumerate(zip(pyramid, self.strides, strict=True)):
            a, b = p, p
            for conv, norm in zip(cls_tower, cls_norm, strict=True):
                a = nn.relu(norm(conv(a)))
            for conv, norm in zip(box_tower, box_norm, strict=True):
                b = nn.relu(norm(conv(b)))
            scale = self.param(f"scale{k + 3}", nn.initializers.ones, (), jnp.float32)
            flat = lambda t: t.reshape(t.shape[0], -1, t.shape[-1]).astype(jnp.float32)
            outs["cls"].append(flat(cls_out(a)))
            outs["ltrb"].append(flat(nn.relu(box_out(b) * scale)) * stride)
            outs["ctr"].append(flat(ctr_out(b))[..., 0])
        return {k: jnp.concatenate(v, axis=1) for k, v in outs.items()}
