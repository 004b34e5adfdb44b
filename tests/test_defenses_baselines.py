"""Baseline defenses (FP, NAD, ANP, I-BAU, CLP): core computations against slow NumPy references
written from the papers' formulas, and end-to-end smoke runs through the real interface
(StageContext, checkpoints, exact resume) on a tiny CNN with 8x8 images."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses import anp as anp_mod
from ftsam_jax.defenses import clp as clp_mod
from ftsam_jax.defenses import fp as fp_mod
from ftsam_jax.defenses import ibau as ibau_mod
from ftsam_jax.defenses import nad as nad_mod
from ftsam_jax.models import TinyCNN, create_model
from ftsam_jax.training.epoch import evaluate
from ftsam_jax.training.stage import StageContext
from tests.defense_helpers import assert_same, ctx_for, random_variables, tiny_benign

NUM_CLASSES = 4
MODEL = TinyCNN(num_classes=NUM_CLASSES, width=4)


@pytest.fixture(scope="module")
def benign():
    return tiny_benign(NUM_CLASSES)


@pytest.fixture(scope="module")
def tiny_vars():
    return random_variables(MODEL, seed=1)


def make_ctx(mesh, workdir, log=None):
    def evaluate_fn(v):
        return {"pnorm": float(sum(np.sum(np.square(np.asarray(x)))
                                   for x in jax.tree.leaves(v["params"])))}

    return ctx_for(mesh, workdir, log, evaluate_fn)

def run_and_resume(name, config, mesh, tmp_path, variables, benign):
    """Runs a defense, checks the output tree, reruns it on the same workdir: identical
    variables and no epoch of any stage recomputed."""
    spec = DEFENSES[name]
    rng = jax.random.key(7)
    out = spec.run(MODEL, variables, benign, config, rng, make_ctx(mesh, tmp_path))
    assert jax.tree.structure(out) == jax.tree.structure(variables)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(variables), strict=True):
        assert np.shape(x) == np.shape(y) and np.all(np.isfinite(np.asarray(x)))
    epochs_run = []
    again = spec.run(MODEL, variables, benign, config, rng,
                     make_ctx(mesh, tmp_path, log=lambda stage, hist: epochs_run.append(stage)))
    assert epochs_run == []
    assert_same(out, again)
    stages = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert stages and all(s.startswith(name) for s in stages)
    return out


def smoke(name, **kw):
    return dataclasses.replace(DEFENSES[name].default_config("smoke"), **kw)


# ----------------------------------------------------------------------------------------------
# CLP


def test_clp_pairs_conv_with_the_bn_that_normalises_its_output():
    model = create_model("preactresnet18", 10, width=4)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    pairs = clp_mod.conv_bn_pairs(model, v, (8, 8, 3))
    expected = [(("conv1",), ("layer1_0", "bn1"))]
    prev = ("conv1",)
    for i in range(1, 5):
        for j in range(2):
            block = f"layer{i}_{j}"
            if prev != ("conv1",):
                expected.append((prev, (block, "bn1")))
            expected.append(((block, "conv1"), (block, "bn2")))
            prev = (block, "conv2")
    assert pairs == expected and len(pairs) == 16
    vgg = create_model("vgg19_bn", 10, width=4)
    vv = jax.eval_shape(vgg.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert clp_mod.conv_bn_pairs(vgg, vv, (8, 8, 3)) == [((f"conv{i}",), (f"bn{i}",))
                                                         for i in range(16)]


def test_clp_uclc_and_pruned_set_match_reference():
    model = create_model("preactresnet18", 10, width=4)
    v = random_variables(model, seed=3)
    v["params"]["layer2_1"]["bn2"]["scale"][3] = 40.0   # an obvious outlier channel
    pairs = clp_mod.conv_bn_pairs(model, v, (8, 8, 3))
    u = 1.0
    out, pruned = clp_mod.clp_prune_variables(v, pairs, u)
    total = 0
    for conv_path, bn_path in pairs:
        kernel = np.asarray(clp_mod._get(v["params"], conv_path)["kernel"], np.float64)
        bn = clp_mod._get(v["params"], bn_path)
        std = np.sqrt(clp_mod._get(v["batch_stats"], bn_path)["var"])
        # PyTorch layout: weight[k] is (in, kh, kw), reshaped to (in, kh * kw).
        torch_w = np.transpose(kernel, (3, 2, 0, 1))
        lips = []
        for k in range(torch_w.shape[0]):
            w = torch_w[k].reshape(torch_w.shape[1], -1) * abs(bn["scale"][k] / std[k])
            lips.append(max(np.linalg.svd(w)[1]))
        lips = np.array(lips)
        np.testing.assert_allclose(
            clp_mod.channel_lipschitz(kernel, bn["scale"], std ** 2), lips, rtol=1e-6)
        mean = sum(lips) / len(lips)
        sd = np.sqrt(sum((x - mean) ** 2 for x in lips) / (len(lips) - 1))
        expected = [k for k in range(len(lips)) if lips[k] > mean + u * sd]
        assert list(pruned[bn_path]) == expected
        new_bn = clp_mod._get(out["params"], bn_path)
        for k in range(len(lips)):
            if k in expected:
                assert new_bn["scale"][k] == 0 and new_bn["bias"][k] == 0
            else:
                assert new_bn["scale"][k] == bn["scale"][k] and new_bn["bias"][k] == bn["bias"][k]
        total += len(expected)
    assert 3 in pruned[("layer2_1", "bn2")] and total > 1
    # Convolutions, the classifier and running statistics are untouched.
    np.testing.assert_array_equal(out["params"]["layer3_0"]["conv1"]["kernel"],
                                  v["params"]["layer3_0"]["conv1"]["kernel"])


def test_clp_end_to_end_data_free_and_resumes(mesh, tmp_path, tiny_vars, benign):
    v = jax.tree.map(np.array, tiny_vars)
    v["params"]["bn2"]["scale"][0] = 50.0
    out = run_and_resume("clp", dataclasses.replace(DEFENSES["clp"].default_config("smoke"),
                                                    u=1.0), mesh, tmp_path, v, benign)
    assert out["params"]["bn2"]["scale"][0] == 0 and out["params"]["bn2"]["bias"][0] == 0
    assert not DEFENSES["clp"].uses_data


# ----------------------------------------------------------------------------------------------
# FP


def test_fp_channel_order_and_pruning_search_match_reference():
    rng = np.random.default_rng(0)
    feats = rng.gamma(2.0, 1.0, (40, 10)).astype(np.float32)
    kernel = rng.normal(size=(10, 3)).astype(np.float32)
    kernel[np.argsort(feats.mean(0))[:4]] *= 0.05       # dormant channels barely matter
    bias = rng.normal(size=3).astype(np.float32)
    labels = np.argmax(feats @ kernel + bias, -1)
    means = [sum(feats[i, c] for i in range(len(feats))) / len(feats) for c in range(10)]
    order = sorted(range(10), key=lambda c: means[c])
    keep_ref, acc0 = 0, None
    for num in range(0, 10, 2):
        logits = np.zeros((len(feats), 3), np.float32)
        for i in range(len(feats)):
            for c in range(10):
                if c not in order[:num]:
                    logits[i] += feats[i, c] * kernel[c]
            logits[i] += bias
        acc = np.mean(np.argmax(logits, -1) == labels)
        acc0 = acc if acc0 is None else acc0
        if abs(acc - acc0) / acc0 < 0.1:
            keep_ref = num
        else:
            break
    keep, got_order, history = fp_mod.select_pruning(feats, labels, kernel, bias, 0.1, 2)
    assert list(got_order) == order
    assert keep == keep_ref and 0 < keep < 10 and history[0] == (0, 1.0)


def test_fp_first_beyond_rule_matches_backdoorbench_loop():
    """BackdoorBench `defense/fp.py`: step m > 0 masks seq_sort[0:m - 1] (cumulative), and the
    network fine-tuned is the pruned network itself after the loop (the first step beyond the
    tolerance, or the last step)."""
    rng = np.random.default_rng(1)
    feats = rng.gamma(2.0, 1.0, (60, 12)).astype(np.float32)
    kernel = rng.normal(size=(12, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    labels = np.argmax(feats @ kernel + bias, -1)
    order = np.argsort(feats.mean(0), kind="stable")
    for acc_ratio in (0.05, 0.2, 1.0):
        mask, acc0, num_masked, tested = np.ones(12, np.float32), None, 0, []
        for m in range(0, 12, 3):
            if m:
                mask[order[0:m - 1]] = 0.0
                num_masked = m - 1
            acc = float(np.mean(np.argmax((feats * mask) @ kernel + bias, -1) == labels))
            tested.append((num_masked, acc))
            acc0 = acc if acc0 is None else acc0
            if not abs(acc - acc0) / acc0 < acc_ratio:
                break
        keep, _, history = fp_mod.select_pruning(feats, labels, kernel, bias, acc_ratio, 3,
                                                 keep="first_beyond")
        assert keep == num_masked and history == tested
    assert fp_mod.fp_config("paper").keep == "first_beyond"
    with pytest.raises(ValueError, match="keep rule"):
        fp_mod.select_pruning(feats, labels, kernel, bias, 0.1, 3, keep="best")


def test_fp_mask_equals_zeroing_last_stage_channels(mesh, tiny_vars, benign):
    feats = fp_mod.benign_features(MODEL, tiny_vars, benign.x, mesh, batch_size=16)
    _, mut = MODEL.apply(tiny_vars, benign.x, train=False, mutable=["intermediates"])
    last_stage = np.asarray(mut["intermediates"]["stage2"][0])
    np.testing.assert_allclose(feats, last_stage.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    mask = fp_mod.channel_mask(fp_mod.pruning_order(feats), 3)
    assert mask.sum() == 5
    pruned = {**tiny_vars, "params": fp_mod.apply_channel_mask(tiny_vars["params"], mask)}
    lin = tiny_vars["params"]["linear"]
    manual = (last_stage * mask).mean(axis=(1, 2)) @ lin["kernel"] + lin["bias"]
    np.testing.assert_allclose(MODEL.apply(pruned, benign.x), manual, rtol=1e-4, atol=1e-5)
    acc = evaluate(MODEL.apply, pruned, benign.x, benign.y, mesh=mesh, batch_size=16)
    assert acc["accuracy"] == np.mean(np.argmax(manual, -1) == benign.y)


def test_fp_end_to_end_and_resumes(mesh, tmp_path, tiny_vars, benign):
    cfg = smoke("fp", batch_size=16, acc_ratio=1.0, prune_step_ratio=0.25)
    out = run_and_resume("fp", cfg, mesh, tmp_path, tiny_vars, benign)
    zero_rows = np.all(out["params"]["linear"]["kernel"] == 0, axis=1)
    assert 0 < zero_rows.sum() < 8       # pruned channels stay exactly zero after fine-tuning
    assert not np.array_equal(out["params"]["conv1"]["kernel"],
                              tiny_vars["params"]["conv1"]["kernel"])


# ----------------------------------------------------------------------------------------------
# NAD


def test_nad_attention_map_and_loss_match_reference():
    rng = np.random.default_rng(0)
    fs = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    ft = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)

    def ref_map(f, p=2.0):
        n, h, w, c = f.shape
        am = np.zeros((n, h, w))
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    am[i, y, x] = sum(abs(f[i, y, x, k]) ** p for k in range(c))
            am[i] /= np.sqrt(np.sum(am[i] ** 2)) + 1e-6
        return am

    np.testing.assert_allclose(nad_mod.attention_map(jnp.asarray(fs)), ref_map(fs), rtol=1e-5)
    ref_loss = np.mean((ref_map(fs) - ref_map(ft)) ** 2)
    np.testing.assert_allclose(nad_mod.attention_loss(jnp.asarray(fs), jnp.asarray(ft)),
                               ref_loss, rtol=1e-5)
    # Only the student receives a gradient; the teacher's map is a constant.
    g_t = jax.grad(lambda t: nad_mod.attention_loss(jnp.asarray(fs), t))(jnp.asarray(ft))
    assert np.all(np.asarray(g_t) == 0)


def test_nad_loss_is_ce_plus_weighted_attention_terms(tiny_vars, benign):
    pre = create_model("preactresnet18", 10, width=4)
    pv = jax.eval_shape(pre.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert nad_mod.nad_layers(pre, pv, (8, 8, 3), 3) == ("stage2", "stage3", "stage4")
    layers = nad_mod.nad_layers(MODEL, tiny_vars, (8, 8, 3), 3)
    assert layers == ("stage1", "stage2")
    x = jnp.asarray(benign.x[:8], jnp.float32) / 255.0
    y = jnp.asarray(benign.y[:8])
    rng = np.random.default_rng(1)
    teacher = tuple(jnp.asarray(rng.normal(size=(8, 8, 8, 4)).astype(np.float32)) if k ==
                    "stage1" else jnp.asarray(rng.normal(size=(8, 4, 4, 8)).astype(np.float32))
                    for k in layers)
    loss_fn = nad_mod.nad_loss(MODEL.apply, layers, (500.0, 1000.0, 1000.0), 2.0)
    batch = {"image": x, "label": y, "nad_teacher": teacher}
    loss, (logits, _) = loss_fn(tiny_vars["params"], tiny_vars["batch_stats"], batch, None)
    logits_ref, mut = MODEL.apply(tiny_vars, x, train=True,
                                  mutable=["batch_stats", "intermediates"])
    lp = np.asarray(jax.nn.log_softmax(logits_ref))
    ce = -np.mean(lp[np.arange(8), np.asarray(y)])
    at = [np.mean((np.asarray(nad_mod.attention_map(mut["intermediates"][k][0]))
                   - np.asarray(nad_mod.attention_map(t))) ** 2)
          for k, t in zip(layers, teacher, strict=True)]
    np.testing.assert_allclose(loss, ce + 1000.0 * at[0] + 1000.0 * at[1], rtol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-6)


def test_nad_settings_are_backdoorbench_effective_ones():
    """BackdoorBench `defense/nad.py`: te_epochs (10) for teacher and student, wd 5e-4 (the
    YAML's `weight_decay` is never read), layer3 (500) and layer4 (1000) of PreAct-ResNet18."""
    cfg = nad_mod.nad_config("paper")
    assert (cfg.teacher_epochs, cfg.epochs, cfg.weight_decay) == (10, 10, 5e-4)
    assert (cfg.lr, cfg.schedule, cfg.teacher_schedule) == (0.01, "constant", "cosine_epoch")
    pre = create_model("preactresnet18", 10, width=2)
    pv = jax.eval_shape(pre.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert nad_mod.nad_layers(pre, pv, (8, 8, 3), len(cfg.betas)) == ("stage3", "stage4")
    assert cfg.betas == (500.0, 1000.0)


def test_nad_end_to_end_and_resumes(mesh, tmp_path, tiny_vars, benign):
    out = run_and_resume("nad", smoke("nad", batch_size=16), mesh, tmp_path, tiny_vars, benign)
    stages = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert stages == ["nad_student", "nad_teacher"]
    assert not np.array_equal(out["params"]["conv1"]["kernel"],
                              tiny_vars["params"]["conv1"]["kernel"])


# ----------------------------------------------------------------------------------------------
# ANP


def test_anp_mask_noise_application_and_pruning_match_reference():
    model = create_model("preactresnet18", 10, width=2)
    v = random_variables(model)
    paths = anp_mod.batchnorm_paths(v)
    assert len(paths) == 16 and all(p[-1] in ("bn1", "bn2") for p in paths)
    masks = anp_mod.init_masks(v)
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: jnp.asarray(rng.uniform(0, 1, m.shape), jnp.float32), masks)
    noise = anp_mod.random_noise(jax.random.key(0), masks, 0.4)
    for leaf in jax.tree.leaves(noise):
        assert np.all(np.abs(np.asarray(leaf)) <= 0.4)
    assert not np.allclose(jax.tree.leaves(noise[0])[0], jax.tree.leaves(noise[1])[0])
    clean = anp_mod.perturb_params(v["params"], masks)
    noisy = anp_mod.perturb_params(v["params"], masks, noise)
    pruned = anp_mod.prune_by_mask(v["params"], masks, 0.2)
    flat = traverse_util.flatten_dict(v["params"])
    for key, value in flat.items():
        module, leaf = key[:-1], key[-1]
        outs = [traverse_util.flatten_dict(t)[key] for t in (clean, noisy, pruned)]
        if module not in paths:                # convs, linear: untouched
            for o in outs:
                np.testing.assert_array_equal(o, value)
            continue
        m = np.asarray(traverse_util.flatten_dict(masks)[module])
        dw = np.asarray(traverse_util.flatten_dict(noise[0])[module])
        db = np.asarray(traverse_util.flatten_dict(noise[1])[module])
        for c in range(len(m)):
            if leaf == "scale":
                np.testing.assert_allclose(outs[0][c], value[c] * m[c], rtol=1e-6)
                np.testing.assert_allclose(outs[1][c], value[c] * (m[c] + dw[c]), rtol=1e-5)
                assert outs[2][c] == (np.float32(0.0) if m[c] <= 0.2 else value[c])
            else:
                np.testing.assert_allclose(outs[0][c], value[c], rtol=1e-6)
                np.testing.assert_allclose(outs[1][c], value[c] * (1 + db[c]), rtol=1e-5)
                assert outs[2][c] == value[c]


def test_anp_end_to_end_and_resumes_after_interrupt(mesh, tmp_path, tiny_vars, benign):
    cfg = smoke("anp", batch_size=16)
    out = run_and_resume("anp", cfg, mesh, tmp_path / "full", tiny_vars, benign)
    # Only BN scales change, each either kept or zeroed; running statistics are untouched.
    for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(out["params"]),
                                jax.tree.leaves(tiny_vars["params"]), strict=True):
        new, old = np.asarray(new), np.asarray(old)
        if path[-1].key == "scale":
            assert np.all((new == old) | (new == 0))
        else:
            np.testing.assert_array_equal(new, old)
    assert_same(out["batch_stats"], tiny_vars["batch_stats"])

    # Killed in its second (last) epoch, before that epoch's checkpoint (the log comes first):
    # the stage resumes from its epoch-1 checkpoint to the same result.
    class Stop(Exception):
        pass

    def stop(stage, history):
        if len(history) == 2:
            raise Stop

    with pytest.raises(Stop):
        anp_mod.anp(MODEL, tiny_vars, benign, cfg, jax.random.key(7),
                    make_ctx(mesh, tmp_path / "cut", log=stop))
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("*/*")] == ["1"]
    resumed = anp_mod.anp(MODEL, tiny_vars, benign, cfg, jax.random.key(7),
                          make_ctx(mesh, tmp_path / "cut"))
    assert_same(out, resumed)


