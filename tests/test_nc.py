"""NC (ftsam_jax/defenses/nc.py): the MAD anomaly index and the cost schedule against slow
references written from the published rules, the search's loss, the unlearning set, a planted
easy trigger found and flagged (and unlearned), an evenly spread model left unflagged and
returned unchanged, determinism and label-by-label resume, and a smoke run through
`experiments.ftsam` with the detection record in results.json."""

import dataclasses
import json
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ftsam as ftsam_exp
from experiments.configs.ftsam import get_config
from ftsam_jax.defenses import DEFENSES, BenignData
from ftsam_jax.defenses import nc as nc_mod
from ftsam_jax.defenses.base import Defended
from tests.conftest import small_mesh
from tests.defense_helpers import ctx_for, interrupt_after


def reference_median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def reference_outliers(norms, threshold=2.0):
    """Slow reference: anomaly index |l - med| / (1.4826 * median |l - med|), flagged on the
    small side above the threshold, smallest norm first."""
    med = reference_median(norms)
    mad = 1.4826 * reference_median([abs(v - med) for v in norms])
    index = []
    for v in norms:
        d = abs(v - med)
        index.append(d / mad if mad > 0 else (math.inf if d > 0 else 0.0))
    flagged = [k for k, v in enumerate(norms) if v <= med and index[k] > threshold]
    flagged.sort(key=lambda k: (norms[k], k))
    return index, med, mad, flagged


def test_anomaly_index_matches_a_reference_written_from_the_equation():
    rng = np.random.default_rng(0)
    cases = [list(rng.uniform(10, 30, k)) for k in (3, 4, 10, 11, 43)]
    cases.append([1.0, 20.0, 21.0, 22.0])  # one small outlier: index 19.5 / 1.4826
    cases.append([50.0, 20.0, 21.0, 22.0, 19.0])  # a large outlier is never flagged
    cases.append([5.0, 5.0, 5.0, 1.0])  # MAD = 0: the deviating label at +inf
    cases.append([2.0, 2.0, 2.0])  # MAD = 0, nothing deviates: index 0
    for norms in cases:
        index, med, mad, flagged = reference_outliers(norms)
        got, got_med, got_mad = nc_mod.anomaly_indices(norms)
        np.testing.assert_allclose(got, index, rtol=1e-12)
        assert got_med == pytest.approx(med) and got_mad == pytest.approx(mad)
        assert nc_mod.flagged_labels(norms) == flagged
    assert nc_mod.flagged_labels([1.0, 20.0, 21.0, 22.0]) == [0]
    assert nc_mod.anomaly_indices([1.0, 20.0, 21.0, 22.0])[0][0] == pytest.approx(
        19.5 / 1.4826)
    assert nc_mod.flagged_labels([50.0, 20.0, 21.0, 22.0, 19.0]) == []
    assert nc_mod.flagged_labels([5.0, 5.0, 5.0, 1.0]) == [3]
    # Two small outliers: both flagged, the smaller first; the threshold is a setting.
    norms = [27.0, 1.0, 30.0, 31.0, 29.0, 30.5, 2.0, 29.5]
    assert nc_mod.flagged_labels(norms) == [1, 6]
    assert nc_mod.flagged_labels(norms, threshold=1e9) == []


# ----------------------------------------------------------------------------------------------
# The cost schedule


