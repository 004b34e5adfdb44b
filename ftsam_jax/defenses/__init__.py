"""Backdoor defenses: each `(model, variables, benign, config, rng, ctx) -> variables`.

The baselines live in submodules named after their registry names (`defenses.fp.fp`, ...).
Each registration (`DefenseSpec`) also says what the defense fixes in its settings, its named
variants, and how settings records written before a field existed are completed.
"""

from __future__ import annotations

from typing import Any

from ftsam_jax.defenses import abl, ac, anp, clp, fp, fst, ibau, ikd, nad, nc, pam
from ftsam_jax.defenses.base import BenignData, DefenseSpec, PoisonedTrainData, select_benign
from ftsam_jax.defenses.finetune import (
    RECIPES,
    FineTuneConfig,
    ft,
    ft_config,
    ftsam,
    ftsam_config,
)

__all__ = ["DEFENSES", "BenignData", "DefenseSpec", "PoisonedTrainData", "register",
           "select_benign"]

DEFENSES: dict[str, DefenseSpec] = {}


def register(spec: DefenseSpec) -> DefenseSpec:
    DEFENSES[spec.name] = spec
    return spec


# FT's, FT-SAM's and FP's settings became FitConfigs (their fields were copies of it), which
# added the fields they had fixed: augment, drop_last (and for FP SAM's and label smoothing's).
# Records written before lack them; these values reproduce what those runs did.
_FIT_FIELDS: dict[str, Any] = {"augment": True, "drop_last": False}

register(DefenseSpec(
    "ft", ft, ft_config, FineTuneConfig, balanced=False,
    summary="vanilla fine-tuning on benign data (random 5%)",
    fixed={"sam": "FT is plain fine-tuning; the ftsam defense is FT with SAM"},
    added_fields=_FIT_FIELDS))
register(DefenseSpec(
    "ftsam", ftsam, ftsam_config, FineTuneConfig, balanced=True,
    summary="fine-tuning with adaptive SAM, rho 2 (Zhu et al., ICCV 2023)",
    fixed={"sam": "FT-SAM always uses SAM; the ft defense is FT without it"},
    variant_field="recipe", variants=RECIPES, added_fields=_FIT_FIELDS))
register(DefenseSpec(
    "fp", fp.fp, fp.fp_config, fp.FinePruningConfig, balanced=False,
    summary="Fine-Pruning: prune dormant last-stage channels, then fine-tune "
            "(Liu et al., RAID 2018)",
    added_fields={"keep": "last_within", **_FIT_FIELDS, "label_smoothing": 0.0, "sam": False,
                  "rho": 2.0, "adaptive": True, "eta": 0.0, "group_size": None}))
register(DefenseSpec(
    "nad", nad.nad, nad.nad_config, nad.NADConfig, balanced=False,
    summary="Neural Attention Distillation from a fine-tuned teacher (Li et al., ICLR 2021)"))
register(DefenseSpec(
    "anp", anp.anp, anp.anp_config, anp.ANPConfig, balanced=False,
    summary="Adversarial Neuron Pruning of BN neurons, threshold 0.2 (Wu & Wang, NeurIPS 2021)",
    added_fields={"selection": "threshold", "sweep_max": 0.9, "sweep_step": 0.05,
                  "acc_ratio": 0.1}))
register(DefenseSpec(
    "ibau", ibau.ibau, ibau.ibau_config, ibau.IBAUConfig, balanced=False,
    summary="I-BAU: minimax unlearning with implicit hypergradients (Zeng et al., ICLR 2022)",
    added_fields={"delta_space": "pixel"}))
register(DefenseSpec(
    "clp", clp.clp, clp.clp_config, clp.CLPConfig, balanced=False, uses_data=False,
    summary="data-free Channel Lipschitzness-based Pruning, u = 3 (Zheng et al., ECCV 2022)"))
register(DefenseSpec(
    "ikd", ikd.ikd, ikd.ikd_config, ikd.IKDConfig, balanced=True,
    summary="IKD: NAD attention distillation from an FT-SAM teacher plus adversarial feature "
            "augmentation (Liang et al., ACM MM 2023)",
    fixed={"teacher.sam": "the teacher's SAM is ikd.teacher_sam",
           "teacher.batch_size": "the teacher's batch size is ikd.batch_size"},
    added_fields={"teacher": _FIT_FIELDS}))
register(DefenseSpec(
    "fst", fst.fst, fst.fst_config, fst.FSTConfig, balanced=False,
    summary="Feature Shift Tuning: re-initialised head, CE + alpha <W, W0>, head norm kept "
            "(Min et al., NeurIPS 2023)"))
register(DefenseSpec(
    "pam", pam.pam, pam.pam_config, pam.PAMConfig, balanced=False,
    summary="Path-Aware Minimization: SGD on the gradient at weights moved rho towards the "
            "backdoored ones, with reversed-trigger images (Min et al., NeurIPS 2024)"))
register(DefenseSpec(
    "nc", nc.nc, nc.nc_config, nc.NCConfig, balanced=False,
    summary="Neural Cleanse: a reversed trigger per label, MAD outlier test, unlearning of "
            "the flagged triggers (Wang et al., S&P 2019)"))
register(DefenseSpec(
    "ac", ac.ac, ac.ac_config, ac.ACConfig, training_time=True,
    summary="Activation Clustering: per-class ICA + 2-means of the last hidden layer on the "
            "poisoned training set, small clusters removed, retrained (Chen et al., 2018)"))
register(DefenseSpec(
    "abl", abl.abl, abl.abl_config, abl.ABLConfig, training_time=True,
    summary="Anti-Backdoor Learning: LGA isolation of the lowest-loss 1%, continued training, "
            "then unlearning them (Li et al., NeurIPS 2021)"))
