"""PAM: Path-Aware Minimization (Min et al., NeurIPS 2024).

A purified model that still lies close to the backdoored one along the path that connects them
relearns the backdoor from a handful of poisoned samples (the Retuning Attack). PAM tunes the
model with extra updates that push it away from the backdoored weights along that path:

1. theta_0, the backdoored weights, is kept (once, before any round); theta_t are the current
   weights, starting at theta_0.
2. Every step, on a batch in which a fraction of the images carry a *reversed* trigger (with
   their true labels), the weights are first moved a distance rho along the path towards the
   backdoored model,
       e_t = rho * (theta_0 - theta_t) / ||theta_0 - theta_t||_2      (one L2 norm over all
                                                                        parameters),
   the cross-entropy gradient is taken there, g_t = grad CE(theta_t + e_t), and theta_t is
   stepped with it: theta_{t+1} = theta_t - lr * SGD-momentum(g_t). This is
   `ftsam_jax.optim.pam_gradient` in front of SGD in one optax chain. At the first step
   theta_t = theta_0, so e_0 = 0 and the step is plain SGD.
3. The tuning runs in rounds; each round first re-synthesises the trigger from the current model
   (the released code re-runs its trigger inversion every round), then runs its epochs. The
   optimizer's state (momentum, the anchor theta_0) carries over from round to round.

The reversed trigger: PAM as released takes its reversed samples from BTI-DBF(U) (a UNet
generator trained to decouple benign from backdoor features); that inversion is not ported here.
Its stand-in (`trigger="uap"`) is a universal additive perturbation delta found on the benign
data from the current model in inference mode by one pass of SGD (lr `uap_lr`, from delta = 0)
on -CE(f(clip(x + delta)), argmax f(x)) + `uap_reg` * ||delta||^2 (I-BAU's inner maximisation,
in pixel units as the original I-BAU), and stamped as clip(x + delta, 0, 1). `trigger="none"`
tunes on the benign images alone (PAM's path term without reversed samples).

Settings (the released `defense.sh` and `btidbfu.py`): rho 0.5, 3 rounds of 30 epochs, SGD lr
0.01, momentum 0.1, no weight decay, constant lr, batch 128, int(0.2 B + 1) reversed images per
batch (26 of 128), crop+flip augmentation, the last model (no selection). The `cpu` preset is the
same; `smoke` runs 2 rounds of 1 epoch. Data: the defender's benign subset (`benign_ratio`, 5%
by default, the released loader's 2,500 CIFAR-10 images).

References: Min, Qin, Zhang, Shen, Cheng, Uncovering, Explaining, and Mitigating the Superficial
Safety of Backdoor Defense, NeurIPS 2024 (arXiv 2410.09838); code
`AISafety-HKUST/stable_backdoor_purification` `fine_tune/BTIDBF/btidbfu.py` (`unlearn_pam`) and
`fine_tune/BTIDBF/sam.py` (class `PAM`), commit 37d2ef5. The paper's body (its equations and
Algorithm 1) could not be read here; the update above is the released code's, which matches the
abstract's description (deviation along the backdoor-connected path with extra model updates).

Differences from the released code (all deliberate):
- Reversed samples: the universal-perturbation stand-in above instead of BTI-DBF's generator
  (mask search 20 epochs, generator 30 epochs, a generator pre-trained 50 epochs, the detected
  target label's CE from round 1 on); each round's perturbation starts again from 0, where the
  released generator keeps training from the last round's; no early stop on a changed target
  label (off there too).
- BatchNorm: the released step has a single forward pass, at the perturbed weights in training
  mode, so its running statistics come from theta_t + e_t; here, as for SAM in this library, a
  forward pass at theta_t (no backward) gives the statistics, the loss and the accuracy, and the
  perturbed pass gives only the gradient. This costs one extra forward pass per step.
- The reversed images are chosen per batch from the step's key (`jax.random`), where the
  released loop uses Python's unseeded `random.sample`; the trigger is applied to the augmented
  [0, 1] image and clipped, where the generator maps normalised tensors.
- The perturbation covers the parameters only (as the released `first_step`, which iterates over
  `parameters()`); the released difference of whole state_dicts, buffers included, is built but
  its buffers are never used.
- Data: our benign subset (uniform, or the run's shared subset with `benign_selection=shared`);
  the released CIFAR loader draws an unseeded random 2,500 images and also *evaluates* on that
  subset of the test set; we evaluate on the full test sets like every defense here.
- The released scripts do not run unchanged (`opt.attack_target` is undefined, the non-PAM branch
  calls `unlearn` with 3 arguments); nothing of that is carried over.
- The last partial batch is filled from a second permutation (`drop_last=False`, as for every
  defense here), where PyTorch's DataLoader runs a smaller last batch; float32.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax import parallel, xla
from ftsam_jax.defenses.base import BenignData, Defended
from ftsam_jax.optim import pam_gradient
from ftsam_jax.training.epoch import epoch_indices, standard_preprocess, steps_per_epoch
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import (
    LossFn,
    TrainState,
    classification_loss,
    create_train_state,
    cross_entropy,
)

__all__ = ["TRIGGERS", "PAMConfig", "PAMTrainState", "num_reversed", "pam", "pam_config",
           "pam_optimizer", "pam_step", "stamp", "universal_trigger"]

Variables = dict[str, Any]

TRIGGERS = ("uap", "none")


@dataclasses.dataclass(frozen=True)
class PAMConfig:
    """PAM hyperparameters (see the module docstring).

    Attributes:
      rounds: trigger synthesis + `epochs` of PAM tuning, repeated (the released `nround`).
      epochs: PAM epochs per round (the released `ul_round`).
      batch_size, lr, momentum, weight_decay: SGD with a constant lr (all parameters trained).
      rho: length of the step towards the backdoored weights (>= 0; 0 is plain SGD).
      reversed_fraction: int(f * B + 1) images of each batch of B carry the trigger (f > 0);
        0 stamps none.
      trigger: "uap" (a universal perturbation, the stand-in for BTI-DBF's generator) or
        "none" (benign images only).
      uap_lr, uap_reg: SGD step and L2 weight of the universal perturbation's one pass.
      augment: random crop (4-px padding) + horizontal flip.
      drop_last: drop the last partial batch (else fill it from a second permutation).
    """

    rounds: int = 3
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.1
    weight_decay: float = 0.0
    rho: float = 0.5
    reversed_fraction: float = 0.2
    trigger: str = "uap"
    uap_lr: float = 10.0
    uap_reg: float = 0.001
    augment: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.epochs < 0 or self.batch_size < 1:
            raise ValueError("rounds and epochs must be >= 0 and batch_size >= 1")
        for name in ("lr", "momentum", "weight_decay", "rho", "uap_lr", "uap_reg"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.reversed_fraction <= 1:
            raise ValueError(f"reversed_fraction must be in [0, 1], got {self.reversed_fraction}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {self.trigger!r}; choose one of {TRIGGERS}")


def pam_config(preset: str = "paper") -> PAMConfig:
    """The released setting (rho 0.5, 3 rounds of 30 epochs, lr 0.01, momentum 0.1); `smoke`
    runs 2 rounds of 1 epoch."""
    if preset == "smoke":
        return PAMConfig(rounds=2, epochs=1)
    if preset not in ("paper", "cpu"):
        raise ValueError(f"unknown preset {preset!r}")
    return PAMConfig()


def num_reversed(fraction: float, batch_size: int) -> int:
    """Images of a batch that carry the trigger: the released int(f * B + 1), at most B; 0 for
    f = 0."""
    if fraction <= 0:
        return 0
    return min(batch_size, int(fraction * batch_size + 1))


def stamp(images: jax.Array, trigger: jax.Array) -> jax.Array:
    """clip(x + delta, 0, 1): the additive trigger on [0, 1] images."""
    return jnp.clip(images + trigger, 0.0, 1.0)


def pam_optimizer(config: PAMConfig) -> optax.GradientTransformationExtraArgs:
    """pam_gradient(rho) -> add_decayed_weights -> sgd(lr, momentum); the anchor is the params
    the state is initialised with."""
    return optax.chain(pam_gradient(config.rho), optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(config.lr, momentum=config.momentum or None))


@flax.struct.dataclass
class PAMTrainState(TrainState):
    """A `TrainState` that also carries the round's trigger (1, H, W, C): an input of the
    compiled step, not a constant in it, so a new round's trigger needs no new compilation; it
    is checkpointed with the rest."""

    trigger: jax.Array | None = None


def pam_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
             tx: optax.GradientTransformationExtraArgs, loss_fn: LossFn,
             trigger: jax.Array | None = None, reversed_per_batch: int = 0,
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PAM step: `reversed_per_batch` random images of the batch stamped with the trigger
    (labels kept), a forward pass at theta_t (loss, accuracy, BN statistics), the gradient at
    theta_t + e_t from `tx`'s `pam_gradient`, the update. The trigger: `trigger`, else the
    state's (`PAMTrainState`). Metrics: loss, accuracy and `deviation` = ||theta_0 - theta_t||_2
    before the step."""
    stamp_rng, loss_rng = jax.random.split(rng)
    if trigger is None:
        trigger = getattr(state, "trigger", None)
    images = batch["image"]
    if trigger is not None and reversed_per_batch > 0:
        b = images.shape[0]
        chosen = jax.random.permutation(stamp_rng, b)[:reversed_per_batch]
        mask = jnp.zeros((b,), bool).at[chosen].set(True)[:, None, None, None]
        images = jnp.where(mask, stamp(images, trigger.astype(images.dtype)), images)
    batch = {**batch, "image": images}
    loss, (logits, batch_stats) = loss_fn(state.params, state.batch_stats, batch, loss_rng)

    def perturbed_grad(p: Any) -> Any:
        return jax.grad(lambda q: loss_fn(q, state.batch_stats, batch, loss_rng)[0])(p)

    anchor = optax.tree_utils.tree_get(state.opt_state, "anchor")
    deviation = optax.tree.norm(jax.tree.map(jnp.subtract, anchor, state.params))
    zeros = jax.tree.map(jnp.zeros_like, state.params)  # pam_gradient ignores the gradient
    updates, opt_state = tx.update(zeros, state.opt_state, state.params, grad_fn=perturbed_grad)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                       "deviation": deviation}


