"""TrojanNN (ftsam_jax/attacks/trojannn.py): the cost, its gradient and the projected signed
step against a slow NumPy reference written from the equations, the neuron selection against
a loop, the layer-input capture, the apple mask, the optimisation on a tiny model, additive
clipped stamping, determinism, the cached trigger (reused on rerun, made again when a setting
or the data change), and a smoke run through `experiments.ftsam`."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ftsam as ftsam_exp
from experiments.configs.ftsam import get_config
from ftsam_jax.attacks import create_attack
from ftsam_jax.attacks import trojannn as tj
from ftsam_jax.models import TinyCNN
from tests.attack_helpers import fit_with
from tests.attack_helpers import tiny_dataset as shared_tiny_dataset
from tests.conftest import small_mesh

SHAPES = [(28, 28, 1), (32, 32, 3)]
MODEL = TinyCNN(num_classes=4, width=4)


class TwoLayer(nn.Module):
    """x -> relu(Dense 'hidden') -> Dense 'linear': the input of `linear` in closed form."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.relu(nn.Dense(6, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(3, name="linear")(h)


def tiny_dataset(shape, n_train=32, n_test=16, seed=0):
    return shared_tiny_dataset(shape, n_train, n_test, seed)


def fit(attack, ds, variables, workdir=None, calls=None):
    fit_with(attack, ds, MODEL, variables, 16, workdir, calls)


@pytest.fixture(scope="module")
def tiny_vars():
    return {s: MODEL.init(jax.random.key(1), jnp.zeros((1, *s))) for s in SHAPES}


# -- the equations --------------------------------------------------------------------------------


def numpy_cost_grad(params, x, keep, neurons, target):
    """C = sum_j (relu(W1^T vec(x*keep) + b1)_j - t)^2 and dC/dx, by hand."""
    w1 = np.asarray(params["hidden"]["kernel"], np.float64)
    b1 = np.asarray(params["hidden"]["bias"], np.float64)
    z = (x * keep).reshape(-1) @ w1 + b1
    a = np.maximum(z, 0.0)
    cost = sum((a[j] - target) ** 2 for j in neurons)
    dz = np.zeros_like(z)
    for j in neurons:
        dz[j] = 2.0 * (a[j] - target) * (z[j] > 0)
    return cost, (w1 @ dz).reshape(x.shape) * keep


def numpy_step(x, x0, grad, step, eps):
    out = np.empty_like(x)
    for i in np.ndindex(x.shape):
        moved = x[i] - step * np.sign(grad[i])
        out[i] = min(1.0, max(0.0, x0[i] + min(eps, max(-eps, moved - x0[i]))))
    return out


def test_cost_gradient_and_step_match_a_numpy_reference():
    shape = (8, 8, 3)
    model = TwoLayer()
    variables = model.init(jax.random.key(3), jnp.zeros((1, *shape)))
    x0 = np.repeat(tj.apple_mask(8, 8)[:, :, None], 3, axis=2)
    keep = (x0 > 0).astype(np.float64)
    neurons, target = [2, 4], 3.0
    cost_fn = lambda x: tj.neuron_cost(model, variables, "linear", jnp.asarray(neurons),
                                       target, x, jnp.asarray(keep, jnp.float32))
    cost_and_grad, step_fn = jax.jit(jax.value_and_grad(cost_fn)), jax.jit(tj.trigger_step)
    # the loop below matches `optimise_trigger` step by step
    x = x0.copy()
    for _ in range(4):
        ref_cost, ref_grad = numpy_cost_grad(variables["params"], x, keep, neurons, target)
        cost, grad = cost_and_grad(jnp.asarray(x, jnp.float32))
        np.testing.assert_allclose(float(cost), ref_cost, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-5)
        assert np.all(np.asarray(grad)[keep == 0] == 0)  # nothing moves outside the mask
        step = step_fn(jnp.asarray(x, jnp.float32), jnp.asarray(x0, jnp.float32), grad, 0.1,
                       0.3)
        x = numpy_step(x, x0, ref_grad, 0.1, 0.3)
        np.testing.assert_allclose(np.asarray(step), x, atol=1e-6)
    out, steps, last = tj.optimise_trigger(model, variables, x0, keep, "linear", neurons,
                                           target_value=target, iterations=4, step_size=0.1,
                                           eps=0.3, tolerance=0.0)
    np.testing.assert_allclose(out, x, atol=1e-6)
    assert steps == 4 and np.isclose(last, ref_cost, rtol=1e-5)
    assert np.all(np.abs(out - x0) <= 0.3 + 1e-6) and out.min() >= 0 and out.max() <= 1
    # the tolerance stops the loop at the first step whose starting cost is below it
    _, steps, _ = tj.optimise_trigger(model, variables, x0, keep, "linear", neurons,
                                      target_value=target, iterations=50, step_size=0.1,
                                      eps=0.3, tolerance=1e12)
    assert steps == 1


