"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

The minimax problem min_theta max_delta L(theta, delta) is solved round by round:

1. Inner max: a universal perturbation delta (one image, added to every input) found by one pass
   of SGD (lr 10) over the benign data on -CE(f(x + delta), argmax f(x)) + 0.001 ||delta||^2,
   from delta = 0, with the model's own predictions as labels.
2. Outer min: for every batch b of a fixed list of benign batches, one Adam step on theta with
   the implicit hypergradient of the outer loss
   L1(delta, theta) = CE(f_theta(x_b + delta on a random `portion` of the batch), y_b),
   where delta is treated as the fixed point of the inner map
   Phi(delta, theta) = delta - 0.1 * grad_delta L2(delta, theta),
   L2(delta, theta) = -CE(f_theta(x_0 + delta), y_0) + 0.001 ||delta||^2 on the first batch.
   `fixed_point_hypergradient` is hypertorch's `fixed_point` (Grazzi et al. 2020), the solver of
   the original code: v_0 = 0, v_{k+1} = J_delta(Phi)^T v_k + dL1/ddelta for K iterations (a
   truncated Neumann series for (I - J_delta^T)^{-1} dL1/ddelta), then
   d/dtheta = J_theta(Phi)^T v_K + dL1/dtheta, all with `jax.vjp` (the vjp of a gradient:
   Hessian-vector products, nothing is materialised). The model runs in inference mode
   throughout (`model.eval()` in the original): BN running statistics are used and unchanged;
   Adam updates every parameter, BN scale and bias included.

Units of delta: BackdoorBench adds the perturbation to *normalised* tensors (its loader ends
with `Normalize`), so its step sizes and regulariser are in units of the per-channel std.
Our models normalise inside, so with `delta_space="normalized"` (default) the image fed to the
model is x + std * delta: the model then sees x_norm + delta, exactly BackdoorBench's input, and
every gradient in delta is BackdoorBench's. (Rescaling scalar constants to pixel units cannot do
this: in pixel units the equivalent step sizes are lr * std_c^2 and the regulariser
0.001 / std_c^2, which differ per channel: std (0.247, 0.243, 0.261) on CIFAR-10, i.e. step
sizes ~16x smaller and a ~16x stronger regulariser than the same numbers in pixel units.)
`delta_space="pixel"` adds delta to the [0, 1] pixels, as the original I-BAU (inputs x / 255, no
normalisation) and as this module did before; a model without `std` is always in pixel units.

