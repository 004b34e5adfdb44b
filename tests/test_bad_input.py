"""Bad input at every entry point: one `error: ...` line on stderr, exit code 2, no traceback
and nothing left in the workdir.

Each row is (entry point, arguments, a phrase of the expected message). Arguments may name
prepared broken inputs: {npz:NAME} an npz data set, {coco:NAME} a COCO folder, {file} a plain
file, {tmp} the row's scratch folder, {data} ../shared/data, {cifar} its CIFAR-10 slice,
{workdir:NAME} a workdir holding a damaged file of a run. Every row but those that name a
--workdir gets `--workdir={tmp}/w`, which must not exist afterwards (a refused run makes no
folder). `WRITE_FAULTS` are runs on a disk that refuses a write: one line, exit code 1. The
rows of an entry point run in one process (`tests/bad_input_worker.py`: its flag parser, then
`experiments.cli.guarded`, the body of `python -m experiments.NAME`), so the suite costs one
JAX import per entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ENV_8, ROOT

DATA = ROOT.parent / "shared" / "data"
SMOKE = "--preset=smoke"
CONFIG = "--config=experiments/configs/ftsam.py:smoke"
TJ = f"--attack=trojannn {CONFIG} --dataset={{npz:toy}}"  # "trojan" in the test ids
LCA = f"--attack=lc {CONFIG} --dataset={{npz:toy}}"  # "attack=lc" in the test ids
SSBA = f"--attack=ssba {CONFIG} --dataset={{npz:toy}}"  # "ssba" in the test ids

ROWS: dict[str, list[tuple[str, str]]] = {
    "ftsam": [
        # names, types, numbers
        (f"{SMOKE} --dataset={{npz:toy}} --attack=magic", "unknown attack"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft,magic", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --model=magic", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --epochs=abc", "--epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --epochs=0", "epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --epochs=-3", "epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --poison_ratio=0", "poison_ratio"),
        (f"{SMOKE} --dataset={{npz:toy}} --poison_ratio=-0.1", "poison_ratio"),
        (f"{SMOKE} --dataset={{npz:toy}} --poison_ratio=7", "poison_ratio"),
        (f"{SMOKE} --dataset={{npz:toy}} --benign_ratio=0", "benign_ratio"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=0", "--batch_size must be >= 1"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=1000000000", "larger than the training"),
        (f"{SMOKE} --dataset={{npz:toy}} --lr=-1", "lr"),
        (f"{SMOKE} --dataset={{npz:toy}} --target=7", "--target 7 is outside [0, 4)"),
        (f"{SMOKE} --dataset={{npz:toy}} --target=-1", "outside"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam --set=ftsam.rho=abc", "rho"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam --set=ftsam.magic=1", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --set=magic.rho=1", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --set=rho", "--set"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ikd --set=ikd.afa_layers=layer3_1,layer4_1",
         "write a tuple of names as a Python literal"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam --rho=-1", "rho"),
        (f"{SMOKE} --dataset={{npz:toy}} --defense_epochs=0 --defenses=ft", "epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --trigger_path={{file}}", "not used by the badnets"),
        (f"{SMOKE} --dataset={{npz:toy}} stray", "unexpected positional arguments"),
        (f"{SMOKE} --config=experiments/configs/ftsam.py:smoke", "not both"),
        (f"{SMOKE} --dataset={{npz:toy}} --config.magic=1", "magic"),
        # data files
        (f"{SMOKE} --dataset=npz:{{tmp}}/missing.npz", "not found"),
        (f"{SMOKE} --dataset={{npz:truncated}}", "cannot read"),
        (f"{SMOKE} --dataset={{npz:text}}", "cannot read"),
        (f"{SMOKE} --dataset={{npz:no_labels}}", "lacks the arrays"),
        (f"{SMOKE} --dataset={{npz:mixed_sizes}}", "cannot read"),
        (f"{SMOKE} --dataset=cifar10 --data_dir={{tmp}}/nowhere", "does not exist"),
        (f"{SMOKE} --dataset=cifar10 --data_dir={{file}}", "is a file"),
        (f"{SMOKE} --dataset=cifar10 --data_dir={{tmp}}", "holds no official cifar10"),
        # degenerate data
        (f"{SMOKE} --dataset={{npz:one_class}}", "at least 2 classes"),
        (f"{SMOKE} --dataset={{npz:empty_test}}", "test split is empty"),
        (f"{SMOKE} --dataset={{npz:label_out_of_range}}", "labels out of range"),
        (f"{SMOKE} --dataset={{npz:negative_label}}", "labels must be >= 0"),
        (f"{SMOKE} --dataset={{npz:all_target}} --attack=badnets", "all 40 test images are of "
         "the target class 0"),
        (f"{SMOKE} --dataset={{npz:float_images}}", "values must lie in [0, 255]"),
        (f"{SMOKE} --dataset={{npz:nan_images}}",
         "float_nan.npz: x_train holds 1 non-finite value (NaN/inf)"),
        # workdirs
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{file}}", "is a file"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{file}}/sub", "lies under the file"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{readonly}}/w", "read-only"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir=/proc/ftsam_jax_test/w", "--workdir"),
        # a damaged file of an earlier run (cut short by a full disk, edited)
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{workdir:results}}",
         "results.json is unreadable (not valid JSON: Unterminated string"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{workdir:config}}",
         "config.json is unreadable (not valid JSON"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{workdir:metrics}}",
         "metrics.jsonl is unreadable (line 2 is not a stage's epoch record)"),
        # moved from tests/test_ftsam_pipeline.py (one subprocess each there)
        (f"{SMOKE} --dataset={{npz:toy}} --attack=nope", "unknown attack 'nope'"),
        (f"{SMOKE} --dataset={{npz:toy}} --model=resnet9000", "unknown model"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=12",
         "not divisible by the number of devices (8)"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=100000",
         "larger than the training set (160 images)"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft,magic", "unknown defenses ['magic']"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft --set=ft.epochz=3", "no setting 'epochz'"),
        # defense variants (issue 22)
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam[rho=x]", "--defenses ftsam[rho=x]"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft[sam=true]",
         "ft[sam=true]: ft.sam cannot be changed"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam[rho",
         "expected NAME or NAME[FIELD=VALUE,...]"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ftsam[nope=1]", "no setting 'nope' in ftsam"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft,ftsam[rho=-2]", "rho must be >= 0"),
        (f"{SMOKE} --dataset={{npz:toy}} --benign_selection=half", "benign_selection"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ft --set=ft.sam=true",
         "ft.sam cannot be changed"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ikd --set=ikd.teacher.sam=false",
         "ikd.teacher_sam"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ikd --set=ikd.teacher.batch_size=64",
         "ikd.batch_size"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=fst --set=fst.alpha=-0.1",
         "alpha must be a finite number >= 0"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=fst --set=fst.alpha=abc", "fst.alpha"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=fst[schedule=step]", "unknown schedule"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.anomaly_threshold=-1",
         "anomaly_threshold must be a finite number > 0"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.attack_threshold=98",
         "attack_threshold must lie in (0, 1] (a fraction)"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc[unlearning_ratio=1.5]",
         "unlearning_ratio must lie in (0, 1)"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.cost_multiplier=1",
         "cost_multiplier must be a finite number > 1"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.trigger_epochs=0",
         "trigger_epochs must be >= 1"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.mask_lr=abc", "nc.mask_lr"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=nc --set=nc.batch_size=12",
         "batch size"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=pam --set=pam.rho=-0.5",
         "rho must be a finite number >= 0"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=pam[trigger=bti]", "unknown trigger 'bti'"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=pam --set=pam.reversed_fraction=2",
         "reversed_fraction must be in [0, 1]"),
        # the training-time defenses: their settings, and an attack that poisons on the fly
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ac --set=ac.reduce=svd",
         "reduce must be one of ('ica', 'pca')"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=ac[size_threshold=1.5]",
         "size_threshold must lie in (0, 1)"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=abl --set=abl.isolation_ratio=0",
         "isolation_ratio must lie in (0, 1)"),
        (f"{SMOKE} --dataset={{npz:toy}} --defenses=abl --set=abl.loss=hinge",
         "loss must be one of ('lga', 'flooding')"),
        (f"{SMOKE} --dataset={{npz:toy}} --attack=wanet --defenses=ft,abl",
         "--defenses abl: a training-time defense needs the attack's poisoned training images"),
        # TrojanNN's settings (config section trojannn)
        (f"{TJ} --config.trojannn.num_neurons=0",
         "trojannn: num_neurons must be >= 1"),
        (f"{TJ} --config.trojannn.num_neurons=17",
         "num_neurons must lie in [1, 16] (the inputs of layer linear)"),
        (f"{TJ} --config.trojannn.layer=magic",
         "the model has no layer 'magic'"),
        (f"{TJ} --config.trojannn.layer=bn1",
         "layer 'bn1' is not a dense or conv layer"),
        (f"{TJ} --config.trojannn.eps=-1",
         "step_size and eps must be > 0"),
        (f"{TJ} --config.trojannn.iterations=-5",
         "iterations must be >= 0"),
        (f"{TJ} --config.trojannn.target_value=nan",
         "target_value must be a finite number"),
        (f"{TJ} --config.trojannn.target_value=big",
         "--config.trojannn.target_value=big"),
        (f"{TJ} --trigger_path={{file}}",
         "not used by the trojannn attack"),
        # ({tmp}/w/trojannn: "trojan" in the test id; a refused run still makes no {tmp}/w)
        (f"--workdir={{tmp}}/w/trojannn {CONFIG} --dataset={{npz:toy}} "
         "--config.trojannn.iterations=5",
         "config trojannn is changed but --attack is not trojannn"),
        # LC's settings (config section lc)
        (f"{LCA} --config.lc.eps=0", "lc: eps and at_eps must lie in (0, 255] grey levels"),
        (f"{LCA} --config.lc.eps=300", "eps and at_eps must lie in (0, 255]"),
        (f"{LCA} --config.lc.eps=big", "--config.lc.eps=big"),
        (f"{LCA} --config.lc.step_size=-1", "step_size and at_step_size must be > 0"),
        (f"{LCA} --config.lc.steps=-5", "steps must be >= 0"),
        (f"{LCA} --config.lc.amplitude=2", "amplitude must lie in (0, 1]"),
        (f"{LCA} --config.lc.amplitude=nan", "amplitude must be a finite number"),
        (f"{LCA} --config.lc.source=robust", "source must be one of ['clean', 'adversarial']"),
        (f"{LCA} --config.lc.source=adversarial --config.lc.at_steps=0", "at_steps >= 1"),
        (f"{LCA} --trigger_path={{file}}", "not used by the lc attack"),
        # ({tmp}/w/lc: "lc" in the test id; a refused run still makes no {tmp}/w)
        (f"--workdir={{tmp}}/w/lc {CONFIG} --dataset={{npz:toy}} --config.lc.steps=5",
         "config lc is changed but --attack is not lc"),
        # SSBA's settings (config section ssba) and its refusal of an encoder near chance
        (f"{SSBA} --config.ssba.bits=0", "ssba: bits, epochs and batch_size must be >= 1"),
        (f"{SSBA} --config.ssba.epochs=-1", "bits, epochs and batch_size must be >= 1"),
        (f"{SSBA} --config.ssba.lr=nan", "ssba: lr must be a finite number"),
        (f"{SSBA} --config.ssba.lr=fast", "--config.ssba.lr=fast"),
        (f"{SSBA} --config.ssba.width=0", "lr, bce_weight and width must be > 0"),
        (f"{SSBA} --config.ssba.l2_ramp=0", "l2_await must be >= 0 and l2_ramp >= 1"),
        (f"{SSBA} --config.ssba.min_bit_accuracy=2",
         "l2_start_acc and min_bit_accuracy must lie in [0, 1]"),
        (f"{SSBA} --config.ssba.batch_size=100000",
         "ssba: batch_size 100000 is larger than the training set ("),
        (f"{SSBA} --trigger_path={{file}}", "not used by the ssba attack"),
        (f"--workdir={{tmp}}/w/ssba {CONFIG} --dataset={{npz:toy}} --config.ssba.epochs=5",
         "config ssba is changed but --attack is not ssba"),
        (f"--workdir={{tmp}}/ssba_refused {SSBA} --config.ssba.bits=64 --config.ssba.epochs=1 "
         "--config.ssba.min_bit_accuracy=0.99 --config.progress=False",
         "below min_bit_accuracy 0.99: its trigger carries no code"),
        ("--config=experiments/configs/ftsam.py:smoke --dataset={npz:toy} --config.nope=1",
         "no config field"),
        ("--dataset={npz:toy} --config=experiments/configs/ftsam.py:tiny", "unknown preset 'tiny'"),
        ("--dataset={npz:toy} --config=/no/such/config.py",
         "cannot load --config=/no/such/config.py"),
        ("--config=experiments/configs/ftsam.py:smoke --dataset={npz:toy} --config.lr=fast",
         "--config.lr=fast"),
        ("--dataset={npz:toy} --config=experiments/configs/ftsam.py:smoke --preset=cpu",
         "not both"),
    ],
    "distill": [
        (f"{SMOKE} --dataset={{npz:toy}} --methods=ce,magic", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --seeds=0,x", "seeds"),
        (f"{SMOKE} --dataset={{npz:toy}} --seeds=1,1", "distinct"),
        (f"{SMOKE} --dataset={{npz:toy}} --teacher=magic", "magic"),
        (f"{SMOKE} --dataset={{npz:toy}} --epochs=0", "epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --teacher_epochs=-1", "epochs"),
        (f"{SMOKE} --dataset={{npz:toy}} --lr=0", "lr"),
        (f"{SMOKE} --dataset={{npz:toy}} --kd_alpha=2", "kd_alpha"),
        (f"{SMOKE} --dataset={{npz:toy}} --temperature=0", "temperature"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=1000000000", "larger than the training"),
        (f"{SMOKE} --dataset={{npz:toy}} --batch_size=abc", "--batch_size"),
        (f"{SMOKE} --dataset={{npz:toy}} --adv_source=magic", "adv_source"),
        (f"{SMOKE} --dataset=npz:{{tmp}}/missing.npz", "not found"),
        (f"{SMOKE} --dataset={{npz:truncated}}", "cannot read"),
        (f"{SMOKE} --dataset={{npz:one_class}}", "at least 2 classes"),
        (f"{SMOKE} --dataset={{npz:empty_train}}", "train split is empty"),
        (f"{SMOKE} --dataset={{npz:label_out_of_range}}", "labels out of range"),
        (f"{SMOKE} --dataset={{npz:mixed_sizes}}", "cannot read"),
        (f"{SMOKE} --dataset=cifar10 --data_dir={{file}}", "is a file"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{file}}", "is a file"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{file}}/sub", "lies under the file"),
        (f"{SMOKE} --dataset={{npz:toy}} --workdir={{readonly}}/w", "read-only"),
        (f"{SMOKE} --config=experiments/configs/distill.py:smoke", "not both"),
        # moved from tests/test_distill_pipeline.py (one subprocess each there)
        ("--dataset={npz:toy} --preset=smoke --methods=ce,magic", "unknown methods ['magic']"),
        ("--dataset={npz:toy} --preset=smoke --afa_layers=stage9",
         "--afa_layers ['stage9'] are not features"),
        ("--dataset={npz:toy} --preset=smoke --batch_size=20",
         "not divisible by the number of devices"),
        ("--dataset={npz:toy} --preset=paper --epochs=0",
         "epochs, widths and --eval_every must be >= 1"),
        ("--config=experiments/configs/distill.py:smoke --dataset={npz:toy} "
         "--config.adv_source=disk", "--adv_source must be precomputed or online"),
        ("--config=experiments/configs/distill.py:smoke --dataset={npz:toy} --config.kd_alpha=x",
         "--config.kd_alpha=x"),
    ],
    "detect": [
        (f"{SMOKE} --methods=student,magic", "--methods must list"),
        (f"{SMOKE} --seeds=0,0", "distinct"),
        (f"{SMOKE} --epochs=0", "must be >= 1"),
        (f"{SMOKE} --teacher_epochs=-2", "must be >= 1"),
        (f"{SMOKE} --lr=0", "--lr must be > 0"),
        (f"{SMOKE} --alpha_adv=-1", "--alpha_adv >= 0"),
        (f"{SMOKE} --batch_size=12", "not divisible"),
        (f"{SMOKE} --batch_size=1024", "larger than the training set"),
        (f"{SMOKE} --num_train=abc", "--num_train"),
        (f"{SMOKE} --dataset=voc:/nowhere", "not supported"),
        ("--config=experiments/configs/detect.py:smoke --config.warmup_epochs=-1",
         "warmup_epochs"),
        ("--config=experiments/configs/detect.py:smoke --config.teacher_eval_every=-1",
         "eval_every"),
        ("--config=experiments/configs/detect.py:smoke --config.eval_split=test", "eval_split"),
        ("--config=experiments/configs/detect.py:nano", "nano"),
        (f"{SMOKE} --data_dir={{tmp}}/nowhere", "not found"),
        (f"{SMOKE} --data_dir={{file}}", "not found"),
        (f"{SMOKE} --dataset=coco:{{tmp}}/nowhere", "COCO folder not found"),
        (f"{SMOKE} --dataset={{coco:bad_json}}", "not valid JSON"),
        (f"{SMOKE} --dataset={{coco:missing_image}}", "not found"),
        (f"{SMOKE} --dataset={{coco:box_outside}}", "outside"),
        (f"{SMOKE} --dataset={{coco:unknown_image}}", "unknown image id 99"),
        (f"{SMOKE} --dataset={{coco:unknown_category}}", "unknown category id 7"),
        (f"{SMOKE} --dataset={{coco:no_images}}", "no images"),
        (f"{SMOKE} --dataset={{coco:no_boxes}}", "no (non-crowd) boxes"),
        (f"{SMOKE} --dataset={{coco:not_an_image}}", "unreadable image"),
        (f"{SMOKE} --workdir={{file}}", "is a file"),
        (f"{SMOKE} --workdir={{file}}/sub", "lies under the file"),
        (f"{SMOKE} --workdir={{readonly}}/w", "read-only"),
        (f"{SMOKE} --config=experiments/configs/detect.py:smoke", "not both"),
        # moved from tests/test_detect_pipeline.py (one subprocess each there)
        ("--config=experiments/configs/detect.py:smoke --config.num_val=0", "must be >= 1"),
        # AFA's attack strength and MGD's settings (issue 34)
        (f"{SMOKE} --afa_eps=-1", "--afa_eps must be a number of grey levels in (0, 255]"),
        (f"{SMOKE} --afa_eps=abc", "--afa_eps"),
        ("--config=experiments/configs/detect.py:smoke --config.afa_eps=nan", "--afa_eps must"),
        (f"{SMOKE} --afa_steps=0", "--afa_steps must be >= 1"),
        ("--config=experiments/configs/detect.py:smoke --config.mgd_lambda=1.0", "mgd_lambda"),
    ],
    "table": [
        ("--attacks=badnets,magic", "magic"),
        ("--defenses=ft,magic", "magic"),
        ("--defense_seeds=0,x", "defense_seeds"),
        ("--defense_seeds=0,0", "distinct"),
        ("--defenses=ft --seeded_defenses=nad", "not in --defenses"),
        ("--defenses=ft,ftsam[rho=abc]", "--defenses ftsam[rho=abc]"),
        ("--defenses=ft,ftsam[adaptive=maybe]", "ftsam[adaptive=maybe]"),
        ("--benign_ratios=0.05,2", "distinct numbers in (0, 1]"),
        ("--defenses=ft --differences=ft:ftsam", "'ftsam' is not a column"),
        ("--differences=ft", "expected A:B"),
        ("--ftsam_flag=--benign_selection=reference", "does not set itself"),
        ("--benign_ratios=0.1 --ftsam_flag=--benign_ratio=0.2", "does not set itself"),
        ("--benign_selection=half", "benign_selection"),
        ("--ftsam_flag=--workdir=x", "does not set itself"),
        ("--ftsam_flag=rho", "does not set itself"),
        ("--preset=huge", "preset"),
        ("--dataset={npz:one_class}", "at least 2 classes"),
        ("--dataset={npz:label_out_of_range}", "labels out of range"),
        ("--dataset=cifar10 --data_dir={file}", "is a file"),
        ("--workdir={file}", "is a file"),
        ("--workdir={file}/sub", "lies under the file"),
        ("--workdir={readonly}/w", "read-only"),
        ("--workdir={workdir:table}", "table.json is unreadable (not valid JSON"),
    ],
    "bench": [
        ("--model=magic", "--model"),
        ("--rows=train_step,magic", "magic"),
        ("--steps=0", "--steps must be >= 1"),
        ("--warmup=-1", "--warmup"),
        ("--batch_size=0", "batch_size"),
        ("--batch_size=12", "divisible"),
        ("--width=-4", "width"),
        ("--image_size=0", "image_size"),
        ("--num_classes=1", "num_classes"),
        ("--dtype=float16", "--dtype"),
        ("--preset=smoke --config=experiments/configs/bench.py:smoke", "not both"),
        ("stray", "unexpected positional arguments"),
    ],
}


# Runs on a disk that refuses a write (`@enospc:FILE`: every write of FILE fails as on a full
# disk, tests/bad_input_worker.py): (entry point, arguments, the expected line after `{w}`,
# the row's workdir). The smoke run trains its backdoored model, then cannot write its results.
WRITE_FAULTS: dict[str, list[tuple[str, str]]] = {
    "ftsam": [
        (f"@enospc:results.json {SMOKE} --dataset={{npz:toy}} --progress=false",
         "error: no space left on device writing results.json in {w}: free space and rerun the "
         "same command to resume"),
    ],
}


def _save_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def make_npz(folder):
    """The broken (and one good) npz data sets the rows name."""
    rng = np.random.default_rng(0)
    x = lambda n: rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)  # noqa: E731
    y = lambda n, k=4: rng.integers(0, k, n)  # noqa: E731
    out = {"toy": _save_npz(folder / "toy.npz", x(160), y(160), x(40), y(40))}
    out["one_class"] = _save_npz(folder / "one.npz", x(64), np.zeros(64, int), x(16),
                                 np.zeros(16, int))
    out["empty_test"] = _save_npz(folder / "empty_test.npz", x(64), y(64), x(0), y(0))
    out["empty_train"] = _save_npz(folder / "empty_train.npz", x(0), y(0), x(16), y(16))
    bad = y(160)
    bad[5] = 255  # a label of a uint8 "unknown" marker: 246 empty classes if accepted
    out["label_out_of_range"] = _save_npz(folder / "oor.npz", x(160), bad, x(40), y(40))
    neg = y(160)
    neg[3] = -1
    out["negative_label"] = _save_npz(folder / "neg.npz", x(160), neg, x(40), y(40))
    out["all_target"] = _save_npz(folder / "all_target.npz", x(160), y(160), x(40),
                                  np.zeros(40, int))
    out["float_images"] = _save_npz(folder / "float.npz", x(160) * 3.0, y(160), x(40), y(40))
    nan = x(160).astype(np.float32)
    nan[7, 3, 2, 1] = np.nan
    out["nan_images"] = _save_npz(folder / "float_nan.npz", nan, y(160), x(40), y(40))
    out["no_labels"] = folder / "no_labels.npz"
    np.savez(out["no_labels"], x_train=x(8), x_test=x(8))
    ragged = np.empty(2, object)
    ragged[0], ragged[1] = x(1)[0], rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    out["mixed_sizes"] = folder / "mixed.npz"
    np.savez(out["mixed_sizes"], x_train=ragged, y_train=y(2), x_test=ragged, y_test=y(2))
    good = out["toy"].read_bytes()
    out["truncated"] = folder / "truncated.npz"
    out["truncated"].write_bytes(good[: len(good) // 2])
    out["text"] = folder / "text.npz"
    out["text"].write_text("x_train,y_train\n1,2\n")
    return out


def make_coco(folder):
    """Small COCO folders, each broken in one way."""
    from PIL import Image

    def write(name, images, annotations, categories, files=True, json_text=None):
        d = folder / name
        (d / "img").mkdir(parents=True)
        if files:
            for im in images:
                Image.new("RGB", (im["width"], im["height"]), (90, 40, 20)).save(
                    d / im["file_name"])
        for split in ("train", "val"):
            (d / f"{split}.json").write_text(json_text or json.dumps(
                {"images": images, "annotations": annotations, "categories": categories}))
        return d

    ims = [{"id": i, "file_name": f"img/{i}.png", "width": 40, "height": 30} for i in range(2)]
    box = lambda i, c=3, b=(2, 2, 10, 8): {"id": i + 1, "image_id": i, "category_id": c,  # noqa: E731
                                           "bbox": list(b)}
    cats = [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}]
    anns = [box(0), box(1)]
    out = {"bad_json": write("bad_json", ims, anns, cats, json_text="{not json")}
    out["missing_image"] = write("missing_image", ims, anns, cats, files=False)
    out["box_outside"] = write("box_outside", ims, [box(0), box(1, b=(35, 2, 10, 8))], cats)
    out["unknown_image"] = write("unknown_image", ims, [*anns, {**box(0), "id": 9,
                                                                "image_id": 99}], cats)
    out["unknown_category"] = write("unknown_category", ims, [box(0), box(1, c=7)], cats)
    out["no_images"] = write("no_images", [], [], cats)
    out["no_boxes"] = write("no_boxes", ims, [], cats)
    d = write("not_an_image", ims, anns, cats)
    (d / "img" / "1.png").write_text("not a png")
    out["not_an_image"] = d
    return out


def make_workdirs(folder):
    """Workdirs of earlier runs, each with one file damaged as a full disk or an editor leaves
    it: cut short, or a line that is no record."""
    results = json.dumps({"dataset": "npz", "attack": "badnets", "defenses": {}}, indent=2)
    damaged = {"results": ("results.json", results[: len(results) // 2]),
               "config": ("config.json", '{"run": {"dataset": '),
               "metrics": ("metrics.jsonl", '{"stage": "backdoored", "epoch": 1}\n{"stage": '),
               "table": ("table.json", '{"benign_selection": "shared", "rows": [')}
    out = {}
    for name, (file, text) in damaged.items():
        (folder / name).mkdir(parents=True)
        (folder / name / file).write_text(text)
        out[name] = folder / name
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    (root / "npz").mkdir()
    plain = root / "plain.txt"
    plain.write_text("a file, not a folder\n")
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    return {"root": root, "npz": make_npz(root / "npz"), "coco": make_coco(root / "coco"),
            "workdir": make_workdirs(root / "workdirs"), "file": plain, "readonly": readonly}


def expand(text: str, inputs, tmp) -> list[str]:
    for kind in ("npz", "coco"):
        for name, path in inputs[kind].items():
            text = text.replace(f"{{{kind}:{name}}}", f"{kind}:{path}")
    for name, path in inputs["workdir"].items():
        text = text.replace(f"{{workdir:{name}}}", str(path))
    text = (text.replace("{file}", str(inputs["file"])).replace("{tmp}", str(tmp))
            .replace("{readonly}", str(inputs["readonly"])).replace("{data}", str(DATA))
            .replace("{cifar}", str(DATA / "cifar10-subset")))
    return text.split()


_outcomes: dict[str, list[dict]] = {}


def outcomes(entry: str, inputs) -> list[dict]:
    """Runs every row of `entry` once (one process) and keeps the outcomes for the tests: those
    of ROWS, then those of WRITE_FAULTS."""
    if entry not in _outcomes:
        rows = []
        for i, (args, _) in enumerate(ROWS[entry] + WRITE_FAULTS.get(entry, [])):
            tmp = inputs["root"] / entry / str(i)
            tmp.mkdir(parents=True)
            argv = expand(args, inputs, tmp)
            if entry != "bench" and not any(a.startswith("--workdir=") for a in argv):
                argv.append(f"--workdir={tmp / 'w'}")
            rows.append(argv)
        proc = subprocess.run([sys.executable, "-m", "tests.bad_input_worker", entry],
                              input=json.dumps(rows), capture_output=True, text=True, cwd=ROOT,
                              env=ENV_8, timeout=600)  # the batch-size rows need 8
        assert proc.returncode == 0, proc.stderr[-3000:]
        _outcomes[entry] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _outcomes[entry]


CASES = [(entry, i) for entry, rows in ROWS.items() for i in range(len(rows))]


@pytest.mark.parametrize("entry, i", CASES,
                         ids=[f"{e}-{i}-{ROWS[e][i][0].replace(SMOKE, '').strip()[:60]}"
                              for e, i in CASES])
def test_bad_input_is_one_line_exit_2(inputs, entry, i):
    args, phrase = ROWS[entry][i]
    if "{readonly}" in args and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the /proc row covers an unwritable "
                    "workdir)")
    if "--dataset=cifar10" in args and "{tmp}" not in args and not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    out = outcomes(entry, inputs)[i]
    stderr = out["stderr"].strip()
    assert out["code"] == 2, f"{args}: exit {out['code']}\n{stderr[-2000:]}"
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert phrase in lines[0], lines[0]
    tmp = inputs["root"] / entry / str(i)
    assert not (tmp / "w").exists(), f"a refused run left {tmp / 'w'}"
    if "{file}" in args:
        assert inputs["file"].read_text() == "a file, not a folder\n"


FAULT_CASES = [(entry, i) for entry, rows in WRITE_FAULTS.items() for i in range(len(rows))]


@pytest.mark.parametrize("entry, i", FAULT_CASES,
                         ids=[f"{e}-{WRITE_FAULTS[e][i][0].split()[0]}" for e, i in FAULT_CASES])
def test_a_refused_write_is_one_line_exit_1(inputs, entry, i):
    """Not bad input (exit 1, not 2): the line says what could not be written and that the
    same command resumes (tests/test_faults.py checks that it does, exactly)."""
    args, line = WRITE_FAULTS[entry][i]
    out = outcomes(entry, inputs)[len(ROWS[entry]) + i]
    stderr = out["stderr"].strip()
    assert out["code"] == 1, f"{args}: exit {out['code']}\n{stderr[-2000:]}"
    workdir = (inputs["root"] / entry / str(len(ROWS[entry]) + i) / "w").resolve()
    assert stderr.splitlines() == [line.format(w=workdir)], stderr[-2000:]
