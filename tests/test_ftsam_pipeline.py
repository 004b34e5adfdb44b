"""experiments.ftsam end to end: results files, exact resume after an interrupt, bad input."""

import json
import shutil

import pytest

from tests.conftest import ENV, run_module

pytestmark = pytest.mark.slow  # subprocess runs of the entry points


def run_ftsam(*args, env=None, check=True):
    return run_module("experiments.ftsam", *args, env=env, check=check)


@pytest.fixture
def npz_data(toy_npz):
    return toy_npz


def strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: strip_seconds(v) for k, v in obj.items() if k not in ("seconds",)}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_writes_results_and_resumes_exactly(npz_data, tmp_path):
    args = [f"--dataset=npz:{npz_data}", "--attack=badnets", "--preset=smoke",
            "--defenses=ft,ftsam", "--defense_epochs=2"]
    full = tmp_path / "full"
    out = run_ftsam(*args, f"--workdir={full}")
    results = json.loads((full / "results.json").read_text())
    assert results["dataset"] == f"npz:{npz_data}" and results["attack"] == "badnets"
    assert results["model"] == "tiny_cnn" and results["config"]["poison_ratio"] == 0.1
    for row in [results["backdoored"], *results["defenses"].values()]:
        for key in ("clean_acc", "asr", "robust_acc"):
            assert 0.0 <= row[key] <= 1.0
    assert set(results["defenses"]) == {"ft", "ftsam"}
    for r in results["defenses"].values():
        assert 0.0 <= r["der"] <= 1.0 and r["seconds"] >= 0
    assert results["defenses"]["ftsam"]["benign_examples"] == 16  # 4 per class, balanced
    table = (full / "results.md").read_text()
    assert "| No defense |" in table and "| ftsam |" in table
    assert "| ftsam |" in out.stdout  # the summary table on the terminal
    stages = [r["stage"] for r in read_jsonl(full / "metrics.jsonl")]
    assert stages == ["backdoored"] * 2 + ["ft"] * 2 + ["ftsam"] * 2
    for stage in ("backdoored", "ft", "ftsam"):  # TensorBoard event files, one run per stage
        assert list((full / "tensorboard" / stage).glob("events.out.tfevents.*"))

    # Interrupted after 3 epochs (inside the ft stage), then resumed: the same numbers.
    part = tmp_path / "part"
    proc = run_ftsam(*args, f"--workdir={part}", check=False,
                     env={**ENV, "FTSAM_JAX_INTERRUPT_AFTER": "3"})
    assert proc.returncode == 130 and "rerun the same command" in proc.stderr
    partial = json.loads((part / "results.json").read_text())
    assert partial["defenses"] == {}  # nothing half-finished is reported
    run_ftsam(*args, f"--workdir={part}")
    resumed = json.loads((part / "results.json").read_text())
    assert strip_seconds(resumed["backdoored"]) == strip_seconds(results["backdoored"])
    assert strip_seconds(resumed["defenses"]) == strip_seconds(results["defenses"])
    assert strip_seconds(read_jsonl(part / "metrics.jsonl")) == strip_seconds(
        read_jsonl(full / "metrics.jsonl"))

    # A finished defense is not re-run; a defense's numbers do not depend on the others.
    run_ftsam(*args[:-2], "--defenses=ftsam,ft", "--defense_epochs=2", f"--workdir={part}")
    again = json.loads((part / "results.json").read_text())
    assert again["defenses"]["ft"]["seconds"] == resumed["defenses"]["ft"]["seconds"]
    alone = tmp_path / "alone"
    run_ftsam(*args[:-2], "--defenses=ftsam", "--defense_epochs=2", f"--workdir={alone}")
    only = json.loads((alone / "results.json").read_text())
    assert strip_seconds(only["defenses"]["ftsam"]) == strip_seconds(results["defenses"]["ftsam"])

    # --defense_seed repeats defenses on the same backdoored model with a new stream; a workdir
    # that ran another defense seed refuses it.
    reseed = [*args[:-2], "--defenses=ftsam", "--defense_epochs=2", "--defense_seed=5"]
    proc = run_ftsam(*reseed, f"--workdir={alone}", check=False)
    assert proc.returncode == 2 and "defense_seed: 0 -> 5" in proc.stderr
    other_dir = tmp_path / "reseeded"
    shutil.copytree(alone / "checkpoints" / "backdoored", other_dir / "checkpoints" / "backdoored")
    shutil.copy(alone / "config.json", other_dir / "config.json")
    run_ftsam(*reseed, f"--workdir={other_dir}")
    other = json.loads((other_dir / "results.json").read_text())
    assert strip_seconds(other["backdoored"]) == strip_seconds(only["backdoored"])
    assert other["defenses"]["ftsam"]["config"]["defense_seed"] == 5
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if r["stage"] == "ftsam"]
              for d in (alone, other_dir)]
    assert len(losses[1]) == 2 and losses[0] != losses[1]

    # A workdir with the backdoored row and the model's final variables but no checkpoint (what
    # a table commits) goes on without training the backdoored model again.
    committed = tmp_path / "committed"
    shutil.copytree(alone / "models" / "backdoored", committed / "models" / "backdoored")
    shutil.copy(alone / "config.json", committed / "config.json")
    (committed / "results.json").write_text(json.dumps({**only, "defenses": {}}))
    run_ftsam(*args[:-2], "--defenses=ftsam", "--defense_epochs=2", f"--workdir={committed}")
    went_on = json.loads((committed / "results.json").read_text())
    assert strip_seconds(went_on["defenses"]) == strip_seconds(only["defenses"])
    assert {r["stage"] for r in read_jsonl(committed / "metrics.jsonl")} == {"ftsam"}


def test_cifar_slice_backdoored_stage(cifar_dir, tmp_path):
    run_ftsam(f"--data_dir={cifar_dir}", "--dataset=cifar10", "--attack=sig", "--preset=smoke",
              "--epochs=1", f"--workdir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["num_train"] == 5170 and results["config"]["num_test"] == 1017
    # SIG is clean-label: every poisoned training image comes from the target class.
    assert 0 < results["config"]["num_poisoned"] <= 521
    assert results["defenses"] == {}


# The bad-input rows of this entry point are in tests/test_bad_input.py (one process).


def test_malformed_cifar_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"garbage")
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(b"garbage")
    proc = run_ftsam("--dataset=cifar10", f"--data_dir={tmp_path}", "--preset=smoke",
                     f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "not a CIFAR python batch file" in proc.stderr
    assert not (tmp_path / "w").exists()
