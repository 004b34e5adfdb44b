"""The defense interface: `(model, backdoored variables, benign data, config, rng, ctx) ->
defended variables`, plus benign-subset sampling.

`ctx` (`ftsam_jax.runner.StageContext`) carries the mesh, the checkpoint folder (each defense
resumes exactly), progress bars, per-epoch logging and the optional curve evaluator. A defense's
random stream is the `rng` it is given; the pipeline derives it from the seed and the defense's
name, so adding a defense to a command never changes another's numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ftsam_jax.runner import StageContext

__all__ = ["BenignData", "DefenseFn", "DefenseSpec", "select_benign"]

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BenignData:
    """The defender's clean images (uint8 NHWC) and labels."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)


DefenseFn = Callable[[nn.Module, Variables, BenignData, Any, jax.Array, StageContext], Variables]


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense.

    Attributes:
      name: registry name (`--defenses`).
      run: the defense function.
      default_config: `preset -> config` ("paper", "cpu", "smoke").
      balanced: draw the benign subset class-balanced (FT-SAM) instead of uniformly (FT).
      uses_data: False for data-free defenses (CLP).
      summary: one line for --help and README.
    """

    name: str
    run: DefenseFn
    default_config: Callable[[str], Any]
    balanced: bool = False
    uses_data: bool = True
    summary: str = ""


def select_benign(labels: np.ndarray, ratio: float, rng: np.random.Generator,
                  balanced: bool) -> np.ndarray:
    """Indices of the defender's benign subset.

    balanced: int(N * ratio / C) images of every class (BackdoorBench's `choose_by_class`, used
    by FT-SAM); otherwise int(N * ratio) images uniformly (`choose_index`, used by FT and the
    other baselines; BackdoorBench `utils/choose_index.py`). At least one image either way.
    """
    labels = np.asarray(labels)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"benign ratio must lie in (0, 1], got {ratio}")
    if not balanced:
        count = max(1, int(ratio * len(labels)))
        return np.sort(rng.choice(len(labels), size=count, replace=False))
    classes = np.unique(labels)
    per_class = max(1, int(len(labels) * ratio / len(classes)))
    chosen = [rng.choice(np.flatnonzero(labels == c),
                         size=min(per_class, int(np.sum(labels == c))), replace=False)
              for c in classes]
    return np.sort(np.concatenate(chosen))