class ReferenceSearch:
    """The published per-epoch rules written as a plain loop body over mutable counters."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cost = 0.0 if cfg.reset_cost_to_zero else cfg.init_cost
        self.reg_best = math.inf
        self.up = self.down = self.set_count = self.es_count = 0
        self.up_flag = self.down_flag = False
        self.es_best = math.inf

    def epoch(self, acc, reg):
        cfg = self.cfg
        improved = False
        if acc >= cfg.attack_threshold and reg < self.reg_best:
            self.reg_best = reg
            improved = True
        if cfg.early_stop:
            if self.reg_best < math.inf:
                if self.reg_best >= cfg.early_stop_threshold * self.es_best:
                    self.es_count += 1
                else:
                    self.es_count = 0
            self.es_best = min(self.es_best, self.reg_best)
            if self.up_flag and self.down_flag and self.es_count >= cfg.early_stop_patience:
                return improved, True
        if self.cost == 0 and acc >= cfg.attack_threshold:
            self.set_count += 1
            if self.set_count >= cfg.patience:
                self.cost = cfg.init_cost
                self.up = self.down = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_count = 0
        if acc >= cfg.attack_threshold:
            self.up += 1
            self.down = 0
        else:
            self.up = 0
            self.down += 1
        if self.up >= cfg.patience:
            self.up = 0
            self.cost *= cfg.cost_multiplier
            self.up_flag = True
        elif self.down >= cfg.patience:
            self.down = 0
            self.cost /= cfg.cost_multiplier ** 1.5
            self.down_flag = True
        return improved, False


@pytest.mark.parametrize("changes", [
    {}, {"reset_cost_to_zero": True}, {"early_stop": False},
    {"patience": 2, "early_stop_patience": 3, "early_stop_threshold": 1.0},
    {"patience": 3, "cost_multiplier": 1.5, "attack_threshold": 0.5},
])
def test_cost_schedule_matches_the_published_rules_step_by_step(changes):
    cfg = dataclasses.replace(nc_mod.nc_config("paper"), **changes)
    rng = np.random.default_rng(len(changes))
    for trial in range(20):
        ref, s = ReferenceSearch(cfg), nc_mod.CostSchedule.start(cfg)
        # Runs of successes and failures, the norm drifting down with plateaus.
        reg = 100.0
        for epoch in range(200):
            acc = float(rng.choice([0.5, 0.97, 0.98, 0.99, 1.0]) if rng.random() < 0.5
                        else (1.0 if (epoch // int(rng.integers(1, 12))) % 2 else 0.9))
            reg *= float(rng.choice([1.0, 1.0, 0.995, 0.9]))
            want_improved, want_stop = ref.epoch(acc, reg)
            s, improved, stop = nc_mod.schedule_epoch(s, acc, reg, cfg)
            assert (improved, stop) == (want_improved, want_stop), (trial, epoch)
            assert s.cost == pytest.approx(ref.cost, rel=1e-12), (trial, epoch)
            assert (s.up_flag, s.down_flag, s.early_stop_counter) == (
                ref.up_flag, ref.down_flag, ref.es_count)
            if stop:
                break


def test_cost_schedule_by_hand():
    cfg = nc_mod.nc_config("paper")
    s = nc_mod.CostSchedule.start(cfg)
    assert s.cost == 1e-3
    costs = []
    for _ in range(5):  # five successes in a row: cost x 2 at the fifth
        s, improved, stop = nc_mod.schedule_epoch(s, 1.0, 10.0, cfg)
        costs.append(s.cost)
    assert costs == [1e-3] * 4 + [2e-3] and s.up_flag and not s.down_flag
    for _ in range(5):  # five failures: / 2^1.5 at the fifth; 0.979 is a failure
        s, improved, stop = nc_mod.schedule_epoch(s, 0.979, 1.0, cfg)
        assert not improved and not stop
    assert s.cost == pytest.approx(2e-3 / 2 ** 1.5) and s.down_flag
    # A success at an equal norm is no improvement; the best norm is the first one (10).
    s, improved, _ = nc_mod.schedule_epoch(s, 0.98, 10.0, cfg)
    assert not improved and s.reg_best == 10.0
    # With both flags set, 25 epochs without a 1% improvement stop the search, the cost
    # left as it is at the stopping epoch.
    for _ in range(30):
        before = s.cost
        s, _, stop = nc_mod.schedule_epoch(s, 1.0, 9.95, cfg)
        if stop:
            break
    assert stop and s.early_stop_counter == 25 and s.cost == before
    # The cost starts at 0 with reset_cost_to_zero, and five successes set init_cost.
    cfg0 = dataclasses.replace(cfg, reset_cost_to_zero=True)
    s = nc_mod.CostSchedule.start(cfg0)
    for _ in range(5):
        s, _, _ = nc_mod.schedule_epoch(s, 1.0, 10.0, cfg0)
    assert s.cost == 1e-3 and not s.up_flag


# ----------------------------------------------------------------------------------------------
# The search's step and the unlearning set


class LinearModel(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="linear")(x.reshape(x.shape[0], -1))


def test_trigger_step_minimises_ce_plus_cost_times_the_masks_l1(mesh):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 4, 4, 3)).astype(np.float32)
    w = rng.normal(0, 1, (48, 3)).astype(np.float32)
    variables = {"params": {"linear": {"kernel": w, "bias": np.zeros(3, np.float32)}}}
    a = rng.normal(0, 1, (4, 4, 1)).astype(np.float32)
    b = rng.normal(0, 1, (4, 4, 3)).astype(np.float32)
    m, p = np.tanh(a) / (2 + 1e-7) + 0.5, np.tanh(b) / (2 + 1e-7) + 0.5
    xs = (1 - m) * x + m * p
    logits = xs.reshape(8, -1) @ w
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    ce = float(np.mean(lse - logits[:, 2]))
    tx = nc_mod.optax.adam(0.1, b1=0.5, b2=0.9)
    state = nc_mod.TriggerState(jnp.zeros([], jnp.int32), jnp.asarray(a), jnp.asarray(b),
                                tx.init((a, b)), jnp.float32(0.01), jnp.int32(2), variables)
    step = jax.jit(partial(nc_mod.trigger_step, apply_fn=LinearModel().apply, tx=tx))
    new, metrics = step(state, {"image": jnp.asarray(x)}, jax.random.key(0))
    assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["reg"]) == pytest.approx(float(np.abs(m).sum()), rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(ce + 0.01 * float(np.abs(m).sum()), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == 2))
    # Adam's first step moves every variable by lr (a sign step) against its gradient.
    moved = np.abs(np.asarray(new.mask_logit) - a)
    assert np.allclose(moved[moved > 1e-6], 0.1, rtol=1e-3)
    m0, p0 = nc_mod.mask_and_pattern(jnp.ones((2, 2, 1)), jnp.ones((2, 2, 3)))
    assert np.allclose(m0, np.tanh(1) / 2 + 0.5) and np.allclose(p0, 0.8807970, atol=1e-6)


def test_unlearning_set_stamps_a_fifth_once_per_flagged_label_with_true_labels():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 20).astype(np.int32)
    masks = rng.uniform(0, 1, (3, 4, 4, 1)).astype(np.float32)
    patterns = rng.uniform(0, 1, (3, 4, 4, 3)).astype(np.float32)
    benign = BenignData(x, y, 3)
    xs, ys, stamped = nc_mod.unlearning_set(benign, masks, patterns, [2, 0], 0.2,
                                            np.random.default_rng(1))
    order = np.random.default_rng(1).permutation(20)
    clean, rest = order[:16], order[16:]
    assert stamped == 8 and len(ys) == 24
    np.testing.assert_array_equal(xs[:16], x[clean])
    np.testing.assert_array_equal(ys, np.concatenate([y[clean], y[rest], y[rest]]))
    for block, label in ((xs[16:20], 2), (xs[20:24], 0)):
        want = (1 - masks[label]) * (x[rest] / 255.0) + masks[label] * patterns[label]
        np.testing.assert_array_equal(block, np.round(want * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Planted triggers


class RegionModel(nn.Module):
    """Label k's logit rises with the brightness of its own pixel region: the smallest trigger
    of label k brightens that region, so its L1 norm grows with the region's size."""

    sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x, train=False):
        gain = self.param("gain", lambda k: jnp.full((), 20.0))
        bright = x.mean(-1).reshape(x.shape[0], -1)
        starts = np.cumsum((0, *self.sizes))
        feats = [bright[:, a:b].mean(-1) for a, b in zip(starts[:-1], starts[1:], strict=True)]
        return gain * (jnp.stack(feats, -1) - 0.6)


