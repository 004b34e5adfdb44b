"""A defense's stored settings record guards its resume: records written by earlier versions
(the committed `results/table_cpu` cells) still match the settings they ran with."""

import json

import pytest

from experiments import ftsam
from ftsam_jax.defenses import DEFENSES, ftsam_config
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
                                                       stored["defense_seed"])))
    completed = ftsam.with_defaults(stored, ftsam.ADDED_DEFENSE_FIELDS.get(name, {}))
    assert completed == today, where


def test_with_defaults_fills_nested_records_and_keeps_what_is_there():
    old = {"epochs": 3, "teacher": {"rho": 4.0}}
    out = ftsam.with_defaults(old, {"epochs": 9, "sam": False,
                                    "teacher": {"augment": True, "rho": 2.0}})
    assert out == {"epochs": 3, "sam": False, "teacher": {"rho": 4.0, "augment": True}}
    # A changed setting still differs after completion (the guard refuses it).
    changed = dict(ftsam.defense_record(ftsam_config("cpu"), 0.05, 0), rho=3.0)
    record = ftsam.defense_record(ftsam_config("cpu"), 0.05, 0)
    assert ftsam.with_defaults(changed, ftsam.ADDED_DEFENSE_FIELDS["ftsam"]) != record
