"""IKD distillation pieces (ftsam_jax.distill) and the `ikd` defense: the attack against NumPy
references and its constraints, the losses against NumPy, teacher isolation, the SSA rule's
frequencies and joint geometry, 8-device = 1-device for the whole step, and the defense end to
end with exact resume. Tiny nets (TinyCNN width 4) on 8x8 images."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax import distill, parallel
from ftsam_jax.defenses import DEFENSES, BenignData
from ftsam_jax.defenses import nad as nad_mod
from ftsam_jax.distill import adversarial, augment, losses
from ftsam_jax.distill import step as distill_step_module
from ftsam_jax.models import TinyCNN
from ftsam_jax.training.stage import StageContext
from tests.conftest import small_mesh

NUM_CLASSES = 4
STUDENT = TinyCNN(num_classes=NUM_CLASSES, width=4)
TEACHER = TinyCNN(num_classes=NUM_CLASSES, width=6)      # other widths: align convs needed


@functools.cache
def init(model, seed):
    """NumPy-random variables (no compiled init: XLA:CPU compiles the 4-D random kernel draws
    slowly): kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1), BN scale 1, mean 0, var 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        if name in ("scale", "var"):
            return np.ones(leaf.shape)
        return rng.normal(0, 0.1, leaf.shape) if name == "bias" else np.zeros(leaf.shape)

    return jax.tree.map(lambda a: a.astype(np.float32),
                        jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    return x, (np.arange(16) % NUM_CLASSES).astype(np.int32)


def np_ce(logits, labels):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


# ----------------------------------------------------------------------------------------------
# Attack


def test_attack_eps_ball_range_loss_increase_and_precompute(data):
    x, y = data
    teacher = init(TEACHER, 1)
    apply = adversarial.eval_apply(TEACHER)
    mesh = small_mesh()
    cfg = adversarial.AttackConfig()
    adv = adversarial.precompute_adversarial(apply, teacher, x, y, jax.random.key(3), mesh=mesh,
                                             batch_size=8, config=cfg)
    assert adv.dtype == np.uint8 and adv.shape == x.shape
    diff = adv.astype(int) - x.astype(int)
    assert np.abs(diff).max() <= 8 and np.any(diff != 0)
    # Official range clip: each image's own per-channel [min, max].
    assert np.all(adv.min(axis=(1, 2)) >= x.min(axis=(1, 2)))
    assert np.all(adv.max(axis=(1, 2)) <= x.max(axis=(1, 2)))
    # Teacher CE rises on (almost) every example.
    ce = lambda im: np_ce(np.asarray(apply(teacher, im.astype(np.float32) / 255)), y)  # noqa
    assert np.mean(ce(adv) > ce(x)) >= 0.9
    # Example i uses fold_in(key, i): the stored images are the float attack, rounded (so they
    # depend neither on the batch size nor on the 8-device sharding).
    xf = jnp.asarray(x, jnp.float32) / 255
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(16))
    out = jax.jit(lambda v, im: adversarial.mi_di_fgsm(apply, v, im, y, keys, cfg))(teacher, xf)
    assert float(jnp.max(jnp.abs(out - xf))) <= cfg.eps + 1e-6
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(adversarial.to_uint8(out), adv)
    # A second set for the same teacher and settings reuses the compiled attack.
    before = adversarial._attack_program.cache_info()
    again = adversarial.precompute_adversarial(apply, teacher, x[:8], y[:8], jax.random.key(3),
                                               mesh=mesh, batch_size=8, config=cfg)
    after = adversarial._attack_program.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    np.testing.assert_array_equal(again, adv[:8])