def test_anp_sweep_matches_backdoorbench_threshold_choice(tiny_vars):
    """`evaluate_by_threshold`: masks with 4 decimals, thresholds 0..0.9 by 0.05, lowest ASR
    within 10% relative clean-accuracy loss, strictly below the unpruned ASR."""
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda m: rng.uniform(0, 1, m.shape).astype(np.float32),
                         anp_mod.init_masks(tiny_vars))
    flat_m = np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks)])
    scales = [np.ravel(np.asarray(traverse_util.flatten_dict(tiny_vars["params"])[(*p, "scale")]))
              for p in anp_mod.batchnorm_paths(tiny_vars)]

    def fake_eval(v):  # more pruning: lower ASR and lower accuracy
        flat = traverse_util.flatten_dict(v["params"])
        got = np.concatenate([np.ravel(np.asarray(flat[(*p, "scale")]))
                              for p in anp_mod.batchnorm_paths(v)])
        frac = np.mean(got == 0)
        return {"clean_acc": 0.9 - 0.3 * frac, "asr": 1.0 - frac}

    assert np.all(np.concatenate(scales) != 0)
    best_t, best_asr = None, 1.0
    for t in np.arange(0.0, 0.9 + 0.05, 0.05):
        frac = np.mean(np.round(flat_m.astype(np.float64), 4) <= t)
        if abs(0.3 * frac) / 0.9 < 0.1 and 1.0 - frac < best_asr:
            best_t, best_asr = float(t), 1.0 - frac
    out, t = anp_mod.sweep_thresholds(tiny_vars, masks, fake_eval)
    assert t == best_t and 0 < best_t < 0.9
    assert_same(out["params"], anp_mod.prune_by_mask(tiny_vars["params"], jax.tree.map(
        lambda m: np.where(np.round(m.astype(np.float64), 4) <= t, 0.0, 1.0), masks), 0.5))
    # Nothing within the tolerance lowers the ASR: the unpruned model.
    same, t = anp_mod.sweep_thresholds(tiny_vars, masks, fake_eval, acc_ratio=1e-9)
    assert t is None and same is tiny_vars


