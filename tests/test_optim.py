"""sam_gradient: parity with a NumPy implementation of the formula and with optax.contrib.sam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax.optim import sam_perturbation

C = np.array([0.5, -1.5, 2.0, 0.25, -0.75, 1.0])


def loss(params):
    """L(w) = sum c*sin(w) + 0.5*|w|^2 over a two-leaf tree: gradient c*cos(w) + w."""
    w = jnp.concatenate([params["a"].ravel(), params["b"].ravel()])
    return jnp.sum(C * jnp.sin(w)) + 0.5 * jnp.sum(w**2)


def np_grad(w):
    return C * np.cos(w) + w


def np_sam_grad(w, rho, adaptive, eta, eps=1e-12):
    """The paper's Eq. 4 then Eq. 6's gradient, written out in NumPy."""
    g = np_grad(w)
    t = np.abs(w) + eta if adaptive else np.ones_like(w)
    e = rho * t**2 * g / (np.linalg.norm(t * g) + eps)
    return np_grad(w + e)


def make_params(seed=0):
    w = np.random.default_rng(seed).normal(size=6)
    return {"a": jnp.asarray(w[:4].reshape(2, 2), jnp.float32),
            "b": jnp.asarray(w[4:], jnp.float32)}, w


def flat(tree):
    return np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])


@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_matches_numpy_formula(adaptive, eta):
    params, w = make_params()
    rho = 2.0 if adaptive else 0.05
    tx = ftsam_jax.sam_gradient(rho, adaptive=adaptive, eta=eta)
    state = tx.init(params)
    grads = jax.grad(loss)(params)
    new_grads, state = jax.jit(
        lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(loss)))(grads, state, params)
    np.testing.assert_allclose(flat(new_grads), np_sam_grad(w, rho, adaptive, eta),
                               rtol=1e-5, atol=1e-6)
    assert int(state.count) == 1


def test_perturbation_norm_is_rho():
    params, _ = make_params(1)
    grads = jax.grad(loss)(params)
    e = sam_perturbation(grads, params, 0.3)
    assert float(optax.tree.norm(e)) == pytest.approx(0.3, rel=1e-5)
    # Adaptive: ||T^-1 e|| = rho (the constraint set of FT-SAM's Eq. 3).
    e = sam_perturbation(grads, params, 0.3, adaptive=True, eta=0.01)
    inv = jax.tree.map(lambda d, w: d / (jnp.abs(w) + 0.01), e, params)
    assert float(optax.tree.norm(inv)) == pytest.approx(0.3, rel=1e-5)


def test_parity_with_optax_contrib_sam_opaque():
    params, _ = make_params(2)
    rho, lr = 0.1, 0.05
    ours = ftsam_jax.sam(optax.sgd(lr, momentum=0.9), rho)
    theirs = optax.contrib.sam(
        optax.sgd(lr, momentum=0.9), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2, opaque_mode=True)
    p1, s1 = params, ours.init(params)
    p2, s2 = params, theirs.init(params)
    for _ in range(5):
        u1, s1 = ours.update(jax.grad(loss)(p1), s1, p1, grad_fn=jax.grad(loss))
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = theirs.update(jax.grad(loss)(p2), s2, p2, grad_fn=lambda p, _: jax.grad(loss)(p))
        p2 = optax.apply_updates(p2, u2)
    np.testing.assert_allclose(flat(p1), flat(p2), rtol=1e-6, atol=1e-7)
    assert not np.allclose(flat(p1), flat(params))


def test_rho_schedule_advances():
    params, _ = make_params(3)
    schedule = optax.linear_schedule(0.0, 1.0, 4)  # 0, .25, .5, ...
    tx = ftsam_jax.sam_gradient(schedule)
    state = tx.init(params)
    norms = []
    for _ in range(3):
        # grad_fn returns (perturbed - params) = e, whose norm is rho(count) for plain SAM.
        e, state = tx.update(jax.grad(loss)(params), state, params,
                             grad_fn=lambda p: jax.tree.map(jnp.subtract, p, params))
        norms.append(float(optax.tree.norm(e)))
    np.testing.assert_allclose(norms, [0.0, 0.25, 0.5], atol=1e-6)
    assert int(state.count) == 3


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_is_safe(adaptive):
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = ftsam_jax.sam_gradient(2.0, adaptive=adaptive)
    out, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(loss)))(
        zeros, tx.init(params), params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
    np.testing.assert_allclose(flat(out), np_grad(np.zeros(6)), atol=1e-7)


def test_composes_with_weight_decay_and_momentum():
    params, w = make_params(4)
    rho, wd, lr, mom = 2.0, 5e-4, 0.01, 0.9
    tx = optax.chain(ftsam_jax.sam_gradient(rho, adaptive=True), optax.add_decayed_weights(wd),
                     optax.sgd(lr, momentum=mom))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))
    buf = np.zeros_like(w)
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        d = np_sam_grad(w, rho, True, 0.0) + wd * w  # torch SGD: d = g + wd*w; buf = mom*buf + d
        buf = mom * buf + d
        w = w - lr * buf
    np.testing.assert_allclose(flat(params), w, rtol=1e-5, atol=1e-6)


def test_composes_with_clipping_masking_and_injected_hyperparams():
    params, _ = make_params(5)
    mask = {"a": True, "b": False}
    tx = optax.chain(
        ftsam_jax.sam_gradient(0.05),
        optax.clip_by_global_norm(1e-3),
        optax.masked(optax.add_decayed_weights(1e-2), mask),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    )
    state = tx.init(params)
    updates, state = jax.jit(
        lambda p, s: tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss)))(params, state)
    # Clipping after SAM acts on the perturbed gradient: 0.1 * (clip(g_adv) + masked decay).
    g_adv = jax.grad(loss)(jax.tree.map(jnp.add, params, ftsam_jax.sam_perturbation(
        jax.grad(loss)(params), params, 0.05)))
    clipped = jax.tree.map(lambda g: g * min(1.0, 1e-3 / float(optax.tree.norm(g_adv))), g_adv)
    want = {"a": -0.1 * (clipped["a"] + 1e-2 * params["a"]), "b": -0.1 * clipped["b"]}
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-9),
                 updates, want)
    # Learning rate injected and changeable in the state, as optax users expect.
    assert float(state[3].hyperparams["learning_rate"]) == pytest.approx(0.1)


def test_stage_before_sam_changes_only_the_direction():
    """Documented: a norm clip before sam_gradient is a no-op (e is scale-invariant), a mask
    before it changes the perturbation, and neither touches the gradient handed on."""
    params, _ = make_params(5)
    g = jax.grad(loss)(params)
    run = lambda tx: tx.update(g, tx.init(params), params, grad_fn=jax.grad(loss))[0]
    plain = run(ftsam_jax.sam_gradient(0.05))
    clipped_first = run(optax.chain(optax.clip_by_global_norm(1e-4),
                                    ftsam_jax.sam_gradient(0.05)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped_first, plain)
    assert optax.tree.norm(g) > 1e-3  # so the clip did rescale the gradient it saw
    masked_first = run(optax.chain(optax.masked(optax.set_to_zero(), {"a": True, "b": False}),
                                   ftsam_jax.sam_gradient(0.05)))
    e_b = ftsam_jax.sam_perturbation({"a": jnp.zeros_like(g["a"]), "b": g["b"]}, params, 0.05)
    want = jax.grad(loss)(jax.tree.map(jnp.add, params, e_b))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), masked_first, want)
    assert not np.allclose(masked_first["a"], plain["a"])


def test_missing_grad_fn_is_a_clear_error():
    params, _ = make_params()
    tx = ftsam_jax.sam_gradient(0.05)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params)


def test_keeps_gradient_dtype():
    params = {"a": jnp.ones((3,), jnp.bfloat16)}
    tx = ftsam_jax.sam_gradient(0.05, adaptive=True)
    out, _ = tx.update(params, tx.init(params), params,
                       grad_fn=lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p))
    assert out["a"].dtype == jnp.bfloat16
