"""Defense variants as columns (`ftsam[rho=0]`), the shared benign subset, and the SAM-off
control: parsing, settings, files and pairing of an in-process experiments.ftsam run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import ftsam
from experiments.cli import InputError, comma_list
from experiments.configs.ftsam import get_config
from experiments.variants import parse_column, parse_columns
from ftsam_jax import sam_gradient
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses.base import benign_fingerprint
from ftsam_jax.defenses.finetune import FineTuneConfig
from ftsam_jax.models import create_model
from ftsam_jax.training.recipe import fit
from ftsam_jax.training.stage import StageContext
from tests.conftest import small_mesh


def test_commas_inside_brackets_belong_to_their_column():
    assert comma_list("ft, ftsam[rho=0,adaptive=false] ,clp") == [
        "ft", "ftsam[rho=0,adaptive=false]", "clp"]
    column = parse_column("ftsam[rho=0.5, adaptive=false]", DEFENSES)
    assert (column.base, column.overrides) == ("ftsam", (("rho", "0.5"), ("adaptive", "false")))
    assert column.folder == "ftsam_rho=0.5_adaptive=false" and column.is_variant
    assert parse_column("ikd[teacher.rho=4]", DEFENSES).folder == "ikd_teacher.rho=4"
    assert parse_column("ft", DEFENSES).folder == "ft"


@pytest.mark.parametrize("text,message", [
    ("ftsam[rho]", "is not FIELD=VALUE"),
    ("ftsam[]", "is not FIELD=VALUE"),
    ("ftsam[rho=1", "expected NAME or NAME[FIELD=VALUE,...]"),
    ("ftsam[rho=1]x", "expected NAME or NAME[FIELD=VALUE,...]"),
    ("nope[rho=1]", "unknown defenses ['nope']"),
    ("ftsam[rho=1,rho=2]", "rho is set twice"),
    ("ftsam[rho=1],ftsam[rho=1]", "lists a defense twice"),
    ("ftsam[rho=(1)],ftsam[rho=1]", "would share the folder"),
])
def test_bad_column_text_is_an_input_error(text, message):
    with pytest.raises(InputError) as err:
        parse_columns(text, DEFENSES)
    assert message in str(err.value)


def smoke_tree(toy_npz, defenses, **top):
    cfg = get_config("smoke")
    cfg.dataset = f"npz:{toy_npz}"
    cfg.progress = False
    cfg.defenses = defenses
    for key, value in top.items():
        cfg[key] = value
    return cfg


def test_a_variant_is_its_defense_with_the_overrides_on_top(toy_npz):
    cfg = smoke_tree(toy_npz, "ftsam,ftsam[rho=0],ftsam[adaptive=false],ikd[teacher.rho=4]")
    cfg.defense.ftsam.epochs = 3  # the defense's section reaches its variants
    settings = ftsam.resolve_settings(cfg, 1)
    configs = settings.defense_configs
    assert settings.defenses == ("ftsam", "ftsam[rho=0]", "ftsam[adaptive=false]",
                                 "ikd[teacher.rho=4]")
    assert configs["ftsam[rho=0]"].rho == 0.0 and type(configs["ftsam[rho=0]"].rho) is float
    assert configs["ftsam[adaptive=false]"].adaptive is False
    for name in ("ftsam[rho=0]", "ftsam[adaptive=false]"):
        assert configs[name].epochs == 3 and configs[name].label_smoothing == 0.1
    assert configs["ikd[teacher.rho=4]"].teacher.rho == 4.0
    assert configs["ftsam"].rho == 2.0 and configs["ftsam"].adaptive is True


@pytest.mark.parametrize("column,message", [
    ("ft[sam=true]", "ft[sam=true]: ft.sam cannot be changed"),
    ("ftsam[nope=1]", "no setting 'nope' in ftsam"),
    ("ftsam[rho=abc]", "--defenses ftsam[rho=abc]"),
    ("ftsam[epochs=1.5]", "--defenses ftsam[epochs=1.5]"),
    ("ikd[teacher=1]", "is a group"),
    ("ftsam[rho=-1]", "rho must be >= 0"),
])
def test_bad_variants_are_refused_before_anything_runs(toy_npz, column, message):
    with pytest.raises(InputError) as err:
        ftsam.resolve_settings(smoke_tree(toy_npz, column), 1)
    assert message in str(err.value)


def test_sam_at_radius_zero_returns_the_plain_gradient():
    """What lets `fit` skip the second pass at rho = 0: the perturbation is exactly zero, so
    the gradient handed on is the one at w (here by a different function, to see it used)."""
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
    grads = {"w": jnp.array([0.2, 0.1, -0.4]), "b": jnp.array(1.0)}
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.tree.map(lambda x: 3.0 * x, p)

    for adaptive in (True, False):
        tx = sam_gradient(0.0, adaptive=adaptive)
        updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
        jax.tree.map(np.testing.assert_array_equal, seen[-1], params)
        jax.tree.map(np.testing.assert_array_equal, updates, grad_fn(params))


def test_the_sam_off_control_takes_plain_gradient_steps(toy_npz):
    """ftsam[rho=0]: FT-SAM's recipe with a zero radius gives the variables of plain steps with
    that recipe (label smoothing, cyclic schedule, batch), bit for bit."""
    data = np.load(toy_npz)
    x, y = data["x_train"][:64], data["y_train"][:64]
    model = create_model("tiny_cnn", 4, width=4)
    ctx = StageContext(mesh=small_mesh(), progress=False)
    recipe = DEFENSES["ftsam"].default_config("smoke")
    rng = jax.random.key(3)
    off, _ = fit("off", model, None, x, y, FineTuneConfig(
        **{**vars(recipe), "rho": 0.0, "epochs": 2, "batch_size": 16}), rng, ctx)
    plain, _ = fit("plain", model, None, x, y, FineTuneConfig(
        **{**vars(recipe), "sam": False, "epochs": 2, "batch_size": 16}), rng, ctx)
    sam, _ = fit("sam", model, None, x, y, FineTuneConfig(
        **{**vars(recipe), "epochs": 2, "batch_size": 16}), rng, ctx)
    jax.tree.map(np.testing.assert_array_equal, off, plain)
    leaves = zip(jax.tree.leaves(sam["params"]), jax.tree.leaves(plain["params"]), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)  # rho 2 does move elsewhere
    assert optax  # the transform under test is an optax one


def test_shared_benign_subset_pairs_every_column_and_variants_keep_their_own_files(
        toy_npz, tmp_path):
    mesh = small_mesh()
    columns = "ft,ftsam,ftsam[rho=0],nad"
    cfg = smoke_tree(toy_npz, columns, benign_selection="shared", defense_seed=1)
    for name in ("ft", "ftsam"):
        cfg.defense[name].epochs = 1
    cfg.defense.nad.epochs = cfg.defense.nad.teacher_epochs = 1
    results = ftsam.train_and_evaluate(cfg, tmp_path / "shared", mesh=mesh)
    rows = results["defenses"]
    assert list(rows) == ["ft", "ftsam", "ftsam[rho=0]", "nad"]
    prints = {name: rows[name]["benign"] for name in rows}
    assert len({(p["sha256"], p["count"]) for p in prints.values()}) == 1
    assert all(p["selection"] == "shared" for p in prints.values())
    assert rows["ft"]["config"]["benign_selection"] == "shared"
    assert rows["ftsam[rho=0]"]["config"]["rho"] == 0.0
    # The fingerprint is the SHA-256 of the sorted int64 indices: checkable from outside.
    idx = ftsam.benign_indices(np.load(toy_npz)["y_train"], ftsam.resolve_settings(cfg, 1),
                               False, jax.random.key(0), 1, cfg.seed)
    assert benign_fingerprint(idx) == {k: v for k, v in prints["ft"].items()
                                       if k != "selection"}
    assert len(idx) == rows["ft"]["benign_examples"]
    assert np.bincount(np.load(toy_npz)["y_train"][idx]).tolist() == [len(idx) // 4] * 4
    work = tmp_path / "shared"
    assert (work / "models" / "ftsam_rho=0").is_dir() and (work / "models" / "ftsam").is_dir()
    assert (work / "checkpoints" / "ftsam_rho=0" / "ftsam").is_dir()
    assert (work / "checkpoints" / "ftsam_rho=0.settings.json").is_file()
    stages = {json.loads(line)["stage"] for line in
              (work / "metrics.jsonl").read_text().splitlines() if line.strip()}
    assert {"ftsam", "ftsam_rho=0/ftsam", "ft"} <= stages
    # Resume: nothing runs again; another selection on this workdir is refused.
    again = ftsam.train_and_evaluate(cfg, work, mesh=mesh)
    assert again["defenses"] == rows
    cfg.benign_selection = "reference"
    with pytest.raises(InputError, match="benign_selection: 'shared' -> 'reference'"):
        ftsam.train_and_evaluate(cfg, work, mesh=mesh)
    # reference: FT draws uniformly and FT-SAM class-balanced, each from its own stream.
    ref_cfg = smoke_tree(toy_npz, "ft,ftsam", defense_seed=1)
    ref_cfg.defense.ft.epochs = ref_cfg.defense.ftsam.epochs = 1
    ref = ftsam.train_and_evaluate(ref_cfg, tmp_path / "ref", mesh=mesh)
    assert ref["defenses"]["ft"]["benign"]["sha256"] != ref["defenses"]["ftsam"]["benign"][
        "sha256"]
    assert {r["benign"]["selection"] for r in ref["defenses"].values()} == {"reference"}
