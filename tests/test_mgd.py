"""MGD against a slow NumPy reference written from its equation (loops over images, positions
and kernel taps), its mask and initialisation, and MGD as the base distiller of the detection
distillation step (runs, deterministic, its loss the sum of its terms)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftsam_jax.detection.base import DistillInputs, FeatureDistiller
from ftsam_jax.detection.distill import (
    DetectDistillConfig,
    create_detect_distill_state,
    make_detect_distill_step,
)
from ftsam_jax.detection.fgd import FGDConfig
from ftsam_jax.detection.mgd import MGDConfig, mgd_keep_mask, mgd_loss
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.training.step import init_variables
from tests.test_detector import toy_scenes


def np_conv(x, kernel, bias):
    """'same' convolution of NHWC x with an HWIO kernel (odd size), one output cell at a time."""
    n, h, w, _ = x.shape
    k = kernel.shape[0]
    r = k // 2
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                for di in range(k):
                    for dj in range(k):
                        out[b, i, j] += xp[b, i + di, j + dj] @ kernel[di, dj]
                out[b, i, j] += bias
    return out


def np_mgd(fs, ft, params, u, alpha, ratio):
    """alpha * sum (G(align(F_S) * M) - F_T)^2 / N with M = 0 where u > 1 - ratio."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = fs.astype(np.float64)
    if "align" in p:
        x = np_conv(x, p["align"]["conv"]["kernel"], p["align"]["conv"]["bias"])
    mask = np.ones(u.shape)
    for idx in np.ndindex(u.shape):
        if u[idx] > 1 - ratio:
            mask[idx] = 0.0
    g = p["generation"]
    y = np.maximum(np_conv(x * mask, g["conv1"]["kernel"], g["conv1"]["bias"]), 0.0)
    y = np_conv(y, g["conv2"]["kernel"], g["conv2"]["bias"])
    return alpha * np.sum((y - ft) ** 2) / len(fs)


@pytest.mark.parametrize("c_s", [4, 3])  # equal channels (no align), and an align conv
def test_loss_matches_the_numpy_reference(c_s):
    rng = np.random.default_rng(0)
    n, h, w, c = 2, 5, 6, 4
    fs = rng.normal(size=(n, h, w, c_s)).astype(np.float32)
    ft = rng.normal(size=(n, h, w, c)).astype(np.float32)
    cfg = MGDConfig(alpha=0.5, ratio=0.65)
    params = jax.jit(lambda k: cfg.init(k, ("p3",), [jnp.zeros_like(fs)],
                                        [jax.ShapeDtypeStruct(ft.shape, jnp.float32)])
                     )(jax.random.key(1))["p3"]
    assert ("align" in params) == (c_s != c)
    key = jax.random.key(2)
    out = jax.jit(lambda a, b, p: mgd_loss(a, b, p, key, cfg))(fs, ft, params)
    u = np.asarray(jax.random.uniform(key, (n, h, w, 1)))
    want = np_mgd(fs, ft, params, u, 0.5, 0.65)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(out["mse"]) == pytest.approx(want / 0.5, rel=1e-5)
    if c_s != c:
        return
    # the base distiller's loss: the levels summed, level i masked with fold_in(rng, i)
    levels = ("p3", "p4")
    fs2, ft2 = fs[:, :3, :3], ft[:, :3, :3]
    p_all = {"p3": params, "p4": params}
    inputs = DistillInputs(boxes=jnp.zeros((n, 1, 4)), valid=jnp.zeros((n, 1), bool),
                           image_hw=(32, 32), rng=key)
    total = jax.jit(lambda a, b, c_, d: cfg.loss(p_all, levels, [a, c_], [b, d], inputs))(
        fs, ft, fs2, ft2)
    u0 = np.asarray(jax.random.uniform(jax.random.fold_in(key, 0), (n, h, w, 1)))
    u1 = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (n, 3, 3, 1)))
    want = np_mgd(fs, ft, params, u0, 0.5, 0.65) + np_mgd(fs2, ft2, params, u1, 0.5, 0.65)
    assert float(total) == pytest.approx(want, rel=1e-5)


