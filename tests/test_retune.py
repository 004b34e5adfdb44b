"""The Retuning Attack (ftsam_jax/retune.py, --retune_attack): its data, its record on every
model of a run, the clean model, pairing, determinism and resume."""

import json

import jax
import numpy as np
import pytest

from experiments import ftsam
from experiments.cli import InputError
from ftsam_jax.attacks import build_backdoor_data, create_attack
from ftsam_jax.data import load_dataset
from ftsam_jax.retune import RetuneConfig, retune_data
from tests.conftest import small_mesh


def smoke_tree(npz, defenses):
    cfg = ftsam.get_config("smoke")
    cfg.dataset, cfg.defenses, cfg.progress = f"npz:{npz}", defenses, False
    cfg.retune_attack = True
    cfg.retune.benign_ratio = 0.1  # 32 of the toy set's 320 images
    cfg.defense.ft.epochs = 1
    return cfg


def test_the_retune_set_holds_the_attacks_poisoned_samples(toy_npz):
    ds = load_dataset(f"npz:{toy_npz}")
    attack = create_attack("badnets", num_classes=4, image_shape=ds.image_shape, target=1)
    bd = build_backdoor_data(ds, attack, 0.1, seed=0)
    config = RetuneConfig(benign_ratio=0.1, poison_num=5)
    data = retune_data(ds.x_train, ds.y_train, bd, config, jax.random.key(3))
    assert len(data.y) == 32 and data.record()["poison_num"] == 5
    assert data.record()["benign_count"] == 27 and len(set(data.benign_indices)) == 27
    assert set(data.poison_indices) <= set(np.flatnonzero(bd.poison_mask))
    np.testing.assert_array_equal(data.x[:5], bd.x_train[data.poison_indices])
    assert np.all(data.y[:5] == 1)  # the attacker's label
    np.testing.assert_array_equal(data.y[5:], ds.y_train[data.benign_indices])
    again = retune_data(ds.x_train, ds.y_train, bd, config, jax.random.key(3))
    np.testing.assert_array_equal(again.x, data.x)  # the frozen augmentation is seeded
    plain = retune_data(ds.x_train, ds.y_train, bd, RetuneConfig(benign_ratio=0.1, augment=False),
                        jax.random.key(3))
    np.testing.assert_array_equal(plain.x[5:], ds.x_train[data.benign_indices])
    assert not np.array_equal(plain.x[5:], data.x[5:])  # crop + flip changed some images
    wanet = create_attack("wanet", num_classes=4, image_shape=ds.image_shape, target=1)
    with pytest.raises(ValueError, match="on the fly"):
        retune_data(ds.x_train, ds.y_train, build_backdoor_data(ds, wanet, 0.1, seed=0),
                    config, jax.random.key(3))


def test_every_model_of_a_run_is_retuned_paired_and_resumes_exactly(toy_npz, tmp_path):
    mesh = small_mesh()
    cfg = smoke_tree(toy_npz, "ft,ftsam[rho=0]")
    cfg.defense.ftsam.epochs = 1
    results = ftsam.train_and_evaluate(cfg, tmp_path / "a", mesh=mesh)
    rows = {"backdoored": results["backdoored"], "clean": results["clean"],
            **results["defenses"]}
    for name, row in rows.items():
        ra = row["retune"]
        assert {"asr", "clean_acc", "robust_acc", "poison_num", "benign_count"} <= set(ra), name
        assert ra["poison_num"] == 5 and ra["benign_count"] == 27 and 0 <= ra["asr"] <= 1
    # Paired: every model is retuned on the same images.
    assert len({(r["retune"]["benign_sha256"], r["retune"]["poison_sha256"])
                for r in rows.values()}) == 1
    work = tmp_path / "a"
    assert (work / "models" / "clean").is_dir() and (work / "models" / "clean.json").is_file()
    assert "| Clean model |" in (work / "results.md").read_text()
    assert "RA ASR" in (work / "results.md").read_text()
    # A lost record (interrupted before it was written) is recomputed to the same numbers.
    saved = json.loads((work / "results.json").read_text())
    del saved["defenses"]["ft"]["retune"]
    (work / "results.json").write_text(json.dumps(saved))
    again = ftsam.train_and_evaluate(cfg, work, mesh=mesh)
    assert again["defenses"]["ft"]["retune"] == results["defenses"]["ft"]["retune"]
    # Another workdir, the same settings: the same numbers (determinism).
    fresh = ftsam.train_and_evaluate(cfg, tmp_path / "b", mesh=mesh)
    assert fresh["clean"]["retune"] == results["clean"]["retune"]
    # Other retune settings on this workdir are refused.
    cfg.retune.epochs = 2
    with pytest.raises(InputError, match="Retuning Attack .* other settings"):
        ftsam.train_and_evaluate(cfg, work, mesh=mesh)


def test_bad_retune_settings_are_input_errors(toy_npz, tmp_path):
    cfg = smoke_tree(toy_npz, "ft")
    cfg.retune.poison_num = -1
    with pytest.raises(InputError, match="config retune"):
        ftsam.train_and_evaluate(cfg, tmp_path / "w", mesh=small_mesh())
    assert not (tmp_path / "w").exists()
    cfg.retune.poison_num = 5
    for attack in ("wanet", "input_aware"):  # no fixed poisoned training set (poisoned_set)
        cfg.attack = attack
        with pytest.raises(InputError,
                           match=f"--retune_attack: .*{attack} poisons each batch on the fly"):
            ftsam.train_and_evaluate(cfg, tmp_path / attack, mesh=small_mesh())
        assert not (tmp_path / attack).exists()  # refused before anything was trained


def test_the_retune_fit_is_the_released_scripts_plain_sgd():
    """The released `ft_poison.py`: 2% of the training set with 5 poisoned samples, SGD lr 0.01,
    momentum 0.9, no weight decay, a constant lr, batch 128, 5 epochs; the benign augmentation
    is drawn once into the set, so the fit itself does not augment."""
    config = RetuneConfig()
    assert (config.benign_ratio, config.poison_num, config.augment) == (0.02, 5, True)
    fit = config.fit_config()
    assert (fit.epochs, fit.batch_size, fit.lr, fit.momentum, fit.weight_decay) == (
        5, 128, 0.01, 0.9, 0.0)
    assert (fit.schedule, fit.augment, fit.drop_last) == ("constant", False, False)
