"""experiments.table: a small grid end to end (smoke preset), resume, bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ENV, ROOT

pytestmark = pytest.mark.slow  # subprocess runs of the entry points


def run_module(module, *args, check=True):
    """`python -m module args...` from the repo root (the table has no --progress flag)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_smoke_table_two_attacks_three_defenses(toy_npz, tmp_path):
    args = [f"--dataset=npz:{toy_npz}", "--preset=smoke", "--attacks=badnets,blended",
            "--defenses=ft,ftsam[rho=0],clp", "--defense_seeds=0,1", "--seeded_defenses=ft",
            "--differences=ft:ftsam[rho=0]", "--ftsam_flag=--defense_epochs=2",
            f"--workdir={tmp_path / 't'}"]
    out = run_module("experiments.table", *args).stdout
    assert "[10/10] blended / clp / seed 0: running" in out
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    assert table["failures"] == [] and table["benign_selection"] == "shared"
    assert table["columns"]["ftsam[rho=0]"] == {"base": "ftsam", "overrides": {"rho": "0"},
                                                "settings": {"rho": 0.0}}
    for attack in ("badnets", "blended"):
        row = table["cells"][attack]
        assert 0 <= row["No defense"]["asr"] <= 1
        assert [p["seed"] for p in row["ft"]["per_seed"]] == [0, 1]
        assert [p["seed"] for p in row["ftsam[rho=0]"]["per_seed"]] == [0]
        ft = [p["asr"] for p in row["ft"]["per_seed"]]
        assert row["ft"]["asr"]["mean"] == pytest.approx(np.mean(ft))
        assert row["ft"]["asr"]["std"] == pytest.approx(np.std(ft, ddof=1))
        # the backdoored model was trained once and shared with seed 1's folder
        r0 = json.loads((tmp_path / "t" / attack / "ds0" / "results.json").read_text())
        r1 = json.loads((tmp_path / "t" / attack / "ds1" / "results.json").read_text())
        assert r0["backdoored"]["asr"] == r1["backdoored"]["asr"]
        assert r0["defenses"]["clp"]["benign_examples"] == 0  # data-free: no image drawn
        # A new table pairs its columns: FT and the variant fine-tuned on the same images.
        prints = {d: r0["defenses"][d]["benign"] for d in ("ft", "ftsam[rho=0]")}
        assert prints["ft"] == prints["ftsam[rho=0]"] and prints["ft"]["selection"] == "shared"
        assert r0["defenses"]["ftsam[rho=0]"]["config"]["rho"] == 0.0
        assert (tmp_path / "t" / "logs" / f"{attack}_ftsam_rho=0_ds0.log").is_file()
    md = (tmp_path / "t" / "table.md").read_text()
    assert "| badnets |" in md and "| blended |" in md and "| Average |" in md
    assert "ftsam[rho=0]" in md
    assert "| badnets | ft − ftsam[rho=0] | 1 defense seed of 1 model |" in md
    assert (tmp_path / "t" / "table.png").stat().st_size > 0
    # Rerun: every cell is done, nothing runs again, same numbers.
    again = run_module("experiments.table", *args).stdout
    assert "running" not in again and again.count("done earlier") == 10
    assert json.loads((tmp_path / "t" / "table.json").read_text())["cells"] == table["cells"]
    # A new seed next to a first folder without checkpoints (a committed table's): its cell
    # reads the backdoored model and row, and trains no backdoored model again.
    shutil.rmtree(tmp_path / "t" / "badnets" / "ds0" / "checkpoints")
    kept = [a for a in args if not a.startswith(("--attacks", "--defenses", "--defense_seeds",
                                                "--differences"))]
    run_module("experiments.table", *kept, "--attacks=badnets", "--defenses=ft",
               "--defense_seeds=0,2")
    seed2 = tmp_path / "t" / "badnets" / "ds2"
    r0 = json.loads((tmp_path / "t" / "badnets" / "ds0" / "results.json").read_text())
    assert json.loads((seed2 / "results.json").read_text())["backdoored"] == r0["backdoored"]
    stages = {json.loads(line)["stage"] for line in
              (seed2 / "metrics.jsonl").read_text().splitlines() if line.strip()}
    assert stages == {"ft"}


@pytest.mark.parametrize("flag, message", [
    ("--attacks=badnets,nope", "unknown --attacks"),
    ("--defense_seeds=0,x", "must be integers"),
    ("--seeded_defenses=nad", "not in --defenses"),
    ("--ftsam_flag=--attack=sig", "does not set itself"),
])
def test_bad_input_is_one_line(tmp_path, flag, message):
    proc = run_module("experiments.table", "--preset=smoke", "--defenses=ft", flag,
                      f"--workdir={tmp_path / 't'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()


def test_bad_data_stops_at_the_first_cell(tmp_path):
    proc = run_module("experiments.table", "--dataset=npz:/nonexistent.npz", "--preset=smoke",
                      "--attacks=badnets", "--defenses=ft", f"--workdir={tmp_path / 't'}",
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t" / "table.json").exists()


def test_model_seeds_train_independent_models_and_share_the_clean_one(toy_npz, tmp_path):
    args = [f"--dataset=npz:{toy_npz}", "--preset=smoke", "--attacks=badnets,blended",
            "--defenses=ft", "--defense_seeds=0", "--model_seeds=0,1",
            "--ftsam_flag=--retune_attack",
            "--ftsam_flag=--defense_epochs=1", "--differences=ft:ft", f"--workdir={tmp_path}"]
    out = run_module("experiments.table", *args).stdout
    assert "[5/8] badnets / model 1 / backdoored / seed 0: running" in out
    res = {(a, m): json.loads((tmp_path / a / f"m{m}" / "ds0" / "results.json").read_text())
           for a in ("badnets", "blended") for m in (0, 1)}
    for m in (0, 1):
        # each model seed is its own backdoored model; its clean model is trained once (in
        # the first attack's folder) and copied to the other attack's
        assert res[("badnets", m)]["config"]["seed"] == m
        assert res[("badnets", m)]["clean"]["clean_acc"] == res[("blended", m)]["clean"][
            "clean_acc"]
        assert not (tmp_path / "blended" / f"m{m}" / "ds0" / "checkpoints" / "clean").exists()
    assert res[("badnets", 0)]["backdoored"] != res[("badnets", 1)]["backdoored"]
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["model_seeds"] == [0, 1] and table["failures"] == []
    row = table["cells"]["badnets"]
    assert len(row["No defense"]["per_model"]) == 2
    assert [(p["model_seed"], p["seed"]) for p in row["ft"]["per_seed"]] == [(0, 0), (1, 0)]
    assert all("retune" in p for p in row["ft"]["per_seed"])
    assert len(row["retune"]["clean"]) == 2
    md = (tmp_path / "table.md").read_text()
    assert "The Retuning Attack" in md and "| all | ft − ft | 4 backdoored models (4 pairs) |" in md
    again = run_module("experiments.table", *args).stdout
    assert "running" not in again and again.count("done earlier") == 8
