"""Backdoor attacks: one file each; `create_attack(name, ...)` builds one by name."""

from __future__ import annotations

from typing import Any

from ftsam_jax.attacks.badnets import BadNets, BadNetsAllToAll
from ftsam_jax.attacks.base import Attack, PoisonPlan
from ftsam_jax.attacks.blended import Blended
from ftsam_jax.attacks.input_aware import InputAware
from ftsam_jax.attacks.lc import LC
from ftsam_jax.attacks.lf import LowFrequency
from ftsam_jax.attacks.poison import BackdoorData, build_backdoor_data
from ftsam_jax.attacks.sig import SIG
from ftsam_jax.attacks.ssba import SSBA
from ftsam_jax.attacks.trojannn import TrojanNN
from ftsam_jax.attacks.wanet import WaNet

__all__ = ["ATTACKS", "Attack", "BackdoorData", "PoisonPlan", "build_backdoor_data",
           "create_attack"]

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, BadNetsAllToAll, Blended, SIG, WaNet, LowFrequency,
                               InputAware, TrojanNN, LC, SSBA)
}


def create_attack(name: str, *, num_classes: int, image_shape: tuple[int, int, int],
                  target: int = 0, **kwargs: Any) -> Attack:
    """Builds a registered attack; raises ValueError for an unknown name or bad settings."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    return ATTACKS[name](num_classes=num_classes, image_shape=image_shape, target=target,
                         **kwargs)