def test_anp_sweep_end_to_end_and_needs_an_evaluator(mesh, tmp_path, tiny_vars, benign):
    cfg = smoke("anp", batch_size=16, selection="sweep")
    with pytest.raises(ValueError, match="evaluator"):
        anp_mod.anp(MODEL, tiny_vars, benign, cfg, jax.random.key(7),
                    StageContext(mesh=mesh, seed=0, workdir=tmp_path / "none", progress=False))
    ctx = make_ctx(mesh, tmp_path / "sweep")
    ctx.evaluate = lambda v: {"clean_acc": 1.0, "asr": -float(  # fewest nonzero BN scales
        sum(np.sum(np.asarray(x) == 0) for x in jax.tree.leaves(v["params"])))}
    out = anp_mod.anp(MODEL, tiny_vars, benign, cfg, jax.random.key(7), ctx)
    most = anp_mod.anp(MODEL, tiny_vars, benign, dataclasses.replace(cfg, selection="threshold",
                                                                     threshold=0.9),
                       jax.random.key(7), make_ctx(mesh, tmp_path / "fixed"))
    assert_same(out, most)      # every threshold is within tolerance: 0.9 prunes the most


# ----------------------------------------------------------------------------------------------
# I-BAU


def quadratic_problem(seed=0):
    rng = np.random.default_rng(seed)
    n, m = 4, 3
    q = rng.normal(size=(n, n))
    a = q @ q.T / n + np.eye(n)                       # SPD inner Hessian
    b = rng.normal(size=(n, m))
    c = rng.normal(size=(2, n))
    eta = 0.5 / np.linalg.eigvalsh(a).max()           # a contraction: ||I - eta A|| < 1
    theta = rng.normal(size=(m,))
    delta = rng.normal(size=(n,))

    def inner_loss(d, t):
        return 0.5 * d @ (a @ d) - d @ (b @ t)

    def fp_map(d, t):
        return d - eta * jax.grad(inner_loss)(d, t)

    def outer_loss(d, t):
        return jnp.sum(jnp.tanh(c @ d + t[:2]) ** 2) + 0.1 * jnp.sum(t * t)

    return a, b, eta, theta, delta, fp_map, outer_loss


