"""FT / FT-SAM: benign sampling, the two recipes' schedules, the defense end to end + resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftsam_jax.defenses import DEFENSES, BenignData, select_benign
from ftsam_jax.defenses.finetune import ftsam_config
from ftsam_jax.models import TinyCNN
from ftsam_jax.optim import SAMState
from ftsam_jax.training import stage as runner
from ftsam_jax.training.recipe import make_optimizer
from ftsam_jax.training.stage import StageContext
from tests.conftest import small_mesh


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


def built_learning_rates(cfg, num_examples, steps):
    """The learning rate of each of `steps` updates of the optimizer the recipe builds,
    read off its updates: params 0 (no weight decay), SAM's gradient a constant 1, so
    update_t = -lr_t * m_t with the momentum buffer m_t = 1 + momentum * m_{t-1}."""
    tx = make_optimizer(cfg, num_examples=num_examples)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    assert isinstance(state[0], SAMState)
    ones = lambda p: jax.tree.map(jnp.ones_like, p)
    update = jax.jit(lambda s: tx.update(ones(params), s, params, grad_fn=ones))
    lrs, buf = [], 0.0
    for _ in range(steps):
        u, state = update(state)
        buf = 1.0 + cfg.momentum * buf
        lrs.append(-float(u["w"]) / buf)
    return np.asarray(lrs)


def test_reference_recipe_has_the_cyclic_per_iteration_cosine():
    cfg = ftsam_config("paper", "reference")
    assert cfg.sam and cfg.rho == 2.0 and cfg.adaptive and cfg.eta == 0.0
    assert cfg.label_smoothing == 0.1 and cfg.batch_size == 256 and cfg.epochs == 100
    lr = built_learning_rates(cfg, 2500, 201)  # 10 iterations per epoch
    # closed form: lr(t) = 0.005 (1 + cos(pi t / 100)): 0 at t=100, back to 0.01 at t=200
    np.testing.assert_allclose(lr, 0.005 * (1 + np.cos(np.pi * np.arange(201) / 100)),
                               atol=1e-7)
    paper = built_learning_rates(ftsam_config("paper", "paper"), 2500, 31)
    assert np.allclose(paper[:10], 0.01) and paper[10] < 0.01  # cosine per epoch
    np.testing.assert_allclose(paper[10:20], paper[10], rtol=1e-6)  # constant within an epoch


def test_paper_recipe_differs_only_in_loss_and_schedule():
    ref, paper = ftsam_config("paper", "reference"), ftsam_config("paper", "paper")
    assert paper.label_smoothing == 0.0 and paper.schedule == "cosine_epoch"
    assert ref.schedule == "cosine_iter"
    assert (ref.rho, ref.lr, ref.batch_size, ref.epochs) == (
        paper.rho, paper.lr, paper.batch_size, paper.epochs)
    with pytest.raises(ValueError, match="recipe"):
        ftsam_config("paper", "magic")


@pytest.mark.parametrize("name", ["ft", "ftsam"])
def test_defense_end_to_end_and_resume(name, tmp_path, monkeypatch):
    model = TinyCNN(num_classes=4, width=4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 40).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    spec = DEFENSES[name]
    cfg = spec.default_config("smoke")
    assert cfg.epochs >= 2
    mesh = small_mesh()
    run = lambda workdir: spec.run(model, variables, BenignData(x, y, 4), cfg,
                                   jax.random.key(1), StageContext(mesh=mesh, seed=0,
                                                                   workdir=workdir,
                                                                   progress=False))
    out = run(tmp_path / "full")
    assert jax.tree.structure(out) == jax.tree.structure(jax.device_get(variables))
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(out),
                                                     jax.tree.leaves(variables), strict=True)]
    assert any(changed)
    # Interrupted after its first epoch (as a Ctrl-C would), then rerun: resumes mid-stage
    # from the checkpoint and ends with the uninterrupted numbers.
    monkeypatch.setattr(runner, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", "1")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part")
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
    stage_dir = next(p for p in (tmp_path / "part" / "checkpoints").iterdir() if p.is_dir())
    assert sorted(int(p.name) for p in stage_dir.iterdir() if p.name.isdigit()) == [1]
    resumed = run(tmp_path / "part")
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
