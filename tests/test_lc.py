"""LC (ftsam_jax/attacks/lc.py): the projected PGD step and the whole PGD against a slow NumPy
reference written from the equations, the adversarial-training loss, the uint8 storage within
eps, the four-corner trigger against a hand-written pattern, clean labels and only target-class
images perturbed, determinism, the cached adversarial images (reused on rerun, made again when
a setting or the data change), and a smoke run through `experiments.ftsam`."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ftsam as ftsam_exp
from experiments.configs.ftsam import get_config
from ftsam_jax.attacks import build_backdoor_data, create_attack, lc
from ftsam_jax.training.step import cross_entropy
from tests.attack_helpers import fit_with
from tests.attack_helpers import tiny_dataset as shared_tiny_dataset
from tests.conftest import small_mesh

SHAPES = [(28, 28, 1), (32, 32, 3)]


class Linear(nn.Module):
    """Softmax regression: logits = vec(x) W + b (its input gradient in closed form)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(4, name="linear")(x.reshape(x.shape[0], -1))


MODEL = Linear()


def tiny_dataset(shape, n_train=24, n_test=12, seed=0):
    ds = shared_tiny_dataset(shape, n_train, n_test, seed)
    ds.x_train[0, :2] = 0  # saturated pixels: the [0, 1] clip binds
    ds.x_train[0, 2:4] = 255
    return ds


def fit(attack, ds, variables, workdir=None, calls=None):
    fit_with(attack, ds, MODEL, variables, 8, workdir, calls)


@pytest.fixture(scope="module")
def tiny_vars():
    return {s: MODEL.init(jax.random.key(1), jnp.zeros((1, *s))) for s in SHAPES}


# -- the equations ------------------------------------------------------------------------------


def numpy_step(x, x0, grad, step, eps):
    """x + step * sign(g), projected onto the eps-ball around x0 and onto [0, 1], per pixel."""
    out = np.empty_like(x)
    for i, (xi, x0i, gi) in enumerate(zip(x.ravel(), x0.ravel(), grad.ravel(), strict=True)):
        moved = xi + step * (1.0 if gi > 0 else -1.0 if gi < 0 else 0.0)
        moved = min(max(moved, x0i - eps), x0i + eps)
        out.flat[i] = min(max(moved, 0.0), 1.0)
    return out


def numpy_ce_grad(params, x, y):
    """d/dx of the summed cross-entropy of softmax(vec(x) W + b): W (p - onehot(y)), per image."""
    w = np.asarray(params["linear"]["kernel"], np.float64)
    b = np.asarray(params["linear"]["bias"], np.float64)
    z = x.reshape(len(x), -1) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p @ w.T).reshape(x.shape)


def numpy_pgd(params, x0, y, eps, step, steps, start=None):
    x = x0.copy() if start is None else start.copy()
    for _ in range(steps):
        x = numpy_step(x, x0, numpy_ce_grad(params, x, y), step, eps)
    return x


