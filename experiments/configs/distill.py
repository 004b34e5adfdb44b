r"""Every setting of an `experiments.distill` run (IKD for classification); the argument picks
the preset.

    python -m experiments.distill --config=experiments/configs/distill.py:cpu \
        --config.methods=kd,kd_afa --config.alpha_adv=1e-3 --config.seeds=0,1,2

Presets: `paper` (PreAct-ResNet18 width 64 -> 16, 100/100 epochs), `cpu` (width 16 -> 4,
30/30 epochs), `smoke` (tiny nets, seconds). Lists (`methods`, `seeds`, `afa_layers`) are
comma-separated strings, as on the command line. The old flags are shorthands for these fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = {
    "paper": dict(teacher="preactresnet18", teacher_width=64, student="preactresnet18",
                  student_width=16, epochs=100, teacher_epochs=100, batch_size=128, lr=0.05,
                  eval_every=5, afa_layers="stage3,stage4"),
    "cpu": dict(teacher="preactresnet18", teacher_width=16, student="preactresnet18",
                student_width=4, epochs=30, teacher_epochs=30, batch_size=128, lr=0.05,
                eval_every=5, afa_layers="stage3,stage4"),
    "smoke": dict(teacher="tiny_cnn", teacher_width=8, student="tiny_cnn", student_width=4,
                  epochs=2, teacher_epochs=2, batch_size=64, lr=0.05, eval_every=1,
                  afa_layers="stage2"),
}


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict(PRESETS[preset])
    c.preset = preset
    c.dataset = "cifar10"
    c.data_dir = config_dict.placeholder(str)
    c.methods = "ce,kd,kd_afa,kd_afa_ssa"
    c.seeds = "0"
    c.kd_alpha = 0.9            # KD weight; CE gets 1 - kd_alpha
    c.temperature = 4.0
    c.alpha_adv = 1e-4          # AFA weight (on a sum over C*H*W per image)
    c.adv_source = "precomputed"  # made once (official); online: every step
    c.ssa_quantile = 0.5        # SSA: high-frequency-share quantile of the noise branch
    c.dtype = "float32"
    c.progress = True
    return c
