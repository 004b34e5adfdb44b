r"""Every setting of an `experiments.detect` run (IKD for object detection); the argument picks
the preset.

    python -m experiments.detect --config=experiments/configs/detect.py:cpu \
        --config.methods=student,fgd_ikd --config.seeds=0,1,2 --config.teacher_epochs=36

Presets: `paper` (4,000/1,000 scenes, 24 epochs, teacher width 32 / student 16: accelerator
scale), `cpu` (4,000/1,000 scenes, teacher 24 / students 12 epochs, widths 16 / 8: about 1.5 h
on 2 cores for 6 methods x 3 seeds; 2,000 scenes x 12 teacher epochs gave a teacher of AP 6.0,
too weak to distil from), `smoke` (64/32 scenes at 64 px, seconds). Lists (`methods`, `seeds`)
are comma-separated strings, as on the command line; the old flags are shorthands.
"""

from __future__ import annotations

import ml_collections

PRESETS = {
    "paper": dict(image_size=128, num_train=4000, num_val=1000, epochs=24, teacher_epochs=24,
                  batch_size=32, lr=1e-3, teacher_width=32, teacher_blocks=(2, 2, 2, 2),
                  student_width=16, student_blocks=(1, 1, 1, 1), fpn_channels=64),
    "cpu": dict(image_size=128, num_train=4000, num_val=1000, epochs=12, teacher_epochs=24,
                batch_size=32, lr=1e-3, teacher_width=16, teacher_blocks=(2, 2, 2, 2),
                student_width=8, student_blocks=(1, 1, 1, 1), fpn_channels=32),
    "smoke": dict(image_size=64, num_train=64, num_val=32, epochs=2, teacher_epochs=2,
                  batch_size=16, lr=1e-3, teacher_width=8, teacher_blocks=(1, 1, 1, 1),
                  student_width=4, student_blocks=(1, 1, 1, 1), fpn_channels=16),
}


# Fields added after workdirs existed, with the value every older run had: an older
# config.json without such a field is compared as if it held this value (so it still resumes).
LEGACY_VALUES = {"fgd_scale": 1.0, "eval_split": "val", "warmup_epochs": 0.0,
                 "teacher_extra_scenes": 0, "teacher_flip": False, "paired_streams": False,
                 "ikd_fraction": 2 / 3, "ssa_small_area": 256.0, "noise_eps": 8.0,
                 "weight_decay": 1e-4, "afa_eps": 8.0, "afa_steps": 5, "mgd_alpha": 2e-5,
                 "mgd_lambda": 0.65}


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict(PRESETS[preset])
    c.preset = preset
    c.dataset = "scenes:fashion_mnist"   # or coco:DIR
    c.data_dir = "../shared/data"        # holds fashion-mnist/ and cifar10-subset/
    c.methods = "student,fgd,fgd_ssa,fgd_afa,fgd_ikd,fgd_noise"
    c.seeds = "0"                        # the teacher and the scenes use the first
    # Optimisation (teacher and students): AdamW, cosine per epoch after the warm-up.
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.0                # linear lr warm-up (teacher and students), then cosine
    # The teacher.
    c.teacher_extra_scenes = 0           # more training scenes for the teacher only (scenes:)
    c.teacher_flip = False               # random horizontal flips of the teacher's batches
    # The students' methods.
    c.alpha_adv = 1e-5                   # AFA weight (sum over C*H*W per image and level)
    c.afa_eps = 8.0                      # AFA's MI-DI-FGSM radius, grey levels (/255; official 8)
    c.afa_steps = 5                      # ... and its iterations (official 5; step 2/255)
    c.fgd_scale = 1.0                    # multiplies FGD's loss weights (official RetinaNet's)
    c.mgd_alpha = 2e-5                   # MGD's alpha_mgd (official RetinaNet config)
    c.mgd_lambda = 0.65                  # MGD's lambda_mgd: the share of masked positions
    c.ikd_fraction = 2 / 3               # IKD phase: this share of the epochs (official 16/24)
    c.ssa_small_area = 256.0             # SSA's "small" box area: 16² px on the 128 px canvas
    c.noise_eps = 8.0                    # fgd_noise: uniform +-eps grey levels (AFA's eps 8/255)
    c.paired_streams = False             # every method of a seed: same init and batch order
    # Evaluation and output.
    c.eval_split = "val"                 # or heldout: scenes of training objects, for tuning
    c.teacher_eval_every = 0             # AP on the evaluation split every k teacher epochs
    c.student_eval_every = 0             # ... and student epochs (0: only the final numbers)
    c.progress = True
    return c
