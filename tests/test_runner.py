"""Resumable stages: non-finite loss stops and keeps the last good checkpoint; seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax import parallel
from ftsam_jax.checkpoint import Checkpointer
from ftsam_jax.runner import NonFiniteLossError, StageContext, run_stage, stage_rng


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ctx = StageContext(mesh=parallel.make_mesh(), seed=0, workdir=tmp_path, progress=False)
    state = {"w": jnp.zeros(())}

    def epoch_fn(st, rng):
        w = st["w"] + 1.0
        loss = jnp.where(w >= 3, jnp.nan, 1.0 / w)
        return {"w": w}, {"loss": loss}

    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 3"):
        run_stage("toy", state, epoch_fn, 5, ctx)
    with Checkpointer(tmp_path / "checkpoints" / "toy") as ckpt:
        assert ckpt.latest_step() == 2
        restored, meta = ckpt.restore(state)
    assert float(restored["w"]) == 2.0 and [h["epoch"] for h in meta["history"]] == [1, 2]


def test_resume_continues_and_finished_stages_are_skipped(tmp_path):
    ctx = StageContext(mesh=parallel.make_mesh(), seed=0, workdir=tmp_path, progress=False)
    calls = []

    def epoch_fn(st, rng):
        calls.append(1)
        return {"w": st["w"] + jax.random.uniform(rng)}, {"loss": jnp.float32(1.0)}

    full, _ = run_stage("a", {"w": jnp.zeros(())}, epoch_fn, 4, StageContext(
        mesh=ctx.mesh, seed=0, workdir=tmp_path / "full", progress=False))
    _, first = run_stage("a", {"w": jnp.zeros(())}, epoch_fn, 2, ctx)
    assert ctx.restored_seconds == 0.0
    resumed, history = run_stage("a", {"w": jnp.zeros(())}, epoch_fn, 4, ctx)
    assert float(resumed["w"]) == float(full["w"]) and len(history) == 4
    # The resumed run accounts for the time the first two epochs took in the earlier run.
    assert history[:2] == first
    assert ctx.restored_seconds == pytest.approx(sum(h["seconds"] for h in first))
    n = len(calls)
    run_stage("a", {"w": jnp.zeros(())}, epoch_fn, 4, ctx)
    assert len(calls) == n  # finished: nothing recomputed


def test_stage_streams_depend_only_on_seed_and_name():
    a = jax.random.key_data(stage_rng(0, "defense/ftsam"))
    assert np.array_equal(a, jax.random.key_data(stage_rng(0, "defense/ftsam")))
    assert not np.array_equal(a, jax.random.key_data(stage_rng(0, "defense/ft")))
    assert not np.array_equal(a, jax.random.key_data(stage_rng(1, "defense/ftsam")))
