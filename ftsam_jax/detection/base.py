"""The base feature distiller of detection KD: what `make_detect_distill_step` needs from FGD
(`ftsam_jax.detection.fgd`), MGD (`ftsam_jax.detection.mgd`) or any other, so that IKD's terms
(sample-specific augmentation, adversarial feature augmentation) never know which one runs.

A base distiller is a frozen dataclass of its settings (its fields are its record in
results.json) with a class-level `name` (the key of its trainable parameters in the step's
state, `params[name]`, and of its term in the step's metrics) and two pure functions over all
distilled FPN levels at once:

    params = distiller.init(rng, levels, student_features, teacher_features)
    loss   = distiller.loss(params, levels, student_features, teacher_features, inputs)

`init` runs inside one compiled program (`create_detect_distill_state`); the teacher's
features there are shapes only (`jax.ShapeDtypeStruct`). `loss` returns the weighted sum over
the levels; the teacher's features arrive already frozen (`stop_gradient`). `inputs` holds
what a distiller may use besides the features: the ground truth (FGD's masks) and a random key
(MGD's mask), the same key in the clean pass and in SAM's perturbed pass of one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax

__all__ = ["DistillInputs", "FeatureDistiller"]


@dataclasses.dataclass(frozen=True)
class DistillInputs:
    """boxes (N, M, 4) in input pixels, valid (N, M), image_hw (H, W) of the input, rng: a
    key of this step for the distiller's own randomness."""

    boxes: jax.Array
    valid: jax.Array
    image_hw: tuple[int, int]
    rng: jax.Array


@runtime_checkable
class FeatureDistiller(Protocol):
    name: ClassVar[str]

    def init(self, rng: jax.Array, levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[Any]) -> dict[str, Any]:
        """The trainable modules' parameters, {level: ...} (shapes from the features)."""

    def loss(self, params: dict[str, Any], levels: Sequence[str], student: Sequence[jax.Array],
             teacher: Sequence[jax.Array], inputs: DistillInputs) -> jax.Array:
        """The weighted loss summed over the levels."""
