"""SIGTERM and SIGINT in the middle of a stage: the process stops within seconds with one line
saying where, and the same command resumes to the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ENV, ROOT, run_module

pytestmark = pytest.mark.slow  # subprocess runs of the entry points

DATA = ROOT.parent / "shared" / "data"


def strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: strip_seconds(v) for k, v in obj.items()
                if k not in ("seconds", "seconds_per_seed")}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj


def epochs_logged(workdir, stage) -> int:
    path = workdir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    return sum(1 for line in lines if line.strip() and json.loads(line)["stage"] == stage)


def interrupt_during(module, args, workdir, stage, sig, after_epochs):
    """Starts `python -m module args`, sends `sig` once `stage` has logged `after_epochs`
    epochs (so the signal lands inside the stage); returns (exit code, stderr, seconds from
    the signal to the exit)."""
    proc = subprocess.Popen([sys.executable, "-m", module, "--progress=false", *args,
                             f"--workdir={workdir}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while epochs_logged(workdir, stage) < after_epochs:
        assert proc.poll() is None, f"the run ended before {stage} epoch {after_epochs}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr, time.monotonic() - t0


def check_stopped(code, stderr, seconds, sig, stage):
    name = signal.Signals(sig).name
    assert code == 128 + sig, stderr
    assert seconds < 5, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({name}) in stage {stage} at epoch "), last
    assert "rerun the same command" in last


def run_interrupted_then_resume(module, args, workdir, stage, signals):
    """Each of `signals` in turn (the first after 1 epoch of `stage`, the next after 3 more),
    then a run to the end."""
    after = 1
    for sig in signals:
        code, err, dt = interrupt_during(module, args, workdir, stage, sig, after)
        check_stopped(code, err, dt, sig, stage)
        after = epochs_logged(workdir, stage) + 3
    run_module(module, *args, f"--workdir={workdir}")
    return json.loads((workdir / "results.json").read_text())


def test_ftsam_defense_stage_sigterm_sigint_resume(toy_npz, tmp_path):
    args = [f"--dataset=npz:{toy_npz}", "--attack=badnets", "--preset=smoke", "--defenses=ft",
            "--defense_epochs=30"]
    run_module("experiments.ftsam", *args, f"--workdir={tmp_path / 'full'}")
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed = run_interrupted_then_resume("experiments.ftsam", args, tmp_path / "part", "ft",
                                          (signal.SIGTERM, signal.SIGINT))
    assert strip_seconds(resumed["defenses"]) == strip_seconds(full["defenses"])
    assert strip_seconds(resumed["backdoored"]) == strip_seconds(full["backdoored"])


def test_detect_student_sigterm_resume(tmp_path):
    """The detector's student stage, once (both signals take the same path, tested above). The
    interrupted run starts from the full run's teacher (its final variables, scenes and teacher
    row, as a committed run would), so only the student stage runs twice more."""
    if not (DATA / "fashion-mnist").is_dir() or not (DATA / "cifar10-subset").is_dir():
        pytest.skip("../shared/data is not present")
    args = [f"--data_dir={DATA}", "--preset=smoke", "--methods=student", "--epochs=4"]
    full_dir, part = tmp_path / "full", tmp_path / "part"
    run_module("experiments.detect", *args, f"--workdir={full_dir}")
    full = json.loads((full_dir / "results.json").read_text())
    for name in ("data", "models/teacher"):
        shutil.copytree(full_dir / name, part / name)
    shutil.copy(full_dir / "config.json", part / "config.json")
    (part / "results.json").write_text(json.dumps({**full, "students": {}}))
    resumed = run_interrupted_then_resume("experiments.detect", args, part,
                                          "student_student_s0", (signal.SIGTERM,))
    assert not (part / "checkpoints" / "teacher").exists()  # the teacher was not trained again
    assert strip_seconds(resumed["students"]) == strip_seconds(full["students"])


PARENT = r'''
import subprocess, sys, time
from experiments import cli

def main(argv):
    for k in range(3):  # children one after another, as experiments.table runs its cells
        with open(sys.argv[1], "a") as fh:
            fh.write(f"start {k}\n")
        proc = cli.start_child(["sleep", "30"] if k == 0 else ["sleep", "0.5"])
        try:
            proc.wait()
        finally:
            cli.children.discard(proc)
        cli.wait_for_exit()
        with open(sys.argv[1], "a") as fh:
            fh.write(f"done {k} exit {proc.returncode}\n")

cli.guarded(main, ["parent"])
'''


def test_an_interrupted_parent_passes_the_signal_on_and_starts_no_child_after(tmp_path):
    """What experiments.table relies on: SIGTERM reaches the running child, the child's exit is
    not taken for a finished (or failed) one, no further child starts, the parent exits 143."""
    record = tmp_path / "record.txt"
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(record)], cwd=ROOT, env=ENV,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (record.is_file() and "start 0" in record.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # the child runs
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert record.read_text() == "start 0\n"  # neither "done 0" nor another child
    assert "interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
