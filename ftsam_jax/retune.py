"""The Retuning Attack (RA): post-purification robustness of a defended model.

Min et al. (NeurIPS 2024, arXiv 2410.09838) fine-tune a purified model briefly on a small
benign set that holds a few poisoned training samples and measure the attack success rate
again (their P-ASR): a backdoor that was really removed comes back no faster than it would be
learned by a clean model from those few samples; a superficially removed one returns within a
few epochs. As released (`fine_tune/ft_poison.py` of `stable_backdoor_purification`):

  D_RA = (benign subset of 2% of the training set, drawn uniformly)
         with its first `poison_num` (5) images replaced by poisoned training samples
         (the attack's own, with the attacker's labels);
  benign images augmented once (crop + flip, frozen across epochs), poisoned ones not;
  SGD lr 0.01, momentum 0.9, no weight decay, no schedule, cross-entropy, batch 128, 5 epochs.

Differences from the released script: the RA data are drawn from this run's own stream (one
draw per defense seed, the same for every model retuned in a run: the rows are paired), the
poisoned samples are drawn from the poison plan of this run (not from PNG files), a last
partial batch is filled from a second permutation (`FitConfig.drop_last=False`) instead of
being a smaller batch, and attacks that poison each batch on the fly (WaNet) are refused: they
have no fixed poisoned training images to draw from.

References: Min, Y. et al., "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024, arXiv 2410.09838.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ftsam_jax.attacks import BackdoorData
from ftsam_jax.data.augment import crop_flip
from ftsam_jax.defenses.base import benign_fingerprint
from ftsam_jax.training.recipe import FitConfig, fit
from ftsam_jax.training.stage import StageContext

__all__ = ["RetuneConfig", "RetuneData", "retune", "retune_data"]


@dataclasses.dataclass(frozen=True)
class RetuneConfig:
    """The Retuning Attack's settings (the released script's defaults).

    Attributes:
      benign_ratio: share of the training set in the RA set (2%: 1,000 CIFAR-10 images).
      poison_num: poisoned training samples that replace as many benign ones.
      epochs, batch_size, lr, momentum, weight_decay: plain SGD, constant learning rate.
      augment: crop (4-px padding) + flip of the benign images, drawn once (frozen).
    """

    benign_ratio: float = 0.02
    poison_num: int = 5
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.benign_ratio <= 1.0:
            raise ValueError(f"retune.benign_ratio must lie in (0, 1], got {self.benign_ratio}")
        if self.poison_num < 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("retune: need poison_num >= 0, epochs >= 1, batch_size >= 1, lr > 0")

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay,
                         schedule="constant", augment=False, drop_last=False)


@dataclasses.dataclass(frozen=True)
class RetuneData:
    """The RA set (uint8 images, labels) and what it was made of, for the record."""

    x: np.ndarray
    y: np.ndarray
    benign_indices: np.ndarray
    poison_indices: np.ndarray

    def record(self) -> dict[str, Any]:
        return {"benign_count": int(len(self.y) - len(self.poison_indices)),
                "poison_num": int(len(self.poison_indices)),
                "benign_sha256": benign_fingerprint(self.benign_indices)["sha256"],
                "poison_sha256": benign_fingerprint(self.poison_indices)["sha256"]}


def retune_data(x_clean: np.ndarray, y_clean: np.ndarray, bd: BackdoorData,
                config: RetuneConfig, rng: jax.Array) -> RetuneData:
    """Draws the RA set from the clean training images and the poisoned ones of `bd`.

    round(benign_ratio * N) benign indices uniformly without replacement; the first
    `poison_num` of them are replaced by poisoned training samples drawn from the poison plan
    (`bd.poison_mask`), with the attacker's labels; the remaining benign images are augmented
    once when `config.augment`. ValueError when the attack has no fixed poisoned images or
    fewer than `poison_num`."""
    poisoned = np.flatnonzero(bd.poison_mask)
    if config.poison_num > 0 and bd.train_transform is not None:
        raise ValueError("the Retuning Attack needs the attack's poisoned training images; this "
                         "attack poisons each batch on the fly (WaNet)")
    if len(poisoned) < config.poison_num:
        raise ValueError(f"the Retuning Attack needs {config.poison_num} poisoned training "
                         f"images, the attack made {len(poisoned)}")
    n = len(y_clean)
    count = max(config.poison_num + 1, int(round(config.benign_ratio * n)))
    data_rng, aug_rng = jax.random.split(rng)
    generator = np.random.default_rng(np.asarray(jax.random.key_data(data_rng)).ravel())
    chosen = generator.choice(n, size=min(count, n), replace=False)
    poison_idx = generator.choice(poisoned, size=config.poison_num, replace=False)
    benign_idx = chosen[config.poison_num:]
    x_benign = x_clean[benign_idx]
    if config.augment:
        x_benign = np.asarray(crop_flip(aug_rng, jax.numpy.asarray(x_benign)))
    x = np.concatenate([bd.x_train[poison_idx], x_benign]).astype(np.uint8)
    y = np.concatenate([bd.y_train[poison_idx], y_clean[benign_idx]]).astype(np.int32)
    return RetuneData(x, y, benign_idx, poison_idx)


def retune(name: str, model: Any, variables: dict[str, Any], data: RetuneData,
           config: RetuneConfig, rng: jax.Array, ctx: StageContext,
           evaluate: Callable[[dict[str, Any]], dict[str, float]]) -> dict[str, Any]:
    """Retunes `variables` on the RA set and evaluates them: {"asr", "clean_acc",
    "robust_acc", "poison_num", "benign_count", ...}. The stage keeps no checkpoint (it is a few
    seconds, deterministic in `rng`: an interrupted one reruns to the same numbers)."""
    ctx = dataclasses.replace(ctx, workdir=None, evaluate=None)
    tuned, _ = fit(name, model, variables, data.x, data.y, config.fit_config(), rng, ctx)
    return {**evaluate(tuned), **data.record(), "epochs": config.epochs, "lr": config.lr}
