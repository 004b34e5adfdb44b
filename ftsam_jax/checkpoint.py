"""Exact-resume checkpoints: a thin wrapper over orbax's CheckpointManager.

Each checkpoint holds a state pytree and a small JSON `meta` dict (epoch, metrics so far...).
Randomness is derived from (seed, stage, epoch), never stored, so restoring the state of epoch k
and re-running epoch k+1 gives the numbers of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "WriteError", "load_variables", "save_variables",
           "wait_for_saves", "write_errno", "writing"]

_open: set[Checkpointer] = set()


def wait_for_saves() -> None:
    """Waits for every open Checkpointer's asynchronous saves to commit (an entry point that is
    stopped by a signal calls this before it exits, so its last checkpoint is whole)."""
    for ckptr in list(_open):
        try:
            ckptr._mngr.wait_until_finished()
        except Exception:  # noqa: BLE001 - a failed save is not committed; restore skips it
            pass


class CheckpointError(RuntimeError):
    """No checkpoint of a stage can be read (all are damaged); says which folder to delete."""


# The errors of a write the disk refused, and what the user can do about each.
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
            errno.EIO: "input/output error"}
_FIXES = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EFBIG: "free space",
          errno.EACCES: "make it writable", errno.EPERM: "make it writable",
          errno.EROFS: "make it writable", errno.EIO: "check the disk"}
# tensorstore (orbax's array writer) reports the system's error code in its message ...
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# ... or only its status name / the system's text.
_STATUS_TEXT = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "No space left on device": errno.ENOSPC,
                "Disk quota exceeded": errno.EDQUOT, "PERMISSION_DENIED": errno.EACCES,
                "Permission denied": errno.EACCES, "Read-only file system": errno.EROFS,
                "Input/output error": errno.EIO}


class WriteError(RuntimeError):
    """A write the disk refused (no space, no permission, a read-only or failing disk). What was
    committed before is intact (checkpoints are committed by orbax, files replaced by rename),
    so the same command resumes once the cause is fixed.

    Attributes:
      path: what was being written (a file, a model folder, a checkpoint `DIR/STEP`).
      errno: the system's error code (`errno.ENOSPC`...).
      last_checkpoint: for a checkpoint, the newest complete one of its stage (0: none yet).
    """

    def __init__(self, path: str | Path, code: int, last_checkpoint: int | None = None) -> None:
        super().__init__(str(path))
        self.path, self.errno, self.last_checkpoint = Path(path), code, last_checkpoint

    def describe(self, roots: Sequence[str | Path] = ()) -> str:
        """The message; `path` is shown relative to the first of `roots` (the run's workdir)
        that holds it ("checkpoints/ft/3 in WORKDIR")."""
        where, target = str(self.path), Path(os.path.abspath(self.path))
        for root in roots:
            root = Path(os.path.abspath(root))
            if target.is_relative_to(root) and target != root:
                where = f"{target.relative_to(root)} in {root}"
                break
        reason = _REASONS.get(self.errno, os.strerror(self.errno).lower())
        ckpt = ("" if self.last_checkpoint is None else
                "; no checkpoint of this stage is complete yet" if self.last_checkpoint == 0
                else f"; the last complete checkpoint is epoch {self.last_checkpoint}")
        fix = _FIXES.get(self.errno, "fix the disk")
        return f"{reason} writing {where}{ckpt}: {fix} and rerun the same command to resume"

    def __str__(self) -> str:
        return self.describe()


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes (orbax wraps tensorstore's errors, Python its OSErrors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def write_errno(exc: BaseException) -> int | None:
    """The error code of a write the disk refused (`_REASONS`) behind `exc`: an OSError's
    errno, tensorstore's `[os_error_code=N]` or status (`RESOURCE_EXHAUSTED: ... No space left
    on device`); None for any other error (a bug, which keeps its traceback)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _REASONS:
            return e.errno
        if isinstance(e, OSError) and e.errno is not None:
            continue
        text = str(e)
        if (m := _OS_ERROR_CODE.search(text)) and int(m.group(1)) in _REASONS:
            return int(m.group(1))
        for phrase, code in _STATUS_TEXT.items():
            if phrase in text:
                return code
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turns a write the disk refuses inside the block into a `WriteError` naming `path`; any
    other error passes unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        code = write_errno(e)
        if code is None:
            raise
        raise WriteError(path, code) from e


def _remove_partial(path: Path) -> None:
    """Removes what an uncommitted orbax write of `path` left (`PATH.orbax-checkpoint-tmp*`),
    so a full disk gets its space back and the rerun starts that write afresh."""
    for tmp in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


class _QuietWriteFailures(logging.Filter):
    """Drops orbax's own log records of a refused write (a traceback from each of its threads):
    the failure reaches the caller as one `WriteError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return (write_errno(exc) if exc is not None else
                write_errno(RuntimeError(record.getMessage()))) is None


_quiet = _QuietWriteFailures()


def _late_callback(unraisable: Any) -> bool:
    """Whether an unraisable error is tensorstore completing a write for an event loop that
    orbax has closed: after one write of a save fails, orbax stops waiting and closes the loop,
    and each of that save's other writes, finishing later, reports `Event loop is closed`."""
    tb = unraisable.exc_traceback
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _quiet_orbax() -> None:
    """Keeps a refused write to the one WriteError: orbax's log records of it and
    tensorstore's late completions (`_late_callback`) are not printed."""
    logger = logging.getLogger("absl")
    if _quiet not in logger.filters:
        logger.addFilter(_quiet)
    previous = sys.unraisablehook
    if getattr(previous, "_ftsam_jax", False):
        return

    def hook(unraisable: Any) -> None:
        if not _late_callback(unraisable):
            previous(unraisable)

    hook._ftsam_jax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _type_handlers() -> Any:
    """orbax's handlers for the leaves of a state. On CPU, jax.Arrays are written without
    replica-parallel slicing: the "devices" share one host memory, so splitting a replicated
    array into one slice per replica gains nothing and compiles a `slice` per device and leaf
    shape (216 compiles, about 11 s, in a smoke detection run on 8 CPU devices). Elsewhere
    orbax's default (off on GPU, on for TPU)."""
    cpu = jax.default_backend() == "cpu"
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False if cpu else None)
    scalars = ocp.type_handlers.ScalarHandler()
    return ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, scalars), (float, scalars), (np.number, scalars),
        (str, ocp.type_handlers.StringHandler()))


