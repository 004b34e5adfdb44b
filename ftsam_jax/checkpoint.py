"""Exact-resume checkpoints: a thin wrapper over orbax's CheckpointManager.

Each checkpoint holds a state pytree and a small JSON `meta` dict (epoch, metrics so far...).
Randomness is derived from (seed, stage, epoch), never stored, so restoring the state of epoch k
and re-running epoch k+1 gives the numbers of an uninterrupted run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "Checkpointer", "load_variables", "save_variables",
           "wait_for_saves"]

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
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            handler_registry=registry,
        )
        _open.add(self)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save (the device-to-host copy happens before it returns, so
        the state may be donated right after); `close` waits for the last one. A save cut short
        by a crash is never committed, and restore falls back to the previous one."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))

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
        _open.discard(self)
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_variables(path: str | Path, variables: Any) -> None:
    """Writes a finished model's variables (one orbax checkpoint, overwritten atomically)."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(variables), force=True)


def load_variables(path: str | Path, template: Any) -> Any:
    """Reads variables written by `save_variables` into the structure of `template` (arrays or
    `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape(model.init, ...)`)."""
    abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                            else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute(), abstract)
