"""The entry points' `train_and_evaluate(config, workdir)` in process, on tiny data: what
`main` runs after parsing (flags, exit codes and interruptions are the subprocess tests')."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import ROOT, small_mesh

pytestmark = pytest.mark.slow  # whole runs of the entry points, in process

DATA = ROOT.parent / "shared" / "data"


def test_distill_train_and_evaluate_in_process(toy_npz, tmp_path):
    from experiments.configs.distill import get_config
    from experiments.distill import train_and_evaluate

    tree = get_config("smoke")
    tree.dataset, tree.methods, tree.progress = f"npz:{toy_npz}", "ce,kd_afa", False
    results = train_and_evaluate(tree, tmp_path / "w", mesh=small_mesh())
    assert set(results["students"]) == {"ce", "kd_afa"}
    assert 0 <= results["teacher"]["clean_acc"] <= 1
    written = json.loads((tmp_path / "w" / "results.json").read_text())
    assert json.loads(json.dumps(results)) == written
    assert "| kd_afa |" in (tmp_path / "w" / "results.md").read_text()
    again = train_and_evaluate(tree, tmp_path / "w", mesh=small_mesh())  # resumed: nothing re-run
    assert json.loads(json.dumps(again)) == written


def test_detect_train_and_evaluate_in_process(tmp_path):
    """experiments.detect in process: results, resume, and a committed run (final variables,
    no checkpoints) going on with a new method without training its teacher again."""
    if not (DATA / "fashion-mnist").is_dir() or not (DATA / "cifar10-subset").is_dir():
        pytest.skip("../shared/data is not present")
    from experiments.configs.detect import get_config
    from experiments.detect import train_and_evaluate

    tree = get_config("smoke")
    tree.data_dir, tree.methods, tree.seeds = str(DATA), "student,fgd_ikd", "0"
    tree.progress = False
    tree.paired_streams, tree.epochs = True, 1
    tree.afa_steps = 1  # one attack iteration: the same program, a fifth of its running time
    work = tmp_path / "w"
    mesh = small_mesh()
    res = json.loads(json.dumps(train_and_evaluate(tree, work, mesh=mesh)))
    keys = {"ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100"}
    assert keys <= set(res["teacher"]) and "ap_adv" in res["teacher"]
    assert set(res["students"]) == {"student", "fgd_ikd"}
    for r in res["students"].values():
        assert keys <= set(r) and len(r["per_seed"]) == 1
        assert all(-1 <= r[k] <= 1 for k in keys)
    assert res["students"]["fgd_ikd"]["config"]["alpha_adv"] > 0
    assert res["config"]["paired_streams"] is True
    assert (work / "detections.png").stat().st_size > 0
    assert (work / "data" / "adversarial_eps8_steps1.npy").is_file()
    assert (work / "models" / "teacher").is_dir()
    assert (work / "models" / "student_fgd_ikd").is_dir()
    log = (work / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["stage"] for line in log} == {
        "teacher", *(f"student_{m}_s0" for m in ("student", "fgd_ikd"))}
    # Rerun: every stage is finished; the same numbers, nothing trained again.
    again = json.loads(json.dumps(train_and_evaluate(tree, work, mesh=mesh)))
    assert again["students"] == res["students"] and again["teacher"] == res["teacher"]
    # A committed run keeps no checkpoints: the teacher's final variables (models/teacher)
    # suffice for new students (here a second seed of each method, whose programs are compiled
    # already); the teacher is not trained again, the adversarial set is rebuilt from it.
    shutil.rmtree(work / "checkpoints")
    (work / "data" / "adversarial_eps8_steps1.npy").unlink()
    tree.seeds = "0,1"
    more = json.loads(json.dumps(train_and_evaluate(tree, work, mesh=mesh)))
    assert not (work / "checkpoints" / "teacher").exists()
    assert more["teacher"] == res["teacher"] and set(more["students"]) == {"student", "fgd_ikd"}
    for method, r in more["students"].items():
        assert r["per_seed"][:1] == res["students"][method]["per_seed"]
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
        assert set(r["std"]) == keys and all(-1 <= r[k] <= 1 for k in keys)
        for k in keys:  # the mean and sample std over the two seeds
            values = [p[k] for p in r["per_seed"]]
            assert r[k] == pytest.approx(np.mean(values))
            assert r["std"][k] == pytest.approx(np.std(values, ddof=1))
    assert more["config"]["seeds"] == [0, 1]  # this run's settings
    assert (work / "data" / "adversarial_eps8_steps1.npy").is_file()
    md = (work / "results.md").read_text()
    assert "| student |" in md and "| fgd_ikd |" in md and "seeds [0, 1]" in md
