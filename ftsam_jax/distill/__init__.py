"""IKD (Liang et al., ACM MM 2023, arXiv 2209.09841) in JAX: inconsistent knowledge
distillation with adversarial feature augmentation and sample-specific data augmentation.

- `adversarial`: MI-DI-FGSM against the frozen teacher (`mi_di_fgsm`), and the offline
  precomputation of a training set's adversarial images (`precompute_adversarial`, uint8).
- `losses`: logit KD, feature KD (MSE or NAD attention), the AFA loss with 1x1 align convs.
- `augment`: sample-specific augmentation, the official box rule (`ssa_boxes`) and its
  classification analogue from a Fourier statistic (`ssa_classification`).
- `step`: `make_distill_step(model_s, model_t, tx, config)` -> the pure, jitted, data-parallel
  `distill_step(state, teacher_vars, batch, rng)`.
"""

from ftsam_jax.distill.adversarial import (
    AttackConfig,
    eval_apply,
    input_diversity,
    mi_di_fgsm,
    precompute_adversarial,
    to_uint8,
)
from ftsam_jax.distill.augment import (
    SSAConfig,
    all_small,
    crop_resize,
    fourier_threshold,
    high_freq_share,
    joint_preprocess,
    ssa_boxes,
    ssa_classification,
)
from ftsam_jax.distill.losses import (
    afa_loss,
    align_features,
    attention_loss,
    attention_map,
    feature_kd_loss,
    init_align,
    kd_loss,
)
from ftsam_jax.distill.step import (
    DistillConfig,
    DistillState,
    StudentTeacherState,
    bind_teacher,
    create_distill_state,
    init_alignment,
    make_distill_fns,
    make_distill_step,
)

__all__ = [
    "AttackConfig",
    "DistillConfig",
    "DistillState",
    "SSAConfig",
    "StudentTeacherState",
    "afa_loss",
    "align_features",
    "all_small",
    "attention_loss",
    "attention_map",
    "bind_teacher",
    "create_distill_state",
    "crop_resize",
    "eval_apply",
    "feature_kd_loss",
    "fourier_threshold",
    "high_freq_share",
    "init_align",
    "init_alignment",
    "input_diversity",
    "joint_preprocess",
    "kd_loss",
    "make_distill_fns",
    "make_distill_step",
    "mi_di_fgsm",
    "precompute_adversarial",
    "ssa_boxes",
    "ssa_classification",
    "to_uint8",
]
