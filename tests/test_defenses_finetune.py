"""FT / FT-SAM: benign sampling, the two recipes' schedules, the defense end to end + resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax import parallel
from ftsam_jax.defenses import DEFENSES, BenignData, select_benign
from ftsam_jax.defenses.finetune import ftsam_config
from ftsam_jax.fit import make_optimizer
from ftsam_jax.models import TinyCNN
from ftsam_jax.optim import SAMState
from ftsam_jax.runner import StageContext
from ftsam_jax.schedules import make_schedule


def test_balanced_and_random_benign_selection():
    labels = np.repeat(np.arange(10), [500 + 10 * c for c in range(10)])
    idx = select_benign(labels, 0.05, np.random.default_rng(0), balanced=True)
    per = int(len(labels) * 0.05 / 10)
    assert np.all(np.bincount(labels[idx]) == per) and len(np.unique(idx)) == len(idx)
    again = select_benign(labels, 0.05, np.random.default_rng(0), balanced=True)
    np.testing.assert_array_equal(idx, again)
    rand = select_benign(labels, 0.05, np.random.default_rng(0), balanced=False)
    assert len(rand) == int(0.05 * len(labels))
    # BackdoorBench's choose_index floors: int(5450 * 0.013) = 70, not round() = 71.
    assert len(select_benign(labels, 0.013, np.random.default_rng(0), balanced=False)) == 70
    with pytest.raises(ValueError, match="benign ratio"):
        select_benign(labels, 0.0, np.random.default_rng(0), balanced=True)


def lr_at(tx_state_schedule, count):
    return float(tx_state_schedule(jnp.asarray(count)))


def test_reference_recipe_has_the_cyclic_per_iteration_cosine():
    cfg = ftsam_config("paper", "reference")
    assert cfg.sam and cfg.rho == 2.0 and cfg.adaptive and cfg.eta == 0.0
    assert cfg.label_smoothing == 0.1 and cfg.batch_size == 256 and cfg.epochs == 100
    tx = make_optimizer(cfg.fit_config(), num_examples=2500)  # 10 iterations per epoch
    assert isinstance(tx.init({"w": jnp.ones(())})[0], SAMState)
    # closed form: lr(t) = 0.005 (1 + cos(pi t / 100)): 0 at t=100, back to 0.01 at t=200
    sched = make_schedule("cosine_iter", 0.01, 10, 100)
    assert lr_at(sched, 0) == pytest.approx(0.01)
    assert lr_at(sched, 100) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(sched, 200) == pytest.approx(0.01)
    paper = make_schedule("cosine_epoch", 0.01, 10, 100)
    assert lr_at(paper, 9) == pytest.approx(0.01) and lr_at(paper, 10) < 0.01  # per epoch
    assert lr_at(paper, 500) == pytest.approx(0.005)


def test_paper_recipe_differs_only_in_loss_and_schedule():
    ref, paper = ftsam_config("paper", "reference"), ftsam_config("paper", "paper")
    assert paper.label_smoothing == 0.0 and paper.schedule == "cosine_epoch"
    assert ref.schedule == "cosine_iter"
    assert (ref.rho, ref.lr, ref.batch_size, ref.epochs) == (
        paper.rho, paper.lr, paper.batch_size, paper.epochs)
    with pytest.raises(ValueError, match="recipe"):
        ftsam_config("paper", "magic")


@pytest.mark.parametrize("name", ["ft", "ftsam"])
def test_defense_end_to_end_and_resume(name, tmp_path):
    model = TinyCNN(num_classes=4, width=4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 40).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    spec = DEFENSES[name]
    cfg = spec.default_config("smoke")
    ctx = StageContext(mesh=parallel.make_mesh(), seed=0, workdir=tmp_path, progress=False)
    out = spec.run(model, variables, BenignData(x, y, 4), cfg, jax.random.key(1), ctx)
    assert jax.tree.structure(out) == jax.tree.structure(jax.device_get(variables))
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(out),
                                                     jax.tree.leaves(variables), strict=True)]
    assert any(changed)
    again = spec.run(model, variables, BenignData(x, y, 4), cfg, jax.random.key(1), ctx)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
