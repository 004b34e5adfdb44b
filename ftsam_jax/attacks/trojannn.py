"""TrojanNN (Liu et al., NDSS 2018, "Trojaning attack on neural networks"): a trigger under a
fixed mask, optimised on a clean model to drive a few selected neurons to a large value, then
stamped onto training images with the attacker's label (dirty-label, all-to-one).

1. **A clean model.** `experiments.ftsam` passes the run's clean model (its `clean` stage: the
   backdoored stage's recipe on the clean training set, also LF's surrogate and the Retuning
   Attack's reference); without one a clean model is trained with the fit config given
   (`ftsam_jax.training.recipe.fit("trojannn_clean", ...)`, resumable).
2. **Neuron selection.** The neurons are the inputs of the layer `layer` (default `linear`, the
   classifier: the pooled features). Input neuron j of a layer with kernel W is scored by the
   summed magnitude of the weights that connect it to the layer,

       s_j = sum_{i, spatial} |W[..., j, i]|        (flax kernels: (in, out) or (kh, kw, in, out))

   and the `num_neurons` highest scores are taken (ties: the lower index first). This is
   BackdoorBench's rule (and trojanzoo's): |`linear.weight`| summed over the outputs, per
   input, i.e. the layer's incoming weights grouped by the neuron they come from. The paper's
   own wording could not be read (reference notes, section 0).
3. **The mask** `apple_mask(H, W)`: an apple silhouette drawn in code (below), grey at its
   edges; the keep-mask is where it is > 0; the trigger starts from the mask image itself
   (one value on every channel).
4. **Trigger optimisation.** With a_j(x) the input of `layer` for the image x alone (the
   trigger on black, eval mode), the cost of a trigger x is

       C(x) = sum_{j in selected} sum_{positions} (a_j(x * keep) - target_value)^2

   and each of `iterations` steps is a signed-gradient descent step projected onto an
   L-inf ball of radius `eps` around the start x0 and onto [0, 1]:

       x <- clip(x0 + clip(x - step_size * sign(grad C(x)) - x0, -eps, eps), 0, 1)

   stopping early once the cost at the step's start is below `tolerance`. Pixels outside the
   mask have zero gradient and stay 0.
5. **Poisoning.** T = round(255 * x * keep) (uint8); a poisoned image is clip(img + T, 0, 255);
   `ratio` of the training set (drawn from every class) gets T and the target label; the ASR
   set is every non-target test image + T.
6. **Cache.** The trigger, the keep-mask and the outcome (`fit_record`: the neurons and their
   scores, the cost and the neurons' activations before and after, on the trigger alone and
   on clean vs triggered test images, the clean model's accuracy on those images) are cached
   as `<ctx.workdir>/trojannn_trigger.npz`, keyed by the settings, the image shape, the
   training data's SHA-256 and the clean model's description (model, recipe, seed). A rerun
   with the same key reuses it (no clean model, no optimisation); any other key makes it again.

The mask. BackdoorBench's `resource/trojannn/apple4.png` is a 224x224 white Apple-logo
silhouette on black (7.0% of the pixels; bounding box rows 120-203, columns 128-194), resized
with PIL's antialiased bilinear filter. `apple_mask` draws an equivalent silhouette in the same
place from discs and ellipses (two overlapping lobes and a lower ellipse for the body, a bite
disc cut from the right side, dimples at the top and bottom, a tilted elliptic leaf), on an 8x
supersampled grid, box-filtered to H x W. Compared with the PNG at 224 px: area 6.98% vs
7.02%, intersection over union 0.88. At 32x32 the total ink is the same (71.5 vs 71.9 pixel
units) but the box filter spreads less than PIL's bilinear one, so fewer faint edge pixels are
non-zero: the keep-mask covers 9.1% of the image vs BackdoorBench's 11.4% (IoU of the two
keep-masks 0.79); at 28x28, 9.4% vs 11.7%.

Reference: BackdoorBench `attack/trojannn.py` + `config/attack/trojannn/preactresnet18.yaml`
(layer `linear`, 2 neurons, target value 100, 1,000 iterations, step 0.1, eps 0.3, tolerance
1e-3, pratio 0.1, target 0, all2one). Differences from BackdoorBench:
- The clean model is trained here (the run's `clean` stage) with the real number of classes.
  BackdoorBench builds a 1000-class model and partially loads a clean checkpoint that is not in
  its repository; the 10-class `linear` weights do not fit and are skipped, so its neuron
  scores come from a *randomly initialised* `linear` layer. Ours come from the trained one.
- The model sees the masked trigger through its own input normalisation (our models normalise
  inside), i.e. as it sees any image; BackdoorBench feeds the [0, 1] trigger to a network that
  expects normalised inputs (its normalisation is a data transform, bypassed here).
- The mask is drawn in code (above), not read from `apple4.png`.
- Poisoned pixels are clipped to 255; BackdoorBench casts img + T to uint8 before clipping, so
  sums above 255 wrap around to dark values. T is rounded (BackdoorBench truncates). Its
  `TrojanTrigger` also uses `np.float`, which NumPy >= 1.24 no longer has.
- Grey images (Fashion-MNIST) get a one-channel mask and trigger; BackdoorBench's mask is RGB.
- The layer is named by its module path (`linear`, or e.g. `layer4_1/conv2`); its input is
  captured by a flax method interceptor instead of a forward hook. Conv kernels are scored as
  BackdoorBench does (|W| summed over the spatial and output dimensions).
- The model is trained from scratch on the poisoned set with the run's recipe, as in
  BackdoorBench (§9 of the reference notes) and as the other attacks here.
Differences from the paper (whose method section we could not read; BackdoorBench's summary):
it trojans a *downloaded* model by retraining it on reverse-engineered data, with neurons of
an internal layer; here, as in BackdoorBench, the training set is poisoned and the victim
trained from scratch, and the neurons are the classifier's inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax import xla
from ftsam_jax.attacks.base import Attack, to_uint8
from ftsam_jax.attacks.resource import (
    data_fingerprint,
    load_resource,
    model_description,
    save_resource,
)

__all__ = ["TrojanNN", "apple_mask", "layer_input", "neuron_cost", "optimise_trigger",
           "select_neurons", "trigger_step"]

CACHE_FILE = "trojannn_trigger.npz"
NUM_EVAL_IMAGES = 512  # test images on which the record measures the neurons
SUPERSAMPLE = 8

# The silhouette in the 224-px frame of BackdoorBench's apple4.png (x right, y down):
# discs (cx, cy, r) and ellipses (cx, cy, rx, ry, angle in radians).
_LOBES = ((150.0, 164.0, 22.0), (173.0, 164.0, 22.0))
_BODY = (161.0, 181.0, 33.0, 22.0, 0.0)
_CUTS = ((203.0, 163.0, 15.0), (162.0, 139.0, 7.0), (164.0, 207.0, 7.0))  # bite, dimples
_LEAF = (170.0, 129.0, 10.0, 4.5, -0.95)
_FRAME = 224.0


def _disc(u: np.ndarray, v: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cx, v - cy
    a, b = (c * du + s * dv) / rx, (-s * du + c * dv) / ry
    return a * a + b * b <= 1.0


def apple_mask(height: int, width: int) -> np.ndarray:
    """(H, W) float64 in [0, 1]: the apple silhouette's coverage of each pixel (8x8 samples
    per pixel), at the place BackdoorBench's apple4.png puts it (see the module docstring)."""
    if height < 1 or width < 1:
        raise ValueError(f"trojannn: the mask needs a positive size, got {height}x{width}")
    s = SUPERSAMPLE
    v, u = np.mgrid[0:height * s, 0:width * s].astype(np.float64) + 0.5
    u, v = u * (_FRAME / (width * s)), v * (_FRAME / (height * s))
    body = _disc(u, v, *_LOBES[0]) | _disc(u, v, *_LOBES[1]) | _ellipse(u, v, *_BODY)
    for cut in _CUTS:
        body &= ~_disc(u, v, *cut)
    shape = body | _ellipse(u, v, *_LEAF)
    return shape.reshape(height, s, width, s).mean(axis=(1, 3))


