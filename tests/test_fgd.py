"""FGD against a slow NumPy port of the official loss (loops over images, boxes and cells)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.detection.fgd import FGDConfig, FGDRelation, fgd_loss, fgd_masks


def np_attention(f, t):
    n, h, w, c = f.shape
    v = np.abs(f)
    s = v.mean(-1).reshape(n, -1) / t
    s = np.exp(s - s.max(1, keepdims=True))
    s = (h * w * s / s.sum(1, keepdims=True)).reshape(n, h, w)
    ch = v.mean((1, 2)) / t
    ch = np.exp(ch - ch.max(1, keepdims=True))
    return s, c * ch / ch.sum(1, keepdims=True)


def np_masks(boxes, valid, img, h, w):
    fg = np.zeros((len(boxes), h, w))
    bg = np.ones((len(boxes), h, w))
    for i in range(len(boxes)):
        for j in range(boxes.shape[1]):
            if not valid[i, j]:
                continue
            x1, y1, x2, y2 = boxes[i, j]
            wmin, wmax = math.floor(x1 / img * w), math.ceil(x2 / img * w)
            hmin, hmax = math.floor(y1 / img * h), math.ceil(y2 / img * h)
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            for r in range(hmin, min(hmax, h - 1) + 1):  # torch slicing clips at the edge
                for c in range(wmin, min(wmax, w - 1) + 1):
                    fg[i, r, c] = max(fg[i, r, c], area)
        bg[i] = np.where(fg[i] > 0, 0, 1)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def np_relation(p, x):
    n, h, w, c = x.shape
    logits = (x.reshape(n, h * w, c) @ p["conv_mask"]["kernel"])[..., 0] + p["conv_mask"]["bias"]
    a = np.exp(logits - logits.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    ctx = np.einsum("np,npc->nc", a, x.reshape(n, h * w, c))
    y = ctx @ p["add_conv1"]["kernel"] + p["add_conv1"]["bias"]
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    y = (y - mu) / np.sqrt(var + 1e-5) * p["add_norm"]["scale"] + p["add_norm"]["bias"]
    y = np.maximum(y, 0) @ p["add_conv2"]["kernel"] + p["add_conv2"]["bias"]
    return x + y[:, None, None, :]


def test_masks_match_the_official_loops():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (3, 4, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (3, 4, 2))], -1).clip(0, 128)
    valid = rng.random((3, 4)) < 0.75
    fg, bg = fgd_masks(jnp.asarray(boxes), jnp.asarray(valid), (128, 128), 16, 16)
    rfg, rbg = np_masks(boxes, valid, 128, 16, 16)
    np.testing.assert_allclose(fg, rfg, rtol=1e-6)
    np.testing.assert_allclose(bg, rbg, rtol=1e-6)


def test_loss_matches_the_numpy_reference():
    rng = np.random.default_rng(1)
    n, h, w, c = 2, 8, 8, 6
    fs = rng.normal(size=(n, h, w, c)).astype(np.float32)
    ft = rng.normal(size=(n, h, w, c)).astype(np.float32)
    boxes = np.array([[[10, 20, 60, 90], [70, 5, 120, 40]], [[0, 0, 127, 127], [0, 0, 0, 0]]],
                     np.float32)
    valid = np.array([[True, True], [True, False]])
    rel = FGDRelation()
    keys = jax.random.split(jax.random.key(0), 2)
    init = jax.jit(rel.init)  # one program instead of each small op compiled eagerly
    params = {k: init(key, jnp.zeros((1, h, w, c)))["params"]
              for k, key in zip(("student", "teacher"), keys, strict=True)}
    # a non-zero last layer, so the global term is not trivially |F_S - F_T|^2
    params = jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), params)
    cfg = FGDConfig(alpha=1.0, beta=2.0, gamma=3.0, lam=4.0)
    out = jax.jit(lambda *a: fgd_loss(*a[:4], (128, 128), a[4], cfg))(
        jnp.asarray(fs), jnp.asarray(ft), jnp.asarray(boxes), jnp.asarray(valid), params)
    s_t, c_t = np_attention(ft, 0.5)
    s_s, c_s = np_attention(fs, 0.5)
    m_fg, m_bg = np_masks(boxes, valid, 128, h, w)
    sq = s_t[..., None] * c_t[:, None, None, :] * (ft - fs) ** 2
    fg = np.sum(m_fg[..., None] * sq) / n
    bg = np.sum(m_bg[..., None] * sq) / n
    att = (np.abs(c_s - c_t).sum() + np.abs(s_s - s_t).sum()) / n
    p_np = jax.tree.map(np.asarray, params)
    glob = np.sum((np_relation(p_np["student"], fs) - np_relation(p_np["teacher"], ft)) ** 2) / n
    for key, want in (("fg", fg), ("bg", bg), ("attention", att), ("global", glob)):
        assert float(out[key]) == pytest.approx(want, rel=1e-4), key
    assert float(out["loss"]) == pytest.approx(fg + 2 * bg + 3 * att + 4 * glob, rel=1e-4)


def test_teacher_gets_no_gradient_and_relation_starts_as_identity():
    rng = np.random.default_rng(2)
    fs = jnp.asarray(rng.normal(size=(1, 4, 4, 4)), jnp.float32)
    ft = jnp.asarray(rng.normal(size=(1, 4, 4, 4)), jnp.float32)
    rel = FGDRelation()
    p = rel.init(jax.random.key(0), fs)["params"]
    np.testing.assert_allclose(rel.apply({"params": p}, fs), fs)  # zero-initialised last layer
    params = {"student": p, "teacher": p}
    boxes, valid = jnp.zeros((1, 1, 4)), jnp.zeros((1, 1), bool)
    g = jax.grad(lambda t: fgd_loss(fs, t, boxes, valid, (32, 32), params, FGDConfig())["loss"])(
        ft)
    assert float(jnp.abs(g).max()) == 0.0
