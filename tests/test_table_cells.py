"""experiments.table's pieces in process: the cells' environment, what a seed's folder gets."""

import json
import os
from pathlib import Path

from experiments.table import CACHE_ENV, _share_backdoored, cell_env


def test_table_cells_share_a_compilation_cache(tmp_path, monkeypatch):
    """experiments.table points its cells at one persistent compilation cache: WORKDIR/jax_cache
    by default, an inherited $JAX_COMPILATION_CACHE_DIR or --compilation_cache instead, none
    with 'off'."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cell_env(tmp_path, None)[CACHE_ENV] == str(tmp_path.absolute() / "jax_cache")
    assert cell_env(tmp_path, "c")[CACHE_ENV] == str(Path("c").absolute())
    monkeypatch.setenv(CACHE_ENV, "/elsewhere")
    assert cell_env(tmp_path, None)[CACHE_ENV] == "/elsewhere"
    assert CACHE_ENV not in cell_env(tmp_path, "off")
    assert cell_env(tmp_path, None)["PATH"] == os.environ["PATH"]


def test_seed_folders_get_the_backdoored_model_trigger_and_attack_checkpoints(tmp_path):
    first = tmp_path / "lf" / "ds0"
    for sub in ("models/backdoored", "models/input_aware", "models/ft",
                "checkpoints/backdoored/3", "checkpoints/lf_surrogate/60", "checkpoints/ft/100",
                "checkpoints/nad_teacher/10", "checkpoints/ftsam_rho=0/ftsam/100"):
        (first / sub).mkdir(parents=True)
    (first / "models" / "backdoored" / "variables").write_text("v")
    (first / "lf_pattern.npy").write_bytes(b"p")
    row = {"dataset": "cifar10", "attack": "lf", "model": "preactresnet18", "config": {"x": 1},
           "backdoored": {"clean_acc": 0.7, "asr": 0.9}}
    (first / "results.json").write_text(json.dumps({**row, "defenses": {"ft": {"asr": 0.5}}}))
    second = tmp_path / "lf" / "ds1"
    _share_backdoored(first, second)
    assert (second / "models" / "backdoored" / "variables").read_text() == "v"
    assert (second / "lf_pattern.npy").read_bytes() == b"p"  # LF does not train its surrogate again
    assert sorted(p.name for p in (second / "models").iterdir()) == ["backdoored", "input_aware"]
    # The attack's stages, not a defense's (another seed's NAD teacher would be restored as
    # this seed's) nor a variant's.
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["backdoored",
                                                                          "lf_surrogate"]
    # The backdoored row comes along (with the variables, experiments.ftsam trains nothing
    # again even where the first folder has no checkpoints); the defenses are the seed's own.
    assert json.loads((second / "results.json").read_text()) == {**row, "defenses": {}}
    (second / "results.json").write_text(json.dumps({**row, "defenses": {"ft": {"asr": 0.1}}}))
    _share_backdoored(first, second)  # a seed's own records are never overwritten
    assert json.loads((second / "results.json").read_text())["defenses"] == {"ft": {"asr": 0.1}}
