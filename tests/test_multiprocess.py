"""2 processes x 2 CPU devices (gloo on 127.0.0.1) give the steps of 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags

pytestmark = pytest.mark.slow  # subprocess runs of the entry points

WORKER = ROOT / "tests" / "multiprocess_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "FTSAM_JAX_DISTRIBUTED"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_two_processes_equal_one(tmp_path):
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, str(WORKER), str(single)], env=_env(XLA_FLAGS=xla_flags(4)),
                   check=True, timeout=600, capture_output=True)
    multi = tmp_path / "multi.npz"
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), str(multi)],
        env=_env(XLA_FLAGS=xla_flags(2), JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = np.load(single), np.load(multi)
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("sam_") for k in a.files)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_pipeline_as_two_processes_writes_one_result(tmp_path, toy_npz):
    args = ["-m", "experiments.ftsam", f"--dataset=npz:{toy_npz}", "--attack=badnets",
            "--preset=smoke", "--defenses=ft", "--defense_epochs=2", "--progress=false"]
    four = dict(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, *args, f"--workdir={tmp_path / 'one'}"], cwd=ROOT,
                   env=_env(**four), check=True, timeout=600, capture_output=True)
    addr = f"127.0.0.1:{_free_port()}"
    two = dict(XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=addr,
               JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, *args, f"--workdir={tmp_path / 'two'}"],
                              cwd=ROOT, env=_env(**two, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two_res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two_res["config"]["devices"] == 4 and list(two_res["defenses"]) == ["ft"]
    for a, b in ((one["backdoored"], two_res["backdoored"]),
                 (one["defenses"]["ft"], two_res["defenses"]["ft"])):
        for key in ("clean_acc", "asr"):
            assert abs(a[key] - b[key]) <= 0.02, (key, a[key], b[key])
