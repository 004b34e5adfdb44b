r"""Every setting of an `experiments.ftsam` run, as one tree; the argument picks the preset.

    python -m experiments.ftsam --config=experiments/configs/ftsam.py:cpu \
        --config.attack=blended --config.lr=0.01 --config.defense.ftsam.rho=4 \
        --config.defenses=ft,ftsam

Presets: `paper` (the reference recipe: PreAct-ResNet18, SGD 0.01/0.9/5e-4, cosine, 100 epochs,
batch 128), `cpu` (width 16, 60 epochs at lr 0.05: about 20 minutes on 2 CPU cores on the 5k
CIFAR slice), `smoke` (a tiny net, seconds). The top level is the run (data, attack, the
backdoored model's training, the defenders' share of data, logging); `defense.<name>` holds every
defense's settings with its preset defaults (`ftsam_jax.defenses.<name>`), used when `<name>` is
in `defenses`. The old flags (`--preset`, `--attack`, `--lr`, `--set=ikd.alpha_adv=0`, ...)
are shorthands for the same fields.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from ftsam_jax.defenses import DEFENSES

PRESETS = {
    "paper": dict(model="preactresnet18", width=64, epochs=100, batch_size=128, lr=0.01,
                  eval_every=5),
    "cpu": dict(model="preactresnet18", width=16, epochs=60, batch_size=128, lr=0.05,
                eval_every=5),
    "smoke": dict(model="tiny_cnn", width=8, epochs=2, batch_size=64, lr=0.05, eval_every=1),
}


def defense_defaults(preset: str, ftsam_recipe: str = "reference") -> dict[str, dict]:
    """Every registered defense's settings for `preset`, as plain nested dicts."""
    out = {}
    for name, spec in sorted(DEFENSES.items()):
        cfg = (spec.default_config(preset, ftsam_recipe) if name == "ftsam"
               else spec.default_config(preset))
        out[name] = dataclasses.asdict(cfg)
    return out


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    # Data and attack.
    c.dataset = "cifar10"
    c.data_dir = config_dict.placeholder(str)
    c.attack = "badnets"
    c.poison_ratio = 0.1
    c.target = 0
    c.trigger_path = config_dict.placeholder(str)
    # The backdoored model and its training (SGD 0.9 / 5e-4, cosine per epoch; WaNet and
    # Input-aware at a constant rate in the paper preset, as BackdoorBench).
    p = PRESETS[preset]
    c.model, c.width = p["model"], p["width"]
    c.epochs, c.batch_size, c.lr = p["epochs"], p["batch_size"], p["lr"]
    c.dtype = "float32"
    c.seed = 0
    # The defenders: which defenses, their share of the training set, their seed.
    c.defenses = ""
    c.benign_ratio = 0.05
    c.defense_seed = config_dict.placeholder(int)
    c.defense = defense_defaults(preset)
    # Logging and checkpoints.
    c.eval_every = p["eval_every"]
    c.checkpoint_every = 1
    c.analysis = False
    c.progress = True
    return c
