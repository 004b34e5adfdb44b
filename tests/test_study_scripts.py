"""The long-run study scripts (experiments/studies): `--help` prints the header and starts
nothing; a mistyped option is one `error:` line, exit 2, and starts nothing either."""

import subprocess

import pytest

from tests.conftest import ROOT

STUDIES = ROOT / "experiments" / "studies"
SCRIPTS = {"queue_cpu.sh": "--sync", "fmnist_cpu.sh": "--sync --knobs",
           "table_cpu_extend.sh": "--sync", "detect_mgd_cpu.sh": "--sync",
           "start_queue.sh": ""}


def _bash(script, *args, cwd):
    # RUNS / PYTHON point at the scratch folder and a command that fails: anything started by
    # mistake shows up as a file there or as a failing exit code
    env = {"PATH": "/usr/bin:/bin", "RUNS": str(cwd / "runs"), "PYTHON": "false"}
    return subprocess.run(["bash", str(STUDIES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_prints_the_header_and_starts_nothing(script, tmp_path):
    for flag in ("--help", "-h"):
        proc = _bash(script, *SCRIPTS[script].split()[:1], flag, cwd=tmp_path)
        assert proc.returncode == 0 and proc.stderr == ""
        first = (STUDIES / script).read_text().splitlines()[1].lstrip("# ")
        assert proc.stdout.splitlines()[0] == first
        assert "#" not in proc.stdout.splitlines()[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_unknown_option_is_one_line_exit_2(script, tmp_path):
    proc = _bash(script, "--snyc", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {script} has no option --snyc")
    assert SCRIPTS[script] in lines[0]
    assert list(tmp_path.iterdir()) == []
