"""The training-time defenses AC (ftsam_jax/defenses/ac.py) and ABL (abl.py): their pieces
against slow references written from the equations (PCA as an SVD projection, the relative-size
rule on planted clusters, the removal record by hand, LGA's value and gradient, the
per-example loss as a log-softmax loop, the isolation by a sort), determinism and exact resume
of each defense, and both through `experiments.ftsam` (their rows with `details`, resumed; an
on-the-fly attack refused)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ftsam as ftsam_exp
from experiments.cli import InputError
from experiments.configs.ftsam import get_config
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses import abl as abl_mod
from ftsam_jax.defenses import ac as ac_mod
from ftsam_jax.defenses.base import PoisonedTrainData
from ftsam_jax.models import TinyCNN
from ftsam_jax.training.step import classification_loss, init_variables
from tests.conftest import small_mesh
from tests.defense_helpers import assert_same, ctx_for, interrupt_after

NUM_CLASSES = 4
MODEL = TinyCNN(num_classes=NUM_CLASSES, width=4)


@pytest.fixture(scope="module")
def poisoned():
    """64 random 8x8 images; 8 'poisoned' ones (a bright corner, label 0)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 120, (64, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, 64).astype(np.int32)
    mask = np.zeros(64, bool)
    mask[rng.choice(64, 8, replace=False)] = True
    x[mask, :3, :3] = 255
    y[mask] = 0
    return PoisonedTrainData(x, y, NUM_CLASSES, mask)


@pytest.fixture(scope="module")
def tiny_vars():
    return jax.device_get(init_variables(MODEL, jax.random.key(1), (8, 8, 3)))
def test_pca_reduction_is_the_projection_on_the_leading_singular_vectors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    a[:, 3] = 1.5  # a constant (dead) channel is dropped
    cfg = ac_mod.ACConfig(nb_dims=3, reduce="pca")
    got = ac_mod.reduce_activations(a, cfg, seed=0)
    kept = np.delete(a, 3, axis=1)
    centred = kept - kept.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:3].T
    assert got.shape == (50, 3)
    for j in range(3):  # each component up to its sign
        assert min(np.abs(got[:, j] - ref[:, j]).max(), np.abs(got[:, j] + ref[:, j]).max()) < 1e-8
    ica = ac_mod.reduce_activations(a, dataclasses.replace(cfg, reduce="ica"), seed=0)
    assert ica.shape == (50, 3)
    np.testing.assert_array_equal(ica, ac_mod.reduce_activations(
        a, dataclasses.replace(cfg, reduce="ica"), seed=0))


def test_the_relative_size_rule_flags_only_a_small_cluster():
    rng = np.random.default_rng(1)
    big, small = rng.normal(0, 0.1, (90, 2)), rng.normal(5, 0.1, (10, 2))
    reduced = np.concatenate([big, small])
    cfg = ac_mod.ACConfig()
    _, flags = ac_mod.cluster_class(reduced, cfg, seed=0)
    np.testing.assert_array_equal(flags, np.arange(100) >= 90)  # the 10% blob, exactly
    # Two large clusters (60 / 40): a clean class, nothing flagged by relative size ...
    even = np.concatenate([rng.normal(0, 0.1, (60, 2)), rng.normal(5, 0.1, (40, 2))])
    assert not ac_mod.cluster_class(even, cfg, seed=0)[1].any()
    # ... while BackdoorBench's "smaller" rule removes the 40.
    _, smaller = ac_mod.cluster_class(even, dataclasses.replace(cfg, cluster_analysis="smaller"),
                                      seed=0)
    np.testing.assert_array_equal(smaller, np.arange(100) >= 60)


def test_the_removal_record_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    flagged = np.array([True, True, False, False, True, False])
    poison = np.array([True, False, True, False, False, False])
    rec = ac_mod.removal_record(labels, flagged, poison, 3, {0: [0.67, 0.33]})
    assert rec["removed"] == 3 and rec["removed_poisoned"] == 1 and rec["poisoned"] == 2
    assert rec["kept"] == 3 and rec["precision"] == pytest.approx(1 / 3)
    assert rec["recall"] == pytest.approx(1 / 2)
    assert rec["per_class"][0] == {"label": 0, "size": 3, "removed": 2, "removed_poisoned": 1,
                                   "poisoned": 2, "cluster_fractions": [0.67, 0.33]}
    assert rec["per_class"][2]["removed"] == 0


