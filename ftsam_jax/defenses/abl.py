r"""ABL: Anti-Backdoor Learning (Li et al., NeurIPS 2021), a training-time defense.

The defender trains its own model on the whole poisoned training set (images with their
triggers, the labels as given) and unlearns what it isolates:

1. Isolation training: a fresh model, `isolation_epochs` epochs on every training image
   without augmentation, with the local gradient ascent loss (the paper's Eq. 3) on the
   batch-mean cross-entropy l:  L = sign(l - gamma) * l,  gamma = 0.5: below gamma the gradient
   is reversed, so the easily learned (backdoored) examples are held near gamma while the
   others are learned. `loss="flooding"` is BackdoorBench's configured form, |l - gamma| +
   gamma, whose gradient is the same. SGD (Nesterov, momentum 0.9, weight decay 1e-4) at a
   constant lr.
2. Isolation: the per-example cross-entropy of every training image in inference mode; the
   `isolation_ratio` (1%) with the lowest loss are isolated (backdoor examples are learned
   fastest, so their loss is lowest).
3. Continued training of the same model on the other 99%: `finetune_epochs` epochs of plain
   cross-entropy with crop + flip, lr `lr` for epochs < 40 and lr / 10 after (BackdoorBench's
   hard-coded schedule).
4. Unlearning: `unlearn_epochs` epochs of gradient ascent on the isolated examples (the loss
   -CE, the paper's Eq. 4's maximisation) at the fixed lr `unlearn_lr`, with crop + flip; the
   optimizer of step 3 goes on (its momentum and weight decay are kept).
The final model is the defended one (no selection).

`details` in results.json: the isolated count and how many of them were really poisoned (the
isolation's precision; recall against all poisoned images), from the attack's poison indices
(for this record only, never for a decision).

Settings (BackdoorBench's CIFAR-10 yaml): isolation 20 epochs at lr 0.01, gamma 0.5, 1%
isolated, 60 epochs of continued training (lr 0.01, then 0.001 from epoch 40), 20 unlearning
epochs at lr 1e-4, batch 256; `cpu` the same; `smoke` 1, 2 and 1 epochs.

References: Li et al., Anti-Backdoor Learning: Training Clean Models on Poisoned Data, NeurIPS
2021 (arXiv 2110.11571), Eq. 3-4; BackdoorBench `defense/abl.py`,
`config/defense/abl/cifar10.yaml`; the original code `bboylyg/ABL` (`config.py`).

Differences from BackdoorBench (deliberate):
- The loss of step 1 is the paper's LGA by default (`loss="lga"`); BackdoorBench configures
  Flooding (`loss="flooding"` here), whose gradient is identical (d|l - g|/dtheta =
  sign(l - g) dl/dtheta), so only the logged loss differs.
- Step 2 computes the losses in batches of `batch_size`; BackdoorBench uses batch 1. In
  inference mode (BatchNorm's running statistics) the losses are the same.
- The last partial batch is filled from a second permutation (every defense here) where
  PyTorch runs a smaller last batch; on-the-fly attacks (WaNet, Input-aware) have no fixed
  poisoned set and are refused by the pipeline.
- The original code (`bboylyg/ABL`) differs from BackdoorBench in its settings (isolation lr
  0.1 for 10 epochs, continued training at 0.1 / 0.01 / 0.001, 5 unlearning epochs at 5e-4
  without augmentation, batch 128; Flooding its default loss too): BackdoorBench's are the
  ones the FT-SAM paper's ABL column ran with.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax.defenses.base import Defended, PoisonedTrainData
from ftsam_jax.training.epoch import apply_in_batches, standard_preprocess, steps_per_epoch
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import (
    LossFn,
    TrainState,
    classification_loss,
    create_train_state,
    cross_entropy,
    train_step,
)

__all__ = ["ABLConfig", "abl", "abl_config", "isolate", "lga_loss", "per_example_loss"]

Variables = dict[str, Any]
LOSSES = ("lga", "flooding")


@dataclasses.dataclass(frozen=True)
class ABLConfig:
    """ABL hyperparameters (see the module docstring).

    Attributes:
      isolation_epochs, lr: step 1 (constant lr).
      gamma: the LGA / flooding threshold on the batch-mean cross-entropy.
      loss: "lga" (sign(l - gamma) l, the paper) or "flooding" (|l - gamma| + gamma).
      isolation_ratio: share of the training set isolated (lowest loss first).
      finetune_epochs, lr_drop_epoch: step 3, lr until `lr_drop_epoch`, lr / 10 after.
      unlearn_epochs, unlearn_lr: step 4 (gradient ascent at a fixed lr).
      batch_size, momentum, weight_decay, nesterov: SGD of every step.
    """

    isolation_epochs: int = 20
    lr: float = 0.01
    gamma: float = 0.5
    loss: str = "lga"
    isolation_ratio: float = 0.01
    finetune_epochs: int = 60
    lr_drop_epoch: int = 40
    unlearn_epochs: int = 20
    unlearn_lr: float = 1e-4
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True

    def __post_init__(self) -> None:
        if min(self.isolation_epochs, self.finetune_epochs, self.unlearn_epochs,
               self.lr_drop_epoch) < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        for name in ("lr", "gamma", "unlearn_lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 < self.isolation_ratio < 1.0:
            raise ValueError(f"isolation_ratio must lie in (0, 1), got {self.isolation_ratio}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")


def abl_config(preset: str = "paper") -> ABLConfig:
    """BackdoorBench's ABL (CIFAR-10 yaml); `smoke` runs 1, 2 and 1 epochs."""
    if preset in ("paper", "cpu"):
        return ABLConfig()
    if preset == "smoke":
        return ABLConfig(isolation_epochs=1, finetune_epochs=2, lr_drop_epoch=1,
                         unlearn_epochs=1)
    raise ValueError(f"unknown preset {preset!r}")


