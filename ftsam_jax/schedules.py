"""Learning-rate schedules of the reference recipes, as optax schedules of the step count."""

from __future__ import annotations

import jax.numpy as jnp
import optax

__all__ = ["SCHEDULES", "make_schedule"]

SCHEDULES = ("cosine_epoch", "cosine_iter", "constant")


def make_schedule(kind: str, lr: float, steps_per_epoch: int, t_max: int
                  ) -> optax.Schedule:
    """PyTorch's CosineAnnealingLR in closed form, lr/2 * (1 + cos(pi t / t_max)).

    - "cosine_epoch": t = epoch (the scheduler stepped once per epoch), t_max in epochs.
    - "cosine_iter": t = iteration, t_max in iterations. Past t_max the cosine rises again
      (period 2 t_max), as PyTorch's does: BackdoorBench's FT-SAM steps a T_max=100 scheduler
      every iteration, which makes its schedule cyclic.
    - "constant": lr.
    """
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine_epoch":
        return lambda count: 0.5 * lr * (1 + jnp.cos(jnp.pi * (count // steps_per_epoch) / t_max))
    if kind == "cosine_iter":
        return lambda count: 0.5 * lr * (1 + jnp.cos(jnp.pi * count / t_max))
    raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
