"""FST (ftsam_jax/defenses/fst.py) and its head projection (`ftsam_jax.optim.norm_projection`):
the projection against a slow NumPy loop written from the equations, the norm kept after every
real step, the loss term's gradient, the head's re-initialisation, determinism and exact resume
of the defense, and a smoke run through `experiments.ftsam`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from experiments import ftsam as ftsam_exp
from experiments.configs.ftsam import get_config
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses import fst as fst_mod
from ftsam_jax.models import TinyCNN, create_model
from ftsam_jax.optim import norm_projection
from ftsam_jax.training import stage as stage_mod
from ftsam_jax.training.step import classification_loss
from tests.conftest import small_mesh
from tests.defense_helpers import assert_same, ctx_for, tiny_benign
from tests.defense_helpers import random_variables as shared_random_variables

NUM_CLASSES = 4
MODEL = TinyCNN(num_classes=NUM_CLASSES, width=4)


@pytest.fixture(scope="module")
def benign():
    return tiny_benign(NUM_CLASSES)


def random_variables(model, seed=0, image_shape=(8, 8, 3)):
    """Shared random variables with this file's scales: a large head kernel (norm well above
    the re-initialisation's), so that the projection visibly rescales."""
    return shared_random_variables(model, seed, image_shape, kernel_gain=3.0,
                                   scale=(0.3, 2.0), var=(0.3, 2.0))


@pytest.fixture(scope="module")
def tiny_vars():
    return random_variables(MODEL, seed=1)
