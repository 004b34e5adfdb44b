"""Multi-process launch: what `initialize_distributed` hands to `jax.distributed.initialize`."""

import jax
import pytest

from ftsam_jax import parallel
from tests.conftest import ENV, run_module

LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "FTSAM_JAX_DISTRIBUTED", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS",
               "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def calls(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_single_process_does_not_initialise(calls):
    assert parallel.initialize_distributed() is False and calls == []


def test_hand_made_launch_passes_count_and_id(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12345")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.initialize_distributed() is True
    assert calls == [{"coordinator_address": "127.0.0.1:12345", "num_processes": 2,
                      "process_id": 1}]
    parallel.initialize_distributed(num_processes=4, process_id=3)  # arguments win
    assert calls[-1]["num_processes"] == 4 and calls[-1]["process_id"] == 3


def test_cluster_managers_keep_auto_detection(calls, monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.initialize_distributed() is True and calls == [{}]


@pytest.mark.parametrize("env, match", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"FTSAM_JAX_DISTRIBUTED": "1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"\[0, 2\)"),
])
def test_incomplete_launch_is_refused(calls, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        parallel.initialize_distributed()
    assert calls == []


@pytest.mark.slow
def test_entry_point_reports_an_incomplete_launch_in_one_line(tmp_path):
    proc = run_module("experiments.ftsam", "--preset=smoke", f"--workdir={tmp_path / 'w'}",
                      env={**ENV, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "JAX_NUM_PROCESSES" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