def test_pgd_step_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    x0 = rng.random((3, 5, 5, 2))
    x0[0, 0] = 0.0
    x0[0, 1] = 1.0
    x = np.clip(x0 + rng.uniform(-0.05, 0.05, x0.shape), 0, 1)
    grad = rng.normal(size=x0.shape)
    grad[1, 2] = 0.0  # no move where the gradient is 0
    for step, eps in ((0.02, 0.04), (0.03, 0.01)):  # inside the ball; the projection binds
        out = lc.pgd_step(jnp.asarray(x, jnp.float32), jnp.asarray(x0, jnp.float32),
                          jnp.asarray(grad, jnp.float32), step, eps)
        np.testing.assert_allclose(np.asarray(out), numpy_step(x, x0, grad, step, eps),
                                   atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_pgd_attack_and_stored_images_match_a_numpy_loop(shape, tiny_vars):
    ds = tiny_dataset(shape)
    params = tiny_vars[shape]["params"]
    x0, y = ds.x_train.astype(np.float64) / 255.0, ds.y_train
    eps, step, steps = 4.0, 1.5, 4  # the ball binds after 3 steps
    got = lc.pgd_attack(MODEL, tiny_vars[shape], ds.x_train, y, small_mesh(), eps=eps,
                        step_size=step, steps=steps)
    want = numpy_pgd(params, x0, y, eps / 255, step / 255, steps)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - x0).max() <= eps / 255 + 1e-6 and got.min() >= 0 and got.max() <= 1
    # stored as uint8: round(255 x), never beyond floor(eps) grey levels
    stored = lc.quantise(got, ds.x_train, eps)
    delta = stored.astype(int) - ds.x_train.astype(int)
    assert np.abs(delta).max() == 4
    np.testing.assert_array_equal(stored, np.clip(np.rint(got.astype(np.float64) * 255), 0,
                                                  255).astype(np.uint8))
    # a bound that is not a whole grey level: floor(2.5) = 2 levels at most
    assert np.abs(lc.quantise(x0 + 2.6 / 255, ds.x_train, 2.5).astype(int)
                  - ds.x_train).max() == 2


def test_adversarial_training_loss_matches_a_numpy_reference(tiny_vars):
    shape = (28, 28, 1)
    ds = tiny_dataset(shape)
    v = tiny_vars[shape]
    x0 = ds.x_train[:6].astype(np.float32) / 255.0
    y = ds.y_train[:6]
    rng = jax.random.key(3)
    loss_fn = lc.adversarial_loss(MODEL.apply, eps=8.0, step_size=2.0, steps=3)
    loss, (logits, stats) = jax.jit(loss_fn)(v["params"], {}, {"image": jnp.asarray(x0),
                                                               "label": jnp.asarray(y)}, rng)
    e = 8.0 / 255
    start = np.clip(x0 + np.asarray(jax.random.uniform(rng, x0.shape, jnp.float32, -e, e)), 0, 1)
    x_adv = numpy_pgd(v["params"], x0.astype(np.float64), y, e, 2.0 / 255, 3,
                      start.astype(np.float64))
    want_logits = MODEL.apply(v, jnp.asarray(x_adv, jnp.float32))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-4)
    np.testing.assert_allclose(float(loss), float(cross_entropy(want_logits, y).mean()),
                               atol=1e-5)
    clean = float(cross_entropy(MODEL.apply(v, jnp.asarray(x0)), y).mean())
    assert float(loss) > clean  # the attack raised the loss


# -- the trigger --------------------------------------------------------------------------------

# The four corners of BackdoorBench's "all-corners" pattern, written out by hand (rows top to
# bottom): the left corners alike, the right ones their mirror.
HAND = {"top_left": ("+--", "-+-", "+-+"), "bottom_left": ("+--", "-+-", "+-+"),
        "top_right": ("--+", "-+-", "+-+"), "bottom_right": ("--+", "-+-", "+-+")}


def hand_pattern(h, w):
    out = np.zeros((h, w), int)
    for name, rows in HAND.items():
        r0 = 0 if name.startswith("top") else h - 3
        c0 = 0 if name.endswith("left") else w - 3
        for i, row in enumerate(rows):
            for j, ch in enumerate(row):
                out[r0 + i, c0 + j] = 1 if ch == "+" else -1
    return out


