"""Workdir files shared by the entry points: atomic writes, the run-settings guard and
metrics.jsonl.

A write the disk refuses (no space, no permission, a read-only or failing disk) raises
`ftsam_jax.checkpoint.WriteError` (one line, exit 1: `experiments.cli.guarded`), the file's
earlier content intact; a file of the run's own that cannot be read back (cut short, edited)
is an InputError naming it (`read_json`)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from experiments.cli import InputError
from ftsam_jax.checkpoint import WriteError, writing
from ftsam_jax.training.stage import StageContext

__all__ = ["RESULTS_FIX", "MetricsLog", "atomic_write", "check_workdir", "check_workdir_path",
           "elapsed", "held_workdirs", "lock_workdir", "make_workdir", "read_json", "start_timer"]

_held_locks: dict[Path, int] = {}


def check_workdir_path(workdir: Path) -> None:
    """InputError unless `workdir` is a folder or can be made one: it is not a file, no folder
    above it is a file, and the nearest existing one is writable. Creates nothing (a run that
    fails its input checks leaves no workdir behind); `make_workdir` creates it."""
    workdir = Path(workdir)
    _refuse_if_busy(workdir)
    for path in (workdir, *workdir.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == workdir else f"lies under the file {path}"
            raise InputError(f"--workdir {workdir} {where}; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"--workdir {workdir} cannot be written: {path} is read-only")
        return


def _refuse_if_busy(workdir: Path) -> None:
    """InputError if another run holds `workdir/.lock` (probed without creating it). Multi-host:
    only process 0 probes (the others share its workdir, and its lock)."""
    import fcntl

    lock = workdir / ".lock"
    if jax.process_index() != 0 or workdir.resolve() in _held_locks or not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        raise InputError(f"--workdir {workdir} is in use by another run (pid {holder}); wait "
                         "for it to finish or use another --workdir") from None
    finally:
        os.close(fd)


def make_workdir(workdir: Path, *subdirs: str) -> None:
    """Creates `workdir` and its `subdirs` (every entry point's one way to make its folders);
    InputError with the system's reason where that fails (a read-only file system, a path
    under a file, no space)."""
    check_workdir_path(workdir)
    try:
        for folder in (workdir, *(workdir / s for s in subdirs)):
            folder.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"--workdir {workdir} cannot be used: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename else "")) from None


def lock_workdir(workdir: Path, *subdirs: str) -> None:
    """Makes `workdir` and its `subdirs` (`make_workdir`) and holds an exclusive lock on
    `workdir/.lock` until this process ends.

    A second run started on the same workdir is refused (InputError) instead of writing into
    the same checkpoints. The lock is the kernel's (`flock`), so a killed run leaves nothing
    stuck. Multi-host: only process 0 locks (the others share its workdir).
    """
    import fcntl

    make_workdir(workdir, *subdirs)
    key = workdir.resolve()
    if jax.process_index() != 0 or key in _held_locks:
        return
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise InputError(f"--workdir {workdir} is in use by another run (pid {holder}); wait "
                         "for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = fd


def held_workdirs() -> list[Path]:
    """The workdirs this process holds locked (`lock_workdir`), resolved: where its writes go
    (an error names a file relative to its workdir)."""
    return list(_held_locks)


def start_timer(ctx: StageContext) -> float:
    """Starts timing a section of stages: clears `ctx.restored_seconds` and returns the
    `time.perf_counter()` reading to pass to `elapsed`."""
    ctx.restored_seconds = 0.0
    return time.perf_counter()


def elapsed(t0: float, ctx: StageContext) -> float:
    """Seconds since `t0` (a `time.perf_counter()` reading) plus `ctx.restored_seconds`, the
    epochs that interrupted earlier runs of the same stages ran (from their checkpoints): a
    resumed stage reports its whole time, not only this process's share."""
    return round(time.perf_counter() - t0 + ctx.restored_seconds, 1)


def atomic_write(path: Path, text: str) -> None:
    """Writes `text` to `path` by a temporary file and a rename (a reader sees the old content
    or the new, never a part); process 0 only. WriteError where the disk refuses: `path` keeps
    its old content and the temporary file is removed."""
    if jax.process_index() != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path):
            tmp.write_text(text)
            os.replace(tmp, path)
    except WriteError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