def universal_trigger(model: nn.Module, variables: Variables, benign: BenignData,
                      config: PAMConfig, rng: jax.Array, mesh: Any) -> jax.Array:
    """The stand-in reversed trigger: one shuffled, augmented pass of SGD over the benign data
    on -CE(f(clip(x + delta)), argmax f(x)) + reg ||delta||^2 from delta = 0, the model in
    inference mode; delta has the images' shape (1, H, W, C), in [0, 1] pixel units."""
    bs = config.batch_size
    n = len(benign.y)
    repl = parallel.replicated(mesh)
    sharding = parallel.data_sharding(mesh)
    preprocess = standard_preprocess(config.augment)
    model_vars = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    @xla.jit
    def sgd_step(delta, model_vars, x, ids, aug_rng):
        batch = jax.lax.with_sharding_constraint({"image": x[ids]}, sharding)
        images = preprocess(batch, aug_rng)["image"]
        pseudo = jnp.argmax(model.apply(model_vars, images, train=False), -1)

        def loss(d):
            logits = model.apply(model_vars, stamp(images, d), train=False)
            return -cross_entropy(logits, pseudo).mean() + config.uap_reg * jnp.sum(d * d)

        return delta - config.uap_lr * jax.grad(loss)(delta)

    perm_rng, aug_rng = jax.random.split(rng)
    ids = epoch_indices(perm_rng, n, bs, drop_last=config.drop_last)
    augs = jax.random.split(aug_rng, steps_per_epoch(n, bs, config.drop_last))
    x = jax.device_put(benign.x, repl)
    model_vars = parallel.replicate(model_vars, mesh)
    delta = jnp.zeros((1, *benign.x.shape[1:]), jnp.float32)
    for i in range(ids.shape[0]):
        delta = sgd_step(delta, model_vars, x, ids[i], augs[i])
    return jax.device_get(delta)


