"""FT and FT-SAM: fine-tuning the backdoored model on benign data, without and with SAM.

FT-SAM (Zhu et al., ICCV 2023, Eq. 4 and 6): every step perturbs the weights by
e = rho T_w^2 g / ||T_w g|| with T_w = |w| (ASAM, eta = 0, all parameters including BatchNorm's)
and descends with the gradient taken at w + e; BatchNorm running statistics come from the clean
pass only. Two recipes:

- `reference` (BackdoorBench `defense/ft-sam.py`, the code behind the paper's tables): SGD lr
  0.01, momentum 0.9, weight decay 5e-4, label smoothing 0.1, batch 256, 100 epochs, rho 2,
  class-balanced 5% benign data, crop+flip, and a CosineAnnealingLR(T_max=100) stepped every
  *iteration*, so the learning rate is cyclic (period 200 iterations; with 2,500 images and
  batch 256 it reaches 0 at epoch 10 and is back at 0.01 at epoch 20), last-epoch model.
- `paper` (the paper's text): the same but plain cross-entropy and the cosine stepped per epoch.

FT (BackdoorBench `defense/ft.py`): the same loop without SAM: plain cross-entropy, cosine per
epoch over 100 epochs, batch 256, a uniformly drawn 5% of the training set.

Reference: BackdoorBench `defense/ft.py` + `config/defense/ft/cifar10.yaml` (FT);
`defense/ft-sam.py`, `utils/defense_utils/sam/` + `config/defense/ft-sam/cifar10.yaml` (FT-SAM);
optimiser and schedule from `utils/aggregate_block/train_settings_generate.py`.

Differences from the reference:
- Float32 training (`--dtype=bfloat16` optional); the FT config sets `amp: True` (fp16 autocast
  on CUDA). FT-SAM's `amp` is unused by its SAM loop, so FT-SAM is float32 in both.
- The `paper` recipe of FT-SAM is ours (the paper's text), not BackdoorBench's.
- The `cpu` and `paper` presets run the same defense settings; only `smoke` shortens them (2
  epochs). At `cpu` scale the backdoored model is trained at lr 0.05 (a scale choice of
  `experiments.ftsam`), so fine-tuning at 0.01 is not "the same learning rate as the backdoored
  model" there, as it is in the paper and in BackdoorBench (0.01 for both). `--set=ft.lr=0.05
  --set=ftsam.lr=0.05` restores it; measured on BadNets, Blended, LF and Input-aware
  (REPRODUCTION.md, "Input-aware: why FT-SAM lost to FT"), both then remove far more, FT-SAM
  still below FT.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from ftsam_jax.defenses.base import BenignData
from ftsam_jax.training.recipe import FitConfig, fit
from ftsam_jax.training.stage import StageContext

__all__ = ["RECIPES", "FineTuneConfig", "ft", "ft_config", "ftsam", "ftsam_config"]

# FT-SAM's two recipes (see the module docstring): the fields in which they differ.
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"recipe": "reference", "label_smoothing": 0.1, "schedule": "cosine_iter"},
    "paper": {"recipe": "paper", "label_smoothing": 0.0, "schedule": "cosine_epoch"},
}


@dataclasses.dataclass(frozen=True)
class FineTuneConfig(FitConfig):
    """FT / FT-SAM hyperparameters: `FitConfig`'s fields with BackdoorBench's FT defaults
    (batch 256, cosine T_max 100, the last partial batch kept), and which FT-SAM recipe made
    them (see the module docstring)."""

    batch_size: int = 256
    t_max: int | None = 100
    drop_last: bool = False
    recipe: str = "reference"


def _epochs(preset: str) -> int:
    return {"paper": 100, "cpu": 100, "smoke": 2}[preset]


def ft_config(preset: str = "paper") -> FineTuneConfig:
    """BackdoorBench's FT: plain CE, cosine per epoch (T_max 100), batch 256, 100 epochs."""
    return FineTuneConfig(epochs=_epochs(preset), sam=False, t_max=100)


def ftsam_config(preset: str = "paper", recipe: str = "reference") -> FineTuneConfig:
    """FT-SAM's `reference` (BackdoorBench) or `paper` recipe (`RECIPES`)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown FT-SAM recipe {recipe!r}; choose one of {tuple(RECIPES)}")
    return FineTuneConfig(epochs=_epochs(preset), sam=True, rho=2.0, t_max=100,
                          **RECIPES[recipe])


def _finetune(name: str, model: nn.Module, variables: dict[str, Any], benign: BenignData,
              config: FineTuneConfig, rng: jax.Array, ctx: StageContext) -> dict[str, Any]:
    out, _ = fit(name, model, variables, benign.x, benign.y, config, rng, ctx)
    return out


def ft(model: nn.Module, variables: dict[str, Any], benign: BenignData, config: FineTuneConfig,
       rng: jax.Array, ctx: StageContext) -> dict[str, Any]:
    """Vanilla fine-tuning on the benign data."""
    return _finetune("ft", model, variables, benign, dataclasses.replace(config, sam=False), rng,
                     ctx)


def ftsam(model: nn.Module, variables: dict[str, Any], benign: BenignData,
          config: FineTuneConfig, rng: jax.Array, ctx: StageContext) -> dict[str, Any]:
    """Fine-tuning with adaptive sharpness-aware minimisation (FT-SAM)."""
    return _finetune("ftsam", model, variables, benign, dataclasses.replace(config, sam=True),
                     rng, ctx)