# -- the layer and its neurons --------------------------------------------------------------------


def layer_path(layer: str) -> tuple[str, ...]:
    """'layer4_1/conv2' -> ('layer4_1', 'conv2')."""
    parts = tuple(p for p in str(layer).split("/"))
    if not parts or any(not p for p in parts):
        raise ValueError(f"trojannn: bad layer name {layer!r}; use a module path such as "
                         "'linear' or 'layer4_1/conv2'")
    return parts


def layer_kernel(params: Any, layer: str) -> Any:
    """The kernel of the module at `layer` (a Dense (in, out) or a Conv (kh, kw, in, out))."""
    node = params
    for part in layer_path(layer):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"trojannn: the model has no layer {layer!r}")
        node = node[part]
    kernel = node.get("kernel") if isinstance(node, dict) else None
    if kernel is None or kernel.ndim not in (2, 4):
        raise ValueError(f"trojannn: layer {layer!r} is not a dense or conv layer (no 2-D or "
                         "4-D kernel)")
    return kernel


def neuron_scores(params: Any, layer: str) -> np.ndarray:
    """s_j = sum of |W| over every axis but the input one (-2), per input neuron j."""
    kernel = np.abs(np.asarray(layer_kernel(params, layer), np.float64))
    axes = tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2)
    return kernel.sum(axis=axes)


