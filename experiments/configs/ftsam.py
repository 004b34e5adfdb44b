r"""Every setting of an `experiments.ftsam` run, as one tree; the argument picks the preset.

    python -m experiments.ftsam --config=experiments/configs/ftsam.py:cpu \
        --config.attack=blended --config.lr=0.01 --config.defense.ftsam.rho=4 \
        --config.defenses=ft,ftsam

Presets: `paper` (the reference recipe: PreAct-ResNet18, SGD 0.01/0.9/5e-4, cosine, 100 epochs,
batch 128), `cpu` (width 16, 60 epochs at lr 0.05: about 20 minutes on 2 CPU cores on the 5k
CIFAR slice), `smoke` (a tiny net, seconds). The top level is the run (data, attack, the
backdoored model's training, the defenders' share of data, logging); `defense.<name>` holds every
defense's settings with their preset values, used when `<name>` is in `defenses`.

This file is the settings: every field is spelled out here with its value in each preset. The
defense sections are the values of `ftsam_jax.defenses.<name>`'s settings dataclass (its schema;
`DEFENSES[name].default_config(preset)` gives the same values, tests/test_ftsam_config.py keeps
the two equal). The flags of `experiments.ftsam` (`--attack`, `--rho`, `--set=ikd.alpha_adv=0`,
...) are aliases of fields of this tree (`experiments.ftsam.FLAG_ALIASES`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

PRESETS = ("paper", "cpu", "smoke")

# Settings whose change makes a workdir's checkpoints and results meaningless (config.json's
# "run": the backdoored model's settings; a rerun with other values is refused). `trojannn`, `lc`,
# `ssba`: an attack's section, in "run" only when it is the attack (older workdirs lack it and
# match).
RUN_KEYS = ("dataset", "data_dir", "attack", "poison_ratio", "target", "trigger_path", "model",
            "width", "epochs", "batch_size", "lr", "seed", "preset", "dtype", "schedule",
            "trojannn", "lc", "ssba")

# BackdoorBench trains WaNet and Input-aware with a MultiStepLR whose milestones (100..400)
# never fire in 100 epochs: a constant learning rate. The paper preset keeps that; everything
# else trains the backdoored model with a cosine per epoch (the run's `schedule`).
CONSTANT_LR_ATTACKS = ("wanet", "input_aware")

# FT-SAM's two recipes: the fields of `defense.ftsam` in which they differ (`--ftsam_recipe`;
# `reference` is the presets' own). The same table as `ftsam_jax.defenses.finetune.RECIPES`.
FTSAM_RECIPES = {
    "reference": {"recipe": "reference", "label_smoothing": 0.1, "schedule": "cosine_iter"},
    "paper": {"recipe": "paper", "label_smoothing": 0.0, "schedule": "cosine_epoch"},
}


def backdoored_schedule(preset: str, attack: str) -> str:
    """The backdoored model's learning-rate schedule (`CONSTANT_LR_ATTACKS`)."""
    return "constant" if preset == "paper" and attack in CONSTANT_LR_ATTACKS else "cosine_epoch"


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    smoke, cpu = preset == "smoke", preset == "cpu"
    c = ml_collections.ConfigDict()
    c.preset = preset
    # Data and attack.
    c.dataset = "cifar10"
    c.data_dir = config_dict.placeholder(str)
    c.attack = "badnets"
    c.poison_ratio = 0.1
    c.target = 0
    c.trigger_path = config_dict.placeholder(str)
    # TrojanNN (ftsam_jax/attacks/trojannn.py; used when attack is trojannn): BackdoorBench's
    # preactresnet18.yaml; smoke shortens the trigger optimisation.
    c.trojannn = dict(layer="linear", num_neurons=2, target_value=100.0,
                      iterations=20 if smoke else 1000, step_size=0.1, eps=0.3, tolerance=1e-3)
    # LC (ftsam_jax/attacks/lc.py; used when attack is lc): PGD eps 16/255 (grey levels), step
    # 1.5, 100 steps, BackdoorBench's corner trigger at amplitude 1, against a model adversarially
    # trained here (paper: PGD 8/255, step 2, 10 steps) or the run's clean model (cpu, smoke);
    # smoke shortens the PGD.
    c.lc = dict(eps=16.0, step_size=1.5, steps=10 if smoke else 100, amplitude=1.0,
                source="adversarial" if preset == "paper" else "clean", at_eps=8.0,
                at_step_size=2.0, at_steps=10)
    # SSBA (ftsam_jax/attacks/ssba.py; used when attack is ssba): the StegaStamp encoder/decoder
    # of BackdoorBench's resource/ssba (100-bit code, Adam 1e-4, batch 64, 20 epochs, L2 weight
    # 10 after 1000 steps ramped over 3000). cpu: half-width networks, a 32-bit code and the
    # L2 ramp scaled to the slice's steps (80 per epoch, ~1/10 of CIFAR-10's); smoke: tiny
    # networks, 2 bits, batch 16, lr 1e-3, and no refusal (80 steps may not learn a code).
    # cpu on the 5,170-image CIFAR slice: 9.5 min of encoder training on the shared 2-core
    # machine (18-49 s an epoch); test bit accuracy 0.9999, PSNR 28.4 dB.
    c.ssba = dict(bits=2 if smoke else 32 if cpu else 100, epochs=4 if smoke else 20,
                  batch_size=16 if smoke else 64, lr=1e-3 if smoke else 1e-4, l2_weight=10.0,
                  l2_await=0 if smoke else 100 if cpu else 1000,
                  l2_ramp=20 if smoke else 300 if cpu else 3000, l2_start_acc=0.9,
                  bce_weight=1.0, width=0.25 if smoke else 0.5 if cpu else 1.0, code_seed=0,
                  min_bit_accuracy=0.0 if smoke else 0.75)
    # The backdoored model and its training (SGD 0.9 / 5e-4, `backdoored_schedule`).
    c.model = "tiny_cnn" if smoke else "preactresnet18"
    c.width = 8 if smoke else 16 if cpu else 64
    c.epochs = 2 if smoke else 60 if cpu else 100
    c.batch_size = 64 if smoke else 128
    c.lr = 0.01 if preset == "paper" else 0.05
    c.dtype = "float32"
    c.seed = 0
    # The defenders: which defenses, their share of the training set, their seed (None: seed).
    c.defenses = ""
    c.benign_ratio = 0.05
    # reference: each defense draws its subset by its own rule from its own stream; shared: one
    # class-balanced subset per defense seed for every defense of the run (paired).
    c.benign_selection = "reference"
    c.defense_seed = config_dict.placeholder(int)
    c.defense = defense_settings(preset)
    # The Retuning Attack (ftsam_jax/retune.py) on every model of the run (undefended, each
    # defense, and a clean model trained on the same data): the released script's settings.
    c.retune_attack = False
    c.retune = dict(benign_ratio=0.02, poison_num=5, epochs=1 if smoke else 5, batch_size=128,
                    lr=0.01, momentum=0.9, weight_decay=0.0, augment=True)
    # Logging and checkpoints.
    c.eval_every = 1 if smoke else 5
    c.checkpoint_every = 1
    c.analysis = False
    c.progress = True
    return c


