r"""Every setting of an `experiments.bench` run; the argument picks the preset.

    python -m experiments.bench --config=experiments/configs/bench.py:cpu \
        --config.steps=5 --config.rows=train_step,sam_step

Presets: `paper` (PreAct-ResNet18 at its standard width 64, batch 128: the FT-SAM paper's
network), `cpu` (width 16, the `cpu` preset's network, as the CPU rows of BENCHMARKS.md),
`smoke` (a tiny CNN, one timed call per row: seconds). `rows` is a comma-separated string, as on
the command line. The old flags (`--width`, `--rows`, ...) are shorthands for these fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = {
    "paper": dict(model="preactresnet18", width=None, steps=10, warmup=2),
    "cpu": dict(model="preactresnet18", width=16, steps=5, warmup=1),
    "smoke": dict(model="tiny_cnn", width=8, steps=1, warmup=0),
}


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.model = values["model"]
    # None = the model's standard width.
    c.width = config_dict.placeholder(int) if values["width"] is None else values["width"]
    c.batch_size = 128          # global, divisible by the device count
    c.dtype = "float32"         # float32 | bfloat16
    c.steps = values["steps"]   # timed calls per row
    c.warmup = values["warmup"]  # untimed calls after compilation
    c.image_size = 32
    c.num_classes = 10
    c.rows = "train_step,sam_step,eval_step,ftsam_epoch"
    c.ftsam_examples = 2500     # benign images of the ftsam_epoch row (the paper's 5%)
    c.ftsam_batch_size = 256
    c.ftsam_epochs = 100        # epochs the ftsam_epoch row is extrapolated to
    c.detect_batch_size = 32
    c.detect_image_size = 128
    c.json = False
    return c