def test_ac_settings_refuse_bad_values():
    spec = DEFENSES["ac"]
    assert spec.training_time and spec.config_from_dict(
        dataclasses.asdict(ac_mod.ac_config("paper"))) == ac_mod.ACConfig()
    good = dataclasses.asdict(spec.default_config("paper"))
    for field, value, message in [("reduce", "svd", "reduce"), ("nb_clusters", 1, "nb_clusters"),
                                  ("size_threshold", 1.5, "size_threshold"),
                                  ("cluster_analysis", "big", "cluster_analysis")]:
        with pytest.raises(ValueError, match=message):
            spec.config_from_dict({**good, field: value})


def test_ac_is_deterministic_and_resumes_exactly(mesh, tmp_path, tiny_vars, poisoned,
                                                 monkeypatch):
    spec = DEFENSES["ac"]
    cfg = dataclasses.replace(spec.default_config("smoke"), nb_dims=4, retrain=dataclasses.replace(
        spec.default_config("smoke").retrain, batch_size=16))
    rng = jax.random.key(3)
    out = spec.run(MODEL, tiny_vars, poisoned, cfg, rng, ctx_for(mesh, tmp_path / "a"))
    rec = out.details
    assert rec["removed"] + rec["kept"] == 64 and rec["poisoned"] == 8
    assert rec["removed"] == sum(c["removed"] for c in rec["per_class"])
    assert jax.tree.structure(out.variables) == jax.tree.structure(tiny_vars)
    # Interrupted in the retraining, rerun in the same workdir: the same removal and the same
    # variables bit for bit (determinism and exact resume at once).
    interrupt_after(1, lambda: spec.run(MODEL, tiny_vars, poisoned, cfg, rng,
                                        ctx_for(mesh, tmp_path / "c")), monkeypatch)
    resumed = spec.run(MODEL, tiny_vars, poisoned, cfg, rng, ctx_for(mesh, tmp_path / "c"))
    assert resumed.details == rec and assert_same(resumed.variables, out.variables) is None


def test_ac_retrains_from_scratch_on_exactly_the_kept_images(mesh, tmp_path, tiny_vars,
                                                              poisoned, monkeypatch):
    """Step 5: the retraining gets no variables (a fresh model, not the backdoored one) and
    the poisoned set less the flagged images, in order, with their labels; `smaller` flags a
    cluster in every class, so something is removed."""
    spec = DEFENSES["ac"]
    cfg = dataclasses.replace(spec.default_config("smoke"), nb_dims=4,
                              cluster_analysis="smaller", retrain=dataclasses.replace(
                                  spec.default_config("smoke").retrain, batch_size=16))
    seen = {}

    def fake_fit(name, model, variables, x, y, config, rng, ctx):
        seen.update(name=name, variables=variables, x=x, y=y)
        return tiny_vars, None

    monkeypatch.setattr(ac_mod, "fit", fake_fit)
    rec = spec.run(MODEL, tiny_vars, poisoned, cfg, jax.random.key(3),
                   ctx_for(mesh, tmp_path)).details
    assert seen["name"] == "ac_retrain" and seen["variables"] is None
    assert rec["removed"] > 0 and len(seen["y"]) == rec["kept"] == 64 - rec["removed"]
    # the kept images are a subsequence of the poisoned set, with their own labels
    index = {poisoned.x[i].tobytes(): i for i in range(64)}
    kept = [index[x.tobytes()] for x in seen["x"]]
    assert kept == sorted(kept) and np.array_equal(poisoned.y[kept], seen["y"])
    per_class = np.bincount(seen["y"], minlength=NUM_CLASSES)
    sizes = np.bincount(poisoned.y, minlength=NUM_CLASSES)
    assert per_class.tolist() == [int(sizes[c]) - r["removed"]
                                  for c, r in enumerate(rec["per_class"])]