def test_neuron_selection_and_layer_capture_match_loops(tiny_vars):
    rng = np.random.default_rng(0)
    dense = {"linear": {"kernel": rng.normal(size=(5, 3))}}
    scores = [sum(abs(dense["linear"]["kernel"][j, i]) for i in range(3)) for j in range(5)]
    idx, got = tj.select_neurons(dense, "linear", 2)
    assert idx.tolist() == list(np.argsort(scores)[::-1][:2])
    np.testing.assert_allclose(got, np.sort(scores)[::-1][:2])
    conv = {"block": {"conv": {"kernel": rng.normal(size=(3, 3, 4, 6))}}}
    k = conv["block"]["conv"]["kernel"]
    ref = [sum(abs(k[a, b, j, o]) for a in range(3) for b in range(3) for o in range(6))
           for j in range(4)]
    np.testing.assert_allclose(tj.neuron_scores(conv, "block/conv"), ref)
    tie = {"linear": {"kernel": np.ones((4, 2))}}
    assert tj.select_neurons(tie, "linear", 3)[0].tolist() == [0, 1, 2]  # ties: lower first
    with pytest.raises(ValueError, match="num_neurons must lie in"):
        tj.select_neurons(dense, "linear", 6)
    with pytest.raises(ValueError, match="no layer"):
        tj.select_neurons(dense, "magic", 1)
    # the captured inputs of `linear` and `conv2` are the sown features and stage1 output
    shape = (32, 32, 3)
    x = jnp.asarray(np.random.default_rng(1).random((2, *shape)), jnp.float32)
    _, sown = MODEL.apply(tiny_vars[shape], x, mutable=["intermediates"])
    _, a = tj.layer_input(MODEL, tiny_vars[shape], x, "linear")
    np.testing.assert_allclose(a, sown["intermediates"]["features"][0], atol=1e-6)
    _, c = tj.layer_input(MODEL, tiny_vars[shape], x, "conv2")
    np.testing.assert_allclose(c, sown["intermediates"]["stage1"][0], atol=1e-6)
    tj.check_layer(MODEL, shape, "conv2", 4)
    with pytest.raises(ValueError, match="not a dense or conv"):
        tj.check_layer(MODEL, shape, "bn1", 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_apple_mask_shape_area_and_place(shape):
    h, w, c = shape
    m = tj.apple_mask(h, w)
    assert m.shape == (h, w) and m.min() == 0.0 and m.max() == 1.0
    keep = m > 0
    # this silhouette keeps 9.1% (32 px) / 9.4% (28 px); BackdoorBench's resized PNG 11.4% /
    # 11.7%, the difference being its faint bilinear rim (the module docstring)
    assert 0.08 < keep.mean() < 0.11
    assert 0.06 < m.mean() < 0.08  # ink: the 224-px PNG covers 7.0%
    rows, cols = np.nonzero(keep)
    assert rows.min() >= h // 2 and cols.min() >= w // 2  # the lower right, as apple4.png
    attack = create_attack("trojannn", num_classes=4, image_shape=shape)
    assert attack.mask_image.shape == shape and attack.keep.shape == shape
    assert np.all(attack.mask_image == m[:, :, None])


# -- the attack on a tiny model ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_optimisation_drives_the_neurons_towards_the_target(shape, tiny_vars):
    ds = tiny_dataset(shape)
    attack = create_attack("trojannn", num_classes=4, image_shape=shape, iterations=30)
    with pytest.raises(RuntimeError, match="fit"):
        attack.apply(ds.x_test)
    fit(attack, ds, tiny_vars[shape])
    r = attack.fit_record
    assert len(r["neurons"]) == 2 and r["steps"] == 30
    assert r["neurons"] == tj.select_neurons(tiny_vars[shape]["params"], "linear", 2)[0].tolist()
    assert r["cost_end"] < r["cost_start"]
    assert sum(r["trigger_activation_end"]) > sum(r["trigger_activation_start"])
    assert np.all(np.abs(attack.trigger - attack.mask_image) <= 0.3 + 1e-6)
    assert np.all(attack.pattern[~attack.keep] == 0)
    # poisoning adds T and clips (no uint8 wrap-around)
    x = ds.x_test
    expected = np.minimum(x.astype(np.int32) + attack.pattern, 255).astype(np.uint8)
    np.testing.assert_array_equal(attack.apply(x), expected)
    bright = np.full((1, *shape), 250, np.uint8)
    assert attack.apply(bright)[0][attack.pattern > 5].min() == 255


def test_fit_is_deterministic(tiny_vars):
    shape = (32, 32, 3)
    ds = tiny_dataset(shape)
    runs = []
    for _ in range(2):
        attack = create_attack("trojannn", num_classes=4, image_shape=shape, iterations=10)
        fit(attack, ds, tiny_vars[shape])
        runs.append(attack)
    np.testing.assert_array_equal(runs[0].trigger, runs[1].trigger)
    assert runs[0].fit_record == runs[1].fit_record


def test_cached_trigger_is_reused_and_a_changed_setting_or_data_remakes_it(tiny_vars, tmp_path,
                                                                           monkeypatch):
    shape = (28, 28, 1)
    ds = tiny_dataset(shape)
    kw = dict(num_classes=4, image_shape=shape, iterations=8)
    calls = []
    first = create_attack("trojannn", **kw)
    fit(first, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1] and (tmp_path / tj.CACHE_FILE).is_file()

    def no_optimisation(*args, **kwargs):
        raise AssertionError("the trigger was optimised again")

    with monkeypatch.context() as m:
        m.setattr(tj, "optimise_trigger", no_optimisation)
        again = create_attack("trojannn", **kw)
        fit(again, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1]  # no clean model asked for
    np.testing.assert_array_equal(again.trigger, first.trigger)
    assert again.fit_record == json.loads(json.dumps(first.fit_record))
    # another setting: made again (and the cache now holds the new one)
    other = create_attack("trojannn", **{**kw, "iterations": 9})
    fit(other, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1, 1] and other.fit_record["steps"] == 9
    # other data: made again
    changed = tiny_dataset(shape)
    changed.x_train[0, 0, 0, 0] ^= 1
    third = create_attack("trojannn", **{**kw, "iterations": 9})
    fit(third, changed, tiny_vars[shape], tmp_path, calls)
    assert calls == [1, 1, 1]
    assert third.fit_record["key"]["data_sha256"] != other.fit_record["key"]["data_sha256"]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_neurons": 0}, "num_neurons must be >= 1"),
    ({"num_neurons": 1.5}, "num_neurons must be an integer"),
    ({"iterations": -1}, "iterations must be >= 0"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"target_value": float("nan")}, "target_value must be a finite number"),
    ({"layer": "a//b"}, "bad layer name"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_attack("trojannn", num_classes=4, image_shape=(32, 32, 3), **kwargs)


def test_trojannn_through_experiments_ftsam(toy_npz, tmp_path, monkeypatch):
    cfg = get_config("smoke")
    cfg.dataset, cfg.attack, cfg.progress = f"npz:{toy_npz}", "trojannn", False
    cfg.epochs = 1  # the clean and the backdoored model
    assert cfg.trojannn.iterations == 20 and get_config("paper").trojannn.iterations == 1000
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh)
    fit_record = results["config"]["attack_fit"]
    assert len(fit_record["neurons"]) == 2 and fit_record["steps"] == 20
    assert fit_record["key"]["settings"] == cfg.trojannn.to_dict()
    assert {"clean_activation", "triggered_activation_end", "clean_model_acc"} <= set(fit_record)
    assert {"clean_acc", "asr", "robust_acc"} <= set(results["backdoored"])
    assert results["config"]["attack_config"]["name"] == "trojannn"
    assert (tmp_path / tj.CACHE_FILE).is_file() and (tmp_path / "models" / "clean").is_dir()
    stored = json.loads((tmp_path / "config.json").read_text())["run"]
    assert stored["trojannn"] == cfg.trojannn.to_dict()
    # Rerun: the cached trigger, nothing optimised or trained again, the same results.
    monkeypatch.setattr(tj, "optimise_trigger", lambda *a, **k: pytest.fail("optimised again"))
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh) == results
