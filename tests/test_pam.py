"""PAM (ftsam_jax/defenses/pam.py) and its perturbation (`ftsam_jax.optim.pam_gradient`): the
optax stage against a slow NumPy loop written from the update equation, the perturbation's
length and direction, one real step against its pieces, the stamping, the stand-in trigger,
determinism and exact resume of the defense, and a smoke run through `experiments.ftsam`."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import ftsam as ftsam_exp
from experiments.configs.ftsam import get_config
from ftsam_jax import parallel
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses import pam as pam_mod
from ftsam_jax.models import TinyCNN
from ftsam_jax.optim import pam, pam_gradient, path_perturbation
from ftsam_jax.training import stage as stage_mod
from ftsam_jax.training.epoch import make_epoch_fn, standard_preprocess
from ftsam_jax.training.step import classification_loss, create_train_state
from tests.conftest import small_mesh
from tests.defense_helpers import assert_same, ctx_for, tiny_benign
from tests.defense_helpers import random_variables as shared_random_variables

NUM_CLASSES = 4
MODEL = TinyCNN(num_classes=NUM_CLASSES, width=4)


@pytest.fixture(scope="module")
def benign():
    return tiny_benign(NUM_CLASSES)


def random_variables(model, seed=0, image_shape=(8, 8, 3)):
    """Shared random variables with this file's scales."""
    return shared_random_variables(model, seed, image_shape, kernel_gain=1.5,
                                   scale=(0.3, 2.0), var=(0.3, 2.0))


@pytest.fixture(scope="module")
def tiny_vars():
    return random_variables(MODEL, seed=1)
def _grad(xp, w, b, tw, tb):
    """Gradient of 0.5 ||w - tw||^2 + 0.5 ||b - tb||^2 + 0.25 sum(w^4) + sum(w) sum(b)^2 / 2,
    written once for NumPy (float64) and jax.numpy."""
    return (w - tw + w**3 + 0.5 * xp.sum(b) ** 2 * xp.ones_like(w),
            b - tb + xp.sum(w) * xp.sum(b) * xp.ones_like(b))