def lga_loss(apply_fn: Any, gamma: float, kind: str = "lga") -> LossFn:
    """Step 1's loss on the batch-mean cross-entropy l: sign(l - gamma) * l (LGA, Eq. 3) or
    |l - gamma| + gamma (flooding); the same gradient."""
    base = classification_loss(apply_fn)

    def loss_fn(params, batch_stats, batch, rng):
        loss, aux = base(params, batch_stats, batch, rng)
        if kind == "flooding":
            return jnp.abs(loss - gamma) + gamma, aux
        return jnp.sign(loss - gamma) * loss, aux

    return loss_fn


def ascent_loss(apply_fn: Any) -> LossFn:
    """Step 4's loss: -CE (gradient ascent on the isolated examples, Eq. 4)."""
    base = classification_loss(apply_fn)

    def loss_fn(params, batch_stats, batch, rng):
        loss, aux = base(params, batch_stats, batch, rng)
        return -loss, aux

    return loss_fn


def per_example_loss(model: nn.Module, variables: Variables, x: np.ndarray, y: np.ndarray,
                     mesh: jax.sharding.Mesh, batch_size: int = 256) -> np.ndarray:
    """Inference-mode cross-entropy of every example (step 2)."""
    def losses(v: Variables, images: jax.Array, labels: jax.Array) -> jax.Array:
        return cross_entropy(model.apply(v, images, train=False), labels)

    return apply_in_batches(losses, variables, x, y, mesh, batch_size)


def isolate(losses: np.ndarray, ratio: float) -> np.ndarray:
    """Indices (sorted) of the `ratio` share (at least one) with the lowest loss; ties broken
    by index."""
    count = max(1, int(len(losses) * ratio))
    return np.sort(np.argsort(np.asarray(losses), kind="stable")[:count])


def continued_schedule(config: ABLConfig, steps_per_epoch: int) -> optax.Schedule:
    """The lr of steps 3 and 4 by optimizer step: `lr` until `lr_drop_epoch`, lr / 10 to the
    end of the continued training (`finetune_epochs`), then `unlearn_lr`."""
    drop, end = config.lr_drop_epoch * steps_per_epoch, config.finetune_epochs * steps_per_epoch

    def schedule(step: jax.Array) -> jax.Array:
        return jnp.where(step < end, jnp.where(step < drop, config.lr, 0.1 * config.lr),
                         config.unlearn_lr)

    return schedule


def _sgd(config: ABLConfig, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov))


def abl(model: nn.Module, variables: Variables, data: PoisonedTrainData, config: ABLConfig,
        rng: jax.Array, ctx: StageContext) -> Defended:
    """Isolation training, isolation, continued training, unlearning (module docstring);
    `variables` (the victim's backdoored model) only give the shapes: ABL trains its own."""
    del variables
    init_rng, iso_rng, ft_rng, un_rng = jax.random.split(rng, 4)
    x, y = data.x, np.asarray(data.y, np.int32)
    evaluate = evaluate_variables(ctx)
    plain, augmented = standard_preprocess(False), standard_preprocess(True)

    # 1. isolation training from scratch, LGA, no augmentation, constant lr
    tx = _sgd(config, config.lr)
    state = create_train_state(model, tx, init_rng, tuple(x.shape[1:]))
    state, _ = train_stage(Stage(
        "abl_isolation", state, config.isolation_epochs,
        step=partial(train_step, tx=tx, loss_fn=lga_loss(model.apply, config.gamma, config.loss)),
        data={"image": x, "label": y}, batch_size=config.batch_size, drop_last=False,
        preprocess=plain, evaluate=evaluate, rng=iso_rng, lr=lambda epoch: config.lr), ctx)

    # 2. the lowest-loss share isolated
    isolated = isolate(per_example_loss(model, jax.device_get(state.variables), x, y, ctx.mesh,
                                        config.batch_size), config.isolation_ratio)
    others = np.setdiff1d(np.arange(len(y)), isolated)

    # 3. + 4. one optimizer (its momentum and step count carried into the unlearning)
    tx = _sgd(config, continued_schedule(
        config, steps_per_epoch(len(others), config.batch_size, drop_last=False)))
    epoch_lr = lambda epoch: config.lr * (0.1 if epoch >= config.lr_drop_epoch else 1.0)
    state = create_train_state(model, tx, init_rng, (), variables=jax.device_get(state.variables))
    state, _ = train_stage(Stage(
        "abl_finetune", state, config.finetune_epochs,
        step=partial(train_step, tx=tx, loss_fn=classification_loss(model.apply)),
        data={"image": x[others], "label": y[others]}, batch_size=config.batch_size,
        drop_last=False, preprocess=augmented, evaluate=evaluate, rng=ft_rng, lr=epoch_lr), ctx)
    assert isinstance(state, TrainState)
    state, _ = train_stage(Stage(
        "abl_unlearn", state, config.unlearn_epochs,
        step=partial(train_step, tx=tx, loss_fn=ascent_loss(model.apply)),
        data={"image": x[isolated], "label": y[isolated]}, batch_size=config.batch_size,
        drop_last=False, preprocess=augmented, evaluate=evaluate, rng=un_rng,
        lr=lambda epoch: config.unlearn_lr), ctx)

    poison = np.asarray(data.poison_mask, bool)
    hits = int(poison[isolated].sum())
    details = {"isolated": int(len(isolated)), "isolated_poisoned": hits,
               "poisoned": int(poison.sum()), "precision": hits / len(isolated),
               "recall": hits / int(poison.sum()) if poison.any() else None}
    return Defended(jax.device_get(state.variables), details)
