"""Resumable training stages: epochs with orbax checkpoints, progress bar and per-epoch logs.

Every training stage of the project (the backdoored model, FT, FT-SAM, FP's fine-tuning, NAD,
IKD, ANP's masks, I-BAU's rounds, Input-aware's networks, the distillation students, the
detectors) is a `Stage` given to `train_stage`: a step function + state + data (+ sampler,
preprocessing, evaluation) and a name. The driver puts the state and the data on the devices,
compiles the epoch (`ftsam_jax.training.epoch.make_epoch_fn`) and runs it through `run_stage`,
the one place with resume, checkpoints, progress, logs and timing; stages keep only what is theirs.

A stage's random stream is derived from (seed, stage name, epoch) only, and its state is
checkpointed after each epoch, so killing a run and re-running the same command continues from
the last checkpoint and ends with the same numbers as an uninterrupted run. A finished stage is
not re-run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from ftsam_jax import parallel
from ftsam_jax.checkpoint import Checkpointer
from ftsam_jax.training.epoch import Preprocess, Sampler, Step, make_epoch_fn

__all__ = ["NonFiniteLossError", "Stage", "StageContext", "evaluate_variables", "position",
           "run_stage", "stage_rng", "train_stage"]

EpochFn = Callable[[Any, jax.Array], tuple[Any, dict[str, Any]]]
Evaluate = Callable[[Any], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """A stage produced a non-finite loss; its last good checkpoint is kept."""


@dataclasses.dataclass
class StageContext:
    """Where and how stages run.

    Attributes:
      mesh: the device mesh (batch sharded on 'data', state replicated).
      seed: the run's seed; every stage derives its own stream from it and its name.
      workdir: checkpoints go to `workdir/checkpoints/<stage>`; None: no checkpoints.
      progress: show a progress bar per stage.
      checkpoint_every: save every k epochs (and always after the last one).
      log: called with the stage's whole history after every epoch (for metrics.jsonl).
      evaluate: optional `variables -> {metric: float}` for per-epoch curves (C-Acc, ASR...).
      eval_every: evaluate every k epochs (and after the last one).
      restored_seconds: incremented by the recorded epoch times of every stage resumed from a
        checkpoint, so a caller can report a resumed stage's full time (this process's wall
        time + the epochs earlier, interrupted processes ran; not their start-up).
      scope: a prefix of every stage name ("SCOPE/STAGE": checkpoints, log tags, the default
        random stream), so that two runs of the same stages (a defense and a variant of it)
        keep apart in one workdir; None: the names as given.
    """

    mesh: Mesh
    seed: int = 0
    workdir: Path | None = None
    progress: bool = True
    checkpoint_every: int = 1
    log: Callable[[str, list[dict[str, Any]]], None] | None = None
    evaluate: Callable[[dict[str, Any]], dict[str, float]] | None = None
    eval_every: int = 1
    restored_seconds: float = 0.0
    scope: str | None = None

    def stage_name(self, name: str) -> str:
        return name if self.scope is None else f"{self.scope}/{name}"

    def checkpoint_dir(self, stage: str) -> Path | None:
        return None if self.workdir is None else Path(self.workdir) / "checkpoints" / stage


_epochs_run_in_process = 0
# Where this process is (read by `position`: an interrupted entry point says where it stopped).
_position: str | None = None


def position() -> str | None:
    """Where this process is: "in stage S at epoch k of n (last checkpoint: epoch j)", "after
    stage S (finished)", or None before the first stage."""
    return _position


def _at(name: str, epoch: int, epochs: int, saved: int | None) -> str:
    ckpt = ("no checkpoints" if saved is None else
            "no checkpoint yet" if saved == 0 else f"last checkpoint: epoch {saved}")
    return f"in stage {name} at epoch {epoch} of {epochs} ({ckpt})"


def _simulated_interrupt() -> None:
    """Test hook: FTSAM_JAX_INTERRUPT_AFTER=N raises KeyboardInterrupt after N epochs of this
    process (as a Ctrl-C would), to test that a rerun resumes to the same numbers."""
    global _epochs_run_in_process
    _epochs_run_in_process += 1
    limit = os.environ.get("FTSAM_JAX_INTERRUPT_AFTER")
    if limit is not None and _epochs_run_in_process >= int(limit):
        raise KeyboardInterrupt


