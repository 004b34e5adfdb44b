"""LC (Turner, Tsipras and Madry, 2019, "Label-consistent backdoor attacks"; the FT-SAM paper's
"CLA"): target-class training images made hard to classify by an adversarial perturbation, then
stamped with a four-corner trigger, *keeping their true label* (clean-label, all-to-one). A
network that cannot read these images from their content learns the trigger instead; at test
time the trigger alone (no perturbation) sends other classes' images to the target.

1. **The source model** (`source`). `"clean"`: the run's clean model (`experiments.ftsam`'s
   `clean` stage: the backdoored stage's recipe on the clean training set, shared with LF's
   surrogate, TrojanNN and the Retuning Attack; without one a model is trained with the fit
   config given, stage `lc_clean`). `"adversarial"`: a model adversarially trained here
   (Madry et al.'s PGD training: each batch, after augmentation, replaced by its L-inf PGD
   images within `at_eps` grey levels, a uniform random start, `at_steps` signed steps of
   `at_step_size`, the attack run with the model's current weights in training mode and its
   batch-statistics update dropped; the loss the cross-entropy on those images), with the
   backdoored stage's recipe otherwise (stage `lc_adversarial`, resumable). That costs
   `at_steps + 1` times a clean model, so the `paper` preset (accelerators) uses it and
   `cpu` / `smoke` use the clean model.
2. **The perturbation.** Every training image of the target class (x0 in [0, 1], label y) is
   attacked by untargeted L-inf PGD on the source model in evaluation mode, ascending the
   cross-entropy of its true label, no random start:

       x <- clip(x0 + clip(x + step_size * sign(grad_x CE(f(x), y)) - x0, -eps, eps), 0, 1)

   `steps` times (eps and step_size in grey levels / 255). The result is stored as uint8
   (rounded, then clipped to within floor(eps) grey levels of the original, so the stored
   perturbation never exceeds eps).
3. **The trigger** (`corner_pattern`): a 3x3 pattern of +1/-1 in each of the four corners (36
   pixels), the cells of BackdoorBench's "all-corners" trigger (taken from the official code):
   the left corners carry

       + - -
       - + -
       + - +

   (a checkerboard but for its top-right cell) and the right corners its left-right mirror.
   A triggered image is clip(x + 255 * amplitude * pattern, 0, 255) on every channel, rounded;
   at amplitude 1 the corners saturate to black and white. `amplitude` is the official code's
   "reduced amplitude" (0 < amplitude <= 1; its README's example is 32/255; the official
   code's and BackdoorBench's default is 1, ours too).
4. **Poisoning** (the clean-label plan of `Attack.plan`, as SIG): round(ratio * N) training
   indices drawn from the target class only (at most all of it; CIFAR-10 at ratio 0.1: the
   whole class), each replaced by its adversarial version + trigger with its own (target)
   label; `apply_train` does this by index. The ASR set is every non-target test image + the
   trigger only (`apply`).
5. **Cache.** The perturbed images of the whole target class, their indices and the outcome
   (`fit_record`: the source model's accuracy on the test set, its accuracy on the target-class
   originals vs on their perturbed versions, i.e. the PGD's success, and the perturbation's
   L-inf / L2 size) are cached as `<ctx.workdir>/lc_adversarial.npz`, keyed by the settings,
   the target, the image shape, the training data's SHA-256 and the source model's
   description (model, recipe, seed). A rerun with the same key reuses them (no source model,
   no PGD); any other key makes them again.

Reference: BackdoorBench `attack/lc.py` (all2one, target 0, pratio 0.1, clean-label indices,
train images read from `resource/label-consistent/data/{model}_{dataset}_16_train.npy`),
`config/attack/lc/default.yaml` (reduced_amplitude 1), `utils/bd_img_transform/lc.py` (the
trigger), `resource/label-consistent/craft_adv_dataset.py` (the PGD: step 1.5/255, 100 steps, no
random start, [0, 1] inputs without normalisation, an adversarially trained ResNet-18 checkpoint
`resnet18_PGD_best_model.pth` that is not in the repository; a commented-out path names
`cifar_resnet_e8_a2_s10.pth`: eps 8/255, step 2/255, 10 steps, our `at_*` defaults).
Differences from BackdoorBench:
- eps is 16/255, as BackdoorBench's attack names the file it reads (`..._16_train.npy`, its
  `eps = 16`); its crafting script uses eps 8/255 and writes a file of another name
  (`{dataset}_train.npy`), so its pipeline only runs on the downloaded 16/255 files.
- The source model is made here: the run's clean model (`cpu`, `smoke`) or one adversarially
  trained here with the run's architecture and recipe (`paper`); BackdoorBench loads a
  ResNet-18 checkpoint of unknown training that is not in its repository.
- Only the target-class training images are perturbed (the only ones used); BackdoorBench
  perturbs the whole training and test sets and uses neither the other training images nor
  the test ones (its ASR set is trigger-only, as ours).
- The source model sees images through its own input normalisation (ours normalise inside);
  BackdoorBench feeds [0, 1] images to its checkpoint directly.
- The adversarial images are rounded to uint8 and kept within eps; BackdoorBench truncates
  (x * 255 cast to uint8), which can move a pixel 1/255 beyond eps. Triggered pixels are
  rounded; BackdoorBench truncates (the same at amplitude 1).
- The corner patterns are drawn at the image's size (any H, W >= 6: 28x28 keeps four whole
  3x3 corners); BackdoorBench nearest-resizes its 32x32 mask, which at 28x28 drops the last
  row and column (bottom and right corners become 2x3, 3x2, 2x2).
- Where round(ratio * N) exceeds the target class, the whole class is poisoned (SIG's
  convention); BackdoorBench's draw without replacement raises.
- Grey images (Fashion-MNIST) get the one-channel trigger; the perturbation acts on the one
  channel. BackdoorBench's crafting script assumes three channels.
Differences from the paper (whose body we could not read: the official code's README and
config.json instead, MadryLab/label-consistent-backdoor-code): its default perturbed set is an
L2-bounded one (`two_300.npy`) and its default trigger the bottom-right corner alone; the
"all-corners" trigger, reduced amplitudes and L-inf-bounded sets (`inf_x.npy`) are its
documented options, which we take (as BackdoorBench). Its GAN-interpolation variant is not
built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax.attacks.base import Attack, to_uint8
from ftsam_jax.attacks.resource import (
    data_fingerprint,
    load_resource,
    model_description,
    save_resource,
)

__all__ = ["LC", "adversarial_loss", "add_trigger", "corner_pattern", "pgd_attack", "pgd_step",
           "quantise"]

CACHE_FILE = "lc_adversarial.npz"
SOURCES = ("clean", "adversarial")
# The left corners' 3x3 pattern (rows top to bottom); the right corners carry its mirror.
LEFT_CORNER = np.array([[1, -1, -1],
                        [-1, 1, -1],
                        [1, -1, 1]], np.int8)


def corner_pattern(height: int, width: int) -> np.ndarray:
    """(H, W) int8 in {-1, 0, 1}: the 3x3 pattern in each of the four corners."""
    if height < 6 or width < 6:
        raise ValueError(f"lc: the four 3x3 corners need an image of at least 6x6, got "
                         f"{height}x{width}")
    pattern = np.zeros((height, width), np.int8)
    right = LEFT_CORNER[:, ::-1]
    pattern[:3, :3], pattern[-3:, :3] = LEFT_CORNER, LEFT_CORNER
    pattern[:3, -3:], pattern[-3:, -3:] = right, right
    return pattern


def add_trigger(images: np.ndarray, pattern: np.ndarray, amplitude: float) -> np.ndarray:
    """clip(round(x + 255 * amplitude * pattern), 0, 255) on every channel of uint8 images."""
    return to_uint8(images.astype(np.float64)
                    + 255.0 * float(amplitude) * pattern[..., None].astype(np.float64))


def pgd_step(x: jax.Array, x0: jax.Array, grad: jax.Array, step_size: float | jax.Array,
             eps: float | jax.Array) -> jax.Array:
    """One signed-gradient ascent step, projected onto |x - x0| <= eps and [0, 1]."""
    moved = x + step_size * jnp.sign(grad)
    return jnp.clip(x0 + jnp.clip(moved - x0, -eps, eps), 0.0, 1.0)


def _pgd(logits_fn: Callable[[jax.Array], jax.Array], x0: jax.Array, y: jax.Array,
         eps: float, step_size: float, steps: int, start: jax.Array | None = None
         ) -> jax.Array:
    """`steps` PGD steps from `start` (default x0) ascending the summed cross-entropy of y
    (per image, since the model acts on each image alone)."""
    def ce(x: jax.Array) -> jax.Array:
        logits = logits_fn(x).astype(jnp.float32)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    grad = jax.grad(ce)
    x_start = x0 if start is None else start
    return jax.lax.fori_loop(0, steps, lambda _, x: pgd_step(x, x0, grad(x), step_size, eps),
                             x_start)


def pgd_attack(model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
               mesh: Any, *, eps: float, step_size: float, steps: int,
               batch_size: int = 256) -> np.ndarray:
    """Float32 [0, 1] PGD images (module docstring, step 2) of uint8 `images` against `model`
    in evaluation mode; eps and step_size in grey levels (/255)."""
    from ftsam_jax.training.epoch import apply_in_batches

    e, a = float(eps) / 255.0, float(step_size) / 255.0

    def attack(v: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return _pgd(lambda z: model.apply(v, z, train=False), x, y, e, a, int(steps))

    # Batches of equal size (a multiple of the devices): the last one is padded the least.
    n_dev = mesh.devices.size
    per = -(-max(1, len(images)) // -(-max(1, len(images)) // batch_size))
    return apply_in_batches(attack, variables, images, labels, mesh,
                            batch_size=-(-per // n_dev) * n_dev).astype(np.float32)


def quantise(adversarial: np.ndarray, originals: np.ndarray, eps: float) -> np.ndarray:
    """uint8 adversarial images: round(255 x), kept within floor(eps) grey levels of the uint8
    originals (and [0, 255])."""
    bound = int(np.floor(float(eps) + 1e-6))
    x0 = originals.astype(np.int32)
    out = np.rint(np.asarray(adversarial, np.float64) * 255.0).astype(np.int32)
    return np.clip(out, np.maximum(x0 - bound, 0), np.minimum(x0 + bound, 255)).astype(np.uint8)


def adversarial_loss(apply_fn: Callable[..., Any], *, eps: float, step_size: float,
                     steps: int) -> Callable:
    """A `LossFn` of PGD adversarial training (module docstring, step 1): the cross-entropy of
    the batch's L-inf PGD images (eps, step_size in grey levels; uniform random start; the
    attack in training mode with the current weights, its statistics update dropped)."""
    from ftsam_jax.training.step import cross_entropy

    e, a = float(eps) / 255.0, float(step_size) / 255.0

    def loss_fn(params: Any, batch_stats: Any, batch: dict[str, jax.Array], rng: jax.Array):
        fixed = {"params": jax.lax.stop_gradient(params), "batch_stats": batch_stats}
        x0 = batch["image"]

        def logits_fn(x: jax.Array) -> jax.Array:
            return apply_fn(fixed, x, train=True, mutable=["batch_stats"])[0]

        start = jnp.clip(x0 + jax.random.uniform(rng, x0.shape, x0.dtype, -e, e), 0.0, 1.0)
        x_adv = jax.lax.stop_gradient(_pgd(logits_fn, x0, batch["label"], e, a, int(steps),
                                           start))
        logits, mutated = apply_fn({"params": params, "batch_stats": batch_stats}, x_adv,
                                   train=True, mutable=["batch_stats"])
        loss = cross_entropy(logits, batch["label"]).mean()
        return loss, (logits, mutated.get("batch_stats", batch_stats))

    return loss_fn


def _predict(model: nn.Module, variables: Any, images: np.ndarray, mesh: Any) -> np.ndarray:
    from ftsam_jax.training.epoch import apply_in_batches

    return apply_in_batches(lambda v, x, y: jnp.argmax(model.apply(v, x, train=False), -1),
                            variables, images, np.zeros(len(images), np.int32), mesh)


def _number(label: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not np.isfinite(value):
        raise ValueError(f"lc: {label} must be {'an integer' if integer else 'a finite number'}"
                         f", got {value!r}")


class LC(Attack):
    """The label-consistent attack (see the module docstring); needs `fit` before its
    training images can be poisoned (`apply_train`)."""

    name = "lc"
    clean_label = True
    needs_fit = True

    def __init__(self, *, eps: float = 16.0, step_size: float = 1.5, steps: int = 100,
                 amplitude: float = 1.0, source: str = "clean", at_eps: float = 8.0,
                 at_step_size: float = 2.0, at_steps: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for label, value in (("eps", eps), ("step_size", step_size), ("amplitude", amplitude),
                             ("at_eps", at_eps), ("at_step_size", at_step_size)):
            _number(label, value)
        for label, value in (("steps", steps), ("at_steps", at_steps)):
            _number(label, value, integer=True)
        if not 0 < eps <= 255 or not 0 < at_eps <= 255:
            raise ValueError("lc: eps and at_eps must lie in (0, 255] grey levels")
        if step_size <= 0 or at_step_size <= 0:
            raise ValueError("lc: step_size and at_step_size must be > 0 grey levels")
        if steps < 0 or at_steps < 1:
            raise ValueError("lc: steps must be >= 0 and at_steps >= 1")
        if not 0 < amplitude <= 1:
            raise ValueError(f"lc: amplitude must lie in (0, 1] (a fraction of 255), got "
                             f"{amplitude}")
        if source not in SOURCES:
            raise ValueError(f"lc: source must be one of {list(SOURCES)}, got {source!r}")
        if self.all_to_all:
            raise ValueError("lc: a clean-label attack is all-to-one")
        self.eps, self.step_size, self.steps = float(eps), float(step_size), int(steps)
        self.amplitude, self.source = float(amplitude), str(source)
        self.at_eps, self.at_step_size, self.at_steps = (float(at_eps), float(at_step_size),
                                                         int(at_steps))
        h, w, _ = self.image_shape
        self.pattern = corner_pattern(h, w)
        self.indices: np.ndarray | None = None  # the target class's training indices, sorted
        self.adversarial: np.ndarray | None = None  # their PGD images, uint8
        self.fit_record: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        out = {"eps": self.eps, "step_size": self.step_size, "steps": self.steps,
               "amplitude": self.amplitude, "source": self.source}
        if self.source == "adversarial":
            out.update(at_eps=self.at_eps, at_step_size=self.at_step_size,
                       at_steps=self.at_steps)
        return out

    # -- the trigger and the poisoned images ------------------------------------------------

    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """The trigger only (the ASR set)."""
        return add_trigger(self._check_images(images), self.pattern, self.amplitude)

    def apply_train(self, images: np.ndarray, labels: np.ndarray | None,
                    indices: np.ndarray) -> np.ndarray:
        """The training images at `indices` (of the target class): their adversarial versions
        + the trigger."""
        images = self._check_images(images)
        if self.adversarial is None or self.indices is None:
            raise RuntimeError("lc: no adversarial images; call fit(...) first")
        indices = np.asarray(indices, np.int64)
        pos = np.searchsorted(self.indices, indices)
        pos = np.minimum(pos, len(self.indices) - 1)
        if len(indices) and (len(self.indices) == 0 or
                             not np.array_equal(self.indices[pos], indices)):
            raise ValueError("lc: only training images of the target class are poisoned")
        return self.apply(self.adversarial[pos])

    # -- making them ------------------------------------------------------------------------

    def cache_key(self, x: np.ndarray, y: np.ndarray, model: nn.Module, fit_config: Any,
                  seed: int) -> dict[str, Any]:
        fit = dataclasses.asdict(fit_config) if dataclasses.is_dataclass(fit_config) else \
            repr(fit_config)
        return {"settings": self.settings(), "target": self.target,
                "image_shape": list(self.image_shape), "data_sha256": data_fingerprint(x, y),
                "source_model": {"model": model_description(model), "fit": fit, "seed": seed}}

    def source_model(self, ds: Any, model: nn.Module, fit_config: Any, ctx: Any,
                     rng: jax.Array, clean_model: Callable[[], Any] | None) -> Any:
        """The variables of the model the PGD attacks (module docstring, step 1)."""
        from ftsam_jax.training.recipe import fit as fit_classifier

        if self.source == "adversarial":
            loss = adversarial_loss(model.apply, eps=self.at_eps, step_size=self.at_step_size,
                                    steps=self.at_steps)
            variables, _ = fit_classifier("lc_adversarial", model, None, ds.x_train,
                                          ds.y_train, fit_config, rng, ctx, loss_fn=loss)
            return variables
        variables = None if clean_model is None else clean_model()
        if variables is None:
            variables, _ = fit_classifier("lc_clean", model, None, ds.x_train, ds.y_train,
                                          fit_config, rng, ctx)
        return variables

    def fit(self, *, ds: Any, model: nn.Module, fit_config: Any, ctx: Any, rng: jax.Array,
            ratio: float | None = None,
            clean_model: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        """Perturbs the target class's training images against the source model, or reuses
        the cached ones made with the same key."""
        del ratio, kwargs
        key = self.cache_key(ds.x_train, ds.y_train, model, fit_config, int(ctx.seed))
        cache = None if ctx.workdir is None else Path(ctx.workdir) / CACHE_FILE
        if cache is not None and self._load(cache, key):
            return
        variables = self.source_model(ds, model, fit_config, ctx, rng, clean_model)
        indices = np.flatnonzero(np.asarray(ds.y_train) == self.target).astype(np.int64)
        originals = np.asarray(ds.x_train)[indices]
        labels = np.asarray(ds.y_train)[indices]
        if len(indices) and self.steps:
            floats = pgd_attack(model, variables, originals, labels, ctx.mesh, eps=self.eps,
                                step_size=self.step_size, steps=self.steps)
            adversarial = quantise(floats, originals, self.eps)
        else:
            adversarial = originals.copy()
        self._set(indices, adversarial)
        self.fit_record = {"key": key, **self.measure(model, variables, ds, ctx.mesh)}
        if cache is not None:
            self._save(cache)

    def measure(self, model: nn.Module, variables: Any, ds: Any, mesh: Any) -> dict[str, Any]:
        """The source model's test accuracy, its accuracy on the target class's training
        images before and after the perturbation, and the perturbation's size (L-inf in grey
        levels; L2 per image in [0, 1] units)."""
        assert self.indices is not None and self.adversarial is not None
        originals = np.asarray(ds.x_train)[self.indices]
        n_test, n = len(ds.x_test), len(self.indices)
        preds = _predict(model, variables,
                         np.concatenate([np.asarray(ds.x_test), originals, self.adversarial]),
                         mesh)
        acc = lambda p, y: float(np.mean(p == y)) if len(y) else float("nan")
        delta = self.adversarial.astype(np.float64) - originals.astype(np.float64)
        l2 = np.sqrt(((delta / 255.0) ** 2).reshape(n, -1).sum(axis=1))
        linf = np.abs(delta).reshape(n, -1).max(axis=1, initial=0.0)
        target = np.full(n, self.target)
        return {
            "source": self.source, "num_perturbed": int(n),
            "source_model_test_acc": acc(preds[:n_test], np.asarray(ds.y_test)),
            "source_model_acc_original": acc(preds[n_test:n_test + n], target),
            "source_model_acc_perturbed": acc(preds[n_test + n:], target),
            "linf_max": float(linf.max()) if n else 0.0,
            "linf_mean": float(linf.mean()) if n else 0.0,
            "l2_mean": float(l2.mean()) if n else 0.0,
            "l2_max": float(l2.max()) if n else 0.0,
        }

    def _set(self, indices: np.ndarray, adversarial: np.ndarray) -> None:
        self.indices = np.asarray(indices, np.int64)
        self.adversarial = np.asarray(adversarial, np.uint8)
        self.needs_fit = False

    def _load(self, cache: Path, key: dict[str, Any]) -> bool:
        found = load_resource(cache, key, "lc: the cached adversarial images")
        if found is None:
            return False  # none, or made with other settings, data or source model: made again
        arrays, record = found
        indices, adversarial = arrays.get("indices"), arrays.get("adversarial")
        if (indices is None or adversarial is None or adversarial.dtype != np.uint8
                or adversarial.shape != (len(indices), *self.image_shape)):
            raise ValueError(f"lc: the cached adversarial images {cache} do not fit the run "
                             f"(shape {None if adversarial is None else adversarial.shape})")
        self._set(indices, adversarial)
        self.fit_record = record
        return True

    def _save(self, cache: Path) -> None:
        save_resource(cache, self.fit_record, {"indices": self.indices,
                                               "adversarial": self.adversarial})

    def config(self) -> dict[str, Any]:
        return {**super().config(), **self.settings(),
                "trigger": "all-corners 3x3 (corner_pattern)"}