def test_mask_ratio_init_bounds_and_frozen_teacher():
    keep = np.asarray(mgd_keep_mask(jax.random.key(0), 64, 32, 32, 0.65))
    assert keep.shape == (64, 32, 32, 1) and set(np.unique(keep)) == {0.0, 1.0}
    assert 1 - keep.mean() == pytest.approx(0.65, abs=0.01)  # a share lambda is dropped
    assert np.asarray(mgd_keep_mask(jax.random.key(0), 2, 4, 4, 0.0)).min() == 1.0
    cfg = MGDConfig()
    assert isinstance(cfg, FeatureDistiller) and isinstance(FGDConfig(), FeatureDistiller)
    fs = jnp.ones((1, 4, 4, 8))
    params = jax.jit(lambda k: cfg.init(k, ("p3",), [fs], [fs]))(jax.random.key(0))["p3"]
    for layer, fan_in in (("conv1", 9 * 8), ("conv2", 9 * 8)):  # PyTorch's Conv2d defaults
        bound = 1 / math.sqrt(fan_in)
        for leaf in params["generation"][layer].values():
            assert float(jnp.abs(leaf).max()) <= bound and float(jnp.abs(leaf).max()) > bound / 2
    g = jax.jit(jax.grad(lambda t: mgd_loss(fs, t, params, jax.random.key(1), cfg)["loss"]))(
        fs * 2)
    assert float(jnp.abs(g).max()) == 0.0


@pytest.fixture(scope="module")
def setup():
    data = toy_scenes(8, size=32)
    teacher = FCOS(num_classes=4, width=8, fpn_channels=8, head_convs=1)
    student = FCOS(num_classes=4, width=4, fpn_channels=8, head_convs=1)
    t_params = init_variables(teacher, jax.random.key(1), (32, 32, 3))["params"]
    batch = {"image": jnp.asarray(data.images), "boxes": jnp.asarray(data.boxes),
             "labels": jnp.asarray(data.labels), "mask": jnp.asarray(data.mask),
             "ikd": jnp.float32(1.0)}
    noise = np.random.default_rng(0).integers(-8, 9, data.images.shape)
    batch["adv"] = jnp.asarray(np.clip(data.images.astype(int) + noise, 0, 255), jnp.uint8)
    return teacher, student, t_params, batch


def test_distill_step_with_mgd_runs_and_is_deterministic(setup):
    """MGD in the IKD phase (AFA on): the step runs, repeats exactly, its loss is the sum of
    its terms and its mask follows the step's key. The IKD term is the same code as with FGD
    (tests/test_detect_distill.py keeps FGD's step; that step's parameters after 2 SAM + SSA +
    AFA steps were bit-identical before and after the base interface, checked by hand)."""
    teacher, student, t_params, batch = setup
    base = MGDConfig(alpha=1e-2)
    tx = optax.sgd(0.01)
    cfg = DetectDistillConfig(base=base, alpha_adv=1e-3)
    state = create_detect_distill_state(student, tx, jax.random.key(0), 32, cfg, teacher=teacher)
    assert set(state.params) == {"student", base.name}
    step = jax.jit(make_detect_distill_step(student, teacher, tx, cfg, 4, 32))
    rng = jax.random.key(3)
    new, m = step(state, t_params, batch, rng)
    again, m2 = step(state, t_params, batch, rng)
    jax.tree.map(np.testing.assert_array_equal, new.params, again.params)
    assert {k: float(v) for k, v in m.items()} == {k: float(v) for k, v in m2.items()}
    # the step's loss is the sum of its terms (MGD's own value: the NumPy parity test above)
    assert float(m["mgd"]) > 0 and float(m["afa"]) > 0 and float(m["det"]) > 0
    assert float(m["loss"]) == pytest.approx(float(m["det"] + m["mgd"] + m["afa"]), rel=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params[base.name],
                         state.params[base.name])
    assert max(jax.tree.leaves(moved)) > 0  # the base distiller's modules train
    _, m3 = step(state, t_params, batch, jax.random.key(4))  # another step key, another mask
    assert float(m3["mgd"]) != float(m["mgd"]) and float(m3["det"]) == float(m["det"])
