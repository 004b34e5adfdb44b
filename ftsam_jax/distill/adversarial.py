"""MI-DI-FGSM against the frozen teacher: the adversarial images of IKD's adversarial feature
augmentation (AFA).

**The official rule** (JWLiang007/IKD @ 2c7d605b, `tools/adversarial/difgsm.py`, driven by
`tools/ta_GT.py --method difgsm --eps 8 --alpha 2 --steps 5` with the CLI defaults decay 1.0,
resize_rate 0.9, diversity_prob 0.5, no random start), untargeted, L-inf, ascending the teacher's
classification loss on the ground truth (here: its cross-entropy), teacher in eval mode:

    m_0 = 0,  x^(0) = x_0
    for k = 0 .. K-1:
        g       = grad_x L(T(DI(x^(k))), y)          DI with probability p, else identity
        m_{k+1} = g / ||g||_1 + mu * m_k              per-example L1 norm over all pixels
        x^(k+1) = clip_range(x_0 + clip(x^(k) + a * sign(m_{k+1}) - x_0, -eps, eps))

DI(x) (torchattacks' input diversity as copied there): rescale the W x W image to r x r,
r ~ U{floor(0.9 W), ..., W - 1}, bilinear with align_corners=False, then zero-pad back to
W x W at offsets top, left ~ U{0, ..., W - r - 1}; the gradient flows through DI.

The images are generated **once, offline** by the official code and stored as image files
(`precompute_adversarial`, uint8 here), so they are teacher-specific and student-agnostic;
`mi_di_fgsm` can also run inside a training step (the on-the-fly option of
`ftsam_jax.distill.step`).

Differences from the official code, all deliberate:

- Pixel space [0, 1] with eps = 8/255 and a = 2/255 (the model normalises inside). The
  official attack runs on mean/std-normalised images with eps and a scaled by the image's
  largest per-channel range, about 8 and 2 grey levels, i.e. the same budget.
- `clip="image"` (default) clips to each image's own per-channel [min, max], as the official
  code does; `clip="unit"` clips to [0, 1]. Either way the result stays in [0, 1].
- The official attack runs with batch size 1, so its DI coin and sizes are per example; here
  they are drawn per example too. `precompute_adversarial` gives example i its own key, so the
  stored images do not depend on the batch size or the device count.
- DI on a non-square H x W image scales both axes by r / W inside a fixed H x W canvas (the
  official code resizes to a square, its "square DI" quirk, and changes the shape).
- DI pads with `pad_value` in pixel space (None: 0, black, as torchattacks does on [0, 1]
  inputs). The official code pads normalised images with 0, i.e. with the normalisation mean's
  colour: set `pad_value` to the model's mean to reproduce that (the `ikd` defense does when
  `pad_value` is None and the model has a mean).
- ||g||_1 = 0 (a saturated teacher) gives a zero step instead of the official NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ftsam_jax import parallel, xla
from ftsam_jax.distill.augment import bilinear_matrix, resize_window
from ftsam_jax.training.epoch import to_float
from ftsam_jax.training.step import cross_entropy

__all__ = ["AttackConfig", "diversity_from_uniforms", "eval_apply", "input_diversity",
           "mi_di_fgsm", "precompute_adversarial", "to_uint8"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """MI-DI-FGSM settings (defaults: the official `ta_GT.py` run).

    Attributes:
      eps: L-inf radius on the [0, 1] scale (8/255).
      step_size: per-step size a (2/255).
      steps: iterations K (5).
      decay: momentum factor mu (1.0).
      diversity_prob: probability p of input diversity per example and step (0.5).
      resize_rate: DI's smallest relative size (0.9); must lie in (0, 1].
      clip: "image" (each image's per-channel [min, max], official) or "unit" ([0, 1]).
      pad_value: DI's padding colour in [0, 1] (a float or one value per channel); None: 0.
    """

    eps: float = 8.0 / 255.0
    step_size: float = 2.0 / 255.0
    steps: int = 5
    decay: float = 1.0
    diversity_prob: float = 0.5
    resize_rate: float = 0.9
    clip: str = "image"
    pad_value: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError("eps, step_size and steps must be >= 0")
        if not 0.0 < self.resize_rate <= 1.0:
            raise ValueError(f"resize_rate must lie in (0, 1], got {self.resize_rate}")
        if not 0.0 <= self.diversity_prob <= 1.0:
            raise ValueError("diversity_prob must lie in [0, 1]")
        if self.clip not in ("image", "unit"):
            raise ValueError(f"clip must be 'image' or 'unit', got {self.clip!r}")


def eval_apply(model: nn.Module) -> ApplyFn:
    """`(variables, x) -> logits` of a Flax model in inference mode (the frozen teacher)."""
    return lambda variables, x: model.apply(variables, x, train=False)


def input_diversity(rng: jax.Array, image: jax.Array, resize_rate: float = 0.9,
                    prob: float = 0.5, pad_value: float | tuple[float, ...] | None = None
                    ) -> jax.Array:
    """DI for one HWC image: with probability `prob`, rescale by r / W (r ~ U{floor(rate W),
    ..., W - 1}) and pad (with `pad_value`) at a random offset back into the fixed H x W
    canvas."""
    return diversity_from_uniforms(jax.random.uniform(rng, (4,)), image, resize_rate, prob,
                                   pad_value)


def diversity_from_uniforms(u: jax.Array, image: jax.Array, resize_rate: float = 0.9,
                            prob: float = 0.5,
                            pad_value: float | tuple[float, ...] | None = None) -> jax.Array:
    """`input_diversity` driven by four U[0, 1) draws (size, top, left, coin), so a whole
    attack needs one random call per example (each call site costs XLA compile time)."""
    h, w = image.shape[0], image.shape[1]
    low = int(w * resize_rate)
    if low >= w:
        return image
    r = jnp.minimum(low + jnp.floor(u[0] * (w - low)), w - 1)         # [low, W - 1]
    rh = jnp.maximum(1.0, jnp.round(h * r / w))                       # = r for square images
    top = jnp.minimum(jnp.floor(u[1] * jnp.maximum(h - rh, 1.0)), jnp.maximum(h - rh - 1, 0))
    left = jnp.minimum(jnp.floor(u[2] * (w - r)), w - r - 1)          # [0, W - r - 1]
    rows = bilinear_matrix(h, h, top, rh, 0, h)
    cols = bilinear_matrix(w, w, left, r, 0, w)
    out = resize_window(image, rows, cols)
    if pad_value is not None and np.any(np.asarray(pad_value) != 0):
        inside = rows.sum(1)[:, None, None] * cols.sum(1)[None, :, None]   # 1 in the window
        out = out + (1.0 - inside) * jnp.asarray(pad_value, jnp.float32)
    return jnp.where(u[3] < prob, out.astype(image.dtype), image)


def _diversity_draws(rng: jax.Array, n: int, steps: int) -> jax.Array:
    """(n, steps, 4) U[0, 1) draws for DI. A single key draws them in one flat call (cheap to
    compile); a batch of n keys gives example i its own draws from key i (so the result does
    not depend on the batch an example sits in)."""
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.random.uniform(rng, (n * steps * 4,)).reshape(n, steps, 4)
    if rng.shape != (n,):
        raise ValueError(f"got keys of shape {rng.shape} for {n} examples")
    return jax.vmap(lambda key: jax.random.uniform(key, (steps * 4,)))(rng).reshape(n, steps, 4)


def mi_di_fgsm(apply_fn: ApplyFn, variables: Any, images: jax.Array, labels: Any,
               rng: jax.Array, config: AttackConfig = AttackConfig(),
               objective: Callable[[Any, Any], jax.Array] | None = None) -> jax.Array:
    """Adversarial images (float32 NHWC in [0, 1]) against `apply_fn(variables, x) -> logits`.

    Args:
      apply_fn: the frozen teacher in inference mode (`eval_apply(model)`); no gradient flows
        into `variables`.
      images: NHWC, uint8 or float in [0, 1].
      labels: (N,) ground-truth classes; the attack ascends CE(T(x), y). With `objective`, any
        pytree of ground truth it takes (e.g. a detector's boxes, labels and mask).
      rng: one key, or a batch of N keys (example i draws from key i only).
      config: eps, step size, steps, momentum, DI.
      objective: `(outputs, labels) -> scalar` to ascend instead of the summed cross-entropy
        (for a detector: its classification loss on the ground truth, the official rule).

    Pure and jit-compatible; shard the batch over a mesh like any step (JAX's partitionable
    threefry makes the draws independent of the sharding).
    """
    x0 = to_float(images)
    n = x0.shape[0]
    variables = jax.lax.stop_gradient(variables)
    if config.clip == "image":
        lo = jnp.min(x0, axis=(1, 2), keepdims=True)
        hi = jnp.max(x0, axis=(1, 2), keepdims=True)
    else:
        lo, hi = jnp.zeros((), x0.dtype), jnp.ones((), x0.dtype)

    draws = _diversity_draws(rng, n, max(config.steps, 1))

    def loss(x: jax.Array, u: jax.Array) -> jax.Array:
        if config.diversity_prob > 0:
            x = jax.vmap(lambda uu, im: diversity_from_uniforms(
                uu, im, config.resize_rate, config.diversity_prob, config.pad_value))(u, x)
        outputs = apply_fn(variables, x)
        if objective is not None:
            return objective(outputs, labels)
        return jnp.sum(cross_entropy(outputs, labels))

    grad = jax.grad(loss)

    def step(k: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        x, momentum = carry
        g = grad(x, draws[:, k])
        norm = jnp.sum(jnp.abs(g), axis=(1, 2, 3), keepdims=True)
        g = g / jnp.where(norm > 0, norm, 1.0)
        momentum = g + config.decay * momentum
        x = x + config.step_size * jnp.sign(momentum)
        return jnp.clip(x0 + jnp.clip(x - x0, -config.eps, config.eps), lo, hi), momentum

    # A loop, not `steps` unrolled copies of the teacher's backward pass: tracing and compiling
    # it costs one step's (measured on the smoke detector: 4.5 s tracing + 10.7 s compiling for
    # the 5 unrolled steps on CPU).
    x, _ = jax.lax.fori_loop(0, config.steps, step, (x0, jnp.zeros_like(x0)))
    return jax.lax.stop_gradient(x)


def to_uint8(images: jax.Array) -> jax.Array:
    """[0, 1] floats -> uint8 by rounding (the official code writes image files)."""
    return jnp.clip(jnp.round(images * 255.0), 0, 255).astype(jnp.uint8)


def precompute_adversarial(apply_fn: ApplyFn, variables: Any, images: np.ndarray,
                           labels: Any, rng: jax.Array, *, mesh: Mesh,
                           batch_size: int = 256, config: AttackConfig = AttackConfig(),
                           objective: Callable[[Any, Any], jax.Array] | None = None,
                           ) -> np.ndarray:
    """Adversarial images for a whole training set, once, stored as uint8 (N, H, W, C).

    `labels` is an (N,) class array, or with `objective` any pytree of (N, ...) arrays (a
    detector's padded boxes, labels and mask); both are passed on to `mi_di_fgsm`.
    Example i uses the key fold_in(rng, i), so the result depends neither on `batch_size` nor
    on the number of devices. Batches are sharded over the mesh's 'data' axis (the last one is
    padded with zeros); `batch_size` is rounded up to a multiple of the device count. With uint8
    inputs the rounded result stays inside the eps-ball (|x_adv - x| <= round(255 eps) grey
    levels).
    """
    n = len(images)
    n_dev = mesh.devices.size
    batch_size = max(n_dev, -(-min(batch_size, max(n, 1)) // n_dev) * n_dev)
    repl = parallel.replicated(mesh)
    fn = _attack_program(apply_fn, config, objective, mesh)
    variables = jax.device_put(variables, repl)
    out = np.empty(images.shape, np.uint8)
    if objective is None:
        labels = np.asarray(labels, np.int32)

    def padded(a: np.ndarray, rows: slice) -> np.ndarray:
        a = np.asarray(a[rows])
        pad = batch_size - len(a)
        return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = padded(images, slice(start, stop))
        y = jax.tree.map(partial(padded, rows=slice(start, stop)), labels)
        idx = np.arange(start, start + batch_size, dtype=np.int32)
        out[start:stop] = np.asarray(fn(variables, x, y, idx, rng))[:stop - start]
    return out


@lru_cache(maxsize=8)
def _attack_program(apply_fn: ApplyFn, config: AttackConfig,
                    objective: Callable[[Any, Any], jax.Array] | None, mesh: Mesh) -> Any:
    """The jitted sharded attack of `precompute_adversarial`, one per (teacher, settings):
    a second call for the same teacher (e.g. its evaluation images after its training set)
    reuses the compiled program instead of tracing and compiling a new closure."""
    data, repl = parallel.data_sharding(mesh), parallel.replicated(mesh)

    def attack(v: Any, x: jax.Array, y: Any, idx: jax.Array, key: jax.Array) -> jax.Array:
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        return to_uint8(mi_di_fgsm(apply_fn, v, x, y, keys, config, objective=objective))

    return xla.jit(attack, in_shardings=(repl, data, data, data, repl), out_shardings=data)