def test_norm_projection_matches_a_loop_written_from_the_equations():
    """SGD with momentum (PyTorch's: buf = m buf + g; W -= lr buf) on a quadratic, then
    W <- W r / ||W||_F after every step, for W only; in float64 NumPy against the optax chain
    sgd -> norm_projection in float32."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    tw, tb = rng.normal(size=(5, 3)), rng.normal(size=3)
    r, lr, m = 1.7, 0.1, 0.9

    def grads(w_, b_):  # of 0.5 ||W - TW||^2 + 0.5 ||b - Tb||^2 + sum(W) * sum(b)
        return w_ - tw + b_.sum(), b_ - tb + w_.sum()

    ref_w, ref_b, buf_w, buf_b, ref = w.copy(), b.copy(), 0.0, 0.0, []
    for _ in range(6):
        gw, gb = grads(ref_w, ref_b)
        buf_w, buf_b = m * buf_w + gw, m * buf_b + gb
        ref_w, ref_b = ref_w - lr * buf_w, ref_b - lr * buf_b
        ref_w = ref_w * r / np.sqrt(np.sum(ref_w**2))
        ref.append((ref_w.copy(), ref_b.copy()))

    tx = optax.chain(optax.sgd(lr, momentum=m), norm_projection({("head", "kernel"): r}))
    params = {"head": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}}
    state = tx.init(params)
    for want_w, want_b in ref:
        gw, gb = grads(np.asarray(params["head"]["kernel"], np.float64),
                       np.asarray(params["head"]["bias"], np.float64))
        g = {"head": {"kernel": jnp.asarray(gw, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["head"]["kernel"], want_w, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(params["head"]["bias"], want_b, rtol=2e-5, atol=2e-6)
        assert float(jnp.linalg.norm(params["head"]["kernel"])) == pytest.approx(r, rel=1e-6)
    assert int(state[1].count) == len(ref)


def test_norm_projection_refuses_unknown_paths_and_bad_norms():
    params = {"linear": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="no parameter at linear/weight"):
        norm_projection({("linear", "weight"): 1.0}).init(params)
    with pytest.raises(ValueError, match="must be > 0"):
        norm_projection({("linear", "kernel"): 0.0})
    with pytest.raises(ValueError, match="needs `params`"):
        tx = norm_projection({("linear", "kernel"): 1.0})
        tx.update(params, tx.init(params))


# ----------------------------------------------------------------------------------------------
# The defense's pieces


def test_head_path_names_each_models_final_dense():
    """The path holds a Dense whose output is the logits: logits = features @ W + b."""
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
    for name in ("preactresnet18", "vgg19_bn", "tiny_cnn"):
        model = create_model(name, 10, width=4)
        variables = random_variables(model)
        path = fst_mod.head_path(model)
        head = variables["params"]
        for p in path:
            head = head[p]
        assert head["kernel"].ndim == 2 and head["bias"].shape == (10,)
        logits, mut = model.apply(variables, x, mutable=["intermediates"])
        feats = mut["intermediates"]["features"][0]
        np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-4,
                                   atol=1e-4)
    with pytest.raises(ValueError, match="no linear head"):
        fst_mod.head_path(object())


def test_the_head_is_reinitialised_within_the_bound_and_nothing_else(mesh, tmp_path, tiny_vars,
                                                                     benign):
    params = tiny_vars["params"]
    new = fst_mod.reinit_head(params, ("linear",), jax.random.key(3))
    fan_in = params["linear"]["kernel"].shape[0]
    bound = 1 / np.sqrt(fan_in)
    for leaf in ("kernel", "bias"):
        v = np.asarray(new["linear"][leaf])
        assert v.shape == params["linear"][leaf].shape
        assert np.all(np.abs(v) <= bound) and np.abs(v).max() > 0.5 * bound
        assert not np.allclose(v, params["linear"][leaf])
    for k in params:
        if k != "linear":
            assert_same(new[k], params[k])
    # Zero epochs: the defense returns exactly that re-initialisation, the rest untouched.
    cfg = dataclasses.replace(fst_mod.fst_config("smoke"), epochs=0, batch_size=16)
    out = fst_mod.fst(MODEL, tiny_vars, benign, cfg, jax.random.key(5), ctx_for(mesh, None))
    init_rng, _ = jax.random.split(jax.random.key(5))
    assert_same(out["params"]["linear"],
                fst_mod.reinit_head(params, ("linear",), init_rng)["linear"])
    for k in params:
        if k != "linear":
            assert_same(out["params"][k], params[k])
    assert_same(out["batch_stats"], tiny_vars["batch_stats"])


def test_the_feature_shift_terms_gradient_is_alpha_w0_on_the_head(tiny_vars, benign):
    params, stats = tiny_vars["params"], tiny_vars["batch_stats"]
    w0 = jnp.asarray(np.random.default_rng(2).normal(size=params["linear"]["kernel"].shape),
                     jnp.float32)
    alpha = 0.3
    batch = {"image": jnp.asarray(benign.x[:8], jnp.float32) / 255, "label": jnp.asarray(
        benign.y[:8])}
    rng = jax.random.key(0)
    g_fst = jax.grad(lambda p: fst_mod.fst_loss(MODEL.apply, ("linear",), w0, alpha)(
        p, stats, batch, rng)[0])(params)
    g_ce = jax.grad(lambda p: classification_loss(MODEL.apply)(p, stats, batch, rng)[0])(params)
    diff = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), g_fst, g_ce)
    np.testing.assert_allclose(diff["linear"]["kernel"], alpha * np.asarray(w0), atol=1e-6)
    for path, leaf in traverse_util.flatten_dict(diff).items():
        if path != ("linear", "kernel"):
            np.testing.assert_allclose(leaf, 0.0, atol=1e-6)
    loss = fst_mod.fst_loss(MODEL.apply, ("linear",), w0, alpha)(params, stats, batch, rng)[0]
    ce = classification_loss(MODEL.apply)(params, stats, batch, rng)[0]
    assert float(loss - ce) == pytest.approx(
        alpha * float(jnp.sum(params["linear"]["kernel"] * w0)), rel=1e-5, abs=1e-5)


def test_the_head_keeps_its_original_norm_after_every_step(tiny_vars, benign):
    cfg = dataclasses.replace(fst_mod.fst_config("paper"), lr=0.5, batch_size=16)
    state, step, _ = fst_mod.fst_setup(MODEL, tiny_vars, cfg, len(benign.y), jax.random.key(1))
    norm0 = float(np.linalg.norm(tiny_vars["params"]["linear"]["kernel"]))
    assert float(np.linalg.norm(state.params["linear"]["kernel"])) < 0.5 * norm0  # re-drawn
    step = jax.jit(step)
    rng = np.random.default_rng(0)
    biases = []
    for i in range(5):
        idx = rng.choice(len(benign.y), 16, replace=False)
        batch = {"image": jnp.asarray(benign.x[idx], jnp.float32) / 255,
                 "label": jnp.asarray(benign.y[idx])}
        before = state.params
        state, metrics = step(state, batch, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
        assert float(np.linalg.norm(state.params["linear"]["kernel"])) == pytest.approx(
            norm0, rel=1e-5)
        assert not np.allclose(state.params["conv1"]["kernel"], before["conv1"]["kernel"])
        biases.append(float(np.linalg.norm(state.params["linear"]["bias"])))
    assert len({round(b, 6) for b in biases}) > 1  # the bias is trained, not projected


# ----------------------------------------------------------------------------------------------
# The defense end to end


def test_fst_is_deterministic_and_resumes_exactly(mesh, tmp_path, tiny_vars, benign,
                                                  monkeypatch):
    spec = DEFENSES["fst"]
    cfg = dataclasses.replace(spec.default_config("smoke"), batch_size=16)
    rng = jax.random.key(7)
    out = spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "a"))
    assert jax.tree.structure(out) == jax.tree.structure(tiny_vars)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
    norm0 = float(np.linalg.norm(tiny_vars["params"]["linear"]["kernel"]))
    assert float(np.linalg.norm(out["params"]["linear"]["kernel"])) == pytest.approx(norm0,
                                                                                     rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["fst"]
    # Same seed, fresh workdir: the same variables bit for bit.
    assert_same(out, spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "b")))
    # Rerun on the same workdir: nothing recomputed, the same variables.
    epochs_run = []
    again = spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(
        mesh, tmp_path / "a", log=lambda stage, hist: epochs_run.append(stage)))
    assert epochs_run == [] and assert_same(out, again) is None
    # Interrupted after its first epoch, then rerun: resumes mid-stage to the same variables.
    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "1")
    with pytest.raises(KeyboardInterrupt):
        spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "c"))
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    assert_same(out, spec.run(MODEL, tiny_vars, benign, cfg, rng, ctx_for(mesh, tmp_path / "c")))
    # Another key: another head draw, other variables.
    other = spec.run(MODEL, tiny_vars, benign, cfg, jax.random.key(8), ctx_for(mesh, None))
    assert not np.allclose(other["params"]["linear"]["kernel"], out["params"]["linear"]["kernel"])


def test_fst_settings_refuse_bad_values():
    spec = DEFENSES["fst"]
    good = dataclasses.asdict(spec.default_config("paper"))
    assert spec.config_from_dict(good) == fst_mod.FSTConfig()
    assert fst_mod.fst_config("cpu") == fst_mod.fst_config("paper")
    assert fst_mod.fst_config("paper").fit_config().weight_decay == 0.0
    for field, value, message in [("alpha", -0.1, "alpha must be"), ("lr", -1.0, "lr"),
                                  ("epochs", -1, "epochs"), ("schedule", "step", "schedule"),
                                  ("alpha", "big", "alpha")]:
        with pytest.raises(ValueError, match=message):
            spec.config_from_dict({**good, field: value})
    with pytest.raises(ValueError, match="unknown preset"):
        fst_mod.fst_config("tiny")


def test_fst_through_experiments_ftsam_writes_its_row_and_resumes(toy_npz, tmp_path,
                                                                  monkeypatch):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    cfg.defenses = "fst"
    assert cfg.defense.fst.epochs == 2 and cfg.epochs == 2
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path / "full", mesh=mesh)
    row = results["defenses"]["fst"]
    assert {"clean_acc", "asr", "robust_acc", "der"} <= set(row)
    assert row["config"]["alpha"] == 0.2 and row["config"]["weight_decay"] == 0.0
    stored = json.loads((tmp_path / "full" / "results.json").read_text())
    assert stored["defenses"]["fst"]["clean_acc"] == row["clean_acc"]
    # Rerun on the finished workdir: nothing runs again, the same record.
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path / "full", mesh=mesh)["defenses"] == \
        results["defenses"]
    # Interrupted inside FST's first epoch (2 backdoored epochs + 1), then rerun: the numbers
    # of the uninterrupted run.
    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "3")
    with pytest.raises(KeyboardInterrupt):
        ftsam_exp.train_and_evaluate(cfg, tmp_path / "part", mesh=mesh)
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints" / "fst").iterdir()
                  if p.name.isdigit()) == ["1"]
    resumed = ftsam_exp.train_and_evaluate(cfg, tmp_path / "part", mesh=mesh)["defenses"]["fst"]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert drop(resumed) == drop(row)
