"""Backdoor attacks: exact triggers, poisoning plans, the poisoned data sets, WaNet's warps,
LF's low-frequency pattern and Input-aware's trained trigger networks (tiny and fast)."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.attacks import ATTACKS, build_backdoor_data, create_attack
from ftsam_jax.attacks.base import to_uint8
from ftsam_jax.attacks.blended import cartoon_pattern
from ftsam_jax.attacks.input_aware import TriggerNet, diversity_loss, threshold
from ftsam_jax.attacks.lf import low_frequency_mask
from ftsam_jax.attacks.wanet import bicubic_matrix, bilinear_grid_sample, identity_grid
from ftsam_jax.data.datasets import Dataset
from ftsam_jax.models import TinyCNN
from ftsam_jax.training.recipe import FitConfig
from ftsam_jax.training.stage import StageContext
from tests.conftest import small_mesh

SHAPES = [(28, 28, 1), (32, 32, 3)]


def images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def tiny_dataset(shape, n_train=32, n_test=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset("tiny", images(n_train, shape, seed),
                   np.arange(n_train, dtype=np.int32) % classes, images(n_test, shape, seed + 1),
                   rng.permutation(np.arange(n_test, dtype=np.int32) % classes),
                   tuple(f"c{i}" for i in range(classes)))


def context(tmp_path):
    return StageContext(mesh=small_mesh(), seed=0, workdir=tmp_path, progress=False)


# -- fixed triggers --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_badnets_changes_exactly_the_bottom_right_3x3_patch(shape):
    x = images(5, shape)
    out = create_attack("badnets", num_classes=10, image_shape=shape).apply(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.all(out[:, -3:, -3:, :] == 255)
    changed = np.zeros(shape[:2], bool)
    changed[-3:, -3:] = True
    np.testing.assert_array_equal(out[:, ~changed], x[:, ~changed])


@pytest.mark.parametrize("shape", SHAPES)
def test_blended_is_the_rounded_alpha_blend(shape):
    x = images(4, shape)
    attack = create_attack("blended", num_classes=10, image_shape=shape)
    pat = cartoon_pattern(*shape[:2]).astype(np.float64)
    if shape[-1] == 1:
        pat = np.clip(np.rint(pat @ np.array([0.299, 0.587, 0.114])), 0, 255)[..., None]
    expected = np.clip(np.rint(0.8 * x + 0.2 * pat), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(attack.apply(x), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_sig_signal_formula(shape):
    h, w, c = shape
    x = images(3, shape)
    out = create_attack("sig", num_classes=10, image_shape=shape).apply(x)
    j = np.arange(w)
    signal = 40.0 * np.sin(2 * np.pi * j * 6 / w)[None, None, :, None]
    np.testing.assert_array_equal(out, np.clip(np.rint(x + signal), 0, 255).astype(np.uint8))


def test_sig_clean_label_plan_draws_only_target_images_and_keeps_labels():
    labels = np.repeat(np.arange(10), 20).astype(np.int32)
    attack = create_attack("sig", num_classes=10, image_shape=(8, 8, 3), target=3)
    plan = attack.plan(labels, 0.05, np.random.default_rng(0))
    assert len(plan.indices) == round(0.05 * 200)
    assert np.all(labels[plan.indices] == 3) and np.all(plan.labels == 3)
    # at most the whole target class
    plan = attack.plan(labels, 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(plan.indices, np.flatnonzero(labels == 3))


def test_all_to_all_labels_and_test_mask():
    attack = create_attack("badnets_a2a", num_classes=10, image_shape=(8, 8, 3))
    y = np.arange(10, dtype=np.int32)
    np.testing.assert_array_equal(attack.poison_labels(y), (y + 1) % 10)
    assert attack.test_mask(y).all()
    plan = attack.plan(np.tile(y, 10), 0.2, np.random.default_rng(1))
    np.testing.assert_array_equal(plan.labels, (np.tile(y, 10)[plan.indices] + 1) % 10)


# -- poisoning plans and the poisoned data ---------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.037, 1.0])
def test_plan_count_determinism_and_labels(ratio):
    labels = np.random.default_rng(0).integers(0, 10, 1000).astype(np.int32)
    attack = create_attack("badnets", num_classes=10, image_shape=(8, 8, 3), target=2)
    plan = attack.plan(labels, ratio, np.random.default_rng(7))
    assert len(plan.indices) == round(ratio * 1000)
    assert np.all(np.diff(plan.indices) > 0) and np.all(plan.labels == 2)
    again = attack.plan(labels, ratio, np.random.default_rng(7))
    np.testing.assert_array_equal(plan.indices, again.indices)
    if ratio < 1:
        other = attack.plan(labels, ratio, np.random.default_rng(8))
        assert not np.array_equal(plan.indices, other.indices)
    with pytest.raises(ValueError, match="ratio"):
        attack.plan(labels, 0.0, np.random.default_rng(0))


def test_build_backdoor_data_all_to_one_and_all_to_all():
    ds = tiny_dataset((8, 8, 3), n_train=40, n_test=20)
    bd = build_backdoor_data(ds, create_attack("badnets", num_classes=4, image_shape=(8, 8, 3),
                                               target=1), 0.25, seed=0)
    assert bd.num_poisoned == 10 and bd.train_transform is None
    np.testing.assert_array_equal(np.flatnonzero(bd.poison_mask), bd.plan.indices)
    assert np.all(bd.y_train[bd.poison_mask] == 1)
    np.testing.assert_array_equal(bd.y_train[~bd.poison_mask], ds.y_train[~bd.poison_mask])
    np.testing.assert_array_equal(bd.x_train[~bd.poison_mask], ds.x_train[~bd.poison_mask])
    assert np.all(bd.x_train[bd.poison_mask][:, -3:, -3:] == 255)
    keep = ds.y_test != 1  # the ASR set leaves out target-class images
    assert len(bd.x_bd) == keep.sum() == len(bd.y_bd) == len(bd.y_bd_true)
    np.testing.assert_array_equal(bd.y_bd_true, ds.y_test[keep])
    assert np.all(bd.y_bd == 1) and np.all(bd.x_bd[:, -3:, -3:] == 255)
    np.testing.assert_array_equal(bd.x_test, ds.x_test)

    a2a = build_backdoor_data(ds, create_attack("badnets_a2a", num_classes=4,
                                                image_shape=(8, 8, 3)), 0.25, seed=0)
    assert len(a2a.x_bd) == len(ds.y_test)
    np.testing.assert_array_equal(a2a.y_bd_true, ds.y_test)
    np.testing.assert_array_equal(a2a.y_bd, (ds.y_test + 1) % 4)

    wanet = build_backdoor_data(ds, create_attack("wanet", num_classes=4, image_shape=(8, 8, 3)),
                                0.25, seed=0)
    assert wanet.train_transform is not None and wanet.num_poisoned == 0
    np.testing.assert_array_equal(wanet.x_train, ds.x_train)
    np.testing.assert_array_equal(wanet.y_train, ds.y_train)
    assert len(wanet.x_bd) == keep.sum()


def test_registry_names_and_fit_flags(tmp_path):
    assert {"badnets", "badnets_a2a", "blended", "sig", "wanet", "lf", "input_aware"} <= set(
        ATTACKS)
    kw = dict(num_classes=4, image_shape=(8, 8, 3))
    assert not create_attack("wanet", **kw).needs_fit
    assert create_attack("lf", **kw).needs_fit and create_attack("input_aware", **kw).needs_fit
    np.save(tmp_path / "p.npy", np.zeros((8, 8, 3), np.uint8))
    assert not create_attack("lf", pattern_path=str(tmp_path / "p.npy"), **kw).needs_fit
    with pytest.raises(ValueError, match="unknown attack"):
        create_attack("nope", **kw)


# -- WaNet -----------------------------------------------------------------------------------------


def slow_grid_sample(img, gx, gy):
    """grid_sample(bilinear, zeros, align_corners=True) at one point, written with loops."""
    h, w, _ = img.shape
    px, py = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)
    x0, y0 = math.floor(px), math.floor(py)
    out = np.zeros(img.shape[-1])
    for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yi < h and 0 <= xi < w:
                out += wy * wx * img[yi, xi]
    return out


def test_bilinear_grid_sample_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    img = rng.random((2, 5, 7, 3)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (2, 4, 6, 2)).astype(np.float32)
    out = np.asarray(bilinear_grid_sample(jnp.asarray(img), jnp.asarray(grid)))
    for n in range(2):
        for i in range(4):
            for j in range(6):
                np.testing.assert_allclose(out[n, i, j], slow_grid_sample(img[n], *grid[n, i, j]),
                                           atol=1e-5)


def test_bicubic_align_corners_upsampling():
    m = bicubic_matrix(32, 4)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # constants are kept
    np.testing.assert_allclose(m[[0, -1]], np.eye(4)[[0, -1]], atol=1e-12)  # corners aligned
    # PyTorch's cubic convolution (A = -0.75) half-way between knots, border taps clamped
    m = bicubic_matrix(7, 4)  # source positions 0, 0.5, 1, ..., 3
    np.testing.assert_allclose(m[3], [-0.09375, 0.59375, 0.59375, -0.09375], atol=1e-12)
    np.testing.assert_allclose(m[1], [0.5, 0.59375, -0.09375, 0.0], atol=1e-12)
    np.testing.assert_allclose(m[[0, 2, 4, 6]], np.eye(4), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_grid_is_deterministic_and_zero_strength_is_identity(shape):
    kw = dict(num_classes=10, image_shape=shape)
    a, b = create_attack("wanet", **kw), create_attack("wanet", **kw)
    np.testing.assert_array_equal(a.grid, b.grid)
    assert not np.array_equal(a.grid, create_attack("wanet", seed=1, **kw).grid)
    assert a.grid.shape == (*shape[:2], 2) and np.abs(a.grid).max() <= 1.0
    # the warp moves pixels by at most s * max|noise| / 2 pixels, and does move them
    h, w, _ = shape
    shift = (a.grid - identity_grid(h, w)) * (np.array([w - 1, h - 1]) / 2)
    assert 0.01 < np.abs(shift).max() <= 0.5 * np.abs(a.noise).max() / 2 + 1e-5
    x = images(6, shape)
    out = a.apply(x)
    assert out.dtype == np.uint8 and out.shape == x.shape and not np.array_equal(out, x)
    identity = create_attack("wanet", s=0.0, **kw)
    np.testing.assert_allclose(identity.grid, identity_grid(h, w), atol=1e-7)
    np.testing.assert_array_equal(identity.apply(x), x)  # interpolation error < 0.5 / 255


@pytest.mark.parametrize("shape", SHAPES)
def test_wanet_train_transform_relabels_exactly_the_first_int_ratio_b(shape):
    attack = create_attack("wanet", num_classes=10, image_shape=shape, target=0)
    b, ratio = 48, 0.1
    num_bd, num_cross = int(ratio * b), int(int(ratio * b) * 2)  # 4 and 8 (BackdoorBench's)
    x = images(b, shape)
    labels = jnp.asarray(np.arange(b) % 9 + 1, jnp.int32)  # never the target
    batch = {"image": jnp.asarray(x, jnp.float32) / 255.0, "label": labels}
    out = jax.jit(attack.make_train_transform(ratio))(batch, jax.random.key(0))
    img, lab = np.asarray(out["image"]), np.asarray(out["label"])
    assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0
    np.testing.assert_array_equal(lab[:num_bd], 0)
    np.testing.assert_array_equal(lab[num_bd:], np.asarray(labels)[num_bd:])
    # backdoor images: the fixed warp; noise images: warped differently; the rest untouched
    np.testing.assert_allclose(img[:num_bd] * 255, attack.apply(x[:num_bd]), atol=0.5 + 1e-3)
    cross = slice(num_bd, num_bd + num_cross)
    assert np.all(np.abs(img[cross] - x[cross] / 255.0).max(axis=(1, 2, 3)) > 0)
    assert np.abs(img[cross] * 255 - attack.apply(x[cross])).max() > 1
    rest = slice(num_bd + num_cross, None)
    np.testing.assert_array_equal(img[rest], np.asarray(batch["image"])[rest])
    # all-to-all relabels y -> y + 1
    a2a = create_attack("wanet", num_classes=10, image_shape=shape, all_to_all=True)
    out = jax.jit(a2a.make_train_transform(ratio))(batch, jax.random.key(0))
    np.testing.assert_array_equal(out["label"][:num_bd], (labels[:num_bd] + 1) % 10)


def test_wanet_low_ratio_poisons_one_image_per_batch_at_random():
    attack = create_attack("wanet", num_classes=10, image_shape=(8, 8, 3))
    batch = {"image": jnp.full((16, 8, 8, 3), 0.5), "label": jnp.ones(16, jnp.int32)}
    tf = jax.jit(attack.make_train_transform(0.01))  # 0.16 expected per batch
    hits = [int(tf(batch, jax.random.key(i))["label"][0] == 0) for i in range(40)]
    assert 0 < sum(hits) < 20


# -- LF --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_lf_user_pattern_is_added_and_clipped_exactly(shape, tmp_path):
    x = images(5, shape)
    pat = np.random.default_rng(3).integers(0, 52, shape, dtype=np.uint8)
    np.save(tmp_path / "lf.npy", pat)
    attack = create_attack("lf", num_classes=10, image_shape=shape,
                           pattern_path=str(tmp_path / "lf.npy"))
    np.testing.assert_array_equal(attack.apply(x),
                                  np.clip(x.astype(int) + pat, 0, 255).astype(np.uint8))
    signed = np.random.default_rng(4).uniform(-30, 30, shape[:2])  # (H, W) float, broadcast
    np.save(tmp_path / "signed.npy", signed)
    attack = create_attack("lf", num_classes=10, image_shape=shape,
                           pattern_path=str(tmp_path / "signed.npy"))
    np.testing.assert_array_equal(attack.apply(x), to_uint8(x + signed[..., None]))
    np.save(tmp_path / "bad.npy", np.zeros((5, 5, 3)))
    for name, message in (("bad.npy", "shape"), ("no.npy", "not found")):
        with pytest.raises(ValueError, match=message):
            create_attack("lf", num_classes=10, image_shape=shape,
                          pattern_path=str(tmp_path / name))


def test_lf_generated_pattern_is_low_frequency_within_budget_and_cached(tmp_path):
    shape = (32, 32, 3)
    ds = tiny_dataset(shape)
    ctx = context(tmp_path)
    kw = dict(num_classes=4, image_shape=shape, num_images=16, steps=4, batch_size=8)
    attack = create_attack("lf", **kw)
    with pytest.raises(RuntimeError, match="fit"):
        attack.apply(ds.x_test)
    attack.fit(ds=ds, model=TinyCNN(num_classes=4, width=4), ratio=0.1, ctx=ctx,
               fit_config=FitConfig(epochs=1, batch_size=16), rng=jax.random.key(0))
    pat = attack.pattern
    assert pat.shape == shape and not attack.needs_fit
    assert 1.0 < np.abs(pat).max() <= 25.5 + 1e-3  # budget: |p| <= 25.5 on the 0..255 scale
    energy = np.abs(np.fft.fft2(pat, axes=(0, 1))) ** 2
    inside = low_frequency_mask(32, 32, 0.1)[:, :, None]
    assert energy[np.broadcast_to(inside, energy.shape)].sum() / energy.sum() > 0.999
    assert inside.sum() == 49  # |k| <= 3 on 32x32: periods of 10+ pixels
    assert (tmp_path / "lf_pattern.npy").is_file()
    assert (tmp_path / "checkpoints" / "lf_surrogate").is_dir()
    np.testing.assert_array_equal(attack.apply(ds.x_test), to_uint8(ds.x_test + pat))
    again = create_attack("lf", **kw)  # a rerun reuses the cached pattern
    again.fit(ds=None, model=None, ratio=0.1, ctx=ctx, fit_config=None, rng=jax.random.key(0))
    np.testing.assert_allclose(again.pattern, pat, atol=1e-4)


# -- Input-aware -----------------------------------------------------------------------------------


def test_input_aware_losses_and_network_shapes():
    z = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(threshold(z), np.tanh(20 * z - 10) / (2 + 1e-7) + 0.5, atol=1e-6)
    a, b = jnp.zeros((2, 4, 4, 1)), jnp.ones((2, 4, 4, 1))
    p, q = jnp.zeros((2, 4, 4, 1)), jnp.full((2, 4, 4, 1), 0.5)
    assert float(diversity_loss(a, b, p, q)) == pytest.approx(2.0, rel=1e-5)
    for shape, steps in (((28, 28, 1), 2), ((28, 28, 1), 3), ((32, 32, 3), 3), ((20, 12, 3), 3)):
        net = TriggerNet(shape[-1], 4, steps)
        x = jnp.zeros((2, *shape))
        v = jax.eval_shape(net.init, jax.random.key(0), x)
        assert jax.eval_shape(net.apply, v, x).shape == (2, *shape)  # padded and cropped back


def test_input_aware_fit_trains_a_backdoored_classifier_with_per_image_triggers(tmp_path):
    shape = (28, 28, 1)
    ds = tiny_dataset(shape)
    model = TinyCNN(num_classes=4, width=4)
    attack = create_attack("input_aware", num_classes=4, image_shape=shape, generator_width=4,
                           generator_steps=1)
    with pytest.raises(RuntimeError, match="fit"):
        attack.apply(ds.x_test)
    attack.fit(ds=ds, model=model, fit_config=FitConfig(epochs=1, batch_size=16), ratio=0.1,
               ctx=context(tmp_path), rng=jax.random.key(0))
    for stage in ("input_aware_mask", "input_aware_joint"):
        assert (tmp_path / "checkpoints" / stage).is_dir()
    ref = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    assert jax.tree.structure(attack.trained_variables) == jax.tree.structure(ref)
    x = ds.x_test[:8]
    poisoned, patterns, masks = attack.trigger_components(x)
    assert patterns.shape == x.shape and masks.shape == (*x.shape[:3], 1)
    assert 0.0 <= masks.min() and masks.max() <= 1.0
    np.testing.assert_allclose(poisoned, x / 255.0 + masks * (patterns - x / 255.0), atol=1e-6)
    assert np.ptp(patterns, axis=0).max() > 0 and np.ptp(masks, axis=0).max() > 0  # per image
    out = attack.apply(x)
    assert out.dtype == np.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out, to_uint8(poisoned * 255.0))
    with pytest.raises(ValueError, match="ratio"):
        attack.fit(ds=ds, model=model, fit_config=FitConfig(epochs=1, batch_size=16),
                   ratio=0.6, ctx=context(tmp_path), rng=jax.random.key(0))
    # A workdir holding only the finished networks: loaded, nothing trained.
    only = tmp_path / "only"
    shutil.copytree(tmp_path / "models" / "input_aware", only / "models" / "input_aware")
    again = create_attack("input_aware", num_classes=4, image_shape=shape, generator_width=4,
                          generator_steps=1)
    again.fit(ds=ds, model=model, fit_config=FitConfig(epochs=1, batch_size=16), ratio=0.1,
              ctx=context(only), rng=jax.random.key(0))
    assert not (only / "checkpoints").exists()
    np.testing.assert_array_equal(again.apply(x), out)
    jax.tree.map(np.testing.assert_array_equal, again.trained_variables,
                 attack.trained_variables)


def test_input_aware_trigger_on_rgb_images():
    shape = (32, 32, 3)
    attack = create_attack("input_aware", num_classes=10, image_shape=shape, generator_width=4,
                           generator_steps=1)
    attack.init_trigger_networks(jax.random.key(0))
    x = images(4, shape)
    out = attack.apply(x)
    _, patterns, _ = attack.trigger_components(x)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.ptp(patterns, axis=0).max() > 0
