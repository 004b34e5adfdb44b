"""Whole epochs on device: data stays in accelerator memory, one jit call per epoch.

`make_epoch_fn` turns a step into `epoch(state, images, labels, rng) -> (state, metrics)`: the
permutation, the batch gather, the preprocessing (float conversion, per-batch attack transforms,
crop/flip) and every step run inside one compiled `lax.scan`, with the state donated, the data
replicated and each batch sharded over the mesh's 'data' axis. `evaluate` does the same for
inference over a whole array. No host sync happens inside an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ftsam_jax import parallel, xla
from ftsam_jax.data.augment import crop_flip
from ftsam_jax.training.step import Batch, Metrics, TrainState, eval_step

__all__ = ["Preprocess", "Sampler", "Step", "apply_in_batches", "epoch_indices", "evaluate",
           "make_epoch_fn", "make_evaluator", "standard_preprocess", "steps_per_epoch",
           "to_float"]

Step = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]
Preprocess = Callable[[Batch, jax.Array], Batch]
Sampler = Callable[[jax.Array], jax.Array]  # rng -> (steps, batch_size) int32 example indices


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float input is passed through as float32."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def standard_preprocess(augment: bool = True, padding: int = 4, flip: bool = True
                        ) -> Preprocess:
    """uint8 -> [0, 1] float, then (optionally) random crop with padding and horizontal flip."""

    def preprocess(batch: Batch, rng: jax.Array) -> Batch:
        images = to_float(batch["image"])
        if augment:
            images = crop_flip(rng, images, padding=padding, flip=flip)
        return {**batch, "image": images}

    return preprocess


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return max(1, num_examples // batch_size)
    return math.ceil(num_examples / batch_size)


def epoch_indices(rng: jax.Array, num_examples: int, batch_size: int, drop_last: bool
                  ) -> jax.Array:
    """(steps, batch_size) example indices for one shuffled epoch.

    With `drop_last=False` the last batch is filled up with the first examples of a second
    permutation, so every example is seen at least once and every batch has the same shape.
    With fewer examples than one batch, the permutation is repeated.
    """
    steps = steps_per_epoch(num_examples, batch_size, drop_last)
    needed = steps * batch_size
    reps = max(1, math.ceil(needed / num_examples))
    keys = jax.random.split(rng, reps)
    perm = jnp.concatenate([jax.random.permutation(k, num_examples) for k in keys])
    return perm[:needed].reshape(steps, batch_size).astype(jnp.int32)


def make_epoch_fn(
    step: Step,
    *,
    mesh: Mesh,
    num_examples: int,
    batch_size: int,
    preprocess: Preprocess,
    drop_last: bool = True,
    scan: bool | None = None,
    sampler: Sampler | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Compiles one shuffled epoch of `step` (see module docstring).

    The returned function is `epoch(state, images, labels, rng, extra=None)` and gives the new
    state and the epoch's mean metrics. `extra` is an optional dict of arrays indexed like the
    images (e.g. precomputed adversarial images), gathered into each batch under its own keys.

    `scan=True` runs the whole epoch as one `lax.scan` (one dispatch per epoch: the fast path on
    GPU/TPU); `scan=False` dispatches one compiled step per batch from Python (XLA:CPU runs
    convolutions inside while loops about 10x slower). Both give the same numbers. Default:
    scan on accelerators, Python loop on CPU.

    `sampler(rng) -> (steps, batch_size)` indices replaces the shuffled epoch (e.g. ANP's
    iterations of uniformly drawn batches); `num_examples` and `drop_last` are then unused.
    """
    parallel.check_batch_size(batch_size, mesh)
    if scan is None:
        scan = jax.default_backend() != "cpu"
    batch_sharding = parallel.data_sharding(mesh)
    repl = parallel.replicated(mesh)

    def one_step(st: TrainState, images: jax.Array, labels: jax.Array, ids: jax.Array,
                 step_rng: jax.Array, i: jax.Array, extra: dict[str, jax.Array] | None):
        batch = {"image": images[ids], "label": labels[ids]}
        if extra is not None:
            batch.update({k: v[ids] for k, v in extra.items()})
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        pre_rng, rng_i = jax.random.split(jax.random.fold_in(step_rng, i))
        return step(st, preprocess(batch, pre_rng), rng_i)

    def indices(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        perm_rng, step_rng = jax.random.split(rng)
        if sampler is not None:
            return sampler(perm_rng), step_rng
        return epoch_indices(perm_rng, num_examples, batch_size, drop_last), step_rng

    def scanned_epoch(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                      extra: dict[str, jax.Array] | None = None):
        idx, step_rng = indices(rng)
        state, metrics = jax.lax.scan(
            lambda st, inp: one_step(st, images, labels, inp[1], step_rng, inp[0], extra),
            state, (jnp.arange(idx.shape[0]), idx))
        return state, jax.tree.map(jnp.mean, metrics)

    if scan:
        return xla.jit(scanned_epoch, donate_argnums=(0,), out_shardings=(repl, repl))

    jit_indices = xla.jit(indices)
    jit_step = xla.jit(one_step, donate_argnums=(0,), out_shardings=(repl, repl))

    def looped_epoch(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                     extra: dict[str, jax.Array] | None = None):
        idx, step_rng = jit_indices(rng)
        history = []
        for i in range(idx.shape[0]):
            state, metrics = jit_step(state, images, labels, idx[i], step_rng, jnp.int32(i),
                                      extra)
            history.append(metrics)
        return state, jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *history)

    return looped_epoch


