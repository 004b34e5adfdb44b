"""Backdoor metrics: C-Acc, ASR, R-Acc and DER, as fractions in [0, 1].

- clean_acc: accuracy on the full clean test set.
- asr: share of poisoned test images (every image whose true label is not the target; for
  all-to-all attacks every image, target y + 1) classified as the attacker's label.
- robust_acc: accuracy of the same poisoned images against their true labels.
- der (FT-SAM Eq. 7): [max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2. (One of
  BackdoorBench's two copies adds the accuracy drop instead of subtracting it.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["asr", "backdoor_metrics", "clean_acc", "der", "mean_std", "paired_difference",
           "robust_acc"]


def _accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
    if preds.size == 0:
        raise ValueError("no examples to score")
    return float(np.mean(preds == labels))


def clean_acc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on clean test images."""
    return _accuracy(preds, labels)


def asr(preds_bd: np.ndarray, attacker_labels: np.ndarray) -> float:
    """Attack success rate: poisoned images classified as the attacker's label."""
    return _accuracy(preds_bd, attacker_labels)


def robust_acc(preds_bd: np.ndarray, true_labels: np.ndarray) -> float:
    """Poisoned images still classified as their true label."""
    return _accuracy(preds_bd, true_labels)


def der(backdoored: Mapping[str, float], defended: Mapping[str, float]) -> float:
    """Defense effectiveness rate (FT-SAM Eq. 7) from dicts with `clean_acc` and `asr`."""
    d_asr = backdoored["asr"] - defended["asr"]
    d_acc = backdoored["clean_acc"] - defended["clean_acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0


def backdoor_metrics(preds_clean: np.ndarray, y_clean: np.ndarray, preds_bd: np.ndarray,
                     y_bd: np.ndarray, y_bd_true: np.ndarray) -> dict[str, float]:
    """{"clean_acc", "asr", "robust_acc"} from predictions on the clean and poisoned sets."""
    return {"clean_acc": clean_acc(preds_clean, y_clean), "asr": asr(preds_bd, y_bd),
            "robust_acc": robust_acc(preds_bd, y_bd_true)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) over seeds."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95
                      ) -> dict[str, float | int | bool]:
    """The paired difference a - b over seeds (same seed, same index): mean, sample std, n,
    the two-sided Student-t interval at `level` (mean +- t_{n-1} std / sqrt(n)), and
    `resolved`: whether that interval excludes 0 (with one pair the interval is unbounded)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_difference needs two equal-length, non-empty sequences")
    mean, std = mean_std(d)
    if d.size == 1:
        low, high = -np.inf, np.inf
    else:
        half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * std / np.sqrt(d.size)
        low, high = mean - half, mean + half
    return {"mean": mean, "std": std, "n": int(d.size), "ci_low": float(low),
            "ci_high": float(high), "resolved": bool(low > 0 or high < 0)}
