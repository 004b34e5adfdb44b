"""The CPU convolution path: matmul weight gradient == XLA's, and the XLA compiler options."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import ftsam_jax
from ftsam_jax import xla
from ftsam_jax.models import conv as conv_mod
from ftsam_jax.models import create_model
from ftsam_jax.models.conv import conv_general_dilated, use_matmul_wgrad, weight_gradient
from ftsam_jax.training.step import classification_loss, create_train_state, init_variables

DN = ("NHWC", "HWIO", "NHWC")


def native_grads(x, w, strides, padding, dy):
    _, vjp = jax.vjp(lambda x_, w_: lax.conv_general_dilated(
        x_, w_, strides, padding, dimension_numbers=DN), x, w)
    return vjp(dy)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


CASES = [  # (n, h, w, cin, cout, kernel, strides, padding)
    (4, 9, 9, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 8, 8, 6, 4, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (3, 7, 10, 4, 8, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (2, 8, 8, 5, 3, (1, 1), (1, 1), "VALID"),
    (2, 11, 6, 4, 4, (3, 3), (2, 1), "SAME"),
    (2, 9, 9, 2, 3, (5, 3), (1, 2), ((2, 1), (0, 3))),
    (1, 6, 6, 3, 2, (2, 2), (2, 2), ((0, 1), (1, 0))),
]


@pytest.mark.parametrize("case", CASES)
def test_matmul_weight_gradient_equals_xla(case):
    n, h, w, cin, cout, k, strides, padding = case
    rng = np.random.default_rng(sum(map(hash, map(str, case))) % 2**32)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((*k, cin, cout)), jnp.float32)
    y = lax.conv_general_dilated(x, kern, strides, padding, dimension_numbers=DN)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx_ref, dw_ref = native_grads(x, kern, strides, padding, dy)
    pads = (tuple(lax.padtype_to_pads((h, w), k, strides, padding)) if isinstance(padding, str)
            else padding)
    assert rel_err(weight_gradient(x, dy, k, strides, pads), dw_ref) < 1e-5
    # The custom-VJP convolution: same output, same input and weight gradients.
    fn = lambda x_, w_: conv_general_dilated(x_, w_, strides, padding, dimension_numbers=DN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(conv_mod.ENV_WGRAD, "matmul")
        out, vjp = jax.vjp(fn, x, kern)
        dx, dw = vjp(dy)
    assert rel_err(out, y) < 1e-6
    assert rel_err(dx, dx_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5


def test_bfloat16_weight_gradient_close_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 8)), jnp.bfloat16)
    kern = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) * 0.1, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((4, 8, 8, 8)), jnp.bfloat16)
    _, dw_ref = native_grads(x.astype(jnp.float32), kern.astype(jnp.float32), (1, 1),
                             ((1, 1), (1, 1)), dy.astype(jnp.float32))
    dw = weight_gradient(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert dw.dtype == jnp.float32  # accumulated in float32
    assert rel_err(dw, dw_ref) < 1e-5  # bf16 inputs are exact in float32; only sums differ


def test_policy():
    assert use_matmul_wgrad((1, 1, 8, 8), "auto", "cpu")
    assert not use_matmul_wgrad((3, 3, 8, 8), "auto", "cpu")
    assert use_matmul_wgrad((3, 3, 8, 8), "matmul", "cpu")
    assert not use_matmul_wgrad((1, 1, 8, 8), "native", "cpu")
    assert not use_matmul_wgrad((1, 1, 8, 8), "matmul", "gpu")  # accelerators: XLA's own
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(conv_mod.ENV_WGRAD, "fastest")
        with pytest.raises(ValueError, match="FTSAM_JAX_CONV_WGRAD"):
            conv_mod.wgrad_mode()


def _model_grads(mode, monkeypatch, second_order=False):
    monkeypatch.setenv(conv_mod.ENV_WGRAD, mode)
    model = create_model("preactresnet18", 10, width=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((8, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    v = init_variables(model, jax.random.key(0), x.shape[1:], train=False)

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if second_order:  # gradient of the squared gradient norm: reverse over reverse
        fn = jax.grad(lambda p: optax.tree.norm(jax.grad(loss)(p)) ** 2)
    else:
        fn = jax.grad(loss)
    return jax.jit(fn)(v["params"])


@pytest.mark.parametrize("second_order", [False, True])
def test_whole_preact_resnet_gradient_matches_native(monkeypatch, second_order):
    ref = _model_grads("native", monkeypatch, second_order)
    for mode in ("auto", "matmul"):
        got = _model_grads(mode, monkeypatch, second_order)
        errs = jax.tree.map(rel_err, got, ref)
        assert max(jax.tree.leaves(errs)) < 1e-4, (mode, errs)


def test_sam_step_matches_native(monkeypatch):
    model = create_model("tiny_cnn", 10, width=4)
    loss_fn = classification_loss(model.apply)
    tx = ftsam_jax.sam(optax.sgd(0.1, momentum=0.9), 2.0, adaptive=True)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((16, 12, 12, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    out = {}
    for mode in ("native", "matmul"):
        monkeypatch.setenv(conv_mod.ENV_WGRAD, mode)
        state = create_train_state(model, tx, jax.random.key(0), (12, 12, 3))
        step = jax.jit(lambda s, b: ftsam_jax.sam_step(s, b, jax.random.key(1), tx=tx,
                                                         loss_fn=loss_fn))
        for _ in range(2):
            state, _ = step(state, batch)
        out[mode] = state.params
    # conv biases before BN have ~0 gradients (float noise): compare with an absolute floor
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 out["matmul"], out["native"])


def test_compiler_options_on_cpu_and_switch(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert xla.compiler_options() == xla.CPU_OPTIONS
    monkeypatch.setenv(xla.ENV_SWITCH, "0")
    assert xla.compiler_options() == {}


def test_unknown_compiler_option_is_dropped_with_a_warning(monkeypatch):
    monkeypatch.setattr(xla, "CPU_OPTIONS", {"xla_cpu_no_such_option_for_tests": "1"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xla.compiler_options() == {}
    assert any("not accepted" in str(w.message) for w in caught)


def test_tuned_jit_gives_the_same_numbers():
    model = create_model("tiny_cnn", 10, width=4)
    x = jnp.asarray(np.random.default_rng(0).random((8, 12, 12, 3)), jnp.float32)
    v = model.init(jax.random.key(0), x[:1], train=False)
    f = lambda p: jnp.sum(model.apply({**v, "params": p}, x) ** 2)
    g_tuned = xla.jit(jax.grad(f))(v["params"])
    g_plain = jax.jit(jax.grad(f))(v["params"])
    errs = jax.tree.map(rel_err, g_tuned, g_plain)
    assert max(jax.tree.leaves(errs)) < 1e-5, errs
