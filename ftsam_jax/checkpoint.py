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

__all__ = ["CheckpointError", "Checkpointer", "load_variables", "save_variables"]


class CheckpointError(RuntimeError):
    """No checkpoint of a stage can be read (all are damaged); says which folder to delete."""


class Checkpointer:
    """Saves `(state, meta)` per step into `directory`; restores the latest into a template."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save (the device-to-host copy happens before it returns, so
        the state may be donated right after); `close` waits for the last one. A save cut short
        by a crash is never committed, and restore falls back to the previous one."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
        """Restores into the structure, dtypes and shardings of `template`; None if empty.

        Without `step`, the newest readable checkpoint: a damaged newer one (e.g. files cut
        short on a full disk) is skipped with a warning. CheckpointError if none can be read.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
        steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        errors, damaged = [], []
        for s in steps:
            try:
                r = self._mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
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
