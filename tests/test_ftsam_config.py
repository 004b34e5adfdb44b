"""experiments.ftsam's config tree (experiments/configs/ftsam.py): in-process runs of
`train_and_evaluate(config, workdir)` and the validation of every setting."""

import json

import pytest

from experiments import ftsam
from experiments.cli import InputError
from experiments.configs.ftsam import defense_defaults, get_config
from ftsam_jax import parallel


def smoke(toy_npz, **fields):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    for key, value in fields.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def test_entry_points_import_side_by_side():
    """Their flags are defined only when they run as the program: importing several in one
    process (as tests and notebooks do) must not clash."""
    import experiments.bench
    import experiments.detect
    import experiments.distill
    import experiments.table

    assert experiments.table.table_markdown and experiments.distill.resolve
    assert experiments.detect.resolve and experiments.bench.main and ftsam.train_and_evaluate


def test_presets_hold_every_defense_with_its_defaults():
    for preset in ("paper", "cpu", "smoke"):
        cfg = get_config(preset)
        assert cfg.defense.to_dict() == defense_defaults(preset)
    assert get_config("cpu").lr == 0.05 and get_config("paper").width == 64
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("tiny")


def test_train_and_evaluate_in_process_writes_the_resolved_tree(toy_npz, tmp_path):
    cfg = smoke(toy_npz, defenses="ftsam", defense__ftsam__epochs=1, defense__ftsam__rho=4.0)
    results = ftsam.train_and_evaluate(cfg, tmp_path, mesh=parallel.make_mesh())
    assert set(results["defenses"]) == {"ftsam"}
    assert results["defenses"]["ftsam"]["config"]["rho"] == 4.0
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["run"]["preset"] == "smoke" and stored["run"]["epochs"] == 2
    assert stored["config"]["defense"]["ftsam"]["rho"] == 4.0
    assert stored["config"]["defense"]["ftsam"]["epochs"] == 1
    assert cfg.defense.ftsam.rho == 4.0  # the caller's tree is not modified
    # The same tree again: everything finished, the same numbers.
    again = ftsam.train_and_evaluate(cfg, tmp_path, mesh=parallel.make_mesh())
    assert again["defenses"]["ftsam"]["asr"] == results["defenses"]["ftsam"]["asr"]
    # Another backdoored-model setting on this workdir is refused.
    with pytest.raises(InputError, match="lr: 0.05 -> 0.1"):
        ftsam.train_and_evaluate(smoke(toy_npz, lr=0.1), tmp_path, mesh=parallel.make_mesh())


@pytest.mark.parametrize("fields,message", [
    (dict(defenses="ft", defense__nad__epochs=3), "defense.nad is changed but nad is not in"),
    (dict(defenses="ft", defense__ft__sam=True), "ft.sam cannot be changed"),
    (dict(defenses="ikd", defense__ikd__teacher__sam=False), "ikd.teacher_sam"),
    (dict(defenses="ikd", defense__ikd__betas=("a",)), "'betas' must be a tuple of float"),
    (dict(defenses="nad", defense__nad__epochs="ten"), "'epochs' must be int"),
    (dict(defenses="ft,ft"), "lists a defense twice"),
    (dict(defenses="ftsam", defense__ftsam__recipe="magic"), "recipe must be one of"),
    (dict(defenses="ft,magic"), "unknown defenses ['magic']"),
    (dict(attack="nope"), "unknown attack 'nope'"),
    (dict(dtype="float16"), "float32 or bfloat16"),
    (dict(eval_every=0), "--eval_every must be >= 1"),
    (dict(batch_size=12), "not divisible by the number of devices (8)"),
    (dict(poison_ratio=1.5), "--poison_ratio must lie in (0, 1]"),
])
def test_bad_settings_are_refused_before_anything_is_written(toy_npz, tmp_path, fields,
                                                             message):
    cfg = smoke(toy_npz)
    for key, value in fields.items():  # unlocked tree: wrong types reach the validation
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        if isinstance(value, str) and not isinstance(node[last], str):
            node.unlock()
            with node.ignore_type():
                node[last] = value
        else:
            node[last] = value
    with pytest.raises(InputError) as err:
        ftsam.train_and_evaluate(cfg, tmp_path / "w", mesh=parallel.make_mesh())
    assert message in str(err.value)
    assert not (tmp_path / "w").exists()


def test_set_items_are_applied_to_the_tree(toy_npz):
    cfg = smoke(toy_npz, defenses="ikd")
    settings = ftsam.resolve_settings(cfg, 8, ["ikd.alpha_adv=0", "ikd.teacher.rho=3"])
    ikd = settings.defense_configs["ikd"]
    assert ikd.alpha_adv == 0.0 and ikd.teacher.rho == 3.0
    assert cfg.defense.ikd.teacher.rho == 3.0  # written back: the tree says what runs