# ----------------------------------------------------------------------------------------------
# ABL's pieces


def test_lga_and_flooding_follow_their_equations_with_the_same_gradient(tiny_vars, poisoned):
    batch = {"image": jnp.asarray(poisoned.x[:16], jnp.float32) / 255.0,
             "label": jnp.asarray(poisoned.y[:16])}
    params, stats = tiny_vars["params"], tiny_vars["batch_stats"]
    key = jax.random.key(0)
    ce_loss = classification_loss(MODEL.apply)
    ce = float(ce_loss(params, stats, batch, key)[0])
    g_ce = jax.jit(jax.grad(lambda p: ce_loss(p, stats, batch, key)[0]))(params)

    @jax.jit
    def losses_and_grads(p, gamma):
        out = {}
        for kind in abl_mod.LOSSES:
            fn = abl_mod.lga_loss(MODEL.apply, gamma, kind)
            out[kind] = jax.value_and_grad(lambda q, f=fn: f(q, stats, batch, key)[0])(p)
        return out

    for gamma in (0.5 * ce, 2.0 * ce):  # below and above the batch's CE
        sign = 1.0 if ce > gamma else -1.0
        out = losses_and_grads(params, gamma)
        assert float(out["lga"][0]) == pytest.approx(sign * ce, rel=1e-5)
        assert float(out["flooding"][0]) == pytest.approx(abs(ce - gamma) + gamma, rel=1e-5)
        for a, b, c in zip(jax.tree.leaves(g_ce), jax.tree.leaves(out["lga"][1]),
                           jax.tree.leaves(out["flooding"][1]), strict=True):
            np.testing.assert_allclose(b, sign * np.asarray(a), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(c, b, rtol=1e-5, atol=1e-7)


def test_unlearning_ascends_the_cross_entropy(tiny_vars, poisoned):
    """Step 4's loss is -CE: its value and its gradient are CE's negated (a sign error would
    make the unlearning a second round of learning the isolated examples)."""
    batch = {"image": jnp.asarray(poisoned.x[:16], jnp.float32) / 255.0,
             "label": jnp.asarray(poisoned.y[:16])}
    params, stats = tiny_vars["params"], tiny_vars["batch_stats"]
    key = jax.random.key(0)
    ce_fn, up_fn = classification_loss(MODEL.apply), abl_mod.ascent_loss(MODEL.apply)
    ce, g_ce = jax.value_and_grad(lambda p: ce_fn(p, stats, batch, key)[0])(params)
    up, g_up = jax.value_and_grad(lambda p: up_fn(p, stats, batch, key)[0])(params)
    assert float(ce) > 0 and float(up) == pytest.approx(-float(ce), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_ce), jax.tree.leaves(g_up), strict=True):
        np.testing.assert_allclose(b, -np.asarray(a), rtol=1e-6, atol=1e-8)


def test_continued_training_and_unlearning_lr_by_step():
    """Steps 3-4 share one optimizer: lr until the drop epoch, lr / 10 to the end of the
    continued training, then the unlearning lr (BackdoorBench: 0.01, 0.001 from epoch 40 of
    60, then 1e-4), counted in optimizer steps."""
    config = abl_mod.abl_config("paper")
    assert (config.lr, config.lr_drop_epoch, config.finetune_epochs, config.unlearn_lr) == (
        0.01, 40, 60, 1e-4)
    spe = 7
    schedule = abl_mod.continued_schedule(config, spe)
    expected = {0: 0.01, 40 * spe - 1: 0.01, 40 * spe: 0.001, 60 * spe - 1: 0.001,
                60 * spe: 1e-4, 80 * spe: 1e-4}
    for step, lr in expected.items():
        assert float(schedule(jnp.asarray(step))) == pytest.approx(lr, rel=1e-6), step


