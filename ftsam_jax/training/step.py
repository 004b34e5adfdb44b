"""Pure training and evaluation steps: `step(state, batch, rng) -> (state, metrics)`.

A batch is a dict with "image" (NHWC, float in [0, 1] after preprocessing) and "label" (int32),
optionally "mask" (1 for real examples, 0 for padding; evaluation only). The steps are written as
single-device code; run them under `jax.jit` with the batch sharded on the mesh's 'data' axis and
the state replicated (see `ftsam_jax.parallel`), donating the state.

Losses are `LossFn(params, batch_stats, batch, rng) -> (loss, (logits, new_batch_stats))`, so
defenses and distillation plug their own objectives into the same steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "LossFn",
    "TrainState",
    "classification_loss",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "init_variables",
    "sam_step",
    "train_step",
]

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, Params, Batch, jax.Array], tuple[jax.Array, tuple[jax.Array, Params]]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed by orbax)."""

    step: jax.Array
    params: Params
    batch_stats: Params
    opt_state: optax.OptState

    @property
    def variables(self) -> dict[str, Params]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_variables(model: flax.linen.Module, rng: jax.Array, image_shape: tuple[int, ...],
                   **kwargs: Any) -> dict[str, Params]:
    """`model.init(rng, zeros((1, *image_shape)), **kwargs)` compiled as one program.

    The same variables bit for bit as an eager `init`, which runs (and on first use compiles)
    each of its hundreds of small ops separately: 5.0 s eager vs 1.9 s compiled for a
    PreAct-ResNet18 on the 2-core CPU, and the one program can come from JAX's persistent
    compilation cache.
    """
    init = jax.jit(functools.partial(model.init, **kwargs))
    return init(rng, jnp.zeros((1, *image_shape), jnp.float32))


def create_train_state(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    variables: dict[str, Params] | None = None,
) -> TrainState:
    """Initialises the model (or takes given `variables`) and the optimizer state."""
    if variables is None:
        variables = init_variables(model, rng, image_shape, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
    """Per-example cross-entropy; with smoothing s the target is 1 - s on the true class and
    s / (C - 1) on every other class (the `smooth_crossentropy` used by the FT-SAM reference).
    """
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    num_classes = logits.shape[-1]
    off = label_smoothing / (num_classes - 1)
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing - off) + off
    return optax.softmax_cross_entropy(logits, targets)


def classification_loss(apply_fn: Callable[..., Any], label_smoothing: float = 0.0) -> LossFn:
    """Mean (label-smoothed) cross-entropy of a model in training mode (BN batch statistics)."""

    def loss_fn(params: Params, batch_stats: Params, batch: Batch, rng: jax.Array):
        del rng
        logits, mutated = apply_fn(
            {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, mutated.get("batch_stats", batch_stats))

    return loss_fn


def _metrics(loss: jax.Array, logits: jax.Array, labels: jax.Array) -> Metrics:
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def train_step(
    state: TrainState, batch: Batch, rng: jax.Array, *,
    tx: optax.GradientTransformation, loss_fn: LossFn,
) -> tuple[TrainState, Metrics]:
    """One plain gradient step of `tx` on `loss_fn`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
    )
    return new_state, _metrics(loss, logits, batch["label"])


def sam_step(
    state: TrainState, batch: Batch, rng: jax.Array, *,
    tx: optax.GradientTransformationExtraArgs, loss_fn: LossFn, group_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """One step of a chain that contains `ftsam_jax.sam_gradient` (it receives `grad_fn`).

    The clean pass gives the loss, the metrics and the new BatchNorm statistics; the perturbed
    pass inside `grad_fn` only gives a gradient (its BN statistics are dropped, like the
    reference's momentum-0 second pass).

    With `group_size=m` (m-sharpness) the batch is cut into groups of m examples; each group gets
    its own perturbation from its own gradient, and the perturbed gradients are averaged before
    the rest of the chain (a `vmap` over groups with a `pmean` in `grad_fn`). BN statistics are
    then per group (ghost BN) and their running averages are averaged. The result does not
    depend on the number of devices. `group_size=None` uses the whole batch as one group.
    """

    def clean_and_sam(params: Params, b: Batch, axis: str | None):
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state.batch_stats, b, rng)

        def perturbed_grad(p: Params) -> Params:
            g = jax.grad(lambda q: loss_fn(q, state.batch_stats, b, rng)[0])(p)
            return g if axis is None else jax.lax.pmean(g, axis)

        updates, opt_state = tx.update(grads, state.opt_state, params, grad_fn=perturbed_grad)
        return updates, opt_state, loss, logits, batch_stats

    if group_size is None or group_size >= batch["label"].shape[0]:
        updates, opt_state, loss, logits, batch_stats = clean_and_sam(state.params, batch, None)
    else:
        n = batch["label"].shape[0]
        if n % group_size:
            raise ValueError(f"batch size {n} is not divisible by group_size {group_size}")
        groups = jax.tree.map(lambda x: x.reshape(n // group_size, group_size, *x.shape[1:]),
                              batch)
        updates, opt_state, loss, logits, batch_stats = jax.vmap(
            lambda b: clean_and_sam(state.params, b, "sam_group"),
            axis_name="sam_group", out_axes=(None, None, 0, 0, 0),
        )(groups)
        loss = loss.mean()
        logits = logits.reshape(n, -1)
        batch_stats = jax.tree.map(lambda s: s.mean(0), batch_stats)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
    )
    return new_state, _metrics(loss, logits, batch["label"])


def eval_step(variables: dict[str, Params], batch: Batch, *, apply_fn: Callable[..., Any]
              ) -> Metrics:
    """Inference-mode predictions: `preds`, and `correct`/`count` over unmasked examples."""
    logits = apply_fn(variables, batch["image"], train=False)
    preds = jnp.argmax(logits, -1).astype(jnp.int32)
    mask = batch.get("mask", jnp.ones_like(batch["label"]))
    return {
        "preds": preds,
        "correct": jnp.sum((preds == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
