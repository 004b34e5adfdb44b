"""Data sets (uint8 NHWC arrays on the host) and on-device augmentation."""

from ftsam_jax.data.augment import crop_flip, random_crop, random_flip
from ftsam_jax.data.datasets import (
    NORMALIZATION,
    DataError,
    Dataset,
    check_backdoor_target,
    load_dataset,
    normalization_for,
)

__all__ = ["NORMALIZATION", "DataError", "Dataset", "check_backdoor_target", "crop_flip",
           "load_dataset",
           "normalization_for", "random_crop", "random_flip"]
