"""A defense's stored settings record guards its resume: records written by earlier versions
(the committed `results/table_cpu` cells) still match the settings they ran with, once
completed by the defense's own rule (`DefenseSpec.added_fields`)."""

import json

import pytest

from experiments import ftsam
from experiments.variants import DefenseColumn
from ftsam_jax.defenses import DEFENSES, ftsam_config
from ftsam_jax.defenses.base import with_defaults
from tests.conftest import ROOT

TABLE = ROOT / "results" / "table_cpu"


def _stored_records():
    for path in sorted(TABLE.glob("*/ds*/results.json")):
        for name, row in json.loads(path.read_text())["defenses"].items():
            yield f"{path.parent.parent.name}/{path.parent.name}/{name}", name, row["config"]


@pytest.mark.parametrize("where,name,stored", list(_stored_records()))
def test_committed_records_match_todays_settings(where, name, stored):
    cfg = DEFENSES[name].default_config("cpu")
    today = json.loads(json.dumps(ftsam.defense_record(cfg, stored["benign_ratio"],
                                                       stored["defense_seed"], "reference")))
    assert ftsam.completed_record(name, stored, stored["defense_seed"]) == today, where


@pytest.mark.parametrize("where,name,stored", list(_stored_records())[:3])
def test_committed_records_pass_the_resume_guard(where, name, stored, tmp_path):
    cfg = DEFENSES[name].default_config("cpu")
    record = json.loads(json.dumps(ftsam.defense_record(cfg, stored["benign_ratio"],
                                                        stored["defense_seed"], "reference")))
    results = {"defenses": {name: {"config": stored}}}
    ftsam.check_defense_record(tmp_path, results, DefenseColumn(name, name), record,
                               stored["defense_seed"])
    shared = dict(record, benign_selection="shared")  # a shared subset is other images
    with pytest.raises(ftsam.InputError, match="benign_selection: 'reference' -> 'shared'"):
        ftsam.check_defense_record(tmp_path, results, DefenseColumn(name, name), shared,
                                   stored["defense_seed"])


def test_with_defaults_fills_nested_records_and_keeps_what_is_there():
    old = {"epochs": 3, "teacher": {"rho": 4.0}}
    out = with_defaults(old, {"epochs": 9, "sam": False,
                              "teacher": {"augment": True, "rho": 2.0}})
    assert out == {"epochs": 3, "sam": False, "teacher": {"rho": 4.0, "augment": True}}
    # A changed setting still differs after completion (the guard refuses it).
    changed = dict(ftsam.defense_record(ftsam_config("cpu"), 0.05, 0, "reference"), rho=3.0)
    record = ftsam.defense_record(ftsam_config("cpu"), 0.05, 0, "reference")
    assert DEFENSES["ftsam"].complete_record(changed) != record
    with pytest.raises(ftsam.InputError, match=r"rho: 3.0 -> 2.0"):
        ftsam.check_defense_record(ROOT, {"defenses": {"ftsam": {"config": changed}}},
                                   DefenseColumn("ftsam", "ftsam"), record, 0)
