"""experiments.bench: every row runs and reports numbers; bad rows are one-line errors."""

import json

import pytest

from tests.conftest import ENV, ROOT


def bench(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "experiments.bench", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # a subprocess run of the entry point
def test_rows_report_compile_and_throughput():
    proc = bench("--model=tiny_cnn", "--batch_size=8", "--steps=1", "--warmup=0", "--json",
                 "--rows=train_step,sam_step,eval_step,detect_train_step,detect_distill_step",
                 "--detect_batch_size=8", "--detect_image_size=32")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["row"]: r for r in info["rows"]}
    assert set(rows) == {"train_step", "sam_step", "eval_step", "detect_train_step",
                         "detect_distill_step"}
    for r in rows.values():
        assert r["compile_s"] > 0 and r["img_per_s"] > 0
    assert rows["detect_distill_step"]["image_size"] == 32


@pytest.mark.slow  # a subprocess run of the entry point
def test_config_file_with_overrides_and_shorthands():
    proc = bench("--config=experiments/configs/bench.py:smoke", "--config.rows=eval_step",
                 "--batch_size=16", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (info["preset"], info["model"], info["batch_size"]) == ("smoke", "tiny_cnn", 16)
    assert [r["row"] for r in info["rows"]] == ["eval_step"]


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--rows=train_step,warp_drive"], "warp_drive"),
    (["--preset=cpu", "--config=experiments/configs/bench.py:smoke"], "not both"),
    (["--config=experiments/configs/bench.py:smoke", "--config.steps=x"], "config.steps"),
])
def test_bad_input_is_one_line(args, says):
    proc = bench(*args)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:"), proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""


@pytest.mark.parametrize("field, value, says", [
    ("steps", 0, "--steps must be >= 1"),
    ("batch_size", -4, "--batch_size must be >= 1"),
    ("dtype", "float16", "float16"),
    ("model", "resnet9000", "resnet9000"),
    ("rows", "", "unknown --rows"),
])
def test_bad_config_values_are_refused(field, value, says):
    """In process: `resolve` checks every field before anything is built."""
    from experiments.bench import resolve
    from experiments.cli import InputError
    from experiments.configs.bench import get_config

    cfg = get_config("smoke")
    cfg[field] = value
    with pytest.raises(InputError, match=says):
        resolve(cfg)
