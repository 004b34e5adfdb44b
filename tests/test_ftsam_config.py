"""experiments.ftsam's config tree (experiments/configs/ftsam.py): the file's values against the
settings dataclasses, the flag aliases against their tree paths, in-process runs of
`train_and_evaluate(config, workdir)` and the validation of every setting."""

import dataclasses
import json

import pytest
from absl import flags

from experiments import ftsam
from experiments.cli import InputError
from experiments.configs.ftsam import FTSAM_RECIPES, PRESETS, get_config
from experiments.overrides import apply_set_items
from ftsam_jax import parallel
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses.finetune import RECIPES, ftsam_config
from tests.conftest import small_mesh

CONFIG = "--config=experiments/configs/ftsam.py:smoke"


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


def test_the_config_file_spells_the_dataclasses_preset_values():
    """Each default is written twice, in the settings dataclass (the schema, for library users)
    and in the config file (the settings, readable): they must not drift apart."""
    for preset in PRESETS:
        cfg = get_config(preset)
        assert set(cfg.defense) == set(DEFENSES)
        for name, spec in DEFENSES.items():
            assert cfg.defense[name].to_dict() == dataclasses.asdict(
                spec.default_config(preset)), (preset, name)
            assert spec.config_from_dict(cfg.defense[name].to_dict()) == spec.default_config(
                preset)
        for recipe, fields in FTSAM_RECIPES.items():
            section = {**cfg.defense.ftsam.to_dict(), **fields}
            assert section == dataclasses.asdict(ftsam_config(preset, recipe))
    assert FTSAM_RECIPES == RECIPES == DEFENSES["ftsam"].variants
    assert get_config("cpu").lr == 0.05 and get_config("paper").width == 64
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("tiny")


def tree_from(*args):
    """The config tree of an `experiments.ftsam` command line (its own flag set)."""
    argv = ["experiments.ftsam", *args]
    fv = flags.FlagValues()
    ftsam.define_flags(fv, argv)
    fv(argv)
    return ftsam.config_tree(fv)


def config_json(*args):
    tree = tree_from(*args)
    return ftsam.config_json(tree, ftsam.resolve_settings(tree, 8))


ALL = "ft,ftsam,fp,nad,anp,ibau,clp,ikd"
# Every alias flag: (its arguments, the same as --config. paths, the same as --set items or
# None for a run-level field); the defense aliases with the defenses they act on selected.
ALIASES = {
    "dataset": ("--dataset=npz:x.npz", "--config.dataset=npz:x.npz", None),
    "data_dir": ("--data_dir=/data", "--config.data_dir=/data", None),
    "attack": ("--attack=blended", "--config.attack=blended", None),
    "poison_ratio": ("--poison_ratio=0.2", "--config.poison_ratio=0.2", None),
    "target": ("--target=3", "--config.target=3", None),
    "trigger_path": ("--trigger_path=t.npy", "--config.trigger_path=t.npy", None),
    "model": ("--model=preactresnet18", "--config.model=preactresnet18", None),
    "width": ("--width=16", "--config.width=16", None),
    "epochs": ("--epochs=3", "--config.epochs=3", None),
    "batch_size": ("--batch_size=32", "--config.batch_size=32", None),
    "lr": ("--lr=0.2", "--config.lr=0.2", None),
    "seed": ("--seed=5", "--config.seed=5", None),
    "defense_seed": ("--defense_seed=7", "--config.defense_seed=7", None),
    "benign_ratio": ("--benign_ratio=0.1", "--config.benign_ratio=0.1", None),
    "benign_selection": ("--benign_selection=shared", "--config.benign_selection=shared", None),
    "dtype": ("--dtype=bfloat16", "--config.dtype=bfloat16", None),
    "eval_every": ("--eval_every=2", "--config.eval_every=2", None),
    "checkpoint_every": ("--checkpoint_every=3", "--config.checkpoint_every=3", None),
    "analysis": ("--analysis", "--config.analysis=true", None),
    "retune_attack": ("--retune_attack", "--config.retune_attack=true", None),
    "progress": ("--noprogress", "--config.progress=false", None),
    "defenses": ("--defenses=ft,nad", "--config.defenses=ft,nad", None),
    "ftsam_recipe": ("--defenses=ftsam --ftsam_recipe=paper",
                     "--config.defenses=ftsam --config.defense.ftsam.recipe=paper "
                     "--config.defense.ftsam.label_smoothing=0 "
                     "--config.defense.ftsam.schedule=cosine_epoch",
                     "--defenses=ftsam --set=ftsam.recipe=paper --set=ftsam.label_smoothing=0 "
                     "--set=ftsam.schedule=cosine_epoch"),
    "rho": ("--defenses=ftsam --rho=4", "--config.defenses=ftsam --config.defense.ftsam.rho=4",
            "--defenses=ftsam --set=ftsam.rho=4"),
    "defense_epochs": (
        f"--defenses={ALL} --defense_epochs=3",
        f"--config.defenses={ALL} " + " ".join(
            f"--config.defense.{n}.epochs=3" for n in ("ft", "ftsam", "fp", "nad", "ikd")),
        f"--defenses={ALL} " + " ".join(
            f"--set={n}.epochs=3" for n in ("ft", "ftsam", "fp", "nad", "ikd"))),
    "defense_batch_size": (
        f"--defenses={ALL} --defense_batch_size=64",
        f"--config.defenses={ALL} " + " ".join(
            f"--config.defense.{n}.batch_size=64"
            for n in ("ft", "ftsam", "fp", "nad", "anp", "ibau", "ikd")),
        f"--defenses={ALL} " + " ".join(
            f"--set={n}.batch_size=64" for n in ("ft", "ftsam", "fp", "nad", "anp", "ibau",
                                                  "ikd"))),
}


