"""Backdoor defenses: each `(model, variables, benign, config, rng, ctx) -> variables`.

The baselines live in submodules named after their registry names (`defenses.fp.fp`, ...).
"""

from __future__ import annotations

from ftsam_jax.defenses import anp, clp, fp, ibau, ikd, nad
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
register(DefenseSpec("fp", fp.fp, fp.fp_config, balanced=False,
                     summary="Fine-Pruning: prune dormant last-stage channels, then fine-tune "
                             "(Liu et al., RAID 2018)"))
register(DefenseSpec("nad", nad.nad, nad.nad_config, balanced=False,
                     summary="Neural Attention Distillation from a fine-tuned teacher "
                             "(Li et al., ICLR 2021)"))
register(DefenseSpec("anp", anp.anp, anp.anp_config, balanced=False,
                     summary="Adversarial Neuron Pruning of BN neurons, threshold 0.2 "
                             "(Wu & Wang, NeurIPS 2021)"))
register(DefenseSpec("ibau", ibau.ibau, ibau.ibau_config, balanced=False,
                     summary="I-BAU: minimax unlearning with implicit hypergradients "
                             "(Zeng et al., ICLR 2022)"))
register(DefenseSpec("clp", clp.clp, clp.clp_config, balanced=False, uses_data=False,
                     summary="data-free Channel Lipschitzness-based Pruning, u = 3 "
                             "(Zheng et al., ECCV 2022)"))
register(DefenseSpec("ikd", ikd.ikd, ikd.ikd_config, balanced=True,
                     summary="IKD: NAD attention distillation from an FT-SAM teacher plus "
                             "adversarial feature augmentation (Liang et al., ACM MM 2023)"))
