"""NAD: Neural Attention Distillation (Li et al., ICLR 2021).

1. Teacher: the backdoored model fine-tuned on the benign data (`teacher_epochs`).
2. Student: the backdoored model trained on the benign data with
   CE(student(x), y) + sum_l beta_l * AT(f_l^S(x), f_l^T(x)),
   where AT(a, b) = mean((A(a) - A(b))^2) over batch and positions, and the attention map of a
   feature map f (N, H, W, C) is A(f) = s / (||s||_2 + 1e-6) with s = sum_c |f_c|^p, the norm
   taken over the H x W positions of each example (`AT.attention_map` of the original code; the
   paper also writes the mean over channels, which the normalisation makes identical up to the
   epsilon). The teacher runs in inference mode and is not updated.

Settings (BackdoorBench): p = 2; betas (500, 1000) on the last two spatial stages (`stage3`,
`stage4` of PreAct-ResNet18 = its `layer3`, `layer4` outputs); the teacher: 10 epochs
(`te_epochs`), SGD lr 0.01, momentum 0.9, weight decay 5e-4, CosineAnnealingLR(T_max=100)
stepped per epoch, plain cross-entropy; the student: 10 epochs (also `te_epochs`), SGD at a
constant lr 0.01 (`adjust_learning_rate` gives 0.01 below epoch 20; the scheduler is never
stepped), momentum 0.9, weight decay 5e-4; batch 256, crop+flip, a uniformly drawn 5% of the
training set. The `cpu` preset is the same; `smoke` runs 1 + 1 epochs.

Reference: BackdoorBench `defense/nad.py` + `config/defense/nad/cifar10.yaml`; optimiser from
`utils/aggregate_block/train_settings_generate.py`.
- Weight decay: both optimisers come from `argparser_opt_scheduler`, which reads `wd` (5e-4) and
  `sgd_momentum`; the YAML's `weight_decay: 1.0e-4` and `momentum` keys are never read.
- Layers: on PreAct-ResNet18 BackdoorBench distils `children()[:-3]` (layer3, beta1 500),
  `[:-2]` (layer4, beta2 1000) and `[:-1]` (the average-pooled layer4, beta3 1000). The pooled
  map is 1x1, so its normalised attention map is s / (s + 1e-6) = 1 - O(1e-6 / s) for student
  and teacher alike: that term is negligible (< 1e-9 once s > 1) and is dropped.

Differences from the reference:
- BackdoorBench's student runs four forward passes per batch in training mode (the logits and
  each feature map separately), so BN running statistics get four momentum updates per step;
  here one pass. Gradients are the same.
- Float32 teacher; the config sets `amp: True` for the teacher.
No hyper-parameter differs. The original NAD repository differs from BackdoorBench (20 student
epochs, weight decay 1e-4, lr 0.1 for the first 2 epochs, Nesterov momentum, batch 64); we follow
BackdoorBench, the code behind the FT-SAM paper's table.

Layers: `layers=None` takes the last `len(betas)` 4-D feature maps the model sows into
`intermediates`, in natural name order (stage1 < stage2 < ... < stage10); the betas align with
the last layers when the model has fewer. Both stages are checkpointed per epoch (`nad_teacher`,
`nad_student`); the student's checkpoints carry the teacher's variables.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax.defenses.base import BenignData
from ftsam_jax.distill.losses import attention_loss, attention_map
from ftsam_jax.training.epoch import standard_preprocess
from ftsam_jax.training.recipe import FitConfig, fit, make_optimizer
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import cross_entropy, train_step

__all__ = ["NADConfig", "NADState", "attention_loss", "attention_map", "nad", "nad_config",
           "nad_layers", "nad_loss"]

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class NADConfig:
    """NAD hyperparameters (see the module docstring). `epochs` are the student's."""

    teacher_epochs: int = 10
    teacher_lr: float = 0.01
    teacher_schedule: str = "cosine_epoch"
    teacher_t_max: int | None = 100
    epochs: int = 10
    lr: float = 0.01
    schedule: str = "constant"
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, ...] = (500.0, 1000.0)
    p: float = 2.0
    layers: tuple[str, ...] | None = None

    def teacher_fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.teacher_epochs, batch_size=self.batch_size,
                         lr=self.teacher_lr, momentum=self.momentum,
                         weight_decay=self.weight_decay, schedule=self.teacher_schedule,
                         t_max=self.teacher_t_max, augment=True, drop_last=False)

    def student_fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay,
                         schedule=self.schedule, augment=True, drop_last=False)