def test_momentum_and_l1_normalisation_match_numpy_on_a_linear_model():
    rng = np.random.default_rng(1)
    n, h, w, c, k = 4, 3, 3, 2, 5
    x = rng.uniform(0.1, 0.9, (n, h, w, c)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    wmat = rng.normal(0, 1, (h * w * c, k)).astype(np.float32)
    b = rng.normal(0, 1, k).astype(np.float32)
    apply = lambda v, im: im.reshape(im.shape[0], -1) @ v["w"] + v["b"]
    for clip in ("unit", "image"):
        cfg = adversarial.AttackConfig(eps=0.05, step_size=0.02, steps=4, decay=1.0,
                                       diversity_prob=0.0, clip=clip)
        got = adversarial.mi_di_fgsm(apply, {"w": wmat, "b": b}, x, y, jax.random.key(0), cfg)

        # NumPy reference of the official loop (grad of the summed CE, per-example L1 norm).
        x0 = x.astype(np.float64)
        lo, hi = (x0.min((1, 2), keepdims=True), x0.max((1, 2), keepdims=True)) \
            if clip == "image" else (0.0, 1.0)
        xa, m = x0.copy(), np.zeros_like(x0)
        for _ in range(cfg.steps):
            logits = xa.reshape(n, -1) @ wmat + b
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            p[np.arange(n), y] -= 1.0
            g = (p @ wmat.T).reshape(x0.shape)
            g = g / np.abs(g).sum(axis=(1, 2, 3), keepdims=True)
            m = g + cfg.decay * m
            xa = xa + cfg.step_size * np.sign(m)
            xa = np.clip(x0 + np.clip(xa - x0, -cfg.eps, cfg.eps), lo, hi)
        np.testing.assert_allclose(np.asarray(got), xa, atol=1e-6)


def test_resampling_matches_resize_then_pad_and_crop_then_resize():
    img = jnp.asarray(np.random.default_rng(2).uniform(size=(10, 10, 3)), jnp.float32)
    # DI: resize to 9x9 (bilinear, no antialias = torch align_corners=False), pad at (1, 0).
    m_rows = augment.bilinear_matrix(10, 10, 1, 9, 0, 10)
    m_cols = augment.bilinear_matrix(10, 10, 0, 9, 0, 10)
    ref = jnp.pad(jax.image.resize(img, (9, 9, 3), "linear", antialias=False),
                  ((1, 0), (0, 1), (0, 0)))
    np.testing.assert_allclose(augment.resize_window(img, m_rows, m_cols), ref, atol=1e-5)
    # DI itself with the smallest size (9) at offset (0, 0), padded with a per-channel colour.
    pad = jnp.array([0.2, 0.3, 0.4])
    got = adversarial.diversity_from_uniforms(jnp.zeros(4), img, 0.9, 0.5, tuple(pad.tolist()))
    ref = jnp.broadcast_to(pad, img.shape).at[:9, :9].set(
        jax.image.resize(img, (9, 9, 3), "linear", antialias=False))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # SSA crop window (2, 1, 8, 9) resized back to 10x10.
    ref = jax.image.resize(img[2:10, 1:10], (10, 10, 3), "linear", antialias=False)
    np.testing.assert_allclose(augment.crop_resize(img, 2, 1, 8, 9), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Losses


def test_kd_feature_and_afa_losses_match_numpy():
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 2, (6, 5)), rng.normal(0, 2, (6, 5))
    temp = 3.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pt, ps = softmax(t / temp), softmax(s / temp)
    ref = temp ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    np.testing.assert_allclose(losses.kd_loss(jnp.asarray(s), jnp.asarray(t), temp), ref,
                               rtol=1e-5)

    fs = {"a": rng.normal(size=(2, 4, 4, 3)), "b": rng.normal(size=(2, 2, 2, 5))}
    ft = {"a": rng.normal(size=(2, 4, 4, 6)), "b": rng.normal(size=(2, 2, 2, 5))}
    align = {"a": losses.init_align(jax.random.key(0), 3, 6)}
    ka, ba = np.asarray(align["a"]["kernel"]), np.asarray(align["a"]["bias"])
    aligned = {"a": fs["a"] @ ka + ba, "b": fs["b"]}
    cast = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}
    # AFA: alpha * sum_l sum((A(F_s) - F_t)^2) / N.
    ref = 0.01 * sum(np.sum((aligned[k] - ft[k]) ** 2) / 2 for k in ("a", "b"))
    np.testing.assert_allclose(losses.afa_loss(cast(fs), cast(ft), 0.01, ("a", "b"), align),
                               ref, rtol=1e-5)
    # Feature KD, mse: sum_l w_l * mean((A(F_s) - F_t)^2).
    ref = 2.0 * np.mean((aligned["a"] - ft["a"]) ** 2) + 0.5 * np.mean((fs["b"] - ft["b"]) ** 2)
    np.testing.assert_allclose(losses.feature_kd_loss(cast(fs), cast(ft), (2.0, 0.5), ("a", "b"),
                                                      "mse", align=align), ref, rtol=1e-5)
    # Feature KD, attention: NAD's loss.
    got = losses.feature_kd_loss(cast(fs), cast(ft), (3.0,), ("b",), "attention")
    am = lambda f: (lambda a: a / (np.sqrt((a ** 2).sum((1, 2), keepdims=True)) + 1e-6))(  # noqa
        (np.abs(f) ** 2).sum(-1))
    np.testing.assert_allclose(got, 3.0 * np.mean((am(fs["b"]) - am(ft["b"])) ** 2), rtol=1e-5)
    np.testing.assert_allclose(got, 3.0 * nad_mod.attention_loss(cast(fs)["b"], cast(ft)["b"]),
                               rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The step


def full_config(**kw):
    """Every term on: logit KD, mse feature KD with an align conv, online AFA (1 attack step),
    SSA, and the two-phase switch after one step."""
    base = dict(kd_weight=1.0, feat_levels=("stage2",), feat_weights=(0.5,),
                afa_layers=("stage1", "stage2"), alpha_adv=1e-2, adv_source="online",
                attack=adversarial.AttackConfig(steps=1), ssa=True,
                ssa_config=augment.SSAConfig(threshold=0.5), ikd_steps=1)
    return distill.DistillConfig(**{**base, **kw})


def test_no_gradient_reaches_the_teacher(data):
    x, y = data
    student, teacher = init(STUDENT, 0), init(TEACHER, 1)
    cfg = full_config(ikd_steps=None, adv_source="precomputed")
    prepare, loss_fn = distill.make_distill_fns(STUDENT, TEACHER, cfg)
    align = distill.init_alignment(STUDENT, student, TEACHER, teacher, (8, 8, 3), cfg,
                                   jax.random.key(5))
    trainable = {"student": student["params"], "align": align}
    batch = {"image": x[:8], "label": y[:8], "adv": x[8:]}

    def total(tr, tv):
        inputs = prepare(tv, batch, jax.random.key(1), jnp.zeros([], jnp.int32))
        return loss_fn(tr, student["batch_stats"], inputs)[0]

    g_student, g_teacher = jax.jit(jax.grad(total, argnums=(0, 1)))(trainable, teacher)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(g_student["align"]["afa"]))
    assert set(align["afa"]) == {"stage1", "stage2"} and set(align["feat"]) == {"stage2"}