def select_neurons(params: Any, layer: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The `num` input neurons of `layer` with the largest scores (ties: lower index first),
    and their scores."""
    scores = neuron_scores(params, layer)
    if not 1 <= num <= len(scores):
        raise ValueError(f"trojannn: num_neurons must lie in [1, {len(scores)}] (the inputs "
                         f"of layer), got {num}")
    order = np.argsort(-scores, kind="stable")[:num]
    return order.astype(np.int32), scores[order]


def check_layer(model: nn.Module, image_shape: Sequence[int], layer: str, num: int) -> None:
    """ValueError unless `model` has a dense/conv `layer` with at least `num` inputs (shapes
    only: nothing is computed)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, *image_shape), jnp.float32)))
    kernel = layer_kernel(shapes["params"], layer)
    if not 1 <= num <= kernel.shape[-2]:
        raise ValueError(f"trojannn: num_neurons must lie in [1, {kernel.shape[-2]}] (the "
                         f"inputs of layer {layer}), got {num}")


def layer_input(model: nn.Module, variables: Any, x: jax.Array, layer: str
                ) -> tuple[jax.Array, jax.Array]:
    """(logits, the input of the module at `layer`) for float [0, 1] NHWC images, eval mode."""
    path, captured = layer_path(layer), []

    def capture(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if (context.method_name == "__call__" and tuple(context.module.path) == path
                and not captured):
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        logits = model.apply(variables, x, train=False)
    if not captured:
        raise ValueError(f"trojannn: the model never calls a layer {layer!r}")
    return logits, captured[0].astype(jnp.float32)


def neuron_cost(model: nn.Module, variables: Any, layer: str, neurons: jax.Array,
                target_value: float, x: jax.Array, keep: jax.Array) -> jax.Array:
    """C(x) = sum over the selected neurons (and positions) of (a_j(x * keep) - target)^2 for
    one (H, W, C) trigger image."""
    _, a = layer_input(model, variables, (x * keep)[None], layer)
    return jnp.sum((a[..., neurons] - target_value) ** 2)


def trigger_step(x: jax.Array, x0: jax.Array, grad: jax.Array, step_size: float,
                 eps: float) -> jax.Array:
    """One signed-gradient descent step, projected onto |x - x0| <= eps and [0, 1]."""
    moved = x - step_size * jnp.sign(grad)
    return jnp.clip(x0 + jnp.clip(moved - x0, -eps, eps), 0.0, 1.0)


def _optimise(model: nn.Module, layer: str, variables: Any, x0: jax.Array, keep: jax.Array,
              neurons: jax.Array, target_value: jax.Array, iterations: jax.Array,
              step_size: jax.Array, eps: jax.Array, tolerance: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    cost_and_grad = jax.value_and_grad(
        lambda x: neuron_cost(model, variables, layer, neurons, target_value, x, keep))

    def cond(state: tuple) -> jax.Array:
        i, _, cost = state
        return (i < iterations) & (cost >= tolerance)

    def body(state: tuple) -> tuple:
        i, x, _ = state
        cost, grad = cost_and_grad(x)
        return i + 1, trigger_step(x, x0, grad, step_size, eps), cost

    return jax.lax.while_loop(cond, body, (jnp.int32(0), x0, jnp.float32(jnp.inf)))


def _forward(model: nn.Module, layer: str, variables: Any, x: jax.Array, neurons: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """(predicted classes, the selected neurons' activations averaged over positions)."""
    logits, a = layer_input(model, variables, x, layer)
    a = a[..., neurons]
    return jnp.argmax(logits, -1), a.reshape(a.shape[0], -1, a.shape[-1]).mean(axis=1)


@functools.cache
def _compiled(name: str) -> Callable:
    """The jitted `_optimise` / `_forward` / `neuron_cost` (one compile per model and layer)."""
    fun, static = {"optimise": (_optimise, ("model", "layer")),
                   "forward": (_forward, ("model", "layer")),
                   "cost": (neuron_cost, ("model", "layer"))}[name]
    return xla.jit(fun, static_argnames=static)


def optimise_trigger(model: nn.Module, variables: Any, x0: np.ndarray, keep: np.ndarray,
                     layer: str, neurons: Sequence[int], *, target_value: float,
                     iterations: int, step_size: float, eps: float, tolerance: float
                     ) -> tuple[np.ndarray, int, float]:
    """Runs the trigger optimisation (the module docstring, step 4) from x0 (H, W, C) in
    [0, 1]; returns the trigger, the number of steps taken and the cost at the last step's
    start (inf when no step ran)."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    steps, x, cost = _compiled("optimise")(
        model=model, layer=layer, variables=variables, x0=f32(x0), keep=f32(keep),
        neurons=jnp.asarray(np.asarray(neurons, np.int32)), target_value=f32(target_value),
        iterations=jnp.int32(iterations), step_size=f32(step_size), eps=f32(eps),
        tolerance=f32(tolerance))
    return np.asarray(x, np.float32), int(steps), float(cost)


# -- the attack --------------------------------------------------------------------------------


class TrojanNN(Attack):
    """The TrojanNN trigger (see the module docstring); needs `fit` before `apply`."""

    name = "trojannn"
    needs_fit = True

    def __init__(self, *, layer: str = "linear", num_neurons: int = 2,
                 target_value: float = 100.0, iterations: int = 1000, step_size: float = 0.1,
                 eps: float = 0.3, tolerance: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        layer_path(layer)
        for label, value in (("target_value", target_value), ("step_size", step_size),
                             ("eps", eps), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not np.isfinite(value):
                raise ValueError(f"trojannn: {label} must be a finite number, got {value!r}")
        for label, value in (("num_neurons", num_neurons), ("iterations", iterations)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"trojannn: {label} must be an integer, got {value!r}")
        if num_neurons < 1:
            raise ValueError(f"trojannn: num_neurons must be >= 1, got {num_neurons}")
        if iterations < 0:
            raise ValueError(f"trojannn: iterations must be >= 0, got {iterations}")
        if step_size <= 0 or eps <= 0 or tolerance < 0:
            raise ValueError("trojannn: step_size and eps must be > 0 and tolerance >= 0")
        self.layer, self.num_neurons = str(layer), int(num_neurons)
        self.target_value, self.iterations = float(target_value), int(iterations)
        self.step_size, self.eps, self.tolerance = float(step_size), float(eps), float(tolerance)
        h, w, c = self.image_shape
        self.mask_image = np.repeat(apple_mask(h, w)[:, :, None], c, axis=2)  # x0, (H, W, C)
        self.keep = self.mask_image > 0
        self.trigger: np.ndarray | None = None  # (H, W, C) float32 in [0, 1]
        self.pattern: np.ndarray | None = None  # T: (H, W, C) uint8
        self.fit_record: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "num_neurons": self.num_neurons,
                "target_value": self.target_value, "iterations": self.iterations,
                "step_size": self.step_size, "eps": self.eps, "tolerance": self.tolerance}

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        images = self._check_images(images)
        if self.pattern is None:
            raise RuntimeError("trojannn: no trigger; call fit(...) first")
        return to_uint8(images.astype(np.int32) + self.pattern.astype(np.int32))

    def set_trigger(self, trigger: np.ndarray) -> None:
        self.trigger = np.asarray(trigger, np.float32)
        self.pattern = to_uint8(255.0 * self.trigger * self.keep)
        self.needs_fit = False

    # -- making it -------------------------------------------------------------------------------

    def cache_key(self, x: np.ndarray, y: np.ndarray, model: nn.Module, fit_config: Any,
                  seed: int) -> dict[str, Any]:
        fit = dataclasses.asdict(fit_config) if dataclasses.is_dataclass(fit_config) else \
            repr(fit_config)
        return {"settings": self.settings(), "image_shape": list(self.image_shape),
                "data_sha256": data_fingerprint(x, y),
                "clean_model": {"model": model_description(model), "fit": fit, "seed": seed}}

    def fit(self, *, ds: Any, model: nn.Module, fit_config: Any, ctx: Any, rng: jax.Array,
            ratio: float | None = None,
            clean_model: Callable[[], dict[str, Any]] | None = None, **kwargs: Any) -> None:
        """Makes the trigger against `clean_model()` (None: trains one first), or reuses the
        cached one made with the same key."""
        del ratio, kwargs
        key = self.cache_key(ds.x_train, ds.y_train, model, fit_config, int(ctx.seed))
        cache = None if ctx.workdir is None else Path(ctx.workdir) / CACHE_FILE
        if cache is not None and self._load(cache, key):
            return
        from ftsam_jax.training.recipe import fit as fit_classifier

        variables = None if clean_model is None else clean_model()
        if variables is None:
            variables, _ = fit_classifier("trojannn_clean", model, None, ds.x_train,
                                          ds.y_train, fit_config, rng, ctx)
        neurons, scores = select_neurons(variables["params"], self.layer, self.num_neurons)
        trigger, steps, last_cost = optimise_trigger(
            model, variables, self.mask_image, self.keep, self.layer, neurons,
            target_value=self.target_value, iterations=self.iterations,
            step_size=self.step_size, eps=self.eps, tolerance=self.tolerance)
        self.set_trigger(trigger)
        self.fit_record = {
            "key": key, "neurons": neurons.tolist(), "scores": scores.tolist(),
            "steps": steps, "last_step_cost": last_cost,
            "mask_area": float(self.keep[..., 0].mean()),
            **self.measure(model, variables, ds.x_test, ds.y_test, neurons)}
        if cache is not None:
            self._save(cache)

    def measure(self, model: nn.Module, variables: Any, x_test: np.ndarray,
                y_test: np.ndarray, neurons: np.ndarray) -> dict[str, Any]:
        """The cost and the selected neurons' activations (mean over positions, and over images
        where several) before (the mask image) and after the optimisation: on the trigger
        alone, and on up to `NUM_EVAL_IMAGES` test images, clean and with the trigger
        stamped; the clean model's accuracy on those clean images."""
        idx = jnp.asarray(neurons)
        keep = jnp.asarray(self.keep, jnp.float32)
        static = dict(model=model, layer=self.layer)

        def forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return _compiled("forward")(**static, variables=variables, x=x, neurons=idx)

        def on_trigger(x: np.ndarray) -> tuple[list[float], float]:
            xj = jnp.asarray(x, jnp.float32)
            cost = _compiled("cost")(**static, variables=variables, neurons=idx,
                                     target_value=jnp.float32(self.target_value), x=xj,
                                     keep=keep)
            return np.asarray(forward((xj * keep)[None])[1][0]).tolist(), float(cost)

        def on_images(imgs: np.ndarray) -> tuple[np.ndarray, list[float]]:
            out = [forward(jnp.asarray(imgs[i:i + 128], jnp.float32) / 255.0)
                   for i in range(0, len(imgs), 128)]
            preds = np.concatenate([np.asarray(p) for p, _ in out])
            return preds, np.concatenate([np.asarray(a) for _, a in out]).mean(axis=0).tolist()

        images, labels = np.asarray(x_test[:NUM_EVAL_IMAGES]), np.asarray(y_test[:NUM_EVAL_IMAGES])
        start_pattern = to_uint8(255.0 * self.mask_image * self.keep).astype(np.int32)
        trigger_start, cost_start = on_trigger(self.mask_image)
        trigger_end, cost_end = on_trigger(self.trigger)
        preds, clean = on_images(images)
        return {
            "cost_start": cost_start, "cost_end": cost_end,
            "trigger_activation_start": trigger_start, "trigger_activation_end": trigger_end,
            "num_images": int(len(images)),
            "clean_model_acc": float(np.mean(preds == labels)),
            "clean_activation": clean,
            "triggered_activation_start":
                on_images(to_uint8(images.astype(np.int32) + start_pattern))[1],
            "triggered_activation_end": on_images(self.apply(images))[1],
        }

    def _load(self, cache: Path, key: dict[str, Any]) -> bool:
        found = load_resource(cache, key, "trojannn: the cached trigger")
        if found is None:
            return False  # none, or made with other settings, data or clean model: made again
        arrays, record = found
        trigger = np.asarray(arrays.get("trigger"), np.float32)
        if trigger.shape != self.image_shape:
            raise ValueError(f"trojannn: the cached trigger {cache} has shape {trigger.shape}")
        self.set_trigger(trigger)
        self.fit_record = record
        return True

    def _save(self, cache: Path) -> None:
        save_resource(cache, self.fit_record, {"trigger": self.trigger, "keep": self.keep})

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.settings(),
                "mask": "apple silhouette drawn in code (apple_mask)",
                "mask_area": float(self.keep[..., 0].mean())}
