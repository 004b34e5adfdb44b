"""A disk that refuses a write in the middle of a run (full, read-only, failing): one `error:`
line naming what was being written, exit code 1, nothing partial left behind, and the same
command, once the disk takes writes again, resumes to the numbers of an uninterrupted run.

The `faults` fixture makes the N-th write of one kind fail at the layer every writer of the
project goes through: orbax's `CheckpointManager.save` (a stage's checkpoints),
`StandardCheckpointer.save` (models/) and the temporary file of `atomic_write` (results.json,
metrics.jsonl, table.json, the settings markers). It fails them as the system does: tensorstore's
`RESOURCE_EXHAUSTED ... [os_error_code='28']` after leaving the partial folder orbax leaves,
an OSError after writing half the file. A smoke `experiments.ftsam` run (badnets, FT, 2 + 2
epochs, tiny data) runs in process through `experiments.cli.guarded`, once per write point.
"""

from __future__ import annotations

import errno
import json
import pathlib
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import pytest

from experiments import cli
from experiments.configs.ftsam import get_config
from experiments.ftsam import train_and_evaluate
from experiments.workdir import atomic_write
from ftsam_jax.checkpoint import WriteError

TENSORSTORE_ENOSPC = ("RESOURCE_EXHAUSTED: Error writing \"params/conv/kernel\" in OCDBT database "
                      "at local file \"{where}\": Failed to write 4096 bytes to file 4: No space "
                      "left on device [os_error_code='28']")