def test_distill_step_on_8_devices_equals_1_device(data):
    x, y = data
    student, teacher = init(STUDENT, 0), init(TEACHER, 1)
    cfg = full_config()
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    step = distill.make_distill_step(STUDENT, TEACHER, tx, cfg)
    state0 = distill.create_distill_state(STUDENT, tx, jax.random.key(2), (8, 8, 3),
                                          variables=student, model_t=TEACHER,
                                          teacher_vars=teacher, config=cfg)
    batch = {"image": x, "label": y}
    results = []
    for mesh in (parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])):
        repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
        fn = jax.jit(step, in_shardings=(repl, repl, shard, repl), out_shardings=(repl, repl))
        state = parallel.replicate(state0, mesh)
        history = []
        for i in range(2):                                # IKD phase, then plain KD
            state, metrics = fn(state, parallel.replicate(teacher, mesh),
                                jax.device_put(batch, shard), jax.random.key(10 + i))
            history.append(jax.device_get(metrics))
        results.append((jax.device_get(state), history))
    (s8, h8), (s1, h1) = results
    assert [float(h["ikd"]) for h in h8] == [1.0, 0.0]
    assert float(h8[0]["afa"]) > 0 and float(h8[1]["afa"]) == 0
    for a, b in zip(jax.tree.leaves((s8, h8)), jax.tree.leaves((s1, h1)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    changed = jax.tree.map(lambda a, b: np.any(np.asarray(a) != np.asarray(b)), s8.params,
                           state0.params)
    assert all(jax.tree.leaves(changed))


def test_phase_switch_by_selection_equals_lax_cond(data, monkeypatch):
    """On CPU the IKD/plain switch computes both branches and selects one; the accelerator path
    (`lax.cond`) must give the same two steps (IKD phase, then plain)."""
    x, y = data
    student, teacher = init(STUDENT, 0), init(TEACHER, 1)
    cfg = full_config()
    tx = optax.sgd(0.1, momentum=0.9)
    state0 = distill.create_distill_state(STUDENT, tx, jax.random.key(2), (8, 8, 3),
                                          variables=student, model_t=TEACHER,
                                          teacher_vars=teacher, config=cfg)
    batch = {"image": x, "label": y}
    runs = []
    for both in (True, False):
        monkeypatch.setattr(distill_step_module, "compute_both_branches", lambda b=both: b)
        fn = jax.jit(distill.make_distill_step(STUDENT, TEACHER, tx, cfg))
        state, history = state0, []
        for i in range(2):
            state, metrics = fn(state, teacher, batch, jax.random.key(10 + i))
            history.append(jax.device_get(metrics))
        runs.append((jax.device_get(state), history))
    (s_sel, h_sel), (s_cond, h_cond) = runs
    assert [float(h["ikd"]) for h in h_cond] == [1.0, 0.0]
    assert float(h_cond[0]["afa"]) > 0 and float(h_sel[1]["afa"]) == 0
    for a, b in zip(jax.tree.leaves((s_sel, h_sel)), jax.tree.leaves((s_cond, h_cond)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sam_chain_gets_the_gradient_at_the_perturbed_weights(data):
    """With `sam_gradient` in the chain the update is -lr * grad L(w + e), e from grad L(w), on
    the same prepared inputs; BN statistics come from the clean pass at w."""
    x, y = data
    student, teacher = init(STUDENT, 0), init(TEACHER, 1)
    cfg = full_config(adv_source="precomputed", ssa=False, ikd_steps=None, kd_weight=0.0)
    tx = optax.chain(ftsam_jax.sam_gradient(0.5, adaptive=True), optax.sgd(0.1))
    state = distill.create_distill_state(STUDENT, tx, jax.random.key(2), (8, 8, 3),
                                         variables=student, model_t=TEACHER,
                                         teacher_vars=teacher, config=cfg)
    batch = {"image": x, "label": y, "adv": x[::-1]}
    new, _ = jax.jit(distill.make_distill_step(STUDENT, TEACHER, tx, cfg))(
        state, teacher, batch, jax.random.key(0))
    prepare, loss_fn = distill.make_distill_fns(STUDENT, TEACHER, cfg)

    @jax.jit
    def manual(tr, bs):
        inputs = prepare(teacher, batch, jax.random.key(0), jnp.zeros([], jnp.int32))
        g, (_, new_bs, _) = jax.grad(loss_fn, has_aux=True)(tr, bs, inputs)
        e = ftsam_jax.sam_perturbation(g, tr, 0.5, adaptive=True)
        w_e = jax.tree.map(jnp.add, tr, e)
        g_e = jax.grad(lambda q: loss_fn(q, bs, inputs)[0])(w_e)
        return jax.tree.map(lambda w, d: w - 0.1 * d, tr, g_e), new_bs

    want, want_bs = manual(state.trainable, state.batch_stats)
    for a, b in zip(jax.tree.leaves((new.trainable, new.batch_stats)),
                    jax.tree.leaves((want, want_bs)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sample-specific augmentation


def test_ssa_branch_frequency_noise_only_on_clean_and_joint_crop():
    n = 4000
    rng = np.random.default_rng(4)
    clean = jnp.full((n, 4, 4, 1), 0.5, jnp.float32)
    adv = jnp.asarray(rng.uniform(size=(n, 4, 4, 1)), jnp.float32)
    cfg = augment.SSAConfig(small_area=4.0)
    small_boxes = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.5, 2.0]]), (n, 1, 1))
    valid = jnp.ones((n, 2), bool)
    run = jax.jit(lambda k, c, a, b, v: augment.ssa_boxes(k, c, a, b, v, cfg))
    out = run(jax.random.key(0), clean, adv, small_boxes, valid)
    noised = np.asarray(out["noised"])
    assert abs(noised.mean() - 0.30) <= 0.02 and not np.any(out["cropped"])
    np.testing.assert_array_equal(out["adv"], adv)              # adversarial image untouched
    np.testing.assert_array_equal(np.asarray(out["image"])[~noised], 0.5)
    resid = np.asarray(out["image"])[noised] - 0.5
    assert (resid != 0).mean() > 0.99 and abs(resid.std() - 0.08) < 0.005
    np.testing.assert_array_equal(out["boxes"], small_boxes)

    # One box of area >= small_area: always cropped, never noised; the same window for both
    # images (checked through adv = 1 - clean, which bilinear resampling preserves).
    m = 256
    img = jnp.asarray(rng.uniform(size=(m, 10, 10, 3)), jnp.float32)
    boxes = jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 10.0, 10.0]]), (m, 1, 1))
    out = run(jax.random.key(1), img, 1.0 - img, boxes, jnp.ones((m, 2), bool))
    assert np.all(out["cropped"]) and not np.any(out["noised"])
    np.testing.assert_allclose(out["adv"], 1.0 - out["image"], atol=1e-5)
    win = np.asarray(out["window"])
    assert np.all((win[:, 2:] >= 8) & (win[:, 2:] <= 10)) and np.any(win[:, 2:] < 10)
    assert np.all(win[:, :2] + win[:, 2:] <= 10)
    np.testing.assert_allclose(np.asarray(out["boxes"])[:, 1], [[0, 0, 10, 10]] * m, atol=1e-5)
    i = int(np.argmax(win[:, 2] < 10))
    ref = augment.crop_resize(img[i], *win[i])
    np.testing.assert_allclose(out["image"][i], ref, atol=1e-6)