@pytest.mark.parametrize("shape", SHAPES + [(16, 16, 3)])
def test_trigger_corners_and_amplitude_match_a_hand_written_reference(shape):
    h, w, c = shape
    np.testing.assert_array_equal(lc.corner_pattern(h, w), hand_pattern(h, w))
    assert np.count_nonzero(lc.corner_pattern(h, w)) == 36
    grey = np.full((2, *shape), 128, np.uint8)
    full = create_attack("lc", num_classes=4, image_shape=shape).apply(grey)
    want = np.where(hand_pattern(h, w) > 0, 255, np.where(hand_pattern(h, w) < 0, 0, 128))
    np.testing.assert_array_equal(full, np.broadcast_to(want[None, :, :, None], grey.shape))
    reduced = create_attack("lc", num_classes=4, image_shape=shape, amplitude=32 / 255)
    want = 128 + 32 * hand_pattern(h, w)
    np.testing.assert_array_equal(reduced.apply(grey),
                                  np.broadcast_to(want[None, :, :, None], grey.shape))
    # clipped, not wrapped: a bright image stays bright where the pattern adds
    bright = np.full((1, *shape), 250, np.uint8)
    out = reduced.apply(bright)
    assert out[0][hand_pattern(h, w) > 0].min() == 255
    assert out[0][hand_pattern(h, w) < 0].max() == 218


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 6x6"):
        create_attack("lc", num_classes=4, image_shape=(5, 8, 3))


# -- poisoning ----------------------------------------------------------------------------------


def test_clean_labels_and_only_target_class_images_perturbed(tiny_vars):
    shape = (32, 32, 3)
    ds = tiny_dataset(shape)
    attack = create_attack("lc", num_classes=4, image_shape=shape, target=1, steps=3)
    fit(attack, ds, tiny_vars[shape])
    target_idx = np.flatnonzero(ds.y_train == 1)
    np.testing.assert_array_equal(attack.indices, target_idx)
    assert attack.fit_record["num_perturbed"] == len(target_idx)
    bd = build_backdoor_data(ds, attack, 0.125, seed=0)  # round(0.125 * 24) = 3 of the 6
    # the same draw as SIG, our other clean-label attack
    sig = create_attack("sig", num_classes=4, image_shape=shape, target=1)
    np.testing.assert_array_equal(bd.plan.indices,
                                  build_backdoor_data(ds, sig, 0.125, seed=0).plan.indices)
    assert bd.num_poisoned == 3 and np.all(ds.y_train[bd.poison_mask] == 1)
    np.testing.assert_array_equal(bd.y_train, ds.y_train)  # clean labels
    np.testing.assert_array_equal(bd.x_train[~bd.poison_mask], ds.x_train[~bd.poison_mask])
    pos = np.searchsorted(target_idx, bd.plan.indices)
    np.testing.assert_array_equal(bd.x_train[bd.poison_mask],
                                  lc.add_trigger(attack.adversarial[pos], attack.pattern, 1.0))
    assert np.any(attack.adversarial[pos] != ds.x_train[bd.plan.indices])  # perturbed
    # the test set: every non-target image with the trigger only, labelled with the target
    keep = ds.y_test != 1
    np.testing.assert_array_equal(bd.x_bd, attack.apply(ds.x_test[keep]))
    assert np.all(bd.y_bd == 1)
    np.testing.assert_array_equal(bd.y_bd_true, ds.y_test[keep])
    # a ratio beyond the class: the whole class (SIG's convention)
    assert build_backdoor_data(ds, attack, 0.9, seed=0).num_poisoned == len(target_idx)
    with pytest.raises(ValueError, match="only training images of the target class"):
        attack.apply_train(ds.x_train[:1], ds.y_train[:1], np.array([0]))


def test_fit_is_deterministic(tiny_vars):
    shape = (28, 28, 1)
    ds = tiny_dataset(shape)
    runs = []
    for _ in range(2):
        attack = create_attack("lc", num_classes=4, image_shape=shape, steps=3)
        fit(attack, ds, tiny_vars[shape])
        runs.append(attack)
    np.testing.assert_array_equal(runs[0].adversarial, runs[1].adversarial)
    assert runs[0].fit_record == runs[1].fit_record
    record = runs[0].fit_record
    assert record["linf_max"] <= 16 and record["l2_mean"] > 0
    assert 0 <= record["source_model_acc_perturbed"] <= 1