def stage_rng(seed: int, stage: str) -> jax.Array:
    """A key that depends only on the seed and the stage's name (not on other stages)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stage.encode()) & 0x7FFFFFFF)


def _to_host(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_stage(
    name: str,
    state: Any,
    epoch_fn: EpochFn,
    epochs: int,
    ctx: StageContext,
    *,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    rng: jax.Array | None = None,
    finite_key: str = "loss",
    lr_fn: Callable[[int], float] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Runs (or resumes, or skips if done) `epochs` epochs of `epoch_fn`.

    Args:
      name: stage name: checkpoint folder, random stream and log tag.
      state: the initial state; also the restore template (structure, dtypes, shardings).
      epoch_fn: `(state, rng) -> (state, metrics)`; metrics are scalars (averaged per epoch).
      epochs: total epochs of the stage.
      ctx: mesh, seed, workdir, progress and logging.
      eval_fn: optional `state -> {name: float}` evaluated every `ctx.eval_every` epochs and
        after the last one (e.g. C-Acc / ASR curves).
      rng: the stage's key; default `stage_rng(ctx.seed, name)`. Epoch e uses fold_in(rng, e).
      finite_key: the metric that must stay finite.
      lr_fn: optional `epoch index -> learning rate` (that of the epoch's last step), logged
        as each epoch's "lr".

    Returns:
      The final state and the per-epoch history (dicts with "stage", "epoch", metrics,
      "seconds").

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the previous checkpoint stays the latest.
    """
    name = ctx.stage_name(name)
    rng = stage_rng(ctx.seed, name) if rng is None else rng
    ckpt_dir = ctx.checkpoint_dir(name)
    ckpt = Checkpointer(ckpt_dir) if ckpt_dir is not None else None
    history: list[dict[str, Any]] = []
    start = 0
    try:
        if ckpt is not None and (restored := ckpt.restore(state)) is not None:
            state, meta = restored
            start, history = int(meta["epoch"]), list(meta["history"])
            ctx.restored_seconds += sum(float(h.get("seconds", 0.0)) for h in history)
        if start >= epochs:
            return state, history
        global _position
        _position = _at(name, start + 1, epochs, start if ckpt is not None else None)
        bar = None
        if ctx.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, initial=start, desc=name, unit="ep", leave=True,
                       dynamic_ncols=True)
        try:
            for epoch in range(start, epochs):
                t0 = time.perf_counter()
                state, metrics = epoch_fn(state, jax.random.fold_in(rng, epoch))
                record: dict[str, Any] = {"stage": name, "epoch": epoch + 1, **_to_host(metrics)}
                if lr_fn is not None:
                    record["lr"] = float(lr_fn(epoch))
                if not math.isfinite(record.get(finite_key, 0.0)):
                    raise NonFiniteLossError(
                        f"stage {name}: non-finite {finite_key} at epoch {epoch + 1}; stopped, "
                        f"the last good checkpoint (epoch {start if ckpt else 0}) is kept")
                last = epoch + 1 == epochs
                if eval_fn is not None and ((epoch + 1) % ctx.eval_every == 0 or last):
                    record.update(eval_fn(state))
                record["seconds"] = round(time.perf_counter() - t0, 3)
                history.append(record)
                # The log before the checkpoint: an epoch whose log write fails (a full disk)
                # or is interrupted has no checkpoint yet, so the rerun runs and logs it again.
                if ctx.log is not None:
                    ctx.log(name, history)
                if ckpt is not None and ((epoch + 1) % ctx.checkpoint_every == 0 or last):
                    ckpt.save(epoch + 1, state, {"epoch": epoch + 1, "history": history})
                    start = epoch + 1
                _position = (_at(name, epoch + 2, epochs, start if ckpt is not None else None)
                             if not last else f"after stage {name} (finished)")
                _simulated_interrupt()
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                                     if k not in ("stage", "epoch", "seconds")
                                     and isinstance(v, float)}, refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return state, history
    finally:
        if ckpt is not None:
            ckpt.close()


