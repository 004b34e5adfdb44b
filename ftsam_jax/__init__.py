"""ftsam_jax: FT-SAM backdoor defense and IKD distillation in JAX/Flax.

The public core: `sam_gradient` / `sam` (SAM and ASAM as optax stages), the models, the pure
steps (`train_step`, `sam_step`, `eval_step`) and the data-parallel helpers.
"""

from ftsam_jax.optim import SAMState, sam, sam_gradient, sam_perturbation
from ftsam_jax.training.step import (
    TrainState,
    classification_loss,
    create_train_state,
    cross_entropy,
    eval_step,
    sam_step,
    train_step,
)

__version__ = "0.1.0"

__all__ = [
    "SAMState",
    "TrainState",
    "classification_loss",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "sam",
    "sam_gradient",
    "sam_perturbation",
    "sam_step",
    "train_step",
]
