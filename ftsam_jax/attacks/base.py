"""What every backdoor attack provides: a trigger function and a poisoning plan.

An attack is configured once (target, all-to-one or all-to-all, its own trigger parameters) and
then

- `plan(labels, ratio, rng)` says which training indices are poisoned and their new labels
  (dirty-label attacks draw from every class; clean-label attacks only from the target class);
- `apply(images, labels)` inserts the trigger into uint8 NHWC images (host, numpy), before any
  augmentation, so crops and flips move it, as in BackdoorBench; `apply_train(images, labels,
  indices)` makes the poisoned training images (`apply` unless overridden: LC);
- `poison_labels(labels)` maps true labels to the attacker's labels (target, or (y + 1) mod C);
- optionally `fit(...)` prepares data-dependent triggers (a universal perturbation, a
  generator; an attack that trains the backdoored classifier itself, like Input-aware, leaves it
  in `trained_variables`), and `make_train_transform(ratio)` poisons each batch inside the
  jitted step (WaNet's warps);
- `test_mask(labels)` selects the test images whose poisoned versions measure ASR (all images
  whose label is not the target; every image for all-to-all).

Every attack works for any image size and 1 or 3 channels.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

__all__ = ["Attack", "PoisonPlan", "to_uint8"]

Batch = dict[str, Any]
TrainTransform = Callable[[Batch, Any], Batch]


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
    """Training indices that get the trigger, and the labels they are given."""

    indices: np.ndarray  # int64, sorted, unique
    labels: np.ndarray  # int32, same length

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.labels):
            raise ValueError("PoisonPlan: indices and labels differ in length")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Rounds float pixel values in [0, 255] to uint8 (clipping first)."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class Attack(abc.ABC):
    """A backdoor attack on an image classifier.

    Attributes:
      name: registry name.
      clean_label: poison only target-class images and keep their labels (SIG, LC).
      target: the attacker's class for all-to-one attacks.
      all_to_all: label y -> (y + 1) mod C instead of -> target.
    """

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False
    # Attacks that must be prepared from data (`fit`) before `apply` can be used.
    needs_fit: ClassVar[bool] = False
    # Attacks that are all-to-all whatever they are given (no target class to check).
    always_all_to_all: ClassVar[bool] = False
    # False for attacks that poison each training batch as it is drawn (WaNet's warps,
    # Input-aware's generator): they leave no fixed poisoned training set, which the
    # training-time defenses (AC, ABL) and the Retuning Attack need.
    poisoned_set: ClassVar[bool] = True

    def __init__(self, *, num_classes: int, image_shape: tuple[int, int, int], target: int = 0,
                 all_to_all: bool = False) -> None:
        if not 0 <= target < num_classes:
            raise ValueError(f"target {target} is outside [0, {num_classes})")
        if len(image_shape) != 3 or image_shape[-1] not in (1, 3):
            raise ValueError(f"images must be (H, W, C) with C in 1 or 3, got {image_shape}")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.target = int(target)
        self.all_to_all = bool(all_to_all)

    # -- labels ----------------------------------------------------------------------------

    def poison_labels(self, labels: np.ndarray) -> np.ndarray:
        """The attacker's label for each true label."""
        labels = np.asarray(labels)
        if self.all_to_all:
            return ((labels + 1) % self.num_classes).astype(np.int32)
        return np.full(labels.shape, self.target, np.int32)

    def test_mask(self, labels: np.ndarray) -> np.ndarray:
        """Test images whose poisoned versions form the ASR / R-Acc set."""
        labels = np.asarray(labels)
        if self.all_to_all:
            return np.ones(labels.shape, bool)
        return labels != self.target

    # -- poisoning plan ----------------------------------------------------------------------

    def plan(self, labels: np.ndarray, ratio: float, rng: np.random.Generator) -> PoisonPlan:
        """round(ratio * N) indices drawn without replacement (clean-label: from the target
        class only, at most all of it), with their poisoned labels."""
        labels = np.asarray(labels)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"poison ratio must lie in (0, 1], got {ratio}")
        count = max(1, int(round(ratio * len(labels))))
        if self.clean_label:
            pool = np.flatnonzero(labels == self.target)
            if len(pool) == 0:
                raise ValueError(f"clean-label attack: no training image of class {self.target}")
            count = min(count, len(pool))
            chosen = np.sort(rng.choice(pool, size=count, replace=False))
            return PoisonPlan(chosen.astype(np.int64), labels[chosen].astype(np.int32))
        chosen = np.sort(rng.choice(len(labels), size=count, replace=False))
        return PoisonPlan(chosen.astype(np.int64), self.poison_labels(labels[chosen]))

    # -- triggers ----------------------------------------------------------------------------

    # Set by `fit` for attacks that train the backdoored classifier themselves (Input-aware);
    # the pipeline then uses these variables instead of training on the poisoned set.
    trained_variables: dict[str, Any] | None = None
    # Set by `fit` for attacks that make a resource (TrojanNN's trigger): what it measured,
    # recorded in results.json.
    fit_record: dict[str, Any] | None = None

    def fit(self, **kwargs: Any) -> None:  # noqa: B027 - optional hook
        """Prepares data-dependent triggers; a no-op for fixed-pattern attacks.

        The pipeline calls it (only when `needs_fit`) as
        `fit(ds=Dataset, model=flax Module, fit_config=FitConfig of the backdoored stage,
        ratio=poison ratio, ctx=StageContext, rng=key)`; use `ctx` for resumable stages
        (`ftsam_jax.training.recipe.fit`, `ftsam_jax.training.stage.run_stage`) and cache
        artifacts under `ctx.workdir` so a rerun does not redo them.
        """

    @abc.abstractmethod
    def apply(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Inserts the trigger into uint8 NHWC images; returns new uint8 images."""

    def apply_train(self, images: np.ndarray, labels: np.ndarray | None,
                    indices: np.ndarray) -> np.ndarray:
        """The poisoned versions of the training images at `indices` of the training set:
        `apply` unless an attack's training images differ from its test trigger (LC's
        adversarial images, looked up by index)."""
        del indices
        return self.apply(images, labels)

    def make_train_transform(self, ratio: float) -> TrainTransform | None:
        """A jit-able `(batch, rng) -> batch` applied to every (shuffled) training batch, with
        "image" as float [0, 1] NHWC and "label" int32, for attacks that poison on the fly
        (a share `ratio` of each batch); None for static poisoning."""
        del ratio
        return None

    def config(self) -> dict[str, Any]:
        """The attack's settings, for results.json."""
        return {"name": self.name, "target": self.target, "all_to_all": self.all_to_all,
                "clean_label": self.clean_label}

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{self.name}: expected uint8 NHWC images, got {images.dtype} "
                             f"{images.shape}")
        return images