class Checkpointer:
    """Saves `(state, meta)` per step into `directory`; restores the latest into a template."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        state = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
            registry.add("state", args, state)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args, ocp.JsonCheckpointHandler())
        with writing(self.directory):  # creates the folder
            self._mngr = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
                handler_registry=registry,
            )
        self._pending: int | None = None  # the step of a save not known to be committed
        _quiet_orbax()
        _open.add(self)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save (the device-to-host copy happens before it returns, so
        the state may be donated right after); `close` waits for the last one. A save cut short
        by a crash is never committed, and restore falls back to the previous one.

        WriteError when the disk refuses this save or the previous one (whose failure shows
        only now); the refused save's partial files are removed."""
        self._wait()
        with self._refused(step):
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))
        self._pending = step

    def _wait(self) -> None:
        """Waits for the pending save to commit; WriteError if the disk refused it."""
        with self._refused(self._pending):
            self._mngr.wait_until_finished()
        self._pending = None

    @contextlib.contextmanager
    def _refused(self, step: int | None) -> Iterator[None]:
        """`writing(DIR/step)`, the error completed with the newest complete checkpoint and the
        refused one's partial files removed."""
        target = self.directory if step is None else self.directory / str(step)
        try:
            with writing(target):
                yield
        except WriteError as e:
            self._pending = None
            if step is not None:
                _remove_partial(target)
            e.last_checkpoint = max((s for s in self._mngr.all_steps() if step is None
                                     or s < step), default=0)
            raise

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """Restores into the structure, dtypes and shardings of `template`; None if empty.

        Without `step`, the newest readable checkpoint: a damaged newer one (e.g. files cut
        short on a full disk) is skipped with a warning. CheckpointError if none can be read.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        errors, damaged = [], []
        for s in steps:
            try:
                r = self._mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(abstract, restore_args),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                errors.append(f"step {s}: {type(e).__name__}")
                damaged.append(s)
                continue
            if errors:
                for bad in damaged:  # so the epochs after `s` can be saved again
                    self._mngr.delete(bad)
                warnings.warn(f"damaged checkpoints in {self.directory} deleted "
                              f"({'; '.join(errors)}); resumed from step {s}", RuntimeWarning,
                              stacklevel=2)
            return r.state, dict(r.meta)
        raise CheckpointError(f"no readable checkpoint in {self.directory} "
                              f"({'; '.join(errors)}); delete that folder to rerun the stage")

    def close(self) -> None:
        """Waits for the last save (WriteError if the disk refused it) and closes."""
        _open.discard(self)
        try:
            self._wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_variables(path: str | Path, variables: Any) -> None:
    """Writes a finished model's variables (one orbax checkpoint, overwritten atomically);
    WriteError when the disk refuses (the partial files removed, an earlier model intact)."""
    path = Path(path).absolute()
    _quiet_orbax()
    try:
        with writing(path), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, jax.device_get(variables), force=True)
    except WriteError:
        _remove_partial(path)
        raise


def load_variables(path: str | Path, template: Any) -> Any:
    """Reads variables written by `save_variables` into the structure of `template` (arrays or
    `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape(model.init, ...)`)."""
    abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                            else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)
