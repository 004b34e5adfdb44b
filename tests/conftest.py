"""Test set-up: 8 fake CPU devices (so data parallelism is always exercised), fast compiles."""

import atexit
import os
import shutil
import tempfile

# XLA:CPU's compile time is most of the suite's time (tiny data, many distinct programs): the
# tests compile with LLVM's cheap pipeline. They check equations, determinism, resumes and
# device-count parity, each within one setting; speed is measured by experiments.bench with
# XLA's defaults. Halves the compile time of the smoke detector's steps (measured: 102 s -> 54 s
# for the in-process detect test's programs). XLA:CPU's older loop emitters instead of its MLIR
# fusion emitters compile a third less (measured 2026-12-07: the 8-vs-1-device FGD+SAM step
# test, 3 runs each, 101-107 -> 72-74 CPU-s).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


# For a test whose time is running a compiled step many times rather than compiling it:
# `jax.jit(..., compiler_options=OPTIMIZED)` compiles that one program with XLA's defaults.
OPTIMIZED = {"xla_backend_optimization_level": 2, "xla_llvm_disable_expensive_passes": False}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test process (and of the entry points it starts) with `devices` CPUs."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test process (one per pytest-xdist worker), shared
# with the entry points it starts: a rerun, a resume or a second entry point with the same
# stages loads the programs compiled before instead of compiling them again (XLA's compile time
# is most of a smoke run on CPU). Removed when the process ends. (One cache shared by both
# workers was tried on 2026-12-07: 31-32 CPU-minutes against 27 for one earlier run with a cache
# per worker, but 33 for a later one: not resolved either way; results/ci_2026-12-07b.)
_XLA_CACHE = tempfile.mkdtemp(prefix="ftsam_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"


def pytest_collection_modifyitems(items):
    """Files with `slow` tests (end-to-end runs, most of the suite's time) run first, so that
    pytest-xdist's workers end on short unit tests instead of one waiting on the other's long
    run (a stable sort: the order within each group is unchanged)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def small_mesh():
    """Two of the 8 fake CPU devices as one data-parallel mesh: the in-process tests' mesh
    (every batch is still split over devices). A test of device-count parity takes all 8 with
    `parallel.make_mesh()`. On 2 cores an 8-device program takes longer to compile and to run
    (measured 2026-12-07, the in-process detection test: 80-81 -> 59-65 CPU-s)."""
    from ftsam_jax import parallel

    return parallel.make_mesh(jax.devices()[:2])


@pytest.fixture(scope="session")
def mesh():
    """`small_mesh()`, shared by a process's tests."""
    return small_mesh()


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir():
        pytest.skip("../shared/data/cifar10-subset is not present")
    return CIFAR_SUBSET


@pytest.fixture(scope="session")
def toy_npz(tmp_path_factory):
    """A small learnable 4-class npz data set of 16x16 colour images (320 train / 80 test)."""
    import numpy as np

    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 80, (n, 16, 16, 3))
        for c in range(4):
            x[y == c, (c // 2) * 8:(c // 2) * 8 + 8, (c % 2) * 8:(c % 2) * 8 + 8] += 150
        return x.astype(np.uint8), y

    path = tmp_path_factory.mktemp("data") / "toy.npz"
    (xtr, ytr), (xte, yte) = make(320), make(80)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


@pytest.fixture(scope="session")
def cifar_subset(cifar_dir):
    from ftsam_jax.data import load_dataset

    return load_dataset("cifar10", str(cifar_dir))


# Subprocess environment of the entry-point tests: the repo importable, 2 CPU devices (data
# parallelism still on: every batch is sharded). Device-count parity (8 devices == 1) is tested
# in process; on 2 cores shared by 2 xdist workers an entry point runs its steps faster on 2
# fake devices than on 8 (measured, a smoke FT + FT-SAM run with 20 defense epochs, two at once:
# 17.1 -> 14.7 CPU-seconds each). ENV_8: 8 devices, for the bad-input rows that name a batch
# size the 8 devices of the in-process tests cannot split.
ENV = {**os.environ, "XLA_FLAGS": xla_flags(2),
       "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
ENV_8 = {**ENV, "XLA_FLAGS": xla_flags(8)}


def run_module(module, *args, env=None, check=True):
    """Runs `python -m module --progress=false args...` from the repo root."""
    proc = subprocess.run([sys.executable, "-m", module, "--progress=false", *args], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
