"""On-device augmentation, jit- and vmap-friendly: random crop with zero padding and flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop(rng: jax.Array, images: jnp.ndarray, padding: int = 4) -> jnp.ndarray:
    """Pads each NHWC image with `padding` zero pixels and crops back at a random offset.

    Equivalent to torchvision's RandomCrop(size, padding) on an unnormalised image.
    """
    if padding <= 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)

    def crop(img: jnp.ndarray, off: jnp.ndarray) -> jnp.ndarray:
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jnp.ndarray) -> jnp.ndarray:
    """Flips each NHWC image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))[:, None, None, None]
    return jnp.where(flip, images[:, :, ::-1, :], images)


def crop_flip(rng: jax.Array, images: jnp.ndarray, padding: int = 4, flip: bool = True
              ) -> jnp.ndarray:
    """The standard CIFAR augmentation: random crop (4-px padding), then horizontal flip."""
    crop_rng, flip_rng = jax.random.split(rng)
    images = random_crop(crop_rng, images, padding)
    return random_flip(flip_rng, images) if flip else images