Settings: 5 rounds, K = 5, Adam lr 1e-4 with amsgrad (`argparser_opt_scheduler`), betas
(0.9, 0.999), no weight decay, batch 256, a uniformly drawn 5% of the training set with
crop+flip, the fixed batch list drawn (and augmented) once before the rounds, portion 0.01
(2 images of 256), inner step 0.1, perturbation lr 10, regulariser 0.001, model in inference
mode. The `cpu` preset is the same (with 258 benign images that is 2 batches, so 10 Adam steps
in all; BackdoorBench's 2,500 give 50); `smoke` runs 1 round with K = 2.

Reference: BackdoorBench `defense/i-bau.py` + `config/defense/i-bau/cifar10.yaml` (n_rounds 5,
K 5, lr 0.0001, client_optimizer adam, adam_betas [0.9, 0.999], wd 0, batch 256, ratio 0.05);
portion, step sizes and regulariser are constants in `mitigation()`.

Differences from the reference:
- hypertorch's early exit (||v_{k+1} - v_k|| < 1e-10) is omitted.
- Every batch has the configured size: the last batch of a pass is filled from a second
  permutation (`epoch_indices(drop_last=False)`), where PyTorch uses a smaller batch (and then
  patches int(0.01 * its size) images).
- BackdoorBench's CosineAnnealingLR is built but never stepped: the lr is constant in both.
- No clamping to the valid image range (neither implementation clamps).
- The original I-BAU repository uses Adam lr 1e-3 (plain), batch 100 and 5,000 test images
  without augmentation; we follow BackdoorBench.

One round is one checkpointed epoch of the stage `ibau_rounds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax import parallel, xla
from ftsam_jax.defenses.base import BenignData
from ftsam_jax.training.epoch import epoch_indices, standard_preprocess, steps_per_epoch
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import cross_entropy

__all__ = ["IBAUConfig", "IBAUState", "delta_scale", "fixed_point_hypergradient", "ibau",
           "ibau_config"]

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
    """I-BAU hyperparameters (see the module docstring)."""

    rounds: int = 5
    K: int = 5
    batch_size: int = 256
    lr: float = 1e-4
    amsgrad: bool = True
    inner_lr: float = 0.1
    pert_lr: float = 10.0
    reg: float = 0.001
    portion: float = 0.01
    augment: bool = True
    delta_space: str = "normalized"


def ibau_config(preset: str = "paper") -> IBAUConfig:
    """BackdoorBench's I-BAU; the smoke preset runs 1 round with K = 2."""
    if preset == "smoke":
        return IBAUConfig(rounds=1, K=2)
    if preset not in ("paper", "cpu"):
        raise ValueError(f"unknown preset {preset!r}")
    return IBAUConfig()


DELTA_SPACES = ("normalized", "pixel")


def delta_scale(model: nn.Module, space: str) -> np.ndarray:
    """Pixel change per unit of delta, per channel: the model's input `std` for
    "normalized" (delta in normalised units, BackdoorBench), 1 for "pixel" or a model without
    `std`."""
    if space not in DELTA_SPACES:
        raise ValueError(f"I-BAU: unknown delta_space {space!r}; choose one of {DELTA_SPACES}")
    std = getattr(model, "std", None)
    if space == "pixel" or std is None:
        return np.ones((1,), np.float32)
    return np.asarray(std, np.float32).reshape(-1)


@flax.struct.dataclass
class IBAUState:
    step: jax.Array
    params: Any
    opt_state: optax.OptState


def fixed_point_hypergradient(
    fp_map: Callable[[Any, Any], Any],
    outer_loss: Callable[[Any, Any], jax.Array],
    inner: Any,
    outer: Any,
    K: int,
) -> Any:
    """hypertorch's `fixed_point`: the K-step implicit hypergradient d outer_loss / d outer.

    Args:
      fp_map: Phi(inner, outer), whose fixed point defines the inner solution.
      outer_loss: L(inner, outer).
      inner: the inner solution (treated as a fixed point of Phi).
      outer: the outer variables (any pytree).
      K: fixed-point iterations; K = 0 gives the partial gradient dL/douter.
    """
    g_inner, g_outer = jax.grad(outer_loss, argnums=(0, 1))(inner, outer)
    _, vjp = jax.vjp(fp_map, inner, outer)

    # K is small and static: unrolled, because XLA:CPU runs convolution gradients inside a
    # while loop ~40x slower than at top level (a fori_loop here made I-BAU crawl on CPU).
    v = jax.tree.map(jnp.zeros_like, inner)
    for _ in range(K):
        v = jax.tree.map(jnp.add, vjp(v)[0], g_inner)
    return jax.tree.map(jnp.add, vjp(v)[1], g_outer)


def ibau(model: nn.Module, variables: Variables, benign: BenignData, config: IBAUConfig,
         rng: jax.Array, ctx: StageContext) -> Variables:
    """Minimax unlearning of a universal perturbation with the implicit hypergradient."""
    mesh = ctx.mesh
    bs = config.batch_size
    parallel.check_batch_size(bs, mesh)
    n = len(benign.y)
    steps = steps_per_epoch(n, bs, drop_last=False)
    sharding = parallel.data_sharding(mesh)
    repl = parallel.replicated(mesh)
    preprocess = standard_preprocess(augment=config.augment)
    num_patched = int(bs * config.portion)
    scale = jnp.asarray(delta_scale(model, config.delta_space))
    batch_stats = parallel.replicate(variables.get("batch_stats", {}), mesh)
    if config.amsgrad:
        tx = optax.amsgrad(config.lr, b1=0.9, b2=0.999, eps=1e-8)
    else:
        tx = optax.adam(config.lr, b1=0.9, b2=0.999, eps=1e-8)

    def logits_of(params: Any, bstats: Any, images: jax.Array) -> jax.Array:
        return model.apply({"params": params, "batch_stats": bstats}, images, train=False)

    def get_batch(x, y, ids, aug_rng):
        batch = jax.lax.with_sharding_constraint({"image": x[ids], "label": y[ids]}, sharding)
        return preprocess(batch, aug_rng)

    @xla.jit
    def perturbation_step(delta, params, bstats, x, y, ids, aug_rng):
        batch = get_batch(x, y, ids, aug_rng)
        pseudo = jnp.argmax(logits_of(params, bstats, batch["image"]), -1)

        def loss(d):
            ce = cross_entropy(logits_of(params, bstats, batch["image"] + d * scale),
                               pseudo).mean()
            return -ce + config.reg * jnp.sum(d * d)

        return delta - config.pert_lr * jax.grad(loss)(delta)

    @xla.jit
    def outer_step(state: IBAUState, delta, bstats, x, y, ids0, aug0, ids, aug_rng, patch_rng):
        b0 = get_batch(x, y, ids0, aug0)
        b = get_batch(x, y, ids, aug_rng)
        chosen = jax.random.permutation(patch_rng, bs)[:num_patched]
        patch = jnp.zeros((bs,), jnp.float32).at[chosen].set(1.0)[:, None, None, None]

        def loss_inner(d, params):
            ce = cross_entropy(logits_of(params, bstats, b0["image"] + d * scale),
                               b0["label"]).mean()
            return -ce + config.reg * jnp.sum(d * d)

        def fp_map(d, params):
            return d - config.inner_lr * jax.grad(loss_inner)(d, params)

        def loss_outer(d, params):
            logits = logits_of(params, bstats, b["image"] + patch * d * scale)
            return cross_entropy(logits, b["label"]).mean()

        grads = fixed_point_hypergradient(fp_map, loss_outer, delta, state.params, config.K)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = IBAUState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        return new, loss_outer(delta, state.params)

    xd = jax.device_put(benign.x, repl)
    yd = jax.device_put(np.asarray(benign.y, np.int32), repl)
    fixed_rng, run_rng = jax.random.split(rng)
    fixed_perm_rng, fixed_aug_rng = jax.random.split(fixed_rng)
    # The outer loop's batch list is drawn once, as the original collects `images_list` once.
    fixed_ids = epoch_indices(fixed_perm_rng, n, bs, drop_last=False)
    fixed_aug = jax.random.split(fixed_aug_rng, steps)

    def round_fn(state: IBAUState, r: jax.Array):
        perm_rng, aug_rng, patch_rng = jax.random.split(r, 3)
        ids = epoch_indices(perm_rng, n, bs, drop_last=False)
        augs = jax.random.split(aug_rng, steps)
        delta = jnp.zeros((1, *benign.x.shape[1:]), jnp.float32)
        for i in range(steps):
            delta = perturbation_step(delta, state.params, batch_stats, xd, yd, ids[i], augs[i])
        patches = jax.random.split(patch_rng, steps)
        losses = []
        for i in range(steps):
            state, loss = outer_step(state, delta, batch_stats, xd, yd, fixed_ids[0],
                                     fixed_aug[0], fixed_ids[i], fixed_aug[i], patches[i])
            losses.append(loss)
        return state, {"loss": jnp.mean(jnp.stack(losses)),
                       "delta_norm": jnp.sqrt(jnp.sum(delta * delta))}

    params = variables["params"]
    state, _ = train_stage(Stage(
        "ibau_rounds", IBAUState(jnp.zeros([], jnp.int32), params, tx.init(params)),
        config.rounds, epoch_fn=round_fn, rng=run_rng,
        evaluate=evaluate_variables(ctx, lambda st: {**variables, "params": st.params})), ctx)
    return jax.device_get({**variables, "params": state.params})
