"""experiments.bench: every row runs and reports numbers; bad rows are one-line errors."""

import json

import pytest

from tests.conftest import ENV, ROOT

pytestmark = pytest.mark.slow  # subprocess runs of the entry points


def bench(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "experiments.bench", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


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


def test_unknown_row_is_one_line():
    proc = bench("--rows=train_step,warp_drive")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "warp_drive" in proc.stderr and "Traceback" not in proc.stderr
