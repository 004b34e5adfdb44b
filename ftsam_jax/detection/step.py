"""The detector's pure training step: FCOS targets on device, loss, any optax chain (SAM too)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from ftsam_jax.detection.losses import detection_loss
from ftsam_jax.detection.targets import DEFAULT_RANGES, DEFAULT_STRIDES, fcos_targets
from ftsam_jax.training.step import TrainState

__all__ = ["batch_targets", "detect_train_step", "detection_loss_fn", "random_hflip"]

Batch = dict[str, jax.Array]


def batch_targets(batch: Batch, image_size: int, *,
                  strides: Sequence[int] = DEFAULT_STRIDES,
                  ranges: Sequence[tuple[float, float]] = DEFAULT_RANGES
                  ) -> dict[str, jax.Array]:
    """`fcos_targets` of every image of a batch with "boxes", "labels" and "mask"."""
    return jax.vmap(lambda b, lab, m: fcos_targets(b, lab, m, image_size, strides=strides,
                                                   ranges=ranges))(
        batch["boxes"], batch["labels"], batch["mask"])


def random_hflip(batch: Batch, rng: jax.Array) -> Batch:
    """Mirrors each image of a batch left-right with probability 1/2, its boxes with it
    (x1, x2 -> W - x2, W - x1): the detectors' standard flip (mmdetection's RandomFlip 0.5), as
    a `Stage.preprocess` on device."""
    import jax.numpy as jnp

    images, boxes = batch["image"], batch["boxes"]
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    width = images.shape[2]
    mirrored = jnp.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0],
                          boxes[..., 3]], axis=-1)
    return {**batch, "image": jnp.where(flip[:, None, None, None], images[:, :, ::-1], images),
            "boxes": jnp.where(flip[:, None, None], mirrored, boxes)}


def detection_loss_fn(apply_fn: Callable[..., Any], num_classes: int, image_size: int, *,
                      strides: Sequence[int] = DEFAULT_STRIDES,
                      ranges: Sequence[tuple[float, float]] = DEFAULT_RANGES
                      ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`loss(params, batch) -> {"loss", "cls", "box", "ctr"}` for batches of "image" (B, S, S, 3),
    "boxes" (B, M, 4) pixels, "labels" (B, M), "mask" (B, M)."""

    def loss(params: Any, batch: Batch) -> dict[str, jax.Array]:
        out = apply_fn({"params": params}, batch["image"], train=True)
        t = batch_targets(batch, image_size, strides=strides, ranges=ranges)
        return detection_loss(out["cls"], out["ltrb"], out["ctr"], t, num_classes)

    return loss


def detect_train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
                      tx: optax.GradientTransformation,
                      loss_fn: Callable[[Any, Batch], dict[str, jax.Array]]
                      ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of `tx` (given `grad_fn`, so `ftsam_jax.sam_gradient` stages work)."""
    del rng

    def scalar(p):
        parts = loss_fn(p, batch)
        return parts["loss"], parts

    (_, parts), grads = jax.value_and_grad(scalar, has_aux=True)(state.params)
    grad_fn = lambda p: jax.grad(lambda q: scalar(q)[0])(p)
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, grad_fn=grad_fn)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), parts
