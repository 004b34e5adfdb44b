"""experiments.detect end to end on the smoke preset (real scenes), resume, bad input."""

import json

import pytest

from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.slow  # subprocess runs of the entry points

DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA / "fashion-mnist").is_dir() or not (DATA / "cifar10-subset").is_dir():
        pytest.skip("../shared/data is not present")
    return DATA


def test_smoke_run_results_and_rerun(data_dir, tmp_path):
    args = [f"--data_dir={data_dir}", "--preset=smoke", "--methods=student,fgd_ikd",
            "--seeds=0", f"--workdir={tmp_path / 'w'}"]
    out = run_module("experiments.detect", *args).stdout
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    keys = {"ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100"}
    assert keys <= set(res["teacher"]) and "ap_adv" in res["teacher"]
    assert set(res["students"]) == {"student", "fgd_ikd"}
    for r in res["students"].values():
        assert keys <= set(r) and set(r["std"]) == keys and len(r["per_seed"]) == 1
        assert all(-1 <= r[k] <= 1 for k in keys)
    assert res["students"]["fgd_ikd"]["config"]["alpha_adv"] > 0
    assert "| fgd_ikd |" in out and (tmp_path / "w" / "detections.png").stat().st_size > 0
    assert (tmp_path / "w" / "data" / "adversarial.npy").is_file()
    stages = {json.loads(line)["stage"] for line in
              (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher", "student_student_s0", "student_fgd_ikd_s0"}
    # Rerun: every stage is finished; the same numbers, nothing trained again.
    run_module("experiments.detect", *args)
    again = json.loads((tmp_path / "w" / "results.json").read_text())
    assert again["students"] == res["students"] and again["teacher"] == res["teacher"]


@pytest.mark.parametrize("flag, message", [
    ("--methods=student,magic", "--methods must list"),
    ("--seeds=0,0", "distinct"),
    ("--dataset=coco:/nowhere", "not supported"),
    ("--batch_size=12", "not divisible"),
    ("--batch_size=1024", "larger than the training set"),
])
def test_bad_input_is_one_line(tmp_path, flag, message):
    proc = run_module("experiments.detect", "--preset=smoke", flag,
                      f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_missing_data_folder_is_one_line(tmp_path):
    proc = run_module("experiments.detect", "--preset=smoke", f"--data_dir={tmp_path / 'no'}",
                      f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "results.json").exists()
