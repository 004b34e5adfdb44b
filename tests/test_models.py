"""Model layouts, parameter counts, dtypes and named features."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftsam_jax.models import create_model
from ftsam_jax.training.step import classification_loss, create_train_state, train_step


def param_count(model, shape=(32, 32, 3)):
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
    return sum(x.size for x in jax.tree.leaves(v["params"]))


def test_preact_resnet18_has_the_reference_parameter_count():
    assert param_count(create_model("preactresnet18", 10)) == 11_171_146


def test_preact_resnet18_layout():
    v = jax.eval_shape(lambda: create_model("preactresnet18", 10).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    p = v["params"]
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 64) and "bias" not in p["conv1"]
    assert "shortcut" not in p["layer1_0"] and "shortcut" not in p["layer2_1"]
    assert p["layer2_0"]["shortcut"]["kernel"].shape == (1, 1, 64, 128)
    assert p["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert p["linear"]["kernel"].shape == (512, 10)
    assert "bn" not in " ".join(k for k in p if not k.startswith("layer"))  # no final BN


def test_width_option_shrinks_the_model():
    small = param_count(create_model("preactresnet18", 10, width=16))
    assert small < 11_171_146 / 10
    assert param_count(create_model("vgg19_bn", 10, width=16)) < param_count(
        create_model("vgg19_bn", 10))


@pytest.mark.parametrize("name", ["preactresnet18", "vgg19_bn", "tiny_cnn"])
def test_bf16_compute_keeps_float32_params_and_exposes_features(name):
    model = create_model(name, 7, width=8, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables["params"]))
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    inter = state["intermediates"]
    assert inter["features"][0].shape[0] == 2


def test_grey_and_odd_sized_inputs():
    model = create_model("preactresnet18", 3, width=4)
    x = jnp.ones((2, 28, 28, 1))
    assert jax.jit(lambda x: model.apply(model.init(jax.random.key(0), x), x))(x).shape == (2, 3)


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet1000", 10)


def test_preact_resnet18_smoke_train_step():
    model = create_model("preactresnet18", 10)
    tx = optax.sgd(0.01, momentum=0.9)
    state = create_train_state(model, tx, jax.random.key(0), (32, 32, 3))
    batch = {"image": jnp.asarray(np.random.default_rng(0).random((4, 32, 32, 3)), jnp.float32),
             "label": jnp.arange(4, dtype=jnp.int32)}
    new, metrics = jax.jit(lambda s, b: train_step(
        s, b, jax.random.key(0), tx=tx, loss_fn=classification_loss(model.apply)))(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1
