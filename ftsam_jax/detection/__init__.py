"""Object detection for IKD: FCOS targets and losses, the training step, decoding + NMS, COCO
metrics, FGD and the IKD distillation step (the detector is `ftsam_jax.models.fcos.FCOS`; the
experiment is `experiments.detect`)."""

from ftsam_jax.detection.losses import detection_loss, giou_ltrb
from ftsam_jax.detection.targets import DEFAULT_RANGES, DEFAULT_STRIDES, fcos_targets, level_points

__all__ = ["DEFAULT_RANGES", "DEFAULT_STRIDES", "detection_loss", "fcos_targets", "giou_ltrb",
           "level_points"]
