"""The entry points' `train_and_evaluate(config, workdir)` in process, on tiny data: what
`main` runs after parsing (flags, exit codes and interruptions are the subprocess tests')."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

DATA = ROOT.parent / "shared" / "data"


def test_distill_train_and_evaluate_in_process(toy_npz, tmp_path):
    from experiments.configs.distill import get_config
    from experiments.distill import train_and_evaluate

    tree = get_config("smoke")
    tree.dataset, tree.methods, tree.progress = f"npz:{toy_npz}", "ce,kd_afa", False
    results = train_and_evaluate(tree, tmp_path / "w")
    assert set(results["students"]) == {"ce", "kd_afa"}
    assert 0 <= results["teacher"]["clean_acc"] <= 1
    written = json.loads((tmp_path / "w" / "results.json").read_text())
    assert json.loads(json.dumps(results)) == written
    assert "| kd_afa |" in (tmp_path / "w" / "results.md").read_text()
    again = train_and_evaluate(tree, tmp_path / "w")  # resumed: nothing re-run
    assert json.loads(json.dumps(again)) == written


def test_detect_train_and_evaluate_in_process(tmp_path):
    if not (DATA / "fashion-mnist").is_dir() or not (DATA / "cifar10-subset").is_dir():
        pytest.skip("../shared/data is not present")
    from experiments.configs.detect import get_config
    from experiments.detect import train_and_evaluate

    tree = get_config("smoke")
    tree.data_dir, tree.methods, tree.seeds, tree.progress = str(DATA), "student,fgd", "0,1", False
    tree.paired_streams, tree.epochs = True, 1
    results = train_and_evaluate(tree, tmp_path / "w")
    assert set(results["students"]) == {"student", "fgd"}
    assert [p["seed"] for p in results["students"]["fgd"]["per_seed"]] == [0, 1]
    assert results["config"]["paired_streams"] is True
    md = (tmp_path / "w" / "results.md").read_text()
    assert "same init and batch order" in md and "- student: AP" in md and "95% interval" in md
    assert (tmp_path / "w" / "models" / "teacher").is_dir()
    assert (tmp_path / "w" / "models" / "student_fgd").is_dir()