class Faults:
    """Counts the writes of a run by kind and fails the `n`-th of one kind (`fail`)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.n = 0
        self.code = errno.ENOSPC
        self.seen: dict[str, int] = {}

    def fail(self, kind: str, n: int, code: int = errno.ENOSPC) -> None:
        self.kind, self.n, self.code, self.seen = kind, n, code, {}

    def clear(self) -> None:
        self.kind = None

    def hit(self, kind: str) -> bool:
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return kind == self.kind and self.seen[kind] == self.n


@pytest.fixture
def faults(monkeypatch):
    f = Faults()
    manager_save = ocp.CheckpointManager.save
    standard_save = ocp.StandardCheckpointer.save
    write_text = pathlib.Path.write_text

    def refuse(partial: Path) -> None:
        partial.mkdir(parents=True)  # what an uncommitted orbax save leaves
        if f.code == errno.ENOSPC:
            raise ValueError(TENSORSTORE_ENOSPC.format(where=partial))
        raise OSError(f.code, "refused", str(partial))

    def checkpoint_save(self, step, *args, **kwargs):
        if f.hit("checkpoint"):
            refuse(Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1")
        return manager_save(self, step, *args, **kwargs)

    def model_save(self, directory, *args, **kwargs):
        if f.hit("models"):
            path = Path(directory)
            refuse(path.with_name(path.name + ".orbax-checkpoint-tmp-1"))
        return standard_save(self, directory, *args, **kwargs)

    def file_write(self, data, *args, **kwargs):
        if self.name.endswith(".tmp") and f.hit(self.name[:-len(".tmp")]):
            write_text(self, data[:len(data) // 2], *args, **kwargs)  # cut short
            raise OSError(f.code, "refused", str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", checkpoint_save)
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", model_save)
    monkeypatch.setattr(pathlib.Path, "write_text", file_write)
    return f


def smoke_tree(npz: Path) -> Any:
    tree = get_config("smoke")
    tree.dataset, tree.defenses, tree.progress = f"npz:{npz}", "ft", False
    return tree


def strip_seconds(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [strip_seconds(v) for v in obj]
    return obj


def outputs(work: Path) -> dict[str, Any]:
    """What a run leaves that must not depend on interruptions: results.json and
    metrics.jsonl without timings, and the final variables of each model."""
    models = {}
    for name in ("backdoored", "ft"):
        with ocp.StandardCheckpointer() as ckptr:
            leaves = jax.tree_util.tree_leaves_with_path(ckptr.restore(work / "models" / name))
        models[name] = {jax.tree_util.keystr(k): (v.dtype.str, v.shape, v.tobytes())
                        for k, v in leaves}
    return {"results": strip_seconds(json.loads((work / "results.json").read_text())),
            "metrics": [strip_seconds(json.loads(line))
                        for line in (work / "metrics.jsonl").read_text().splitlines()],
            "models": models}


@pytest.fixture(scope="module")
def uninterrupted(toy_npz, tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("uninterrupted") / "w"
    train_and_evaluate(smoke_tree(toy_npz), work)
    return outputs(work)


def run_cli(tree: Any, work: Path, capsys) -> tuple[int, str]:
    """`train_and_evaluate` under `experiments.cli.guarded` (what `python -m experiments.ftsam`
    runs): (exit code, stderr)."""
    capsys.readouterr()
    try:
        cli.guarded(lambda argv: train_and_evaluate(tree, work), ["experiments.ftsam"])
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


# (kind, n, what the line names, its checkpoint clause): the smoke run saves checkpoints
# backdoored/1, backdoored/2, ft/1, ft/2, models/backdoored then models/ft, and writes
# results.json after each of its two models and metrics.jsonl after each of its four epochs.
POINTS = [
    ("checkpoint", 2, "checkpoints/backdoored/2", "; the last complete checkpoint is epoch 1"),
    ("checkpoint", 3, "checkpoints/ft/1", "; no checkpoint of this stage is complete yet"),
    ("models", 1, "models/backdoored", ""),
    ("models", 2, "models/ft", ""),
    ("results.json", 1, "results.json", ""),
    ("results.json", 2, "results.json", ""),
    ("metrics.jsonl", 2, "metrics.jsonl", ""),   # the backdoored stage's last epoch
    ("metrics.jsonl", 4, "metrics.jsonl", ""),   # the run's last epoch
]


@pytest.mark.parametrize("kind, n, where, clause", POINTS,
                         ids=[f"{kind}-{n}" for kind, n, _, _ in POINTS])
def test_a_refused_write_is_one_line_exit_1_and_the_rerun_resumes_exactly(
        toy_npz, tmp_path, faults, capsys, uninterrupted, kind, n, where, clause):
    work = tmp_path / "w"
    tree = smoke_tree(toy_npz)
    faults.fail(kind, n)
    code, err = run_cli(tree, work, capsys)
    assert faults.seen[kind] == n  # the run stopped at the refused write
    assert code == 1, err
    assert err.splitlines() == [
        f"error: no space left on device writing {where} in {work.resolve()}{clause}: free "
        "space and rerun the same command to resume"], err
    left = [p.name for p in work.rglob("*") if ".orbax-checkpoint-tmp" in p.name
            or p.name.endswith(".tmp")]
    assert left == []  # the refused write's partial files are gone
    if (work / "results.json").is_file():  # what was written before is intact
        json.loads((work / "results.json").read_text())

    faults.clear()
    code, err = run_cli(tree, work, capsys)
    assert code == 0 and err == "", err
    assert outputs(work) == uninterrupted


@pytest.mark.parametrize("code, reason, fix", [
    (errno.EACCES, "permission denied", "make it writable"),
    (errno.EROFS, "read-only file system", "make it writable"),
    (errno.EIO, "input/output error", "check the disk"),
])
def test_other_refusals_say_their_cause(toy_npz, tmp_path, faults, capsys, code, reason, fix):
    work = tmp_path / "w"
    faults.fail("checkpoint", 1, code)
    status, err = run_cli(smoke_tree(toy_npz), work, capsys)
    assert status == 1
    assert err.splitlines() == [
        f"error: {reason} writing checkpoints/backdoored/1 in {work.resolve()}; no checkpoint "
        f"of this stage is complete yet: {fix} and rerun the same command to resume"], err


def test_atomic_write_refused_keeps_the_old_file(tmp_path, faults):
    """table.json, results.md and the markers go through `atomic_write` too: a refused write
    leaves the old content and no temporary file."""
    path = tmp_path / "table.json"
    atomic_write(path, '{"old": 1}\n')
    faults.fail("table.json", 1)
    with pytest.raises(WriteError) as refused:
        atomic_write(path, '{"new": 2}\n')
    assert refused.value.path == path and refused.value.errno == errno.ENOSPC
    assert path.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json"]
    assert cli.error_line(refused.value) == (
        f"error: no space left on device writing {path}: free space and rerun the same command "
        "to resume")