def test_cached_images_are_reused_and_a_changed_setting_or_data_remakes_them(tiny_vars,
                                                                             tmp_path,
                                                                             monkeypatch):
    shape = (28, 28, 1)
    ds = tiny_dataset(shape)
    kw = dict(num_classes=4, image_shape=shape, steps=2)
    calls = []
    first = create_attack("lc", **kw)
    fit(first, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1] and (tmp_path / lc.CACHE_FILE).is_file()

    def no_pgd(*args, **kwargs):
        raise AssertionError("the images were perturbed again")

    with monkeypatch.context() as m:
        m.setattr(lc, "pgd_attack", no_pgd)
        again = create_attack("lc", **kw)
        fit(again, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1]  # no source model asked for
    np.testing.assert_array_equal(again.adversarial, first.adversarial)
    assert again.fit_record == json.loads(json.dumps(first.fit_record))
    # another setting: made again (and the cache now holds the new one)
    other = create_attack("lc", **{**kw, "steps": 1})
    fit(other, ds, tiny_vars[shape], tmp_path, calls)
    assert calls == [1, 1] and other.fit_record["key"]["settings"]["steps"] == 1
    assert other.fit_record["linf_max"] <= 2  # one step of 1.5 grey levels, rounded
    # other data: made again
    changed = tiny_dataset(shape)
    changed.x_train[0, 0, 0, 0] ^= 1
    third = create_attack("lc", **{**kw, "steps": 1})
    fit(third, changed, tiny_vars[shape], tmp_path, calls)
    assert calls == [1, 1, 1]
    assert third.fit_record["key"]["data_sha256"] != other.fit_record["key"]["data_sha256"]


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, "eps and at_eps must lie in"),
    ({"eps": 300.0}, "eps and at_eps must lie in"),
    ({"step_size": -1.0}, "step_size and at_step_size must be > 0"),
    ({"steps": -1}, "steps must be >= 0"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"amplitude": 0.0}, "amplitude must lie in"),
    ({"amplitude": 255.0}, "amplitude must lie in"),
    ({"amplitude": float("nan")}, "amplitude must be a finite number"),
    ({"source": "robust"}, "source must be one of"),
    ({"at_steps": 0}, "at_steps >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_attack("lc", num_classes=4, image_shape=(32, 32, 3), **kwargs)


def test_lc_through_experiments_ftsam(toy_npz, tmp_path, monkeypatch):
    cfg = get_config("smoke")
    cfg.dataset, cfg.attack, cfg.progress = f"npz:{toy_npz}", "lc", False
    cfg.epochs = 1  # the clean and the backdoored model
    assert cfg.lc.steps == 10 and get_config("paper").lc.steps == 100
    assert get_config("cpu").lc.source == "clean" and get_config("paper").lc.source == \
        "adversarial"
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh)
    record = results["config"]["attack_fit"]
    assert record["key"]["settings"] == {k: v for k, v in cfg.lc.to_dict().items()
                                         if not k.startswith("at_")}
    assert {"source_model_test_acc", "source_model_acc_original", "source_model_acc_perturbed",
            "linf_max", "l2_mean"} <= set(record)
    assert 0 < record["linf_max"] <= 16
    n_target = int(np.sum(np.load(toy_npz)["y_train"] == 0))
    assert record["num_perturbed"] == n_target
    assert results["config"]["num_poisoned"] == min(n_target, round(0.1 * 320))
    assert {"clean_acc", "asr", "robust_acc"} <= set(results["backdoored"])
    assert results["config"]["attack_config"]["name"] == "lc"
    assert (tmp_path / lc.CACHE_FILE).is_file() and (tmp_path / "models" / "clean").is_dir()
    stored = json.loads((tmp_path / "config.json").read_text())["run"]
    assert stored["lc"] == cfg.lc.to_dict()
    # Rerun: the cached images, nothing perturbed or trained again, the same results.
    monkeypatch.setattr(lc, "pgd_attack", lambda *a, **k: pytest.fail("perturbed again"))
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh) == results