def region_run(mesh, sizes, **changes):
    model = RegionModel(tuple(sizes))
    variables = {"params": {"gain": np.float32(20.0)}}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (64, 8, 8, 3), dtype=np.uint8)  # dark images
    benign = BenignData(x, rng.integers(0, len(sizes), 64).astype(np.int32), len(sizes))
    settings = dict(trigger_epochs=40, batch_size=64, epochs=2, augment=False)
    cfg = dataclasses.replace(nc_mod.nc_config("paper"), **{**settings, **changes})
    return model, variables, benign, cfg


def test_a_planted_small_trigger_is_found_flagged_and_unlearned(mesh, tmp_path):
    model, variables, benign, cfg = region_run(mesh, (1, 8, 9, 10))
    out = DEFENSES["nc"].run(model, variables, benign, cfg, jax.random.key(0),
                             ctx_for(mesh, tmp_path))
    assert isinstance(out, Defended)
    d = out.details
    assert d["flagged"] == [0] and d["unlearned"] is True
    assert d["anomaly_index"][0] > 2 and max(d["anomaly_index"][1:]) < 2
    assert d["min_anomaly_index"] == d["anomaly_index"][0]
    assert d["l1_norms"][0] < min(d["l1_norms"][1:]) / 2
    assert all(d["search"]["found"]) and len(d["search"]["epochs"]) == 4
    assert d["stamped_examples"] == 64 - int(64 * 0.8) and d["unlearning_examples"] == 64
    assert float(out.variables["params"]["gain"]) != 20.0  # fine-tuned
    json.dumps(d)  # JSON-serialisable as it stands
    # The stage is finished: asking again reads the checkpoint (no search reruns), and the
    # flagged label's mask sits on its one-pixel region.
    ran = []
    found = nc_mod.reverse_engineer(model, variables, benign, cfg, jax.random.split(
        jax.random.key(0), 3)[0], ctx_for(mesh, tmp_path, log=lambda s, h: ran.append(s)))
    assert ran == []
    np.testing.assert_allclose(found["l1_norms"], d["l1_norms"], rtol=1e-6)
    mask = found["masks"][0, :, :, 0].reshape(-1)
    assert mask[0] > 0.5 and mask[0] > 10 * mask[1:].max()


