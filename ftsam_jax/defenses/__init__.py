"""Backdoor defenses: each `(model, variables, benign, config, rng, ctx) -> variables`."""

from __future__ import annotations

from ftsam_jax.defenses.base import BenignData, DefenseSpec, select_benign
from ftsam_jax.defenses.finetune import ft, ft_config, ftsam, ftsam_config

__all__ = ["DEFENSES", "BenignData", "DefenseSpec", "register", "select_benign"]

DEFENSES: dict[str, DefenseSpec] = {}


def register(spec: DefenseSpec) -> DefenseSpec:
    DEFENSES[spec.name] = spec
    return spec


register(DefenseSpec("ft", ft, ft_config, balanced=False,
                     summary="vanilla fine-tuning on benign data (random 5%)"))
register(DefenseSpec("ftsam", ftsam, ftsam_config, balanced=True,
                     summary="fine-tuning with adaptive SAM, rho 2 (Zhu et al., ICCV 2023)"))