def pam(model: nn.Module, variables: Variables, benign: BenignData, config: PAMConfig,
        rng: jax.Array, ctx: StageContext) -> Defended:
    """PAM tuning from the backdoored `variables`: `rounds` of (trigger, `epochs` epochs).

    `Defended.details`: the reversed images per batch, per round the trigger's L2 and max-abs
    size (pixel units, [0, 1] images; None without one), and `deviation`, the L2 distance
    ||theta_0 - theta|| over all parameters of the returned model from the backdoored one (the
    deviation along the path that PAM is built to enlarge).
    """
    parallel.check_batch_size(config.batch_size, ctx.mesh)
    tx = pam_optimizer(config)
    base = create_train_state(model, tx, rng, (), variables={
        "params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
    state = PAMTrainState(step=base.step, params=base.params, batch_stats=base.batch_stats,
                          opt_state=base.opt_state,
                          trigger=jnp.zeros((1, *benign.x.shape[1:]), jnp.float32))
    per_batch = num_reversed(config.reversed_fraction, config.batch_size)
    if config.trigger == "none":
        per_batch = 0
    step = partial(pam_step, tx=tx, loss_fn=classification_loss(model.apply),
                   reversed_per_batch=per_batch)
    data = {"image": benign.x, "label": np.asarray(benign.y, np.int32)}
    rounds = []
    for r in range(config.rounds):
        round_rng = jax.random.fold_in(rng, r)
        trigger_rng, run_rng = jax.random.split(round_rng)
        size = {"trigger_l2": None, "trigger_linf": None}
        if per_batch > 0 and config.epochs > 0:
            delta = universal_trigger(model, jax.device_get(state.variables), benign, config,
                                      trigger_rng, ctx.mesh)
            state = state.replace(trigger=jnp.asarray(delta))
            size = {"trigger_l2": float(np.sqrt(np.sum(np.square(delta, dtype=np.float64)))),
                    "trigger_linf": float(np.max(np.abs(delta)))}
        rounds.append({"round": r + 1, **size})
        state, _ = train_stage(Stage(
            f"pam_round{r + 1}", state, config.epochs, step=step, data=data,
            batch_size=config.batch_size, drop_last=config.drop_last,
            preprocess=standard_preprocess(config.augment), evaluate=evaluate_variables(ctx),
            rng=run_rng, lr=lambda epoch: config.lr), ctx)
    out = jax.device_get(state.variables)
    deviation = math.sqrt(sum(
        float(np.sum(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(out["params"]),
                        strict=True)))
    return Defended(out, {"reversed_per_batch": per_batch,
                          "rounds": rounds, "deviation": deviation})