def test_every_alias_flag_is_listed_here():
    assert set(ALIASES) == set(ftsam.FLAG_ALIASES)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_an_alias_flag_its_config_path_and_its_set_form_write_the_same_config_json(name):
    flag, path, set_form = ALIASES[name]
    by_flag = config_json("--preset=smoke", *flag.split())
    assert by_flag != config_json("--preset=smoke")  # the flag changes something
    assert config_json(CONFIG, *path.split()) == by_flag
    if set_form is not None:
        assert config_json("--preset=smoke", *set_form.split()) == by_flag


def test_flags_win_over_config_paths_and_defense_aliases_skip_defenses_that_do_not_run():
    tree = tree_from(CONFIG, "--config.lr=0.1", "--lr=0.2", "--config.defenses=ft", "--rho=4",
                     "--ftsam_recipe=paper", "--defense_epochs=5")
    assert tree.lr == 0.2 and tree.defense.ft.epochs == 5
    assert tree.defense.ftsam.to_dict() == get_config("smoke").defense.ftsam.to_dict()
    assert tree.defense.nad.epochs == get_config("smoke").defense.nad.epochs
    # --set comes after the aliases.
    tree = tree_from("--preset=smoke", "--defenses=ft", "--defense_epochs=5", "--set=ft.epochs=7")
    assert tree.defense.ft.epochs == 7


def test_train_and_evaluate_in_process_writes_the_resolved_tree(toy_npz, tmp_path):
    cfg = smoke(toy_npz, defenses="ftsam", defense__ftsam__epochs=1, defense__ftsam__rho=4.0)
    results = ftsam.train_and_evaluate(cfg, tmp_path, mesh=small_mesh())
    assert set(results["defenses"]) == {"ftsam"}
    assert results["defenses"]["ftsam"]["config"]["rho"] == 4.0
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["run"]["preset"] == "smoke" and stored["run"]["epochs"] == 2
    assert stored["config"]["defense"]["ftsam"]["rho"] == 4.0
    assert stored["config"]["defense"]["ftsam"]["epochs"] == 1
    assert cfg.defense.ftsam.rho == 4.0  # the caller's tree is not modified
    # The same tree again: everything finished, the same numbers.
    again = ftsam.train_and_evaluate(cfg, tmp_path, mesh=small_mesh())
    assert again["defenses"]["ftsam"]["asr"] == results["defenses"]["ftsam"]["asr"]
    # Another backdoored-model setting on this workdir is refused.
    with pytest.raises(InputError, match="lr: 0.05 -> 0.1"):
        ftsam.train_and_evaluate(smoke(toy_npz, lr=0.1), tmp_path, mesh=small_mesh())


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
        # all 8 devices: a batch of 12 does not split over them
        ftsam.train_and_evaluate(cfg, tmp_path / "w", mesh=parallel.make_mesh())
    assert message in str(err.value)
    assert not (tmp_path / "w").exists()


def test_the_tree_is_turned_into_settings_once_without_write_back(toy_npz):
    cfg = smoke(toy_npz, defenses="ikd,ftsam")
    apply_set_items(cfg, ["ikd.alpha_adv=0", "ikd.teacher.rho=3", "ikd.betas=1,2,3"])
    before = cfg.to_json()
    settings = ftsam.resolve_settings(cfg, 8)
    ikd = settings.defense_configs["ikd"]
    assert ikd.alpha_adv == 0.0 and ikd.teacher.rho == 3.0
    assert ikd.betas == (1.0, 2.0, 3.0) and all(type(b) is float for b in ikd.betas)
    assert settings.defense_configs["ftsam"] == DEFENSES["ftsam"].default_config("smoke")
    assert set(settings.defense_configs) == {"ikd", "ftsam"}
    assert cfg.to_json() == before  # the tree is read, never written


@pytest.mark.parametrize("fields,message", [
    (dict(defenses="ikd", defense__ikd__adv_source="sideways"), "adv_source must be one of"),
    (dict(defenses="ft", defense__ft__nope=1), "config defense.ft: no setting 'nope'"),
])
def test_settings_the_dataclass_refuses_are_input_errors(toy_npz, fields, message):
    cfg = smoke(toy_npz)
    cfg.unlock()
    for key, value in fields.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    with pytest.raises(InputError, match=message):
        ftsam.resolve_settings(cfg, 8)