def test_per_example_loss_and_isolation_match_a_loop(mesh, tiny_vars, poisoned):
    got = abl_mod.per_example_loss(MODEL, tiny_vars, poisoned.x[:40], poisoned.y[:40], mesh,
                                   batch_size=16)  # 40 = 2 full batches + a padded one
    logits = np.asarray(MODEL.apply(tiny_vars, jnp.asarray(poisoned.x[:40], jnp.float32) / 255.0,
                                    train=False), np.float64)
    ref = []
    for row, label in zip(logits, poisoned.y[:40], strict=True):
        top = row.max()
        ref.append(top + np.log(np.exp(row - top).sum()) - row[label])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    losses = np.array([0.3, 0.1, 0.5, 0.1, 0.9, 0.2, 0.7, 0.05, 0.4, 0.6])
    order = sorted(range(10), key=lambda i: (losses[i], i))
    np.testing.assert_array_equal(abl_mod.isolate(losses, 0.3), sorted(order[:3]))
    np.testing.assert_array_equal(abl_mod.isolate(losses, 0.01), [7])  # at least one


def test_abl_settings_refuse_bad_values():
    spec = DEFENSES["abl"]
    assert spec.training_time and abl_mod.abl_config("cpu") == abl_mod.abl_config("paper")
    good = dataclasses.asdict(spec.default_config("paper"))
    for field, value, message in [("isolation_ratio", 0.0, "isolation_ratio"),
                                  ("gamma", -1.0, "gamma"), ("loss", "hinge", "loss"),
                                  ("unlearn_lr", float("nan"), "unlearn_lr")]:
        with pytest.raises(ValueError, match=message):
            spec.config_from_dict({**good, field: value})


def test_abl_is_deterministic_and_resumes_exactly(mesh, tmp_path, tiny_vars, poisoned,
                                                  monkeypatch):
    spec = DEFENSES["abl"]
    cfg = dataclasses.replace(spec.default_config("smoke"), batch_size=16, isolation_ratio=0.125)
    rng = jax.random.key(5)
    out = spec.run(MODEL, tiny_vars, poisoned, cfg, rng, ctx_for(mesh, tmp_path / "a"))
    rec = out.details
    assert rec["isolated"] == 8 and rec["poisoned"] == 8
    assert rec["precision"] == pytest.approx(rec["isolated_poisoned"] / 8)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "abl_finetune", "abl_isolation", "abl_unlearn"]
    # Interrupted in the continued training (1 isolation epoch + 1), then rerun: the same
    # isolation and variables bit for bit (determinism and exact resume at once).
    interrupt_after(2, lambda: spec.run(MODEL, tiny_vars, poisoned, cfg, rng,
                                        ctx_for(mesh, tmp_path / "c")), monkeypatch)
    resumed = spec.run(MODEL, tiny_vars, poisoned, cfg, rng, ctx_for(mesh, tmp_path / "c"))
    assert resumed.details == rec and assert_same(resumed.variables, out.variables) is None


# ----------------------------------------------------------------------------------------------
# Through the pipeline


def test_training_time_defenses_through_experiments_ftsam(toy_npz, tmp_path):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    cfg.defenses = "ac,abl"
    cfg.defense.ac.nb_dims = 4
    cfg.defense.ac.retrain.epochs = 1
    cfg.defense.abl.finetune_epochs = 1
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path / "run", mesh=mesh)
    for name in ("ac", "abl"):
        row = results["defenses"][name]
        assert {"clean_acc", "asr", "der", "details"} <= set(row)
        # a training-time defense sees the whole poisoned training set, not a benign subset
        assert row["training_set"] == {"count": results["config"]["num_train"],
                                       "poisoned": results["config"]["num_poisoned"]}
        assert "benign" not in row and row["details"]["poisoned"] == 32  # 10% of 320
    assert results["defenses"]["abl"]["details"]["isolated"] == int(0.01 * 320)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["defenses"]["ac"]["details"] == results["defenses"]["ac"]["details"]
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path / "run", mesh=mesh)["defenses"] == \
        results["defenses"]
    wanet = get_config("smoke")
    wanet.dataset, wanet.attack, wanet.defenses = f"npz:{toy_npz}", "wanet", "ac"
    with pytest.raises(InputError, match="ac"):
        ftsam_exp.train_and_evaluate(wanet, tmp_path / "wanet", mesh=mesh)
    assert not (tmp_path / "wanet").exists()
