"""experiments.distill end to end on a small npz: results contract, resume, bad input."""

import json

import numpy as np
import pytest

from tests.conftest import ENV, run_module

pytestmark = pytest.mark.slow  # subprocess runs of the entry points


def run_distill(*args, env=None, check=True):
    chosen = any(a.startswith(("--config=", "--preset=")) for a in args)
    return run_module("experiments.distill", *([] if chosen else ["--preset=smoke"]), *args,
                      env=env, check=check)


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    rng = np.random.default_rng(1)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 80, (n, 16, 16, 3))
        for c in range(4):
            x[y == c, :, :, c % 3] += 120 + 20 * c
        return x.astype(np.uint8), y

    path = tmp_path_factory.mktemp("distill") / "toy.npz"
    (xtr, ytr), (xte, yte) = make(256), make(64)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if "seconds" not in k}
    return obj


def test_distill_results_and_exact_resume(npz_data, tmp_path):
    args = [f"--dataset=npz:{npz_data}", "--methods=ce,kd_afa", "--seeds=0,1"]
    run_distill(*args, f"--workdir={tmp_path / 'a'}")
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert 0 <= res["teacher"]["clean_acc"] <= 1
    assert set(res["students"]) == {"ce", "kd_afa"}
    for r in res["students"].values():
        assert 0 <= r["clean_acc"] <= 1 and r["seconds"] >= 0 and len(r["per_seed"]) == 2
        assert r["clean_acc"] == pytest.approx(np.mean(list(r["per_seed"].values())))
    assert res["config"]["afa_layers"] == ["stage2"]
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| teacher |" in table and "| kd_afa |" in table and " ± " in table
    afa = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
           .splitlines() if line.startswith('{"stage": "student_kd_afa_s0"')]
    assert afa[0]["ikd"] == 1.0 and afa[0]["afa"] > 0  # IKD phase, then plain KD
    assert afa[-1]["ikd"] == 0.0 and afa[-1]["afa"] == 0.0

    proc = run_distill(*args, f"--workdir={tmp_path / 'b'}", check=False,
                       env={**ENV, "FTSAM_JAX_INTERRUPT_AFTER": "5"})
    assert proc.returncode == 130
    run_distill(*args, f"--workdir={tmp_path / 'b'}")
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert strip(again["students"]) == strip(res["students"])
    assert strip(again["teacher"]) == strip(res["teacher"])


# The bad-input rows of this entry point are in tests/test_bad_input.py (one process).
