"""One run per workdir: a second run is refused in one line; a killed run leaves no stale lock."""

import signal
import subprocess
import sys

import pytest

from experiments.workdir import lock_workdir
from tests.conftest import ENV, ROOT

pytestmark = pytest.mark.slow  # subprocess runs of the entry points

HOLD = ("import sys, time; from pathlib import Path; from experiments.workdir import lock_workdir;"
        " lock_workdir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")


def test_second_run_on_a_held_workdir_is_refused(tmp_path):
    lock_workdir(tmp_path / "w")  # held by this test process from now on
    proc = subprocess.run([sys.executable, "-m", "experiments.table", "--preset=smoke",
                           "--attacks=badnets", "--defenses=ft", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "in use by another run" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "logs").exists()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "w")], cwd=ROOT,
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"),
                             str(tmp_path / "w")], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode != 0 and "in use by another run" in second.stderr
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    third = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"),
                            str(tmp_path / "w")], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.strip() == "locked", third.stderr
