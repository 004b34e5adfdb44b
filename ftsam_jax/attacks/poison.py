"""Builds the poisoned training set and the ASR / R-Acc test set of an attack."""

from __future__ import annotations

import dataclasses

import numpy as np

from ftsam_jax.attacks.base import Attack, PoisonPlan, TrainTransform
from ftsam_jax.data.datasets import Dataset

__all__ = ["BackdoorData", "build_backdoor_data"]


@dataclasses.dataclass(frozen=True)
class BackdoorData:
    """Everything the backdoored stage and the metrics need.

    Attributes:
      x_train, y_train: the poisoned training set (triggers baked into uint8 images for static
        attacks; labels changed for dirty-label attacks).
      poison_mask: which training images were poisoned.
      x_test, y_test: the clean test set (C-Acc).
      x_bd: poisoned versions of the ASR test images (`attack.test_mask`).
      y_bd: the attacker's labels for them (ASR); y_bd_true: their true labels (R-Acc).
      train_transform: per-batch on-the-fly poisoning inside the step, or None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    poison_mask: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_bd: np.ndarray
    y_bd: np.ndarray
    y_bd_true: np.ndarray
    plan: PoisonPlan
    train_transform: TrainTransform | None = None

    @property
    def num_poisoned(self) -> int:
        return int(self.poison_mask.sum())


def build_backdoor_data(ds: Dataset, attack: Attack, ratio: float, seed: int) -> BackdoorData:
    """Poisons round(ratio * N) training images (the attack's plan, seeded) and every ASR test
    image. Attacks that poison on the fly (WaNet) keep their training images clean here and
    poison each batch through `train_transform`; their plan is then only informational."""
    rng = np.random.default_rng(seed)
    plan = attack.plan(ds.y_train, ratio, rng)
    transform = attack.make_train_transform(ratio)
    x_train, y_train = ds.x_train.copy(), ds.y_train.copy()
    mask = np.zeros(len(y_train), bool)
    if transform is None:
        x_train[plan.indices] = attack.apply_train(ds.x_train[plan.indices],
                                                   ds.y_train[plan.indices], plan.indices)
        y_train[plan.indices] = plan.labels
        mask[plan.indices] = True
    test_mask = attack.test_mask(ds.y_test)
    x_bd = attack.apply(ds.x_test[test_mask], ds.y_test[test_mask])
    y_true = ds.y_test[test_mask]
    return BackdoorData(
        x_train=x_train, y_train=y_train, poison_mask=mask, x_test=ds.x_test, y_test=ds.y_test,
        x_bd=x_bd, y_bd=attack.poison_labels(y_true), y_bd_true=y_true, plan=plan,
        train_transform=transform,
    )