# What to do about a results.json that cannot be read back: every row is recomputed from its
# stage's checkpoints (or, where they are gone, trained again: the same numbers).
RESULTS_FIX = ("delete it and rerun the same command to recompute its rows from the "
               "checkpoints, or use another --workdir")


def read_json(path: Path, what: str, fix: str = "delete it and rerun the same command to "
              "write it anew, or use another --workdir") -> dict[str, Any]:
    """The JSON object in `path`, a file the run wrote itself (`what`: which, for the message);
    InputError in one line naming it where it cannot be read or is not a JSON object (cut
    short by a full disk, edited by hand), with `fix`: what to do about it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = (e.strerror or type(e).__name__ if isinstance(e, OSError)
                  else f"not valid JSON: {e}")
        raise InputError(f"{what} {path} is unreadable ({reason}): {fix}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is unreadable (not a JSON object): {fix}")
    return data


def check_workdir(workdir: Path, run_cfg: dict[str, Any], keys: Sequence[str],
                  legacy: dict[str, Any] | None = None,
                  upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """A workdir can be made (`check_workdir_path`) and belongs to one run configuration;
    refuse to mix. `legacy`: the value of each later-added key that an older config.json
    lacks (what its run had); `upgrade`: an older config.json's settings in today's names."""
    check_workdir_path(workdir)
    cfg_path = workdir / "config.json"
    if cfg_path.is_file():
        old = read_json(cfg_path, "the run's settings", "use another --workdir").get("run")
        if not isinstance(old, dict):
            raise InputError(f"the run's settings {cfg_path} are unreadable (no \"run\" "
                             "object): use another --workdir")
        old = {**(legacy or {}), **(upgrade or dict)(old)}
        diff = [k for k in keys if old.get(k) != run_cfg.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {run_cfg.get(k)!r}" for k in diff)
            raise InputError(f"--workdir {workdir} holds a run with other settings ({detail}); "
                             "use another --workdir")


class MetricsLog:
    """metrics.jsonl: every stage's per-epoch history, rewritten atomically after each epoch;
    and the same scalars as TensorBoard event files, one run per stage, in `tensorboard_dir`
    (`tensorboard --logdir runs/`; written with tensorboardX, no TensorFlow)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.stages: dict[str, list[dict[str, Any]]] = {}
        if path.is_file():
            self._read()
        self.tensorboard_dir = tensorboard_dir
        # epochs already in event files: those of earlier processes (a resumed run)
        self._written = {s: max(r["epoch"] for r in h) for s, h in self.stages.items()}
        self._writers: dict[str, Any] = {}

    def _read(self) -> None:
        """The histories of earlier processes; InputError naming the file (and its first bad
        line) where it cannot be read back."""
        fix = ("delete it and rerun the same command (the stages whose checkpoints are kept "
               "write their histories again)")
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"the metrics log {self.path} is unreadable "
                             f"({getattr(e, 'strerror', None) or type(e).__name__}): {fix}"
                             ) from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.stages.setdefault(rec["stage"], []).append(rec)
                int(rec["epoch"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"the metrics log {self.path} is unreadable (line {number} is "
                                 f"not a stage's epoch record): {fix}") from None

    def __call__(self, stage: str, history: list[dict[str, Any]]) -> None:
        self.stages[stage] = list(history)
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for h in self.stages.values()
                                        for r in h))
        if self.tensorboard_dir is not None and jax.process_index() == 0:
            self._to_tensorboard(stage, history)

    def _to_tensorboard(self, stage: str, history: list[dict[str, Any]]) -> None:
        with writing(self.tensorboard_dir / stage):
            self._write_events(stage, history)

    def _write_events(self, stage: str, history: list[dict[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        if stage not in self._writers:
            # a unique file per process: a resumed run must not overwrite the earlier events
            self._writers[stage] = SummaryWriter(
                str(self.tensorboard_dir / stage),
                filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        writer = self._writers[stage]
        for rec in history:
            if rec["epoch"] <= self._written.get(stage, 0):
                continue
            for key, value in rec.items():
                if key not in ("stage", "epoch") and isinstance(value, int | float):
                    writer.add_scalar(key, value, rec["epoch"])
            self._written[stage] = rec["epoch"]
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
