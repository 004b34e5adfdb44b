"""SSBA (ftsam_jax/attacks/ssba.py): the loss and the L2 ramp against slow NumPy references
written from the equations, the encoder's shapes and range on grey 28x28 and colour 32x32
images, a tiny encoder that reads its code back with a small residual, determinism and exact
resume, the cached encoder (reused on rerun, trained again when a setting or the data
change), the refusal of an encoder whose bit accuracy is near chance, and a smoke run through
`experiments.ftsam`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ftsam as ftsam_exp
from experiments.cli import InputError
from experiments.configs.ftsam import get_config
from ftsam_jax.attacks import create_attack, ssba
from ftsam_jax.data.datasets import Dataset
from ftsam_jax.training import stage as stage_mod
from tests.attack_helpers import ctx_for
from tests.conftest import small_mesh

# A tiny encoder that learns 2 bits in ~120 steps (the published ramp, started at 0.8).
TINY = dict(bits=2, epochs=20, width=0.25, lr=1e-3, batch_size=16, l2_await=0, l2_ramp=30,
            l2_start_acc=0.8)


def tiny_dataset(n_train=96, n_test=40, shape=(16, 16, 3), seed=0):
    """Toy images (noise + a bright quadrant per class), as tests/conftest.py's toy_npz."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 80, (n, *shape))
        h, w = shape[0] // 2, shape[1] // 2
        for c in range(4):
            x[y == c, (c // 2) * h:(c // 2) * h + h, (c % 2) * w:(c % 2) * w + w] += 150
        return x.astype(np.uint8), y.astype(np.int32)

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    return Dataset("tiny", xtr, ytr, xte, yte, ("a", "b", "c", "d"))


def make(shape=(16, 16, 3), **kw):
    return create_attack("ssba", num_classes=4, image_shape=shape, **{**TINY, **kw})


@pytest.fixture(scope="module")
def trained():
    attack, ds = make(), tiny_dataset()
    attack.fit(ds=ds, ctx=ctx_for(), rng=jax.random.key(0))
    return attack, ds


def test_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    enc, img = rng.uniform(0, 1, (3, 4, 4, 2)), rng.uniform(0, 1, (3, 4, 4, 2))
    logits, code = rng.normal(0, 3, (3, 5)), rng.integers(0, 2, (3, 5)).astype(np.float64)
    loss, parts = ssba.ssba_loss(*(jnp.asarray(a, jnp.float32) for a in (enc, img, logits, code)),
                                 l2_weight=jnp.float32(2.5), bce_weight=0.7)
    mse = sum((enc.ravel() - img.ravel()) ** 2) / enc.size
    bce = 0.0
    for z, c in zip(logits.ravel(), code.ravel(), strict=True):
        p = 1.0 / (1.0 + np.exp(-z))
        bce -= c * np.log(p) + (1 - c) * np.log(1 - p)
    bce /= logits.size
    np.testing.assert_allclose(float(parts["l2"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(parts["bce"]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 2.5 * mse + 0.7 * bce, rtol=1e-5)


def test_l2_ramp_matches_the_published_schedule():
    # BackdoorBench: min(max(0, w * (s - await) / ramp), w), s = -1 before the switch-on.
    for since in (-1, 0, 500, 1000, 1001, 2500, 3999, 4000, 9000):
        want = min(max(0.0, 10.0 * (since - 1000) / 3000), 10.0)
        got = float(ssba.l2_ramp_weight(jnp.int32(since), 10.0, 1000, 3000))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_encoder_shapes_and_range(shape):
    attack = make(shape, bits=5)
    attack.set_params(attack.init_params(jax.random.key(1)))
    x = np.random.default_rng(0).integers(0, 256, (3, *shape), dtype=np.uint8)
    out, logits = attack.encode_images(x)
    assert out.dtype == np.uint8 and out.shape == x.shape and logits.shape == (3, 5)
    np.testing.assert_array_equal(attack.apply(x), out)
    enc = ssba.encode(attack.encoder, attack.params["encoder"], jnp.asarray(attack.code),
                      jnp.asarray(x, jnp.float32) / 255.0)
    assert enc.shape == x.shape and float(enc.min()) >= 0.0 and float(enc.max()) <= 1.0
    np.testing.assert_array_equal(out, np.round(255.0 * np.asarray(enc)).astype(np.uint8))
    assert attack.config()["code"] == "".join(str(int(b)) for b in attack.code)


def test_trained_encoder_reads_its_code_back_with_a_small_residual(trained):
    attack, ds = trained
    rec = attack.fit_record
    assert rec["test_bit_accuracy"] >= 0.9 and rec["train"]["l2_on"] == 1.0
    assert rec["test_psnr"] > 18.0  # the L2 ramp pulled it back (without: 5-10 dB)
    out = attack.apply(ds.x_test)
    _, logits = attack.encode_images(ds.x_test)
    assert np.mean((logits > 0) == (attack.code > 0.5)) == rec["test_bit_accuracy"]
    np.testing.assert_allclose(np.mean(ssba.psnr(ds.x_test, out)), rec["test_psnr"], rtol=1e-6)
    assert (out != ds.x_test).any()  # sample-specific: every image changes differently
    diffs = out.astype(int) - ds.x_test.astype(int)
    assert not (diffs == diffs[:1]).all()


def same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_time(record):
    return {k: v for k, v in record.items() if k != "train_seconds"}


def test_deterministic_resumed_cached_and_retrained_on_a_change(tmp_path, monkeypatch):
    ds = tiny_dataset(n_train=32, n_test=8)
    kw = dict(epochs=2, min_bit_accuracy=0.0)
    first = make(**kw)
    first.fit(ds=ds, ctx=ctx_for(tmp_path), rng=jax.random.key(0))
    assert (tmp_path / ssba.CACHE_FILE).is_file()
    # Determinism and exact resume at once: the same key in another workdir, interrupted after
    # its first epoch and rerun, gives the same encoder bit for bit.
    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "1")
    with pytest.raises(KeyboardInterrupt):
        make(**kw).fit(ds=ds, ctx=ctx_for(tmp_path / "b"), rng=jax.random.key(0))
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    assert not (tmp_path / "b" / ssba.CACHE_FILE).exists()
    resumed = make(**kw)
    resumed.fit(ds=ds, ctx=ctx_for(tmp_path / "b"), rng=jax.random.key(0))
    same_params(first, resumed)
    assert without_time(resumed.fit_record) == without_time(first.fit_record)
    calls = []

    def fake_train(self, x, ctx, rng, stage_name):
        calls.append(stage_name)
        return jax.device_get(self.init_params(rng)), []

    monkeypatch.setattr(ssba.SSBA, "train", fake_train)
    again = make(**kw)
    again.fit(ds=ds, ctx=ctx_for(tmp_path), rng=jax.random.key(0))
    with pytest.raises(ssba.EncoderRefused):  # a stricter judge of the same cached encoder
        make(**{**kw, "min_bit_accuracy": 1.0}).fit(ds=ds, ctx=ctx_for(tmp_path),
                                                    rng=jax.random.key(0))
    assert calls == []  # the cache (the refusal threshold is no part of its key): nothing trained
    same_params(first, again)
    assert again.fit_record == json.loads(json.dumps(first.fit_record))
    np.testing.assert_array_equal(again.apply(ds.x_test), first.apply(ds.x_test))
    other = make(**{**kw, "l2_weight": 5.0})  # another setting: trained again, in a new stage
    other.fit(ds=ds, ctx=ctx_for(tmp_path), rng=jax.random.key(0))
    assert len(calls) == 1 and calls[0].startswith("ssba_encoder_")
    assert other.fit_record["key"]["settings"]["l2_weight"] == 5.0
    changed = tiny_dataset(n_train=32, n_test=8)  # other data: trained again
    changed.x_train[0, 0, 0, 0] ^= 1
    make(**kw).fit(ds=changed, ctx=ctx_for(tmp_path), rng=jax.random.key(0))
    assert len(calls) == 2


def test_an_encoder_near_chance_is_refused(monkeypatch):
    ds = tiny_dataset(n_train=32, n_test=16)
    monkeypatch.setattr(ssba.SSBA, "train", lambda self, x, ctx, rng, name: (
        jax.device_get(self.init_params(rng)), []))  # an untrained encoder
    attack = make(bits=64)
    with pytest.raises(ssba.EncoderRefused, match=r"bit accuracy on the test images is 0\.\d+ "
                       r"\(chance 0\.5\), below min_bit_accuracy 0\.75"):
        attack.fit(ds=ds, ctx=ctx_for(), rng=jax.random.key(0))
    assert 0.3 < attack.fit_record["test_bit_accuracy"] < 0.7


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 0}, "bits, epochs and batch_size must be >= 1"),
    ({"bits": 2.5}, "bits must be an integer"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"l2_ramp": 0}, "l2_ramp >= 1"),
    ({"min_bit_accuracy": 1.5}, "must lie in \\[0, 1\\]"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_ssba_through_experiments_ftsam(toy_npz, tmp_path, monkeypatch):
    cfg = get_config("smoke")
    cfg.dataset, cfg.attack, cfg.progress = f"npz:{toy_npz}", "ssba", False
    cfg.epochs, cfg.ssba.epochs = 1, 1
    assert get_config("paper").ssba.bits == 100 and get_config("paper").ssba.epochs == 20
    mesh = small_mesh()
    results = ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh)
    fit_record = results["config"]["attack_fit"]
    settings = {k: v for k, v in cfg.ssba.to_dict().items() if k != "min_bit_accuracy"}
    assert fit_record["key"]["settings"] == settings
    assert {"test_bit_accuracy", "test_psnr", "train"} <= set(fit_record)
    assert fit_record["num_test_images"] == 80
    assert {"clean_acc", "asr", "robust_acc"} <= set(results["backdoored"])
    assert results["config"]["attack_config"]["name"] == "ssba"
    assert (tmp_path / ssba.CACHE_FILE).is_file()
    stored = json.loads((tmp_path / "config.json").read_text())["run"]
    assert stored["ssba"] == cfg.ssba.to_dict()
    # Rerun: the cached encoder, nothing trained again, the same results.
    monkeypatch.setattr(ssba.SSBA, "train", lambda *a, **k: pytest.fail("trained again"))
    assert ftsam_exp.train_and_evaluate(cfg, tmp_path, mesh=mesh) == results
    # A refused encoder is an InputError (one `error:` line from the CLI) in the pipeline.
    cfg.ssba.min_bit_accuracy = 0.75
    monkeypatch.setattr(ssba.SSBA, "train", lambda self, x, ctx, rng, name: (
        jax.device_get(self.init_params(rng)), []))
    monkeypatch.setattr(ssba.SSBA, "measure", lambda self, x: {"test_bit_accuracy": 0.5})
    with pytest.raises(InputError, match="ssba: the encoder's bit accuracy on the test images "
                       "is 0.500"):
        ftsam_exp.train_and_evaluate(cfg, tmp_path / "refused", mesh=mesh)