def test_joint_preprocess_gives_clean_and_adv_the_same_geometry():
    img = np.random.default_rng(6).integers(0, 256, (8, 6, 6, 3), dtype=np.uint8)
    out = jax.jit(augment.joint_preprocess(padding=2))({"image": img, "adv": 255 - img},
                                                       jax.random.key(0))
    assert not np.allclose(out["image"], img / 255.0)
    # Zero padding maps to 0 in both, elsewhere adv = 1 - image.
    pad = (out["image"] == 0) & (out["adv"] == 0)
    np.testing.assert_allclose(np.where(pad, 1.0, out["adv"]), np.where(pad, 1.0,
                                                                       1.0 - out["image"]),
                               atol=1e-6)


def test_fourier_statistic_decides_the_classification_branch():
    flat = jnp.full((1, 8, 8, 3), 0.4)
    checker = jnp.asarray(np.indices((8, 8)).sum(0) % 2, jnp.float32)[None, :, :, None]
    checker = jnp.repeat(checker, 3, -1)
    images = jnp.concatenate([flat, checker])
    share = np.asarray(jax.jit(augment.high_freq_share)(images))
    np.testing.assert_allclose(share, [0.0, 0.5], atol=1e-6)  # checker: half its energy at DC
    out = jax.jit(lambda k, im: augment.ssa_classification(
        k, im, cfg=augment.SSAConfig(threshold=0.25)))(jax.random.key(0), images)
    np.testing.assert_array_equal(out["cropped"], [True, False])


