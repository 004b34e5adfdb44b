"""metrics.jsonl's per-epoch learning rate and the defense curves plot (experiments/curves.py)."""

import json
import math

import pytest

from experiments.curves import defense_curves, plot_defense_curves
from ftsam_jax.training.recipe import FitConfig, epoch_learning_rate


def test_the_logged_learning_rate_is_that_of_the_epochs_last_step():
    # FT-SAM's reference recipe on 3,000 images: 12 steps an epoch (the last one partial),
    # a per-iteration cosine of half-period 100 steps, cyclic past it.
    ftsam = FitConfig(epochs=100, batch_size=256, lr=0.01, schedule="cosine_iter", t_max=100,
                      drop_last=False)
    lr = epoch_learning_rate(ftsam, 3000)
    for epoch, step in ((0, 11), (7, 95), (8, 107), (16, 203)):
        # float32 schedule arithmetic
        assert lr(epoch) == pytest.approx(0.005 * (1 + math.cos(math.pi * step / 100)), rel=1e-5)
    assert lr(8) > lr(7)  # past step 100 the cosine rises again
    ft = FitConfig(epochs=100, batch_size=256, lr=0.01, schedule="cosine_epoch", t_max=100,
                   drop_last=False)
    assert epoch_learning_rate(ft, 3000)(50) == pytest.approx(0.005)


def test_defense_curves_leave_out_the_models_they_start_from(tmp_path):
    lines = [{"stage": "backdoored", "epoch": 1, "accuracy": 0.5, "clean_acc": 0.6, "asr": 1.0},
             {"stage": "clean", "epoch": 1, "accuracy": 0.5, "clean_acc": 0.6, "asr": 0.0},
             {"stage": "retune/ft", "epoch": 1, "accuracy": 0.5},
             {"stage": "ft", "epoch": 1, "accuracy": 0.7, "lr": 0.01},
             {"stage": "ft", "epoch": 2, "accuracy": 0.8, "lr": 0.005, "clean_acc": 0.9,
              "asr": 0.4},
             {"stage": "ftsam_rho=0/ftsam", "epoch": 1, "accuracy": 0.7, "lr": 0.01,
              "clean_acc": 0.8, "asr": 0.3},
             {"stage": "ft", "epoch": 1, "accuracy": 0.75, "lr": 0.01}]  # a resumed epoch
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    curves = defense_curves(path)
    assert list(curves) == ["ft", "ftsam_rho=0/ftsam"]
    assert [r["accuracy"] for r in curves["ft"]] == [0.75, 0.8]  # the later line wins
    assert plot_defense_curves(path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    empty = tmp_path / "none.jsonl"
    empty.write_text(json.dumps(lines[0]) + "\n")
    assert not plot_defense_curves(empty, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