def test_ibau_hypergradient_matches_truncated_neumann_series():
    with jax.enable_x64(True):
        a, b, eta, theta, delta, fp_map, outer_loss = quadratic_problem()
        got = ibau_mod.fixed_point_hypergradient(fp_map, outer_loss, jnp.asarray(delta),
                                                 jnp.asarray(theta), 5)
        g_d, g_t = (np.asarray(g) for g in jax.grad(outer_loss, argnums=(0, 1))(delta, theta))
    # Phi(d, t) = d - eta (A d - B t): J_d = I - eta A, J_t = eta B.
    j_d, j_t = np.eye(len(delta)) - eta * a, eta * b
    v = np.zeros_like(delta)
    for _ in range(5):
        v = j_d.T @ v + g_d
    np.testing.assert_allclose(got, j_t.T @ v + g_t, rtol=1e-10)


def test_ibau_hypergradient_matches_finite_differences_of_the_unrolled_solution():
    with jax.enable_x64(True):
        a, b, eta, theta, _, fp_map, outer_loss = quadratic_problem(1)

        def solve(t, iters=3000):
            d = np.zeros(a.shape[0])
            for _ in range(iters):             # the explicit, unrolled fixed-point iteration
                d = d - eta * (a @ d - b @ t)
            return d

        def total(t):
            return float(outer_loss(jnp.asarray(solve(t)), jnp.asarray(t)))

        d_star = solve(theta)
        np.testing.assert_allclose(d_star, np.linalg.solve(a, b @ theta), rtol=1e-8)
        got = np.asarray(ibau_mod.fixed_point_hypergradient(
            fp_map, outer_loss, jnp.asarray(d_star), jnp.asarray(theta), 3000))
        h = 1e-6
        fd = np.array([(total(theta + h * e) - total(theta - h * e)) / (2 * h)
                       for e in np.eye(len(theta))])
        np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-8)
        partial_only = np.asarray(ibau_mod.fixed_point_hypergradient(
            fp_map, outer_loss, jnp.asarray(d_star), jnp.asarray(theta), 0))
        assert not np.allclose(partial_only, fd, rtol=1e-3)


