"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), as in BackdoorBench
(`attack/inputaware.py`, after VinAI's release).

Every image gets its own trigger from two networks trained with the classifier:

    x' = x + m(x) * (g(x) - x),    m(x) = T(M(x)),   T(z) = tanh(20 z - 10) / (2 + 1e-7) + 0.5

with `g` the pattern generator and `M` the mask generator, both `TriggerNet` encoder-decoders
ending in `tanh(.) / (2 + 1e-7) + 0.5` (values in (0, 1)), and `T` a steep threshold.

**Stage 1, "input_aware_mask"** (the reference's 25 "clean" epochs): `M` alone, Adam
(lr `generator_lr` = 0.01, betas (0.5, 0.9)), learning rate x0.1 at 40% and 80% of the stage
(the reference's milestones 10 and 20 of 25 epochs), on pairs of independently shuffled clean
batches (x1, x2):

    L_M = lambda_norm * mean(relu(m(x1) - mask_density)) + lambda_div * L_div(x1, x2, m(x1), m(x2))
    L_div(a, b, p, q) = mean_i( ||a_i - b_i|| / (||p_i - q_i|| + 1e-7) )   (per-image RMS norms)

with mask_density = 0.032, lambda_norm = 100, lambda_div = 1 (sparse masks that differ
between images).

**Stage 2, "input_aware_joint"**: classifier `C` (SGD from `fit_config`: lr, momentum, weight
decay, schedule) and generator `g` (Adam, lr `generator_lr`, betas (0.5, 0.9), constant: the
reference's milestones 200..500 never fire) trained together, `M` frozen (inference mode).
On each (augmented) batch x1 of B images with a second independent shuffle x2,
`n = int(ratio * B)`:

- backdoor: x1[:n] get their own trigger, label -> target (y + 1 mod C for all-to-all);
- cross: x1[n:2n] get the trigger generated from x2[n:2n] (pattern and mask of *another* image)
  and keep their true labels, so that a trigger only works on the image it was made for;
- the rest stay clean;
- loss = CE(C(inputs), labels) + lambda_div * L_div(x1[:n], x2[n:2n], g(x1[:n]), g(x2[n:2n])).

For ratio * B < 1 the reference's `generalize_to_lower_pratio` is followed: n = 1, applied to a
batch with probability ratio * B. The classifier is left in `trained_variables`; the pipeline
uses it as the backdoored model. `apply` inserts each test image's own trigger.

Epochs: the joint stage runs `fit_config.epochs` epochs and the mask stage
`mask_epochs` (default `max(1, round(epochs / 4))`), i.e. 25 + 100 for the reference's
100 epochs, as BackdoorBench's `clean_train_epochs = 25` then `epochs = 100`. The finished
networks are saved as `<ctx.workdir>/models/input_aware` (final variables only); a later `fit`
with that folder loads them instead of training (what a table commits to go on elsewhere).

Networks (`TriggerNet`, the reference's `InputAwareGenerator`): conv3x3-BN-ReLU blocks,
`steps` x (2 blocks, 2x2 max-pool) with `width`, 2 width, 4 width channels, a middle block,
then `steps` x (bilinear 2x upsampling, 2 blocks) halving the channels, the last block without
ReLU, to C (pattern) or 1 (mask) channels. The reference's settings: 3 steps of width 32 for
RGB and 2 steps of width 16 for MNIST; here 3 / 32 for 3-channel and 2 / 16 for 1-channel
images. Any H x W works: images are edge-padded to a multiple of 2**steps (8 or 4) and the
output cropped back (no padding for 32x32 or 28x28).

Reference: BackdoorBench `attack/inputaware.py` + `config/attack/inputaware/default.yaml` (lr_G =
lr_C = lr_M = 0.01, Adam betas (0.5, 0.9) for G and M, SGD momentum 0.9 / wd 5e-4 for C,
milestones C 100..400, G 200..500, M 10, 20, lambda_div 1, lambda_norm 100, mask_density 0.032,
EPSILON 1e-7, clean_train_epochs 25, num_cross = num_bd, pratio 0.1, target 0).

Differences from the reference: the networks see [0, 1] pixels rather than normalised ones,
and the diversity distances are measured in pixel space (the reference measures them on
normalised tensors; the trigger equation itself is the same, since normalisation is a
per-channel affine map); the two stages' BatchNorm running statistics in training see one
forward pass per batch half (the reference calls `M` twice on x1 in stage 1); the post-trigger
augmentation is the data pipeline's crop + flip applied *before* the trigger (as BackdoorBench's
loaders do).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax import parallel, xla
from ftsam_jax.attacks.base import Attack, to_uint8
from ftsam_jax.checkpoint import load_variables, save_variables
from ftsam_jax.data.augment import crop_flip
from ftsam_jax.models.common import Conv
from ftsam_jax.training.epoch import steps_per_epoch, to_float
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import cross_entropy

__all__ = ["InputAware", "TriggerNet", "diversity_loss", "threshold"]

Variables = dict[str, Any]
EPS = 1e-7
# The finished networks (classifier, generator, mask: final variables, no optimizer state),
# under the run's workdir: a rerun, or a workdir holding only this folder, skips both stages.
NETWORKS_DIR = "models/input_aware"


def threshold(z: jax.Array) -> jax.Array:
    """The reference's steep mask threshold tanh(20 z - 10) / (2 + 1e-7) + 0.5."""
    return jnp.tanh(z * 20.0 - 10.0) / (2.0 + EPS) + 0.5


def diversity_loss(a: jax.Array, b: jax.Array, p: jax.Array, q: jax.Array) -> jax.Array:
    """mean_i RMS(a_i - b_i) / (RMS(p_i - q_i) + 1e-7): images that differ must get triggers
    (or masks) that differ."""
    rms = lambda u: jnp.sqrt(jnp.mean(jnp.square(u), axis=(1, 2, 3)) + 1e-12)
    return jnp.mean(rms(a - b) / (rms(p - q) + EPS))


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ConvBlock(nn.Module):
    """Conv3x3 (bias) -> BatchNorm (PyTorch momentum 0.05) -> optional ReLU."""

    features: int
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                 bias_init=_torch_bias_init(9 * x.shape[-1]))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.95, epsilon=1e-5)(x)
        return nn.relu(x) if self.relu else x


class TriggerNet(nn.Module):
    """The reference's encoder-decoder generator; output in (0, 1), (N, H, W, out_channels)."""

    out_channels: int
    width: int = 32
    steps: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n, h, w, _ = x.shape
        mult = 2 ** self.steps
        ph, pw = -h % mult, -w % mult
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        nxt = self.width
        for step in range(self.steps):
            x = ConvBlock(nxt)(x, train)
            x = ConvBlock(nxt)(x, train)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            if step < self.steps - 1:
                nxt *= 2
        x = ConvBlock(nxt)(x, train)
        cur = nxt
        for step in range(self.steps):
            last = step == self.steps - 1
            b, hh, ww, c = x.shape
            x = jax.image.resize(x, (b, 2 * hh, 2 * ww, c), "bilinear")
            x = ConvBlock(cur)(x, train)
            x = ConvBlock(self.out_channels if last else cur // 2, relu=not last)(x, train)
            cur //= 2
        x = x[:, :h, :w, :]
        return jnp.tanh(x) / (2.0 + EPS) + 0.5


@flax.struct.dataclass
class MaskState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class JointState:
    step: jax.Array
    c_params: Any
    c_stats: Any
    c_opt: Any
    g_params: Any
    g_stats: Any
    g_opt: Any
    m_vars: Any  # frozen mask network (params + batch_stats)


def _multistep(lr: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
    """lr x0.1 at 40% and 80% of `epochs` (the reference's milestones 10, 20 of 25)."""
    bounds = sorted({round(f * epochs) for f in (0.4, 0.8)} - {0})
    return optax.piecewise_constant_schedule(
        lr, {b * steps_per_epoch: 0.1 for b in bounds if b < epochs})


class InputAware(Attack):
    """Input-aware dynamic backdoor (see the module docstring)."""

    name = "input_aware"
    poisoned_set = False  # poisons each batch on the fly (its generator)
    needs_fit = True

    def __init__(self, *, mask_density: float = 0.032, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, mask_epochs: int | None = None,
                 generator_lr: float = 0.01, generator_width: int | None = None,
                 generator_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self.image_shape[-1]
        self.mask_density, self.lambda_div = float(mask_density), float(lambda_div)
        self.lambda_norm = float(lambda_norm)
        self.mask_epochs = None if mask_epochs is None else int(mask_epochs)
        self.generator_lr = float(generator_lr)
        self.generator_width = int(generator_width or (32 if c == 3 else 16))
        self.generator_steps = int(generator_steps or (3 if c == 3 else 2))
        if self.generator_width < 1 or self.generator_steps < 1 or self.generator_lr <= 0:
            raise ValueError("input_aware: generator width/steps must be >= 1 and lr > 0")
        if self.mask_epochs is not None and self.mask_epochs < 0:
            raise ValueError("input_aware: mask_epochs must be >= 0")
        self.generator = TriggerNet(c, self.generator_width, self.generator_steps)
        self.mask_net = TriggerNet(1, self.generator_width, self.generator_steps)
        self.generator_variables: Variables | None = None
        self.mask_variables: Variables | None = None
        self._trigger_fn = xla.jit(self._trigger)

    # -- the trigger -----------------------------------------------------------------------------

    def _trigger(self, g_vars: Variables, m_vars: Variables, x: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = to_float(x)
        pattern = self.generator.apply(g_vars, x, train=False)
        mask = threshold(self.mask_net.apply(m_vars, x, train=False))
        return x + (pattern - x) * mask, pattern, mask

    def trigger_components(self, images: np.ndarray, chunk: int = 512
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(poisoned float images in [0, 1], patterns g(x), masks m(x)) for uint8 images."""
        images = self._check_images(images)
        if self.generator_variables is None or self.mask_variables is None:
            raise RuntimeError("input_aware: the trigger networks are not trained; call fit")
        parts = [self._trigger_fn(self.generator_variables, self.mask_variables,
                                  jnp.asarray(images[i:i + chunk]))
                 for i in range(0, len(images), chunk)]
        if not parts:
            h, w, c = self.image_shape
            return (np.zeros((0, h, w, c), np.float32), np.zeros((0, h, w, c), np.float32),
                    np.zeros((0, h, w, 1), np.float32))
        return tuple(np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(3))

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        poisoned, _, _ = self.trigger_components(images)
        return to_uint8(poisoned * 255.0)

    # -- training --------------------------------------------------------------------------------

    def init_trigger_networks(self, rng: jax.Array) -> tuple[Variables, Variables]:
        """Fresh (untrained) generator and mask-network variables; also installs them, so that
        `apply` works before (or without) `fit`.

        The initialisers run from an RBG key derived from `rng`: XLA:CPU takes tens of seconds
        to compile threefry-based initialisation of these deep conv nets, RBG a few (same
        distributions, other draws).
        """
        seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
        fast = jax.random.key(seed, impl="rbg")
        dummy = jnp.zeros((1, *self.image_shape), jnp.float32)

        @xla.jit
        def init(key: jax.Array) -> tuple[Variables, Variables]:
            k_g, k_m = jax.random.split(key)
            return self.generator.init(k_g, dummy), self.mask_net.init(k_m, dummy)

        g_vars, m_vars = jax.device_get(init(fast))
        self.generator_variables, self.mask_variables = g_vars, m_vars
        return g_vars, m_vars

    def batch_counts(self, batch_size: int, ratio: float) -> tuple[int, bool]:
        """(n, random): n backdoor and n cross images per batch; `random`: the low-ratio case
        where they are used only with probability ratio * batch_size."""
        expected = ratio * batch_size
        n = 1 if expected < 1.0 else int(expected)
        if 2 * n > batch_size:
            raise ValueError(f"input_aware: ratio {ratio} leaves no room for {n} backdoor and "
                             f"{n} cross images in a batch of {batch_size}; use ratio <= 0.5")
        return n, expected < 1.0

    def fit(self, *, ds: Any, model: nn.Module, fit_config: Any, ratio: float,
            ctx: StageContext, rng: jax.Array, **kwargs: Any) -> None:
        """Trains the mask network, then classifier + generator (resumable stages)."""
        del kwargs
        from ftsam_jax.training.recipe import make_optimizer

        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"poison ratio must lie in (0, 1], got {ratio}")
        cfg = dataclasses.replace(fit_config, sam=False)
        x, y = ds.x_train, np.asarray(ds.y_train, np.int32)
        n_ex, bs = len(y), cfg.batch_size
        num_bd, random = self.batch_counts(bs, ratio)
        spe = steps_per_epoch(n_ex, bs, cfg.drop_last)
        mask_epochs = (max(1, round(cfg.epochs / 4)) if self.mask_epochs is None
                       else self.mask_epochs)
        k_net, k_c, k_s1, k_s2 = jax.random.split(rng, 4)
        dummy = jnp.zeros((1, *x.shape[1:]), jnp.float32)
        saved = None if ctx.workdir is None else Path(ctx.workdir) / NETWORKS_DIR
        if saved is not None and saved.is_dir():  # finished earlier: its final networks
            template = {"classifier": jax.eval_shape(partial(model.init, train=False), k_c,
                                                     dummy),
                        "generator": jax.eval_shape(self.generator.init, k_c, dummy),
                        "mask": jax.eval_shape(self.mask_net.init, k_c, dummy)}
            v = load_variables(saved, template)
            self.trained_variables = v["classifier"]
            self.generator_variables, self.mask_variables = v["generator"], v["mask"]
            return
        mesh = ctx.mesh
        repl = parallel.replicated(mesh)
        xd, yd = jax.device_put(x, repl), jax.device_put(y, repl)

        @partial(xla.jit, out_shardings=repl)
        def shuffled(images: jax.Array, key: jax.Array) -> jax.Array:
            return images[jax.random.permutation(key, images.shape[0])]

        def preprocess(batch: dict[str, Any], key: jax.Array) -> dict[str, Any]:
            x1, x2 = to_float(batch["image"]), to_float(batch["image2"])
            if cfg.augment:
                k1, k2 = jax.random.split(key)
                x1, x2 = crop_flip(k1, x1), crop_flip(k2, x2)
            return {**batch, "image": x1, "image2": x2}

        def stage(name: str, state: Any, step: Any, epochs: int, key: jax.Array,
                  evaluate: Any = None) -> Any:
            state, _ = train_stage(Stage(
                name, state, epochs, step=step, data={"image": xd, "label": yd}, batch_size=bs,
                drop_last=cfg.drop_last, preprocess=preprocess,
                epoch_data=lambda d, k: {"image2": shuffled(d["image"], k)},
                evaluate=evaluate, rng=key), ctx)
            return jax.device_get(state)

        # Stage 1: the mask network.
        g_vars, m_vars = self.init_trigger_networks(k_net)
        m_tx = optax.adam(_multistep(self.generator_lr, spe, mask_epochs), b1=0.5, b2=0.9)
        m_state = MaskState(step=jnp.zeros([], jnp.int32), params=m_vars["params"],
                            batch_stats=m_vars["batch_stats"],
                            opt_state=m_tx.init(m_vars["params"]))
        if mask_epochs > 0:
            m_state = stage("input_aware_mask", m_state, partial(self._mask_step, tx=m_tx),
                            mask_epochs, k_s1)
        m_vars = {"params": m_state.params, "batch_stats": m_state.batch_stats}

        # Stage 2: classifier + generator.
        c_vars = jax.device_get(xla.jit(partial(model.init, train=False))(k_c, dummy))
        c_tx = make_optimizer(cfg, n_ex)
        g_tx = optax.adam(self.generator_lr, b1=0.5, b2=0.9)
        j_state = JointState(
            step=jnp.zeros([], jnp.int32), c_params=c_vars["params"],
            c_stats=c_vars.get("batch_stats", {}), c_opt=c_tx.init(c_vars["params"]),
            g_params=g_vars["params"], g_stats=g_vars["batch_stats"],
            g_opt=g_tx.init(g_vars["params"]), m_vars=m_vars)
        evaluate = evaluate_variables(
            ctx, lambda st: {"params": st.c_params, "batch_stats": st.c_stats})
        step = partial(self._joint_step, model=model, c_tx=c_tx, g_tx=g_tx, num_bd=num_bd,
                       gate_prob=ratio * bs if random else None,
                       label_smoothing=cfg.label_smoothing)
        j_state = stage("input_aware_joint", j_state, step, cfg.epochs, k_s2, evaluate)
        self.trained_variables = {"params": j_state.c_params, "batch_stats": j_state.c_stats}
        self.generator_variables = {"params": j_state.g_params, "batch_stats": j_state.g_stats}
        self.mask_variables = j_state.m_vars
        if saved is not None:
            save_variables(saved, {"classifier": self.trained_variables,
                                   "generator": self.generator_variables,
                                   "mask": self.mask_variables})

    def _mask_step(self, state: MaskState, batch: dict[str, Any], rng: jax.Array, *,
                   tx: optax.GradientTransformation) -> tuple[MaskState, dict[str, jax.Array]]:
        del rng
        x1, x2 = batch["image"], batch["image2"]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array, jax.Array]]:
            o1, upd = self.mask_net.apply({"params": params, "batch_stats": state.batch_stats},
                                          x1, train=True, mutable=["batch_stats"])
            o2, upd = self.mask_net.apply({"params": params, **upd}, x2, train=True,
                                          mutable=["batch_stats"])
            m1, m2 = threshold(o1), threshold(o2)
            norm = jnp.mean(jax.nn.relu(m1 - self.mask_density))
            div = diversity_loss(x1, x2, m1, m2)
            loss = self.lambda_norm * norm + self.lambda_div * div
            return loss, (upd["batch_stats"], norm, div)

        (loss, (stats, norm, div)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=stats, opt_state=opt_state)
        return new, {"loss": loss, "norm": norm, "diversity": div}

    def _joint_step(self, state: JointState, batch: dict[str, Any], rng: jax.Array, *,
                    model: nn.Module, c_tx: optax.GradientTransformation,
                    g_tx: optax.GradientTransformation, num_bd: int, gate_prob: float | None,
                    label_smoothing: float) -> tuple[JointState, dict[str, jax.Array]]:
        x1, y1, x2 = batch["image"], batch["label"], batch["image2"]
        nb = num_bd
        gate = (jnp.asarray(True) if gate_prob is None
                else jax.random.bernoulli(rng, gate_prob))
        xb, xc, x2c = x1[:nb], x1[nb:2 * nb], x2[nb:2 * nb]
        yb = self.poison_labels_jnp(y1[:nb])
        yb = jnp.where(gate, yb, y1[:nb])
        mb = threshold(self.mask_net.apply(state.m_vars, xb, train=False))
        mc = threshold(self.mask_net.apply(state.m_vars, x2c, train=False))

        def loss_fn(cp: Any, gp: Any):
            pb, upd = self.generator.apply({"params": gp, "batch_stats": state.g_stats}, xb,
                                           train=True, mutable=["batch_stats"])
            pc, upd = self.generator.apply({"params": gp, **upd}, x2c, train=True,
                                           mutable=["batch_stats"])
            bd_x = jnp.where(gate, xb + (pb - xb) * mb, xb)
            cross_x = jnp.where(gate, xc + (pc - xc) * mc, xc)
            inputs = jnp.concatenate([bd_x, cross_x, x1[2 * nb:]])
            labels = jnp.concatenate([yb, y1[nb:]])
            logits, c_upd = model.apply({"params": cp, "batch_stats": state.c_stats}, inputs,
                                        train=True, mutable=["batch_stats"])
            ce = cross_entropy(logits, labels, label_smoothing).mean()
            div = self.lambda_div * diversity_loss(xb, x2c, pb, pc) * gate
            aux = (logits, labels, c_upd.get("batch_stats", state.c_stats),
                   upd["batch_stats"], ce, div)
            return ce + div, aux

        (loss, (logits, labels, c_stats, g_stats, ce, div)), (gc, gg) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state.c_params, state.g_params)
        c_upd, c_opt = c_tx.update(gc, state.c_opt, state.c_params)
        g_upd, g_opt = g_tx.update(gg, state.g_opt, state.g_params)
        new = state.replace(step=state.step + 1,
                            c_params=optax.apply_updates(state.c_params, c_upd), c_stats=c_stats,
                            c_opt=c_opt, g_params=optax.apply_updates(state.g_params, g_upd),
                            g_stats=g_stats, g_opt=g_opt)
        hit = jnp.argmax(logits, -1) == labels
        # train_* names: the per-epoch evaluation (ctx.evaluate) reports "asr" etc.
        metrics = {"loss": loss, "ce": ce, "diversity": div, "accuracy": jnp.mean(hit),
                   "train_asr": jnp.mean(hit[:nb]), "train_cross_acc": jnp.mean(hit[nb:2 * nb])}
        if 2 * nb < hit.shape[0]:
            metrics["train_clean_acc"] = jnp.mean(hit[2 * nb:])
        return new, metrics

    def poison_labels_jnp(self, labels: jax.Array) -> jax.Array:
        """`poison_labels` inside jit."""
        if self.all_to_all:
            return ((labels + 1) % self.num_classes).astype(labels.dtype)
        return jnp.full_like(labels, self.target)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "mask_density": self.mask_density,
                "lambda_div": self.lambda_div, "lambda_norm": self.lambda_norm,
                "mask_epochs": self.mask_epochs, "generator_lr": self.generator_lr,
                "generator_width": self.generator_width, "generator_steps": self.generator_steps}
