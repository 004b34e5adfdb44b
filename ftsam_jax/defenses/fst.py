"""FST: Feature Shift Tuning (Min et al., NeurIPS 2023).

Fine-tuning that drives the features away from the backdoored ones through the linear head:

1. W0, the backdoored head's weight, and its Frobenius norm ||W0||_F are kept; then only the
   head is re-initialised, weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)) (fan_in: the
   head's input features).
2. All parameters are trained on the benign data with
   L = CE(f(x), y) + alpha * <W, W0>_F, the sum of the element-wise product of the current and
   the original head weights: minimising it turns W away from (towards anti-alignment with) W0.
3. After every optimiser step the head's weight is projected back onto the sphere of the
   original norm, W <- W * ||W0||_F / ||W||_F (one norm over the whole weight; the bias is not
   projected): `ftsam_jax.optim.norm_projection`, the last stage of the optax chain.

Settings (the released code and the paper's CIFAR-10 row): SGD lr 0.01, momentum 0.9, no weight
decay, CosineAnnealingLR with T_max = epochs stepped per epoch, batch 128, 10 epochs, alpha 0.2
(the code's default; the paper's CIFAR-10 value), crop+flip augmentation on the fly, the
last-epoch model (no selection). The `cpu` preset is the same; `smoke` runs 2 epochs. The head is
found per model by `head_path` (the final Dense, `linear`, of PreAct-ResNet18, VGG and TinyCNN).

References: Min et al., Towards Stable Backdoor Purification through Feature Shift Tuning,
NeurIPS 2023 (arXiv 2310.01875); code `AISafety-HKUST/stable_backdoor_purification`
`fine_tune/ft.py --ft_mode fst` (commit 37d2ef5).

Differences from the released code (all deliberate):
- The projection runs only in FST. The released loop applies it after every step in every
  `ft_mode` (ft, lp, ft-init, fe-tuning), so its "vanilla FT" is not vanilla; our `ft` is.
- `--lb_smooth` there replaces the whole loss, silently dropping the FST term; here there is no
  label smoothing (the paper's loss is plain CE + the FST term), so the term is always in.
- The bias's bound: the released code draws the bias with the bound computed for the weight
  (the variable left over from the weight's branch); both are 1/sqrt(fan_in), so the draw's
  distribution is the same; we compute it for the head explicitly.
- Data: the defender's benign subset of our pipeline (`benign_ratio`, 5% by default, drawn
  uniformly like the released `random.sample`, or the run's shared subset with
  `benign_selection=shared`), not the released `split_ratio` (README example 2%, the paper's 2%
  for CIFAR-10 and GTSRB, 5% for CIFAR-100 and Tiny-ImageNet).
- The last partial batch is filled from a second permutation (`drop_last=False` of our epochs,
  as for every defense here), where PyTorch's DataLoader runs a smaller last batch.
- Float32; the head is found by model type (`head_path`), not by the substring match of
  `--linear_name` over parameter names.
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

from ftsam_jax.defenses.base import BenignData
from ftsam_jax.models import VGG, PreActResNet, TinyCNN
from ftsam_jax.optim import norm_projection
from ftsam_jax.training.epoch import standard_preprocess
from ftsam_jax.training.recipe import FitConfig, epoch_learning_rate, make_optimizer
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import (
    LossFn,
    TrainState,
    classification_loss,
    create_train_state,
    train_step,
)

__all__ = ["FSTConfig", "fst", "fst_config", "fst_loss", "fst_setup", "head_path",
           "reinit_head"]

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FSTConfig:
    """FST hyperparameters (see the module docstring).

    Attributes:
      epochs, batch_size, lr, momentum, weight_decay: the SGD recipe (all parameters trained).
      schedule: "cosine_epoch" (the released CosineAnnealingLR stepped per epoch), "cosine_iter"
        or "constant".
      t_max: the cosine's half-period in epochs; None: `epochs` (the released T_max).
      alpha: weight of the feature-shift term alpha * <W, W0>_F (>= 0; 0 leaves the head's
        re-initialisation and norm projection, "FT-init with projection").
      augment: random crop (4-px padding) + horizontal flip.
      drop_last: drop the last partial batch (else fill it from a second permutation).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine_epoch"
    t_max: int | None = None
    alpha: float = 0.2
    augment: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        self.fit_config()  # FitConfig's checks (epochs, batch_size, lr, schedule)

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay,
                         schedule=self.schedule, t_max=self.t_max, label_smoothing=0.0,
                         sam=False, augment=self.augment, drop_last=self.drop_last)