def test_ibau_normalized_delta_equals_pixel_delta_with_rescaled_constants(mesh, tmp_path,
                                                                           tiny_vars, benign):
    """delta in normalised units (BackdoorBench) is delta_pixel / std: with a uniform std s, the
    run equals a pixel-space run with step sizes * s^2 and the regulariser / s^2."""
    s0 = 0.25
    model = TinyCNN(num_classes=NUM_CLASSES, width=4, mean=(0.5, 0.4, 0.3), std=(s0,) * 3)
    np.testing.assert_array_equal(ibau_mod.delta_scale(model, "normalized"), [s0] * 3)
    np.testing.assert_array_equal(ibau_mod.delta_scale(model, "pixel"), [1.0])
    np.testing.assert_array_equal(ibau_mod.delta_scale(MODEL, "normalized"), [1.0])
    cfg = smoke("ibau", batch_size=16, portion=0.25)
    assert cfg.delta_space == "normalized"
    norm = ibau_mod.ibau(model, tiny_vars, benign, cfg, jax.random.key(7),
                         make_ctx(mesh, tmp_path / "norm"))
    pix_cfg = dataclasses.replace(cfg, delta_space="pixel", pert_lr=cfg.pert_lr * s0 ** 2,
                                  inner_lr=cfg.inner_lr * s0 ** 2, reg=cfg.reg / s0 ** 2)
    pix = ibau_mod.ibau(model, tiny_vars, benign, pix_cfg, jax.random.key(7),
                        make_ctx(mesh, tmp_path / "pix"))
    old = ibau_mod.ibau(model, tiny_vars, benign, dataclasses.replace(cfg, delta_space="pixel"),
                        jax.random.key(7), make_ctx(mesh, tmp_path / "old"))
    for a, b in zip(jax.tree.leaves(norm), jax.tree.leaves(pix), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert not all(np.allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)
                   for a, c in zip(jax.tree.leaves(norm), jax.tree.leaves(old), strict=True))


def test_ibau_end_to_end_and_resumes(mesh, tmp_path, tiny_vars, benign):
    # portion 0.25: 4 of the 16 images of each outer batch carry the perturbation, so the
    # implicit term of the hypergradient is exercised (BackdoorBench: 2 of 256).
    out = run_and_resume("ibau", smoke("ibau", batch_size=16, portion=0.25), mesh, tmp_path,
                         tiny_vars, benign)
    assert_same(out["batch_stats"], jax.device_get(tiny_vars["batch_stats"]))
    assert not np.array_equal(out["params"]["linear"]["kernel"],
                              tiny_vars["params"]["linear"]["kernel"])