def test_an_evenly_spread_model_is_not_flagged_and_returned_unchanged(mesh):
    model, variables, benign, cfg = region_run(mesh, (4, 6, 8, 10))
    out = DEFENSES["nc"].run(model, variables, benign, cfg, jax.random.key(0),
                             ctx_for(mesh, None))
    d = out.details
    assert d["flagged"] == [] and d["unlearned"] is False and "unchanged" in d["note"]
    assert out.variables is variables
    norms = d["l1_norms"]
    assert norms == sorted(norms)  # the norm follows the region's size
    assert d["min_anomaly_index"] < 2


def test_the_search_is_deterministic_and_resumes_label_by_label(mesh, tmp_path, monkeypatch):
    model, variables, benign, cfg = region_run(mesh, (1, 8, 9), trigger_epochs=2,
                                               augment=True, batch_size=32)
    rng = jax.random.key(3)
    run = lambda w: nc_mod.reverse_engineer(model, variables, benign, cfg, rng, ctx_for(mesh, w))
    first = run(tmp_path / "a")
    assert set(first) == {"masks", "patterns", "l1_norms", "epochs", "final_cost",
                          "attack_acc", "found"}
    assert first["masks"].shape == (3, 8, 8, 1) and first["patterns"].shape == (3, 8, 8, 3)
    assert list(first["epochs"]) == [2] * 3
    for key, value in run(None).items():
        np.testing.assert_array_equal(value, first[key])
    # Interrupted after its first label, then rerun: the same triggers.
    interrupt_after(1, lambda: run(tmp_path / "b"), monkeypatch)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "nc_trigger").iterdir()
                  if p.name.isdigit()) == ["1"]
    for key, value in run(tmp_path / "b").items():
        np.testing.assert_array_equal(value, first[key])


# ----------------------------------------------------------------------------------------------
# Settings and the pipeline


def test_nc_settings_refuse_bad_values():
    spec = DEFENSES["nc"]
    good = dataclasses.asdict(spec.default_config("paper"))
    assert spec.config_from_dict(good) == nc_mod.NCConfig()
    assert nc_mod.nc_config("cpu") == nc_mod.nc_config("paper")
    for field, value, message in [
            ("trigger_epochs", 0, "trigger_epochs"), ("mask_lr", 0.0, "mask_lr"),
            ("betas", (0.5, 1.0), "betas"), ("init_cost", -1.0, "init_cost"),
            ("cost_multiplier", 1.0, "cost_multiplier"), ("patience", 0, "patience"),
            ("attack_threshold", 98.0, "a fraction"), ("early_stop_threshold", 0.0, "early"),
            ("early_stop_patience", 0, "early_stop_patience"),
            ("anomaly_threshold", float("nan"), "anomaly_threshold"),
            ("unlearning_ratio", 1.0, "unlearning_ratio"), ("epochs", -1, "epochs"),
            ("schedule", "step", "schedule"), ("mask_lr", "fast", "mask_lr")]:
        with pytest.raises(ValueError, match=message):
            spec.config_from_dict({**good, field: value})
    with pytest.raises(ValueError, match="unknown preset"):
        nc_mod.nc_config("tiny")


def test_nc_through_experiments_ftsam_records_its_detection(toy_npz, tmp_path):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    cfg.defenses = "nc"
    assert cfg.defense.nc.trigger_epochs == 2 and cfg.defense.nc.epochs == 2
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path / "full", mesh=mesh)
    row = results["defenses"]["nc"]
    assert {"clean_acc", "asr", "robust_acc", "der", "details"} <= set(row)
    d = row["details"]
    assert len(d["l1_norms"]) == len(d["anomaly_index"]) == 4
    assert d["unlearned"] == bool(d["flagged"])
    if not d["flagged"]:  # unchanged: the backdoored model's numbers
        assert row["clean_acc"] == results["backdoored"]["clean_acc"]
        assert row["asr"] == results["backdoored"]["asr"]
    stored = json.loads((tmp_path / "full" / "results.json").read_text())
    assert stored["defenses"]["nc"]["details"] == d
    assert row["config"]["trigger_epochs"] == 2 and row["config"]["betas"] == [0.5, 0.9]
    # Rerun on the finished workdir: nothing runs again, the same record.
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path / "full", mesh=mesh)["defenses"] == \
        results["defenses"]
