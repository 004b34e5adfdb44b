"""Pure steps under data parallelism: 8 devices == 1 device, m-sharpness, BN handling, epochs."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax import parallel
from ftsam_jax.models import TinyCNN
from ftsam_jax.optim import sam_perturbation
from ftsam_jax.training.epoch import (
    epoch_indices,
    make_epoch_fn,
    make_evaluator,
    standard_preprocess,
)
from ftsam_jax.training.step import classification_loss, create_train_state, cross_entropy

MODEL = TinyCNN(num_classes=4, width=4)


def make_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.random((n, 8, 8, 3), np.float32)),
            "label": jnp.asarray(rng.integers(0, 4, n), jnp.int32)}


def make_state(tx):
    return create_train_state(MODEL, tx, jax.random.key(0), (8, 8, 3))


def run_step(step_fn, tx, mesh, batch, steps=2):
    state = parallel.replicate(make_state(tx), mesh)
    batch = jax.device_put(batch, parallel.data_sharding(mesh))
    fn = jax.jit(step_fn, donate_argnums=0)
    for i in range(steps):
        state, metrics = fn(state, batch, jax.random.key(i))
    return jax.device_get(state), jax.device_get(metrics)


def ftsam_tx():
    return optax.chain(ftsam_jax.sam_gradient(2.0, adaptive=True), optax.add_decayed_weights(5e-4),
                       optax.sgd(0.05, momentum=0.9))


def assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("kind", ["train", "sam", "sam_groups"])
def test_eight_devices_equal_one_device(kind):
    assert jax.device_count() == 8
    loss_fn = classification_loss(MODEL.apply, label_smoothing=0.1)
    if kind == "train":
        tx = optax.sgd(0.05, momentum=0.9)
        step = partial(ftsam_jax.train_step, tx=tx, loss_fn=loss_fn)
    else:
        tx = ftsam_tx()
        step = partial(ftsam_jax.sam_step, tx=tx, loss_fn=loss_fn,
                       group_size=4 if kind == "sam_groups" else None)
    batch = make_batch()
    s8, m8 = run_step(step, tx, parallel.make_mesh(), batch)
    s1, m1 = run_step(step, tx, parallel.make_mesh(jax.devices()[:1]), batch)
    assert_trees_close(s8.params, s1.params)
    assert_trees_close(s8.batch_stats, s1.batch_stats)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert int(s8.step) == 2


def test_sam_step_matches_reference_loop():
    """Group mode against an explicit per-group loop written from the formula."""
    tx = ftsam_tx()
    loss_fn = classification_loss(MODEL.apply)
    state = make_state(tx)
    batch = make_batch(12)
    new, _ = jax.jit(partial(ftsam_jax.sam_step, tx=tx, loss_fn=loss_fn, group_size=4))(
        state, batch, jax.random.key(0))
    # Reference: for each group g_i at w, e_i = ASAM perturbation, gradient at w + e_i; average.
    reference = jax.jit(partial(reference_group_sam, loss_fn=loss_fn))
    ref_params, ref_stats = reference(state, batch)
    assert_trees_close(new.params, ref_params, atol=1e-6)
    assert_trees_close(new.batch_stats, ref_stats, atol=1e-6)


def reference_group_sam(state, batch, loss_fn):
    sam_grads, stats = [], []
    for i in range(3):
        b = jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch)
        (_, (_, bs)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, b, None)
        e = sam_perturbation(g, state.params, 2.0, adaptive=True)
        w_adv = jax.tree.map(jnp.add, state.params, e)
        sam_grads.append(jax.grad(lambda p, b=b: loss_fn(p, state.batch_stats, b, None)[0])(w_adv))
        stats.append(bs)
    g_mean = jax.tree.map(lambda *xs: sum(xs) / 3, *sam_grads)
    rest = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    upd, _ = rest.update(g_mean, rest.init(state.params), state.params)
    return optax.apply_updates(state.params, upd), jax.tree.map(lambda *xs: sum(xs) / 3, *stats)


def test_whole_batch_group_equals_no_groups():
    tx = ftsam_tx()
    loss_fn = classification_loss(MODEL.apply)
    state, batch = make_state(tx), make_batch(8)
    a, _ = ftsam_jax.sam_step(state, batch, jax.random.key(0), tx=tx, loss_fn=loss_fn)
    b, _ = ftsam_jax.sam_step(state, batch, jax.random.key(0), tx=tx, loss_fn=loss_fn,
                              group_size=8)
    assert_trees_close(a.params, b.params, atol=0)


def test_sam_step_takes_bn_statistics_from_the_clean_pass():
    loss_fn = classification_loss(MODEL.apply)
    batch = make_batch()
    tx_sam = ftsam_tx()
    sam_state, _ = ftsam_jax.sam_step(make_state(tx_sam), batch, jax.random.key(0), tx=tx_sam,
                                      loss_fn=loss_fn)
    tx = optax.sgd(0.05)
    plain_state, _ = ftsam_jax.train_step(make_state(tx), batch, jax.random.key(0), tx=tx,
                                          loss_fn=loss_fn)
    assert_trees_close(sam_state.batch_stats, plain_state.batch_stats, atol=1e-7)
    assert not np.allclose(np.asarray(sam_state.params["linear"]["kernel"]),
                           np.asarray(plain_state.params["linear"]["kernel"]))


def test_label_smoothing_matches_reference_formula():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 1])
    s = 0.1
    target = np.full((5, 4), s / 3)
    target[np.arange(5), np.asarray(labels)] = 1 - s
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(cross_entropy(logits, labels, s), -(target * logp).sum(-1),
                               rtol=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="not divisible by the number of devices"):
        parallel.check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="not divisible"):
        make_epoch_fn(lambda s, b, r: (s, {}), mesh=mesh, num_examples=100, batch_size=12,
                      preprocess=standard_preprocess())


def test_epoch_indices_cover_every_example():
    idx = np.asarray(epoch_indices(jax.random.key(0), 10, 4, drop_last=False))
    assert idx.shape == (3, 4) and set(idx.ravel()) == set(range(10))
    assert len(set(idx.ravel()[:10])) == 10  # the first pass is a permutation
    assert np.asarray(epoch_indices(jax.random.key(0), 10, 4, drop_last=True)).shape == (2, 4)
    assert np.asarray(epoch_indices(jax.random.key(0), 3, 8, drop_last=True)).shape == (1, 8)


def test_epoch_learns_deterministically():
    """The real compiled epoch on a learnable toy problem: loss falls, same seed same result."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 256).astype(np.int32)
    images = rng.integers(0, 60, (256, 8, 8, 3)).astype(np.uint8)
    for c in range(4):  # class c: a bright channel-c-ish pattern
        images[labels == c, :, :, c % 3] += 150 if c < 3 else 0
        images[labels == c, : 4 if c == 3 else 8] += 40
    tx = optax.chain(ftsam_jax.sam_gradient(0.5, adaptive=True), optax.sgd(0.2, momentum=0.9))
    step = partial(ftsam_jax.sam_step, tx=tx, loss_fn=classification_loss(MODEL.apply))
    epoch = make_epoch_fn(step, mesh=mesh, num_examples=256, batch_size=64,
                          preprocess=standard_preprocess(augment=True), drop_last=False)
    repl = parallel.replicated(mesh)
    x, y = jax.device_put(images, repl), jax.device_put(labels, repl)

    def run():
        state = parallel.replicate(make_state(tx), mesh)
        losses = []
        for e in range(8):
            state, metrics = epoch(state, x, y, jax.random.key(e))
            losses.append(float(metrics["loss"]))
        return state, losses

    s1, l1 = run()
    s2, l2 = run()
    assert l1[-1] < 0.7 * l1[0]
    assert l1 == l2
    assert_trees_close(s1.params, s2.params, atol=0)
    evaluator = make_evaluator(MODEL.apply, mesh=mesh, batch_size=64)
    out = evaluator(s1.variables, x[:100], y[:100])
    assert out["preds"].shape == (100,)
    assert float(out["accuracy"]) > 0.6
    np.testing.assert_allclose(float(out["accuracy"]), np.mean(np.asarray(out["preds"]) ==
                                                               labels[:100]))


def test_scanned_and_looped_epochs_agree():
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 4, 40).astype(np.int32))
    tx = ftsam_tx()
    step = partial(ftsam_jax.sam_step, tx=tx, loss_fn=classification_loss(MODEL.apply))
    out = []
    for scan in (True, False):
        epoch = make_epoch_fn(step, mesh=mesh, num_examples=40, batch_size=16,
                              preprocess=standard_preprocess(), drop_last=False, scan=scan)
        state, metrics = epoch(parallel.replicate(make_state(tx), mesh), x, y, jax.random.key(3))
        out.append((jax.device_get(state), jax.device_get(metrics)))
    assert_trees_close(out[0][0].params, out[1][0].params, atol=1e-6)
    np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-6)


def test_init_variables_equals_eager_init_bit_for_bit():
    from ftsam_jax.models import create_model
    from ftsam_jax.training.step import init_variables

    model = create_model("preactresnet18", 10, width=2)
    x = jnp.zeros((1, 8, 8, 3), jnp.float32)
    eager = model.init(jax.random.key(5), x, train=False)
    jitted = init_variables(model, jax.random.key(5), (8, 8, 3), train=False)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