@pytest.mark.parametrize("rho", [0.3, 5.0])
def test_pam_gradient_matches_a_loop_written_from_the_equation(rho):
    """theta_0 kept; every step e = rho (theta_0 - theta) / ||theta_0 - theta||_2 (one norm over
    all leaves), g = grad L(theta + e), PyTorch SGD with momentum (buf = m buf + g,
    theta -= lr buf); float64 NumPy against the optax chain pam_gradient -> sgd in float32.
    rho 5 exceeds the distance travelled: the perturbed point lies beyond theta_0."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    tw, tb = rng.normal(size=(4, 3)), rng.normal(size=3)
    lr, m = 0.05, 0.1

    w0, b0 = w.copy(), b.copy()  # the anchor: the starting weights
    ref_w, ref_b, buf_w, buf_b, ref = w.copy(), b.copy(), 0.0, 0.0, []
    for _ in range(6):
        dw, db = w0 - ref_w, b0 - ref_b
        norm = np.sqrt(np.sum(dw**2) + np.sum(db**2))
        ew, eb = rho * dw / (norm + 1e-12), rho * db / (norm + 1e-12)
        gw, gb = _grad(np, ref_w + ew, ref_b + eb, tw, tb)
        buf_w, buf_b = m * buf_w + gw, m * buf_b + gb
        ref_w, ref_b = ref_w - lr * buf_w, ref_b - lr * buf_b
        ref.append((ref_w.copy(), ref_b.copy()))

    tx = pam(optax.sgd(lr, momentum=m), rho)
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    twj, tbj = jnp.asarray(tw, jnp.float32), jnp.asarray(tb, jnp.float32)

    def grad_fn(p):
        gw, gb = _grad(jnp, p["w"], p["b"], twj, tbj)
        return {"w": gw, "b": gb}

    state = tx.init(params)
    update = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p,
                                            grad_fn=grad_fn))
    for i, (want_w, want_b) in enumerate(ref):
        updates, state = update(params, state)
        if i == 0:  # at theta_0 there is no path yet: a plain gradient step
            np.testing.assert_allclose(updates["w"], -lr * _grad(np, w, b, tw, tb)[0],
                                       rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"], want_w, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(params["b"], want_b, rtol=2e-5, atol=2e-5)
    assert int(state[0].count) == len(ref)
    assert_same(state[0].anchor, {"w": jnp.asarray(w, jnp.float32),
                                  "b": jnp.asarray(b, jnp.float32)})


def test_path_perturbation_has_length_rho_towards_the_anchor_and_is_zero_there():
    rng = np.random.default_rng(1)
    params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "b": {"c": jnp.asarray(rng.normal(size=5), jnp.float32)}}
    anchor = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                          params)
    e = path_perturbation(params, anchor, 0.7)
    assert float(optax.tree.norm(e)) == pytest.approx(0.7, rel=1e-5)
    d = jax.tree.map(jnp.subtract, anchor, params)
    cos = optax.tree.vdot(e, d) / (optax.tree.norm(e) * optax.tree.norm(d))
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
    zero = path_perturbation(params, params, 0.7)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


def test_pam_gradient_takes_an_explicit_anchor_and_a_schedule_and_refuses_misuse():
    params = {"w": jnp.ones((2,))}
    anchor = {"w": jnp.asarray([3.0, 1.0])}
    seen = []
    tx = pam_gradient(optax.linear_schedule(1.0, 0.0, 2), anchor=anchor)
    state = tx.init(params)
    assert_same(state.anchor, anchor)
    for _ in range(2):
        _, state = tx.update(params, state, params, grad_fn=lambda p: seen.append(p) or p)
    # rho 1 then 0.5 along (anchor - params) / ||.|| = (1, 0)
    np.testing.assert_allclose(seen[0]["w"], [2.0, 1.0])
    np.testing.assert_allclose(seen[1]["w"], [1.5, 1.0])
    with pytest.raises(ValueError, match="needs `params` and the extra argument `grad_fn`"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="anchor's tree differs"):
        pam_gradient(0.5, anchor={"v": jnp.ones((2,))}).init(params)


# ----------------------------------------------------------------------------------------------
# The defense's pieces


def test_one_pam_step_is_sgd_on_the_gradient_at_the_perturbed_weights(tiny_vars, benign):
    """With theta_0 != theta: the step's update is -lr * grad CE(theta + e) on the batch, its BN
    statistics those of a training-mode forward at theta, its metrics of theta."""
    cfg = dataclasses.replace(pam_mod.pam_config("paper"), rho=0.5, momentum=0.1)
    tx = pam_mod.pam_optimizer(cfg)
    start = random_variables(MODEL, seed=2)  # theta_t; theta_0 = tiny_vars
    state = create_train_state(MODEL, tx, jax.random.key(0), (), variables=start)
    state = state.replace(opt_state=tx.init(tiny_vars["params"]))  # anchor theta_0
    batch = {"image": jnp.asarray(benign.x[:16], jnp.float32) / 255,
             "label": jnp.asarray(benign.y[:16])}
    loss_fn = classification_loss(MODEL.apply)
    new, metrics = jax.jit(lambda s, b, r: pam_mod.pam_step(s, b, r, tx=tx, loss_fn=loss_fn))(
        state, batch, jax.random.key(3))

    p, p0 = start["params"], tiny_vars["params"]
    d = jax.tree.map(lambda a, w: np.asarray(a, np.float64) - np.asarray(w, np.float64), p0, p)
    norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(d)))
    perturbed = jax.tree.map(lambda w, dd: jnp.asarray(np.asarray(w) + 0.5 * dd / norm,
                                                       jnp.float32), p, d)
    g = jax.jit(jax.grad(lambda q: loss_fn(q, start["batch_stats"], batch, None)[0]))(perturbed)
    want = jax.tree.map(lambda w, gg: np.asarray(w) - cfg.lr * np.asarray(gg), p, g)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    loss, (_, stats) = jax.jit(lambda q: loss_fn(q, start["batch_stats"], batch, None))(p)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["deviation"]) == pytest.approx(norm, rel=1e-5)
    for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_released_count_of_reversed_images_and_the_stamp():
    assert pam_mod.num_reversed(0.2, 128) == 26  # int(0.2 * 128 + 1)
    assert pam_mod.num_reversed(0.2, 16) == 4
    assert pam_mod.num_reversed(0.0, 128) == 0 and pam_mod.num_reversed(1.0, 16) == 16
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(16, 4, 4, 3)), jnp.float32)
    trigger = jnp.full((1, 4, 4, 3), 0.5)
    cfg = dataclasses.replace(pam_mod.pam_config("smoke"), rho=0.0, lr=0.0)
    tx = pam_mod.pam_optimizer(cfg)
    seen = []

    def loss_fn(params, batch_stats, batch, rng):
        seen.append(batch["image"])
        return jnp.sum(params["w"]) * 0.0, (jnp.zeros((16, 2)), batch_stats)

    state = create_train_state(MODEL, tx, jax.random.key(0), (), variables={
        "params": {"w": jnp.ones(2)}, "batch_stats": {}})
    pam_mod.pam_step(state, {"image": images, "label": jnp.zeros(16, jnp.int32)},
                     jax.random.key(1), tx=tx, loss_fn=loss_fn, trigger=trigger,
                     reversed_per_batch=4)
    out = np.asarray(seen[0])
    stamped = ~np.all(np.isclose(out, np.asarray(images)), axis=(1, 2, 3))
    assert stamped.sum() == 4
    np.testing.assert_allclose(out[stamped], np.clip(np.asarray(images)[stamped] + 0.5, 0, 1))


def test_the_stand_in_trigger_raises_the_loss_of_the_models_own_labels(mesh, tiny_vars, benign):
    cfg = dataclasses.replace(pam_mod.pam_config("smoke"), batch_size=16)
    delta = pam_mod.universal_trigger(MODEL, tiny_vars, benign, cfg, jax.random.key(0), mesh)
    assert delta.shape == (1, 8, 8, 3) and np.all(np.isfinite(delta))
    assert np.abs(delta).max() > 0  # (its determinism: the defense's resume test)

    @jax.jit
    def ces(x, d):
        pseudo = jnp.argmax(MODEL.apply(tiny_vars, x, train=False), -1)
        ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, pseudo).mean()
        return (ce(MODEL.apply(tiny_vars, x, train=False)),
                ce(MODEL.apply(tiny_vars, pam_mod.stamp(x, d), train=False)))

    clean, stamped = ces(jnp.asarray(benign.x, jnp.float32) / 255, delta)
    assert float(stamped) > float(clean)


def test_a_scanned_epoch_of_pam_steps_equals_the_looped_one(mesh, tiny_vars, benign):
    """Accelerators run the epoch as one `lax.scan`, the CPU as a Python loop of steps: PAM's
    step (its anchor in the optimizer state, the stamped images) gives the same numbers in both."""
    cfg = dataclasses.replace(pam_mod.pam_config("smoke"), batch_size=16)
    tx = pam_mod.pam_optimizer(cfg)
    start = random_variables(MODEL, seed=2)
    state = create_train_state(MODEL, tx, jax.random.key(0), (), variables=start)
    state = state.replace(opt_state=tx.init(tiny_vars["params"]))
    step = functools.partial(pam_mod.pam_step, tx=tx, loss_fn=classification_loss(MODEL.apply),
                             trigger=jnp.full((1, 8, 8, 3), 0.2), reversed_per_batch=4)
    x, y = jnp.asarray(benign.x), jnp.asarray(benign.y)
    outs = []
    for scan in (True, False):
        epoch = make_epoch_fn(step, mesh=mesh, num_examples=len(benign.y), batch_size=16,
                              preprocess=standard_preprocess(True), drop_last=False, scan=scan)
        outs.append(epoch(parallel.replicate(state, mesh), x, y, jax.random.key(4)))
    (a, ma), (b, mb) = outs
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    for k in ("loss", "deviation"):
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-5)
    assert float(ma["deviation"]) > 0


def test_pam_settings_refuse_bad_values():
    spec = DEFENSES["pam"]
    good = dataclasses.asdict(spec.default_config("paper"))
    assert spec.config_from_dict(good) == pam_mod.PAMConfig()
    assert pam_mod.pam_config("cpu") == pam_mod.pam_config("paper")
    paper = pam_mod.pam_config("paper")
    assert (paper.rho, paper.rounds, paper.epochs, paper.lr, paper.momentum) == (
        0.5, 3, 30, 0.01, 0.1)
    for field, value, message in [("rho", -0.1, "rho must be"), ("lr", float("nan"), "lr"),
                                  ("epochs", -1, "epochs"), ("trigger", "bti", "unknown trigger"),
                                  ("reversed_fraction", 1.5, "reversed_fraction"),
                                  ("rho", "far", "rho")]:
        with pytest.raises(ValueError, match=message):
            spec.config_from_dict({**good, field: value})
    with pytest.raises(ValueError, match="unknown preset"):
        pam_mod.pam_config("tiny")


# ----------------------------------------------------------------------------------------------
# The defense end to end


def test_pam_is_deterministic_and_resumes_exactly(mesh, tmp_path, tiny_vars, benign,
                                                  monkeypatch):
    spec = DEFENSES["pam"]
    cfg = dataclasses.replace(spec.default_config("smoke"), batch_size=16)
    rng = jax.random.key(7)
    history = []
    defended = spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(
        mesh, tmp_path / "a", log=lambda stage, hist: history.append(hist[-1])))
    out, details = defended.variables, defended.details
    assert details["reversed_per_batch"] == 4 and [r["round"] for r in details["rounds"]] == [1, 2]
    assert all(r["trigger_l2"] > 0 for r in details["rounds"])
    want = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                       for a, b in zip(jax.tree.leaves(out["params"]),
                                       jax.tree.leaves(tiny_vars["params"]), strict=True)))
    assert details["deviation"] == pytest.approx(want, rel=1e-9)
    assert jax.tree.structure(out) == jax.tree.structure(tiny_vars)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
    assert not np.allclose(out["params"]["conv1"]["kernel"], tiny_vars["params"]["conv1"]["kernel"])
    assert [h["stage"] for h in history] == ["pam_round1", "pam_round2"]
    # The second round starts away from theta_0 and moves further (the anchor carries over).
    assert 0 < history[0]["deviation"] < history[1]["deviation"]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "pam_round1", "pam_round2"]
    # Rerun on the same workdir: no epoch recomputed, the same variables.
    epochs_run = []
    again = spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(
        mesh, tmp_path / "a", log=lambda stage, hist: epochs_run.append(stage)))
    assert epochs_run == [] and assert_same(out, again.variables) is None
    assert again.details == details
    # Interrupted after the first round, then rerun in a fresh workdir: resumes to the same
    # variables bit for bit (so the same seed gives the same run).
    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "1")
    with pytest.raises(KeyboardInterrupt):
        spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "c"))
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    resumed = spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "c"))
    assert_same(out, resumed.variables)
    assert resumed.details == details


def test_pam_through_experiments_ftsam_writes_its_row_and_resumes(toy_npz, tmp_path,
                                                                  monkeypatch):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    cfg.defenses = "pam"
    assert cfg.defense.pam.rounds == 2 and cfg.defense.pam.epochs == 1 and cfg.epochs == 2
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path / "full", mesh=mesh)
    row = results["defenses"]["pam"]
    assert {"clean_acc", "asr", "robust_acc", "der"} <= set(row)
    assert row["config"]["rho"] == 0.5 and row["config"]["trigger"] == "uap"
    assert row["details"]["reversed_per_batch"] == 26 and len(row["details"]["rounds"]) == 2
    assert row["details"]["deviation"] > 0
    stored = json.loads((tmp_path / "full" / "results.json").read_text())
    assert stored["defenses"]["pam"]["clean_acc"] == row["clean_acc"]
    # Interrupted after PAM's first round (2 backdoored epochs + 1), then rerun: the numbers of
    # the uninterrupted run.
    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "3")
    with pytest.raises(KeyboardInterrupt):
        ftsam_exp.train_and_evaluate(cfg, tmp_path / "part", mesh=mesh)
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    assert not (tmp_path / "part" / "checkpoints" / "pam_round2").exists()
    resumed = ftsam_exp.train_and_evaluate(cfg, tmp_path / "part", mesh=mesh)["defenses"]["pam"]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert drop(resumed) == drop(row)
