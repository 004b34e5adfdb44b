"""Object detection for IKD (issue 11): FCOS targets and losses (the detector, FGD, evaluation
and `experiments.detect` are not built yet)."""

from ftsam_jax.detection.losses import detection_loss, giou_ltrb
from ftsam_jax.detection.targets import DEFAULT_RANGES, DEFAULT_STRIDES, fcos_targets, level_points

__all__ = ["DEFAULT_RANGES", "DEFAULT_STRIDES", "detection_loss", "fcos_targets", "giou_ltrb",
           "level_points"]