def defense_settings(preset: str) -> ml_collections.ConfigDict:
    """Every defense's settings (`ftsam_jax.defenses`): `cpu` runs `paper`'s except ANP's
    shorter mask optimisation; `smoke` shortens every training."""
    smoke, cpu = preset == "smoke", preset == "cpu"
    d = ml_collections.ConfigDict()
    # FT (finetune.py): BackdoorBench's fine-tuning, plain CE, cosine per epoch.
    d.ft = dict(
        epochs=2 if smoke else 100, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4,
        schedule="cosine_epoch", t_max=100, label_smoothing=0.0, sam=False, rho=2.0,
        adaptive=True, eta=0.0, group_size=config_dict.placeholder(int), augment=True,
        drop_last=False, recipe="reference")
    # FT-SAM (finetune.py): FT with adaptive SAM; the `reference` recipe (FTSAM_RECIPES).
    d.ftsam = dict(
        epochs=2 if smoke else 100, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4,
        schedule="cosine_iter", t_max=100, label_smoothing=0.1, sam=True, rho=2.0,
        adaptive=True, eta=0.0, group_size=config_dict.placeholder(int), augment=True,
        drop_last=False, recipe="reference")
    # Fine-Pruning (fp.py): the pruning rule, then FT's fine-tuning.
    d.fp = dict(
        epochs=1 if smoke else 100, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4,
        schedule="cosine_epoch", t_max=100, label_smoothing=0.0, sam=False, rho=2.0,
        adaptive=True, eta=0.0, group_size=config_dict.placeholder(int), augment=True,
        drop_last=False, acc_ratio=0.1, prune_step_ratio=0.01, keep="first_beyond",
        eval_batch_size=256)
    # NAD (nad.py): a fine-tuned teacher, then attention distillation into the student.
    d.nad = dict(
        teacher_epochs=1 if smoke else 10, teacher_lr=0.01, teacher_schedule="cosine_epoch",
        teacher_t_max=100, epochs=1 if smoke else 10, lr=0.01, schedule="constant",
        batch_size=256, momentum=0.9, weight_decay=5e-4, betas=(500.0, 1000.0), p=2.0,
        layers=config_dict.placeholder(tuple))
    # ANP (anp.py): cpu runs a quarter of the mask optimisation, at batch 128.
    d.anp = dict(
        iterations=4 if smoke else 500 if cpu else 2000,
        iterations_per_epoch=2 if smoke else 100 if cpu else 500,
        batch_size=128 if cpu else 256, lr=0.2, momentum=0.9, eps=0.4, steps=1,
        step_size=config_dict.placeholder(float), alpha=0.2, threshold=0.2, augment=True,
        selection="threshold", sweep_max=0.9, sweep_step=0.05, acc_ratio=0.1)
    # I-BAU (ibau.py).
    d.ibau = dict(
        rounds=1 if smoke else 5, K=2 if smoke else 5, batch_size=256, lr=1e-4, amsgrad=True,
        inner_lr=0.1, pert_lr=10.0, reg=0.001, portion=0.01, augment=True,
        delta_space="normalized")
    # CLP (clp.py): data-free, no training.
    d.clp = dict(u=3.0)
    d.ikd = ikd_settings(smoke)
    # FST (fst.py): head re-initialised, CE + alpha <W, W0>_F, head norm projected after every
    # step; the paper's CIFAR-10 setting (t_max None: the epochs).
    d.fst = dict(
        epochs=2 if smoke else 10, batch_size=128, lr=0.01, momentum=0.9, weight_decay=0.0,
        schedule="cosine_epoch", t_max=config_dict.placeholder(int), alpha=0.2, augment=True,
        drop_last=False)
    # PAM (pam.py): SGD on the gradient at theta + rho (theta_0 - theta) / ||theta_0 - theta||,
    # a universal-perturbation trigger on int(0.2 B + 1) images per batch; the released setting.
    d.pam = dict(
        rounds=2 if smoke else 3, epochs=1 if smoke else 30, batch_size=128, lr=0.01,
        momentum=0.1, weight_decay=0.0, rho=0.5, reversed_fraction=0.2, trigger="uap",
        uap_lr=10.0, uap_reg=0.001, augment=True, drop_last=False)
    # NC (nc.py): a trigger per label (Adam, the cost schedule), MAD test, unlearning of the
    # flagged triggers; BackdoorBench's settings (t_max None: the epochs).
    d.nc = dict(
        trigger_epochs=2 if smoke else 80, batch_size=64 if smoke else 256, mask_lr=0.1,
        betas=(0.5, 0.9), init_cost=1e-3, cost_multiplier=2.0, patience=5,
        attack_threshold=0.98, early_stop=True, early_stop_threshold=0.99,
        early_stop_patience=25, reset_cost_to_zero=False, anomaly_threshold=2.0,
        unlearning_ratio=0.2, epochs=2 if smoke else 100, lr=0.01, momentum=0.9,
        weight_decay=5e-4, schedule="cosine_epoch", t_max=config_dict.placeholder(int),
        augment=True)
    # AC (ac.py), a training-time defense: per-class ICA + 2-means of the last hidden layer on
    # the poisoned training set, clusters under 35% of their class removed, a model retrained
    # from scratch (BackdoorBench's recipe; cpu: the cpu backdoor recipe).
    d.ac = dict(
        nb_dims=10, reduce="ica", nb_clusters=2, n_init=10, cluster_analysis="relative_size",
        size_threshold=0.35, batch_size=256, retrain=dict(
            epochs=2 if smoke else 60 if cpu else 100, batch_size=128 if smoke or cpu else 256,
            lr=0.05 if smoke or cpu else 0.01, momentum=0.9, weight_decay=5e-4,
            schedule="cosine_epoch", t_max=config_dict.placeholder(int), label_smoothing=0.0,
            sam=False, rho=2.0, adaptive=True, eta=0.0, group_size=config_dict.placeholder(int),
            augment=True, drop_last=True))
    # ABL (abl.py), a training-time defense: LGA isolation training, the lowest-loss 1%
    # isolated, continued training, unlearning by gradient ascent (BackdoorBench's yaml).
    d.abl = dict(
        isolation_epochs=1 if smoke else 20, lr=0.01, gamma=0.5, loss="lga",
        isolation_ratio=0.01, finetune_epochs=2 if smoke else 60,
        lr_drop_epoch=1 if smoke else 40, unlearn_epochs=1 if smoke else 20, unlearn_lr=1e-4,
        batch_size=256, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return d


def ikd_settings(smoke: bool) -> dict:
    """IKD (ikd.py): an FT-SAM teacher (the reference recipe), then NAD + adversarial features;
    `smoke` shortens both trainings."""
    return dict(
        teacher=dict(
            epochs=1 if smoke else 100, batch_size=256, lr=0.01, momentum=0.9,
            weight_decay=5e-4, schedule="cosine_iter", t_max=100, label_smoothing=0.1, sam=True,
            rho=2.0, adaptive=True, eta=0.0, group_size=config_dict.placeholder(int),
            augment=True, drop_last=False, recipe="reference"),
        teacher_sam=True, epochs=2 if smoke else 20, batch_size=256, lr=0.01,
        schedule="constant", momentum=0.9, weight_decay=1e-4, betas=(500.0, 1000.0, 1000.0),
        p=2.0, layers=config_dict.placeholder(tuple), alpha_adv=1e-4,
        afa_layers=config_dict.placeholder(tuple), ikd_fraction=2 / 3, adv_source="precomputed",
        attack=dict(
            eps=8 / 255, step_size=2 / 255, steps=5, decay=1.0, diversity_prob=0.5,
            resize_rate=0.9, clip="image", pad_value=config_dict.placeholder(object)),
        attack_batch_size=256, ssa=False, ssa_quantile=0.5, student_sam=False)