def fst_config(preset: str = "paper") -> FSTConfig:
    """The paper's CIFAR-10 setting (10 epochs, lr 0.01, alpha 0.2); `smoke` runs 2 epochs."""
    if preset == "smoke":
        return FSTConfig(epochs=2)
    if preset not in ("paper", "cpu"):
        raise ValueError(f"unknown preset {preset!r}")
    return FSTConfig()


def head_path(model: nn.Module) -> tuple[str, ...]:
    """Module path of the model's linear head (the final Dense)."""
    if isinstance(model, PreActResNet | VGG | TinyCNN):
        return ("linear",)
    raise ValueError(f"no linear head known for {type(model).__name__}")


def _module(params: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        params = params[p]
    return params


def _replace(params: Any, path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    return {**params, path[0]: _replace(params[path[0]], path[1:], value)}


def reinit_head(params: Any, path: tuple[str, ...], rng: jax.Array) -> Any:
    """`params` with the Dense at `path` re-drawn: kernel (fan_in, out) and bias (if any)
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); every other parameter is the same object."""
    head = _module(params, path)
    kernel = jnp.asarray(head["kernel"])
    if kernel.ndim != 2:
        raise ValueError(f"the head at {'/'.join(path)} is not a Dense (kernel of shape "
                         f"{kernel.shape})")
    bound = 1.0 / math.sqrt(kernel.shape[0])
    k_rng, b_rng = jax.random.split(rng)
    new = dict(head)
    new["kernel"] = jax.random.uniform(k_rng, kernel.shape, kernel.dtype, -bound, bound)
    if "bias" in head:
        bias = jnp.asarray(head["bias"])
        new["bias"] = jax.random.uniform(b_rng, bias.shape, bias.dtype, -bound, bound)
    return _replace(params, path, new)


def fst_loss(apply_fn: Any, path: tuple[str, ...], w0: jax.Array, alpha: float) -> LossFn:
    """`LossFn` of FST: mean CE in training mode + alpha * sum(W * W0) over the head's kernel."""
    base = classification_loss(apply_fn)
    w0 = jnp.asarray(w0)

    def loss_fn(params, batch_stats, batch, rng):
        loss, aux = base(params, batch_stats, batch, rng)
        w = _module(params, path)["kernel"]
        return loss + alpha * jnp.sum(w * w0.astype(w.dtype)), aux

    return loss_fn


def fst_setup(model: nn.Module, variables: Variables, config: FSTConfig, num_examples: int,
              rng: jax.Array) -> tuple[TrainState, Any, optax.GradientTransformation]:
    """FST's initial state (the head re-initialised from `rng`), its jit-compatible step
    `(state, batch, rng) -> (state, metrics)` and the optax chain (SGD, then the projection)."""
    path = head_path(model)
    params = variables["params"]
    w0 = jnp.asarray(_module(params, path)["kernel"])
    norm0 = float(jnp.sqrt(jnp.sum(jnp.square(w0.astype(jnp.float32)))))
    params = reinit_head(params, path, rng)
    fit_cfg = config.fit_config()
    tx = optax.chain(make_optimizer(fit_cfg, num_examples),
                     norm_projection({(*path, "kernel"): norm0}))
    state = create_train_state(model, tx, rng, (), variables={
        "params": params, "batch_stats": variables.get("batch_stats", {})})
    loss_fn = fst_loss(model.apply, path, w0, config.alpha)
    return state, partial(train_step, tx=tx, loss_fn=loss_fn), tx


def fst(model: nn.Module, variables: Variables, benign: BenignData, config: FSTConfig,
        rng: jax.Array, ctx: StageContext) -> Variables:
    """Re-initialises the head, then tunes every parameter with the FST loss and projection."""
    init_rng, run_rng = jax.random.split(rng)
    state, step, _ = fst_setup(model, variables, config, len(benign.y), init_rng)
    fit_cfg = config.fit_config()
    state, _ = train_stage(Stage(
        "fst", state, fit_cfg.epochs, step=step,
        data={"image": benign.x, "label": np.asarray(benign.y, np.int32)},
        batch_size=fit_cfg.batch_size, drop_last=fit_cfg.drop_last,
        preprocess=standard_preprocess(fit_cfg.augment), evaluate=evaluate_variables(ctx),
        rng=run_rng, lr=epoch_learning_rate(fit_cfg, len(benign.y))), ctx)
    return jax.device_get(state.variables)