def _identity(batch: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    del rng
    return batch


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: what `train_stage` runs.

    Either minibatch epochs of a `step` over `data`, or `epoch_fn` (a whole custom epoch: a
    pruning pass, I-BAU's fixed-point rounds).

    Attributes:
      name: checkpoint folder, random stream and log tag.
      state: the initial state (host or device arrays); replicated over the mesh.
      epochs: total epochs.
      step: `(state, batch, rng) -> (state, metrics)`, jit-compatible.
      data: per-example arrays, `"image"` and `"label"` plus any others gathered into each
        batch under their own keys (adversarial images, boxes); put on the devices once.
      batch_size, drop_last, preprocess, sampler: the epoch (`make_epoch_fn`); `preprocess`
        default: none.
      epoch_data: optional `(data on device, rng) -> {key: array}`: per-example arrays made
        anew every epoch (Input-aware's shuffled second images); its key is split off the
        epoch's key.
      epoch_fn: `(state, rng) -> (state, metrics)` instead of step + data.
      evaluate: optional `state -> {metric: float}` after every `ctx.eval_every` epochs and the
        last one (`evaluate_variables(ctx, ...)` for the pipeline's C-Acc / ASR).
      rng: the stage's key; default `stage_rng(ctx.seed, name)`.
      lr: optional `epoch index -> learning rate` logged per epoch (`run_stage`'s `lr_fn`).
    """

    name: str
    state: Any
    epochs: int
    step: Step | None = None
    data: dict[str, Any] | None = None
    batch_size: int = 0
    drop_last: bool = True
    preprocess: Preprocess = _identity
    sampler: Sampler | None = None
    epoch_data: Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]] | None = None
    epoch_fn: EpochFn | None = None
    evaluate: Evaluate | None = None
    rng: jax.Array | None = None
    lr: Callable[[int], float] | None = None

    def __post_init__(self) -> None:
        if (self.step is None) == (self.epoch_fn is None):
            raise ValueError(f"stage {self.name}: give exactly one of step and epoch_fn")
        if self.step is not None and (self.data is None or "image" not in self.data
                                      or "label" not in self.data):
            raise ValueError(f"stage {self.name}: a step needs data with 'image' and 'label'")


def state_variables(state: Any) -> dict[str, Any]:
    return state.variables


def evaluate_variables(ctx: StageContext,
                       variables: Callable[[Any], dict[str, Any]] = state_variables,
                       ) -> Evaluate | None:
    """`state -> ctx.evaluate(variables(state))`, or None when the run has no evaluator."""
    if ctx.evaluate is None:
        return None
    evaluate = ctx.evaluate
    return lambda state: evaluate(variables(state))


def _epoch_of(step: Step, mesh: Mesh, num_examples: int, batch_size: int, preprocess: Preprocess,
              drop_last: bool, sampler: Sampler | None) -> Callable[..., Any]:
    """`make_epoch_fn`, once per step object and epoch shape: stages given the same step (one
    method's students over several seeds) share its compiled programs instead of tracing and
    compiling them again. The epoch functions are kept on the step (freed with it)."""
    make = functools.partial(make_epoch_fn, step, mesh=mesh, num_examples=num_examples,
                             batch_size=batch_size, preprocess=preprocess,
                             drop_last=drop_last, sampler=sampler)
    try:
        cache = step.__dict__.setdefault("_ftsam_epoch_fns", {})
    except AttributeError:  # a step without attributes (a jitted or built-in callable)
        return make()
    key = (mesh, num_examples, batch_size, preprocess, drop_last, sampler)
    if key not in cache:
        cache[key] = make()
    return cache[key]


def train_stage(stage: Stage, ctx: StageContext) -> tuple[Any, list[dict[str, Any]]]:
    """Runs (or resumes, or skips if done) `stage` on `ctx.mesh`.

    Returns the final state (replicated device arrays; `jax.device_get` for host copies) and
    the per-epoch history.
    """
    epoch_fn = stage.epoch_fn
    if epoch_fn is None:
        repl = parallel.replicated(ctx.mesh)
        data = {k: jax.device_put(v, repl) for k, v in stage.data.items()}
        images, labels = data.pop("image"), data.pop("label")
        epoch = _epoch_of(stage.step, ctx.mesh, len(labels), stage.batch_size,
                          stage.preprocess, stage.drop_last, stage.sampler)
        make_extra = stage.epoch_data

        def epoch_fn(state: Any, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
            extra = data
            if make_extra is not None:
                k_extra, rng = jax.random.split(rng)
                extra = {**data, **make_extra({"image": images, "label": labels, **data},
                                              k_extra)}
            return epoch(state, images, labels, rng, extra or None)

    state = parallel.replicate(stage.state, ctx.mesh)
    return run_stage(stage.name, state, epoch_fn, stage.epochs, ctx, eval_fn=stage.evaluate,
                     rng=stage.rng, lr_fn=stage.lr)
