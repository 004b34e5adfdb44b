"""MGD: masked generative distillation for detectors (Yang et al., ECCV 2022, arXiv
2205.01529), per FPN level, as in the official loss (yzd-v/MGD `det/mmdet/distillation/losses/
mgd.py` `FeatureLoss`; IKD's `mmdet/distillation/losses/mgd_loss.py` `MGDLoss` is the same
loss under another name). A second base distiller beside FGD (`ftsam_jax.detection.fgd`), for
IKD's claim that its terms extend any feature-KD method.

With F_S, F_T (N, H, W, C) the student's and the teacher's features at one level:

    F_S' = align(F_S)                         1x1 conv C_S -> C_T, only when C_S != C_T
    M(n, i, j) = 0 if U(n, i, j) > 1 - lambda_mgd else 1,   U ~ Uniform[0, 1), one draw per
                                              position, shared by the channels
    G(x) = conv3x3(ReLU(conv3x3(x)))          C_T -> C_T -> C_T, "same" padding, biases
    L_MGD = alpha_mgd * sum_{n,h,w,c} (G(F_S' * M) - F_T)^2 / N

a sum (not a mean) over C, H, W, divided by the batch size only, summed over the levels
(MGD's Eq. 2-4; ikd-paper.md section 3.3; new-methods.md section 10). The mask drops each
position with probability lambda_mgd (0.65 in the RetinaNet/RepPoints configs) and is drawn
anew every step and level; G and align train with the student; the teacher is frozen.

Default weights: the official RetinaNet R50 <- X101 config's (alpha_mgd 2e-5, lambda_mgd 0.65),
set for 256-channel P3-P7 features of ~800 px images. The loss is a sum over C H W, so on the
compact `ftsam_jax.models.fcos` features (32 channels, 16x16 .. 4x4 at 128 px) the same alpha
gives a far smaller term: `experiments.detect`'s `mgd_alpha` sets it (not retuned here).

Differences from the reference code, all deliberate or forced by the port:

- The mask's randomness: the reference draws `torch.rand` from the global PyTorch generator
  on every call; here each step's key (`DistillInputs.rng`, from the step's rng folded with a
  constant, so FGD's and SSA's draws are unchanged) is split per level, so a run is
  reproducible and a resumed run draws the same masks. SAM's perturbed pass of one step reuses
  the clean pass's mask (the reference has no SAM).
- NHWC features and flax convolutions (`ftsam_jax.models.common.Conv`, the CPU
  weight-gradient path) instead of NCHW `nn.Conv2d`; the same arithmetic.
- Initialisation: PyTorch's `nn.Conv2d` default is reproduced (weights and biases
  U(+-1/sqrt(fan_in)), fan_in = k*k*C_in), but from JAX's generator, so not the same numbers.
- The features are the compact FCOS's P3-P5 outputs (sown after each FPN 3x3 conv, before any
  activation, as the reference's hooks on `neck.fpn_convs.{i}.conv`), three levels instead of
  RetinaNet's five, and 32 (cpu) / 64 (paper) channels instead of 256.
- Teacher and student here always share `fpn_channels`, so the align conv is never built in
  `experiments.detect` (as in every official config); it is built, as in the reference, when
  the channel counts differ (`init` gets the teacher's feature shapes).
- The teacher's features enter under `stop_gradient` (the reference runs the teacher under
  `no_grad`); the loss is computed in float32 whatever the features' dtype.
- The reference asserts equal spatial sizes; here a mismatch fails when the step is traced
  (the squared difference does not broadcast).
- In IKD's combination the reference's MGD term reads the clean features that its forward
  hooks hold last (the adversarial pass runs first); here the clean features are passed
  explicitly, the same inputs.
- Not part of the loss but of the official training around it: `init_student` (teacher neck
  and head weights copied into the student), SGD with grad-clip 35 and the 2x schedule are not
  used: `experiments.detect` trains every student from scratch with AdamW, as for FGD.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftsam_jax.models.common import Conv

__all__ = ["MGDConfig", "MGDGeneration", "mgd_keep_mask", "mgd_loss"]


def _torch_bias_init(fan_in: int):
    """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


