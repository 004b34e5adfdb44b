"""Resumable stages: non-finite loss stops and keeps the last good checkpoint; seeds; the one
stage driver (`Stage` + `train_stage`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.checkpoint import Checkpointer
from ftsam_jax.training.epoch import epoch_indices
from ftsam_jax.training.stage import (
    NonFiniteLossError,
    Stage,
    StageContext,
    evaluate_variables,
    run_stage,
    stage_rng,
    train_stage,
)
from tests.conftest import small_mesh


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ctx = StageContext(mesh=small_mesh(), seed=0, workdir=tmp_path, progress=False)
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
    ctx = StageContext(mesh=small_mesh(), seed=0, workdir=tmp_path, progress=False)
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


def _sum_step(state, batch, rng):
    """Adds up the batch's labels (and its extra arrays): which examples a stage saw."""
    del rng
    seen = state["seen"] + jnp.sum(batch["label"]) + sum(
        jnp.sum(v) for k, v in batch.items() if k not in ("image", "label"))
    return {"seen": seen, "n": state["n"] + 1}, {"loss": jnp.float32(1.0)}


def test_stage_needs_exactly_one_of_step_and_epoch_fn():
    with pytest.raises(ValueError, match="exactly one of step and epoch_fn"):
        Stage("s", {}, 1)
    with pytest.raises(ValueError, match="exactly one of step and epoch_fn"):
        Stage("s", {}, 1, step=_sum_step, epoch_fn=lambda st, r: (st, {}),
              data={"image": np.zeros(4), "label": np.zeros(4)})
    with pytest.raises(ValueError, match="'image' and 'label'"):
        Stage("s", {}, 1, step=_sum_step, data={"x": np.zeros(4)})


def test_stages_given_one_step_share_its_compiled_epoch(tmp_path):
    """Two stages with the same step object (one method's students over two seeds) trace it
    once; a new step object is traced anew; the numbers are those of separate programs."""
    mesh = small_mesh()
    n, bs = 32, 8
    data = {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": np.arange(n, dtype=np.int32)}
    state0 = {"seen": jnp.zeros((), jnp.int32), "n": jnp.zeros((), jnp.int32)}
    traced = []

    def make_step():
        def step(st, batch, rng):
            traced.append(1)  # runs only while tracing
            return _sum_step(st, batch, rng)
        return step

    ctx = StageContext(mesh=mesh, seed=0, workdir=None, progress=False)
    shared = make_step()
    runs = [train_stage(Stage(f"seed{s}", state0, 2, step=shared, data=data, batch_size=bs,
                              rng=stage_rng(s, "student")), ctx)[0] for s in (0, 1)]
    assert len(traced) == 1
    fresh = train_stage(Stage("fresh", state0, 2, step=make_step(), data=data, batch_size=bs,
                              rng=stage_rng(1, "student")), ctx)[0]
    assert len(traced) == 2
    assert int(runs[1]["seen"]) == int(fresh["seen"]) == 2 * data["label"].sum()
    assert int(runs[0]["n"]) == int(runs[1]["n"]) == 2 * n // bs


def test_train_stage_runs_the_epochs_it_is_given(tmp_path):
    """Every example once per epoch (shuffled epoch), the sampler's draws instead when given,
    per-epoch data from the epoch key, evaluation every epoch, and resume."""
    mesh = small_mesh()
    n, bs = 32, 8
    labels = np.arange(n, dtype=np.int32)
    data = {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": labels}
    state0 = {"seen": jnp.zeros((), jnp.int32), "n": jnp.zeros((), jnp.int32)}
    ctx = StageContext(mesh=mesh, seed=0, workdir=tmp_path / "a", progress=False)
    evaluated = []
    state, history = train_stage(Stage(
        "epochs", state0, 3, step=_sum_step, data=data, batch_size=bs,
        evaluate=lambda st: evaluated.append(int(st["n"])) or {"n": float(st["n"])}), ctx)
    assert int(state["seen"]) == 3 * labels.sum() and int(state["n"]) == 3 * n // bs
    assert evaluated == [4, 8, 12] and history[-1]["n"] == 12  # ctx.eval_every = 1

    # A sampler: its indices, from the first half of the epoch key.
    ones = lambda rng: jnp.ones((5, bs), jnp.int32)
    state, _ = train_stage(Stage("sampled", state0, 2, step=_sum_step, data=data,
                                 batch_size=bs, sampler=ones), ctx)
    assert int(state["seen"]) == 2 * 5 * bs and int(state["n"]) == 10

    # Per-epoch data: made from the data on device and the epoch's key.
    made = lambda d, rng: {"twice": 2 * d["label"]}
    state, _ = train_stage(Stage("extra", state0, 1, step=_sum_step, data=data, batch_size=bs,
                                 epoch_data=made), ctx)
    assert int(state["seen"]) == 3 * labels.sum()

    # drop_last=False fills the last batch from a second permutation (as loop.epoch_indices).
    rng = stage_rng(0, "partial")
    state, _ = train_stage(Stage("partial", state0, 1, step=_sum_step,
                                 data={**data, "label": labels[:30]}, batch_size=bs,
                                 drop_last=False), ctx)
    perm_rng, _ = jax.random.split(jax.random.fold_in(rng, 0))
    expected = int(jnp.sum(epoch_indices(perm_rng, 30, bs, drop_last=False)))
    assert int(state["seen"]) == expected

    # Finished stages are restored, not rerun; an interrupted one continues.
    again, _ = train_stage(Stage("epochs", state0, 3, step=lambda *a: 1 / 0, data=data,
                                 batch_size=bs), ctx)
    assert int(again["seen"]) == 3 * labels.sum()
    more, _ = train_stage(Stage("epochs", state0, 4, step=_sum_step, data=data,
                                batch_size=bs), ctx)
    assert int(more["seen"]) == 4 * labels.sum()


def test_evaluate_variables_reads_the_runs_evaluator():
    ctx = StageContext(mesh=small_mesh(), progress=False)
    assert evaluate_variables(ctx) is None
    ctx.evaluate = lambda v: {"acc": float(v["w"])}
    ev = evaluate_variables(ctx, lambda st: {"w": st[0]})
    assert ev((0.25,)) == {"acc": 0.25}
