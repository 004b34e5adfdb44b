"""orbax wrapper: exact round trip of a sharded TrainState with NamedTuple optimizer states."""

import jax
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax import parallel
from ftsam_jax.checkpoint import Checkpointer, CheckpointError
from ftsam_jax.models import TinyCNN
from ftsam_jax.training.step import create_train_state


def test_round_trip_keeps_values_types_and_sharding(tmp_path):
    mesh = parallel.make_mesh()
    tx = optax.chain(ftsam_jax.sam_gradient(2.0, adaptive=True), optax.sgd(0.1, momentum=0.9))
    model = TinyCNN(num_classes=3, width=2)
    state = parallel.replicate(create_train_state(model, tx, jax.random.key(0), (8, 8, 3)), mesh)
    state = state.replace(step=state.step + 7)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore(state) is None
        ckpt.save(3, state, {"epoch": 3, "history": [0.5, 0.25]})
        ckpt.save(4, state, {"epoch": 4})
        ckpt.save(5, state, {"epoch": 5})
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 5
        template = parallel.replicate(create_train_state(model, tx, jax.random.key(1), (8, 8, 3)),
                                      mesh)
        restored, meta = ckpt.restore(template, step=4)
    assert meta == {"epoch": 4}
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # SAMState, not a tuple
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["4", "5"]


def _truncate_data_files(step_dir):
    """Cuts every array data file of one checkpoint step to 10 bytes (a damaged save)."""
    cut = 0
    for f in step_dir.rglob("*"):
        if f.is_file() and "state" in f.parts and f.stat().st_size > 10 and f.suffix != ".json":
            with open(f, "r+b") as fh:
                fh.truncate(10)
            cut += 1
    assert cut > 0


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    mesh = parallel.make_mesh()
    model = TinyCNN(num_classes=3, width=2)
    tx = optax.sgd(0.1)
    state = parallel.replicate(create_train_state(model, tx, jax.random.key(0), (8, 8, 3)), mesh)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {"epoch": 1})
        ckpt.save(2, state.replace(step=state.step + 5), {"epoch": 2})
    _truncate_data_files(tmp_path / "ckpt" / "2")
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.warns(RuntimeWarning, match="resumed from step 1"):
            restored, meta = ckpt.restore(state)
        assert meta == {"epoch": 1} and int(restored.step) == int(state.step)
        ckpt.save(2, state, {"epoch": 2})  # the damaged step was removed: saving it again works
    _truncate_data_files(tmp_path / "ckpt" / "1")
    _truncate_data_files(tmp_path / "ckpt" / "2")
    with Checkpointer(tmp_path / "ckpt") as ckpt, pytest.raises(CheckpointError,
                                                                match="delete that folder"):
        ckpt.restore(state)


def test_reads_checkpoints_written_with_orbax_standard_save(tmp_path):
    """Checkpoints of earlier versions (orbax StandardSave, replica-parallel slices) resume."""
    import orbax.checkpoint as ocp

    mesh = parallel.make_mesh()
    model = TinyCNN(num_classes=3, width=2)
    tx = optax.sgd(0.1, momentum=0.9)
    state = parallel.replicate(create_train_state(model, tx, jax.random.key(0), (8, 8, 3)), mesh)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"epoch": 3})))
    template = parallel.replicate(create_train_state(model, tx, jax.random.key(1), (8, 8, 3)),
                                  mesh)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, meta = ckpt.restore(template)
    assert meta == {"epoch": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