class MGDGeneration(nn.Module):
    """G: conv3x3 -> ReLU -> conv3x3 (`channels` out each, "same" padding), with the optional
    1x1 align conv (`align`, applied first by `mgd_loss`) as a separate submodule."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((1, 1), (1, 1))
        c_in = x.shape[-1]
        y = Conv(self.channels, (3, 3), padding=pad, name="conv1",
                 bias_init=_torch_bias_init(9 * c_in))(x)
        y = nn.relu(y)
        return Conv(self.channels, (3, 3), padding=pad, name="conv2",
                    bias_init=_torch_bias_init(9 * self.channels))(y)


class MGDAlign(nn.Module):
    """The 1x1 conv C_S -> C_T used when the channel counts differ."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(self.channels, (1, 1), name="conv",
                    bias_init=_torch_bias_init(x.shape[-1]))(x)


def mgd_keep_mask(rng: jax.Array, n: int, h: int, w: int, ratio: float) -> jax.Array:
    """(N, H, W, 1) float32: 0 where U > 1 - ratio (a dropped position), else 1; U ~ U[0, 1)
    drawn as `jax.random.uniform(rng, (n, h, w, 1))`."""
    u = jax.random.uniform(rng, (n, h, w, 1), jnp.float32)
    return jnp.where(u > 1.0 - ratio, 0.0, 1.0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MGDConfig:
    """MGD's weights (alpha: alpha_mgd, ratio: lambda_mgd, the masked share of positions); a
    base distiller (`ftsam_jax.detection.base.FeatureDistiller`, name "mgd")."""

    name: ClassVar[str] = "mgd"
    alpha: float = 2e-5
    ratio: float = 0.65

    def init(self, rng: jax.Array, levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[Any]) -> dict[str, Any]:
        """{level: {"generation": G's params[, "align": the 1x1 conv's]}}; G has the teacher's
        channels, align exists only where the student's differ."""
        keys = jax.random.split(rng, 2 * len(levels))
        out = {}
        for i, (name, fs, ft) in enumerate(zip(levels, student, teacher, strict=True)):
            c_s, c_t = fs.shape[-1], ft.shape[-1]
            x = jnp.zeros((1, *fs.shape[1:3], c_t), jnp.float32)
            p = {"generation": MGDGeneration(c_t).init(keys[2 * i], x)["params"]}
            if c_s != c_t:
                p["align"] = MGDAlign(c_t).init(keys[2 * i + 1], jnp.zeros_like(fs))["params"]
            out[name] = p
        return out

    def loss(self, params: dict[str, Any], levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[jax.Array], inputs: Any) -> jax.Array:
        """alpha * sum over the levels of the level's `mgd_loss(...)["mse"]`; level i draws
        its mask with `fold_in(inputs.rng, i)`."""
        return sum(mgd_loss(s, t, params[name], jax.random.fold_in(inputs.rng, i), self)["loss"]
                   for i, (name, s, t) in enumerate(zip(levels, student, teacher, strict=True)))


def mgd_loss(student: jax.Array, teacher: jax.Array, params: dict[str, Any], rng: jax.Array,
             config: MGDConfig) -> dict[str, jax.Array]:
    """MGD of one level: {"loss": alpha * mse, "mse": sum (G(align(F_S) * M) - F_T)^2 / N}, the
    mask M from `mgd_keep_mask(rng, N, H, W, config.ratio)`."""
    fs = student.astype(jnp.float32)
    ft = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    n, h, w, c = ft.shape
    if "align" in params:
        fs = MGDAlign(c).apply({"params": params["align"]}, fs)
    keep = mgd_keep_mask(rng, n, h, w, config.ratio)
    new = MGDGeneration(c).apply({"params": params["generation"]}, fs * keep)
    mse = jnp.sum((new - ft) ** 2) / n
    return {"loss": config.alpha * mse, "mse": mse}