def nad_config(preset: str = "paper") -> NADConfig:
    """Teacher 10 + student 10 epochs (BackdoorBench's `te_epochs`); the smoke preset runs
    1 + 1."""
    if preset == "smoke":
        return NADConfig(teacher_epochs=1, epochs=1)
    if preset not in ("paper", "cpu"):
        raise ValueError(f"unknown preset {preset!r}")
    return NADConfig()


@flax.struct.dataclass
class NADState:
    """A TrainState plus the frozen teacher (so the jitted step takes it as an argument)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    teacher: Any

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def nad_layers(model: nn.Module, variables: Variables, image_shape: tuple[int, ...],
               count: int) -> tuple[str, ...]:
    """The last `count` 4-D sown feature maps, in natural name order."""
    _, mut = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, *image_shape), jnp.float32), train=False,
                              mutable=["intermediates"]), variables)
    maps = sorted((k for k, v in mut["intermediates"].items() if len(v[-1].shape) == 4),
                  key=_natural_key)
    if not maps:
        raise ValueError("NAD needs 4-D feature maps sown into 'intermediates'")
    return tuple(maps[-count:])


def nad_loss(apply_fn: Any, layers: tuple[str, ...], betas: tuple[float, ...], p: float):
    """`LossFn` of the student: CE + sum beta * AT; the batch carries the teacher's features
    under `nad_teacher` (a tuple aligned with `layers`)."""
    betas = tuple(betas)[-len(layers):]

    def loss_fn(params, batch_stats, batch, rng):
        del rng
        logits, mut = apply_fn({"params": params, "batch_stats": batch_stats}, batch["image"],
                               train=True, mutable=["batch_stats", "intermediates"])
        inter = mut["intermediates"]
        loss = cross_entropy(logits, batch["label"]).mean()
        for name, beta, t_feat in zip(layers, betas, batch["nad_teacher"], strict=True):
            loss = loss + beta * attention_loss(inter[name][-1], t_feat, p)
        return loss, (logits, mut["batch_stats"])

    return loss_fn


def nad(model: nn.Module, variables: Variables, benign: BenignData, config: NADConfig,
        rng: jax.Array, ctx: StageContext) -> Variables:
    """Fine-tunes a teacher, then distils its attention into the backdoored student."""
    teacher_rng, student_rng = jax.random.split(rng)
    teacher, _ = fit("nad_teacher", model, variables, benign.x, benign.y,
                     config.teacher_fit_config(), teacher_rng, ctx)

    image_shape = tuple(int(s) for s in benign.x.shape[1:])
    layers = config.layers or nad_layers(model, variables, image_shape, len(config.betas))
    if len(layers) > len(config.betas):
        raise ValueError(f"NAD: {len(layers)} layers but only {len(config.betas)} betas")
    loss_fn = nad_loss(model.apply, tuple(layers), tuple(config.betas), config.p)
    fit_cfg = config.student_fit_config()
    n = len(benign.y)
    tx = make_optimizer(fit_cfg, n)

    def step(state: NADState, batch: dict[str, jax.Array], rng_: jax.Array):
        _, t_mut = model.apply(state.teacher, batch["image"], train=False,
                               mutable=["intermediates"])
        t_feats = tuple(jax.lax.stop_gradient(t_mut["intermediates"][k][-1]) for k in layers)
        return train_step(state, {**batch, "nad_teacher": t_feats}, rng_, tx=tx,
                          loss_fn=loss_fn)

    params = variables["params"]
    state = NADState(step=jnp.zeros([], jnp.int32), params=params,
                     batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                     teacher=teacher)
    state, _ = train_stage(Stage(
        "nad_student", state, fit_cfg.epochs, step=step,
        data={"image": benign.x, "label": np.asarray(benign.y, np.int32)},
        batch_size=fit_cfg.batch_size, drop_last=fit_cfg.drop_last,
        preprocess=standard_preprocess(True), evaluate=evaluate_variables(ctx),
        rng=student_rng), ctx)
    return jax.device_get(state.variables)
