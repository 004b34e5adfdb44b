"""Training a classifier on on-device arrays: the loop shared by the backdoored stage, FT, FT-SAM
and the fine-tuning parts of the other defenses.

SGD (momentum, weight decay added to the gradient as in PyTorch) with an optional
`sam_gradient` stage in front, a reference learning-rate schedule, (label-smoothed)
cross-entropy, crop+flip augmentation, an optional per-batch poisoning transform, resumable
epochs (one `ftsam_jax.training.stage.Stage`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from ftsam_jax.optim import sam_gradient
from ftsam_jax.schedules import SCHEDULES, make_schedule
from ftsam_jax.training.epoch import standard_preprocess, steps_per_epoch, to_float
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import (
    LossFn,
    TrainState,
    classification_loss,
    create_train_state,
    sam_step,
    train_step,
)

__all__ = ["FitConfig", "epoch_learning_rate", "fit", "learning_rate", "make_optimizer", "uses_sam"]

Variables = dict[str, Any]
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Hyperparameters of one training/fine-tuning run.

    Attributes:
      epochs, batch_size, lr, momentum, weight_decay: SGD recipe.
      schedule: "cosine_epoch", "cosine_iter" (cyclic past t_max) or "constant".
      t_max: cosine half-period (epochs or iterations); default: `epochs`.
      label_smoothing: 0 for plain cross-entropy.
      sam: put `sam_gradient(rho, adaptive, eta)` in front of the optimizer (at rho = 0 the
        steps are plain ones: `uses_sam`).
      group_size: m-sharpness group size for SAM (None: the whole batch).
      augment: random crop (4-px padding) + horizontal flip.
      drop_last: drop the last partial batch (else fill it from a second permutation).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine_epoch"
    t_max: int | None = None
    label_smoothing: float = 0.0
    sam: bool = False
    rho: float = 2.0
    adaptive: bool = True
    eta: float = 0.0
    group_size: int | None = None
    augment: bool = True
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")


def uses_sam(config: FitConfig) -> bool:
    """Whether the recipe takes SAM steps: `sam` with a radius above 0. At rho = 0 the
    perturbation is zero and the second gradient equals the first, so the step is a plain one
    (FT-SAM's SAM-off control, `ftsam[rho=0]`) and skips the second pass."""
    return config.sam and config.rho > 0


def learning_rate(config: FitConfig, num_examples: int) -> optax.Schedule:
    """The recipe's learning rate as a function of the step count."""
    spe = steps_per_epoch(num_examples, config.batch_size, config.drop_last)
    return make_schedule(config.schedule, config.lr, spe, config.t_max or max(1, config.epochs))


def epoch_learning_rate(config: FitConfig, num_examples: int) -> Callable[[int], float]:
    """`epoch index -> the learning rate of the epoch's last step` (metrics.jsonl's "lr")."""
    schedule = learning_rate(config, num_examples)
    spe = steps_per_epoch(num_examples, config.batch_size, config.drop_last)
    return lambda epoch: float(schedule((epoch + 1) * spe - 1))


def make_optimizer(config: FitConfig, num_examples: int) -> optax.GradientTransformation:
    """[sam_gradient] -> add_decayed_weights -> sgd(schedule, momentum)."""
    schedule = learning_rate(config, num_examples)
    stages = [optax.add_decayed_weights(config.weight_decay),
              optax.sgd(schedule, momentum=config.momentum or None)]
    if uses_sam(config):
        stages.insert(0, sam_gradient(config.rho, adaptive=config.adaptive, eta=config.eta))
    return optax.chain(*stages)


def fit(
    name: str,
    model: nn.Module,
    variables: Variables | None,
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    rng: jax.Array,
    ctx: StageContext,
    *,
    loss_fn: LossFn | None = None,
    train_transform: Callable[[Batch, jax.Array], Batch] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> tuple[Variables, list[dict[str, Any]]]:
    """Trains `model` from `variables` (None: a fresh init from `rng`) on uint8 images `x`.

    Args:
      name: the stage name (checkpoints, log tag).
      loss_fn: default `classification_loss(model.apply, config.label_smoothing)`.
      train_transform: `(batch, rng) -> batch` on float [0, 1] images before augmentation
        (on-the-fly poisoning such as WaNet's warps).
      extra: further per-example arrays gathered into each batch (e.g. adversarial images).

    Returns:
      The trained variables and the stage's per-epoch history (with `ctx.evaluate` metrics).
    """
    tx = make_optimizer(config, len(y))
    init_rng, run_rng = jax.random.split(rng)
    state = create_train_state(model, tx, init_rng, tuple(x.shape[1:]), variables=variables)
    loss_fn = loss_fn or classification_loss(model.apply, config.label_smoothing)
    if uses_sam(config):
        step = partial(sam_step, tx=tx, loss_fn=loss_fn, group_size=config.group_size)
    else:
        step = partial(train_step, tx=tx, loss_fn=loss_fn)
    base = standard_preprocess(augment=config.augment)
    if train_transform is None:
        preprocess = base
    else:
        def preprocess(batch: Batch, rng_: jax.Array) -> Batch:
            t_rng, a_rng = jax.random.split(rng_)
            batch = train_transform({**batch, "image": to_float(batch["image"])}, t_rng)
            return base(batch, a_rng)

    data = {"image": x, "label": np.asarray(y, np.int32), **(extra or {})}
    state, history = train_stage(Stage(
        name, state, config.epochs, step=step, data=data, batch_size=config.batch_size,
        drop_last=config.drop_last, preprocess=preprocess, evaluate=evaluate_variables(ctx),
        rng=run_rng, lr=epoch_learning_rate(config, len(y))), ctx)
    assert isinstance(state, TrainState)
    return jax.device_get(state.variables), history