def make_evaluator(
    apply_fn: Callable[..., Any],
    *,
    mesh: Mesh,
    batch_size: int,
    transform: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[dict[str, Any], jax.Array, jax.Array], dict[str, jax.Array]]:
    """Compiles `evaluate(variables, images, labels) -> {"preds", "accuracy"}` over a whole set.

    The set is padded to a multiple of `batch_size` (masked out), scanned batch by batch on
    device; `transform` maps float [0, 1] images before the model (e.g. a trigger).
    """
    parallel.check_batch_size(batch_size, mesh, "eval batch size")
    batch_sharding = parallel.data_sharding(mesh)

    def run(variables: dict[str, Any], images: jax.Array, labels: jax.Array):
        n = images.shape[0]
        steps = math.ceil(n / batch_size)
        pad = steps * batch_size - n
        mask = jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((pad,), jnp.int32)])
        images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])

        def body(carry: jax.Array, i: jax.Array):
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * batch_size, batch_size)
            batch = {"image": to_float(sl(images)), "label": sl(labels), "mask": sl(mask)}
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            if transform is not None:
                batch["image"] = transform(batch["image"])
            out = eval_step(variables, batch, apply_fn=apply_fn)
            return carry + out["correct"], out["preds"]

        correct, preds = jax.lax.scan(body, jnp.zeros([], jnp.int32), jnp.arange(steps))
        return {"preds": preds.reshape(-1)[:n], "accuracy": correct / n}

    # replicated outputs: every process of a multi-host run can read them
    return xla.jit(run, out_shardings=parallel.replicated(mesh))


def evaluate(apply_fn: Callable[..., Any], variables: dict[str, Any], images: Any, labels: Any,
             *, mesh: Mesh, batch_size: int = 512) -> dict[str, np.ndarray | float]:
    """One-off convenience: accuracy and predictions of `variables` on host arrays."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    repl = parallel.replicated(mesh)
    out = make_evaluator(apply_fn, mesh=mesh, batch_size=batch_size)(
        variables, jax.device_put(images, repl), jax.device_put(labels, repl))
    return {"preds": np.asarray(out["preds"]), "accuracy": float(out["accuracy"])}


def apply_in_batches(fn: Callable[[Any, jax.Array, jax.Array], jax.Array], variables: Any,
                     images: np.ndarray, labels: np.ndarray, mesh: Mesh,
                     batch_size: int = 256) -> np.ndarray:
    """`fn(variables, float [0, 1] images, labels) -> per-example array` over a whole host set,
    batch by batch (compiled once, each batch sharded over the mesh, the last one padded and
    cut back): inference-mode features or per-example losses of every training image."""
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    sharding = parallel.data_sharding(mesh)

    @xla.jit
    def run(v: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        x = jax.lax.with_sharding_constraint(to_float(x), sharding)
        return fn(v, x, y)

    v = parallel.replicate(variables, mesh)
    labels = np.asarray(labels, np.int32)
    out = []
    for start in range(0, len(images), batch_size):
        x, y = np.asarray(images[start:start + batch_size]), labels[start:start + batch_size]
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((pad,), y.dtype)])
        out.append(np.asarray(run(v, jax.device_put(x, sharding),
                                  jax.device_put(y, sharding)))[:batch_size - pad])
    return np.concatenate(out)