# ----------------------------------------------------------------------------------------------
# The ikd defense


def test_ikd_defense_end_to_end_and_resume(tmp_path):
    spec = DEFENSES["ikd"]
    assert spec.balanced
    cfg = dataclasses.replace(spec.default_config("smoke"), batch_size=16, attack_batch_size=32,
                              attack=adversarial.AttackConfig(steps=2))
    rng = np.random.default_rng(5)
    benign = BenignData(rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8),
                        (np.arange(32) % NUM_CLASSES).astype(np.int32), NUM_CLASSES)
    variables = init(STUDENT, 3)
    mesh = small_mesh()
    ctx = lambda d, log=None: StageContext(mesh=mesh, seed=0, workdir=tmp_path / d,  # noqa
                                           progress=False, log=log)
    logs = []
    out = spec.run(STUDENT, variables, benign, cfg, jax.random.key(7),
                   ctx("full", lambda stage, h: logs.append(dict(h[-1]))))
    assert [(r["stage"], r["epoch"]) for r in logs] == [
        ("ikd_teacher", 1), ("ikd_student", 1), ("ikd_student", 2)]
    assert logs[1]["ikd"] == 1.0 and logs[1]["afa"] > 0 and logs[1]["feat"] > 0
    assert logs[2]["ikd"] == 0.0 and logs[2]["afa"] == 0.0
    assert jax.tree.structure(out) == jax.tree.structure(jax.device_get(variables))
    assert not np.array_equal(out["params"]["conv1"]["kernel"],
                              variables["params"]["conv1"]["kernel"])
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == [
        "ikd_student", "ikd_teacher"]

    # Killed during the student's second epoch: only its epoch-1 checkpoint exists. The rerun
    # skips the teacher, resumes the student at epoch 2 and ends with the same variables.
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "ikd_student" / "2")
    ran = []
    resumed = spec.run(STUDENT, variables, benign, cfg, jax.random.key(7),
                       ctx("full", lambda stage, h: ran.append((stage, h[-1]["epoch"]))))
    assert ran == [("ikd_student", 2)]
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_config_json_of_the_former_names_resumes(tmp_path):
    """`afa_levels` / `--adv_source=batch` were renamed `afa_layers` / `precomputed` (the IKD
    defense's names): a workdir whose config.json has the former names belongs to the same run;
    a real difference is still refused."""
    from experiments.cli import InputError
    from experiments.configs.distill import get_config
    from experiments.distill import RUN_KEYS, resolve, upgrade_run
    from experiments.workdir import check_workdir

    cfg = resolve(get_config("smoke"), 8)
    assert cfg["afa_layers"] == ["stage2"] and cfg["adv_source"] == "precomputed"
    former = {k: v for k, v in cfg.items() if k != "afa_layers"}
    former.update(afa_levels=["stage2"], adv_source="batch")
    (tmp_path / "config.json").write_text(json.dumps({"run": former}))
    check_workdir(tmp_path, cfg, RUN_KEYS, upgrade=upgrade_run)
    with pytest.raises(InputError, match="afa_layers: \\['stage2'\\] -> \\['stage1'\\]"):
        check_workdir(tmp_path, {**cfg, "afa_layers": ["stage1"]}, RUN_KEYS, upgrade=upgrade_run)
