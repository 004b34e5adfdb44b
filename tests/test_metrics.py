"""C-Acc, ASR, R-Acc and DER, including DER's sign against the paper's Table 1."""

import numpy as np
import pytest

from ftsam_jax import metrics


def test_accuracies():
    preds = np.array([0, 1, 2, 0, 0])
    assert metrics.clean_acc(preds, np.array([0, 1, 1, 0, 2])) == pytest.approx(0.6)
    assert metrics.asr(preds, np.zeros(5, int)) == pytest.approx(0.6)
    assert metrics.robust_acc(preds, np.array([3, 1, 2, 3, 3])) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.clean_acc(preds, np.zeros(4, int))
    with pytest.raises(ValueError, match="no examples"):
        metrics.asr(np.array([]), np.array([]))


@pytest.mark.parametrize("bd,defended,expected", [
    # (ACC, ASR) in %, from FT-SAM Table 1 (CIFAR-10, PreAct-ResNet18): DER as printed.
    ((91.82, 93.79), (92.21, 1.63), 96.08),   # BadNets, FT-SAM: accuracy rose, no penalty
    ((93.44, 97.71), (92.48, 82.22), 57.26),  # Blended, FT: the accuracy drop is subtracted
    ((93.44, 97.71), (92.44, 4.91), 95.90),   # Blended, FT-SAM
    ((84.49, 97.87), (84.50, 97.87), 50.00),  # SIG, NC: nothing removed
])
def test_der_matches_the_paper(bd, defended, expected):
    value = metrics.der({"clean_acc": bd[0] / 100, "asr": bd[1] / 100},
                        {"clean_acc": defended[0] / 100, "asr": defended[1] / 100})
    assert 100 * value == pytest.approx(expected, abs=0.01)


def test_der_sign_penalises_accuracy_loss():
    bd = {"clean_acc": 0.9, "asr": 0.9}
    keep = metrics.der(bd, {"clean_acc": 0.9, "asr": 0.1})
    lose = metrics.der(bd, {"clean_acc": 0.7, "asr": 0.1})
    assert keep == pytest.approx(0.9) and lose == pytest.approx(0.8) and lose < keep
    assert metrics.der(bd, {"clean_acc": 0.95, "asr": 0.95}) == pytest.approx(0.5)


def test_backdoor_metrics_bundle():
    out = metrics.backdoor_metrics(np.array([1, 2]), np.array([1, 0]), np.array([0, 0, 3]),
                                   np.array([0, 0, 0]), np.array([1, 2, 3]))
    assert out == pytest.approx({"clean_acc": 0.5, "asr": 2 / 3, "robust_acc": 1 / 3})


def test_table_average_der_is_computed_from_averaged_acc_and_asr():
    """The paper's Avg DER (FT-SAM Table 1) is DER(mean ACC/ASR), not the mean of the DERs."""
    from experiments.table_render import table_markdown

    cell = lambda acc, asr, der: {"per_seed": [{}], "clean_acc": {"mean": acc, "std": 0.0},
                                  "asr": {"mean": asr, "std": 0.0}, "der": {"mean": der,
                                                                           "std": 0.0}}
    table = {"dataset": "d", "preset": "cpu", "defense_seeds": [0], "seeded_defenses": ["ft"],
             "defenses": ["ft"], "failures": [], "cells": {
                 "a": {"No defense": {"clean_acc": 0.9, "asr": 0.9}, "ft": cell(0.8, 0.1, 0.85)},
                 "b": {"No defense": {"clean_acc": 0.7, "asr": 0.2}, "ft": cell(0.75, 0.5, 0.5)}}}
    row = next(line for line in table_markdown(table).splitlines() if "| Average |" in line)
    # cells "C-Acc / ASR / DER"; the DER is 61.25 (from the averages), not 67.5 (mean of DERs)
    assert row == "| Average | 80.0 / 55.0 | 77.5 / 30.0 / 61.3 |"


def test_paired_difference_interval_against_the_t_formula():
    """mean +- t_{0.975, n-1} s / sqrt(n) with the tabulated t quantiles (4: 2.776, 9: 2.262)."""
    from ftsam_jax.metrics import paired_difference

    a, b = [1.0, 2.0, 3.0, 4.0, 6.0], [0.5, 1.0, 2.5, 3.0, 5.0]
    d = np.array(a) - np.array(b)  # 0.5, 1, 0.5, 1, 1
    r = paired_difference(a, b)
    half = 2.776445 * d.std(ddof=1) / np.sqrt(5)
    assert r["n"] == 5 and np.isclose(r["mean"], 0.8) and np.isclose(r["std"], d.std(ddof=1))
    assert np.isclose(r["ci_low"], 0.8 - half, atol=1e-5)
    assert np.isclose(r["ci_high"], 0.8 + half, atol=1e-5) and r["resolved"]
    spans = paired_difference([1.0, -1.0] * 5, [0.0] * 10)
    assert np.isclose(spans["ci_high"], 2.262157 * np.std([1, -1] * 5, ddof=1) / np.sqrt(10))
    assert not spans["resolved"]
    one = paired_difference([2.0], [1.0])
    assert one["mean"] == 1.0 and not one["resolved"] and one["ci_low"] == -np.inf
