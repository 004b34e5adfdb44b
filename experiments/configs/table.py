r"""Every setting of an `experiments.table` run (the paper's Table 1: attacks x defenses, each
cell one `experiments.ftsam` run); the argument picks the preset of the cells.

    python -m experiments.table --config=experiments/configs/table.py:cpu \
        --config.attacks=badnets,blended --config.defense_seeds=0,1,2

The flags of `experiments.table` are shorthands of the fields of the same name
(`--ftsam_flag`, repeatable, fills `ftsam_flags`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = ("paper", "cpu", "smoke")


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = preset                     # the cells' experiments.ftsam preset
    c.dataset = "cifar10"                 # as in experiments.ftsam
    c.data_dir = config_dict.placeholder(str)
    c.attacks = "badnets,badnets_a2a,blended,sig,wanet,lf,input_aware"   # rows
    c.defenses = "ft,ftsam,fp,nad,anp,ibau,clp,ikd"                      # column groups
    c.defense_seeds = "0"                 # benign subset and the defenses' random streams
    c.seeded_defenses = config_dict.placeholder(str)  # run with every seed (default: all)
    c.benign_selection = config_dict.placeholder(str)  # shared (new tables) or reference
    c.benign_ratios = ""                  # a block per ratio, e.g. "0.01,0.05,0.1" (Table 3)
    c.differences = ""                    # paired differences "A:B,...", e.g. "ftsam:ft"
    c.seed = 0                            # the backdoored models' seed
    c.model_seeds = ""                    # independent backdoored models, e.g. "0,1" (ATTACK/m<s>)
    c.ftsam_flags = ()                    # flags passed to every cell, e.g. ("--epochs=30",)
    c.plot = True                         # table.png
    c.compilation_cache = config_dict.placeholder(str)  # default: WORKDIR/jax_cache; 'off'
    return c
