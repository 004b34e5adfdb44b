"""IKD for detection: the distillation step (FGD + AFA, phases, frozen teacher, SAM, 8 devices
== 1) and the detector attack (it raises the teacher's classification loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax import parallel
from ftsam_jax.detection.distill import (
    DetectDistillConfig,
    create_detect_distill_state,
    detection_objective,
    make_detect_distill_step,
)
from ftsam_jax.distill.adversarial import AttackConfig, mi_di_fgsm
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.training.step import init_variables
from tests.test_detector import toy_scenes


@pytest.fixture(scope="module")
def setup():
    data = toy_scenes(8, size=64)
    teacher = FCOS(num_classes=4, width=16, fpn_channels=16)
    student = FCOS(num_classes=4, width=8, fpn_channels=16)
    t_params = init_variables(teacher, jax.random.key(1), (64, 64, 3))["params"]
    batch = {"image": jnp.asarray(data.images), "boxes": jnp.asarray(data.boxes),
             "labels": jnp.asarray(data.labels), "mask": jnp.asarray(data.mask)}
    noise = np.random.default_rng(0).integers(-8, 9, data.images.shape)
    batch["adv"] = jnp.asarray(np.clip(data.images.astype(int) + noise, 0, 255), jnp.uint8)
    return teacher, student, t_params, batch


def _step(setup, config, tx):
    teacher, student = setup[:2]
    return jax.jit(make_detect_distill_step(student, teacher, tx, config, 4, 64))


def _run(setup, config, tx, batch_update=None, steps=1, mesh=None, step=None):
    """`steps` steps from a fresh state; pass `step` (from `_step`) to reuse one jitted step:
    tracing and compiling it is most of these tests' time."""
    teacher, student, t_params, batch = setup
    batch = {**batch, **(batch_update or {})}
    state = create_detect_distill_state(student, tx, jax.random.key(0), 64, config)
    step = step or _step(setup, config, tx)
    if mesh is not None:
        state = parallel.replicate(state, mesh)
        t_params = parallel.replicate(t_params, mesh)
        batch = {k: jax.device_put(v, parallel.data_sharding(mesh) if jnp.ndim(v)
                                   else parallel.replicated(mesh)) for k, v in batch.items()}
    for _ in range(steps):
        state, metrics = step(state, t_params, batch, jax.random.key(0))
    return state, metrics


def test_fgd_and_afa_terms_train_and_the_teacher_is_frozen(setup):
    tx = optax.adam(1e-3)
    cfg = DetectDistillConfig(alpha_adv=1e-3)
    s0 = create_detect_distill_state(setup[1], tx, jax.random.key(0), 64, cfg)
    state, m = _run(setup, cfg, tx, {"ikd": jnp.float32(1.0)}, steps=3)
    assert {"det", "fgd", "afa", "loss"} <= set(m) and float(m["afa"]) > 0
    assert float(m["loss"]) == pytest.approx(float(m["det"] + m["fgd"] + m["afa"]), rel=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params["fgd"],
                         s0.params["fgd"])
    assert max(jax.tree.leaves(moved["p3"]["student"])) > 0  # FGD's relation modules train
    assert set(state.params) == {"student", "fgd"}  # the teacher is not among the trainables


def test_plain_phase_ignores_the_adversarial_images(setup):
    tx = optax.sgd(0.01)
    cfg = DetectDistillConfig(alpha_adv=1e-3)
    other = {"adv": jnp.zeros_like(setup[3]["adv"]), "ikd": jnp.float32(0.0)}
    step = _step(setup, cfg, tx)
    a, ma = _run(setup, cfg, tx, {"ikd": jnp.float32(0.0)}, step=step)
    b, _ = _run(setup, cfg, tx, other, step=step)
    c, mc = _run(setup, cfg, tx, {"ikd": jnp.float32(1.0)}, step=step)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert float(ma["afa"]) == 0.0 and float(mc["afa"]) > 0
    assert not np.allclose(a.params["student"]["fpn3"]["kernel"],
                           c.params["student"]["fpn3"]["kernel"])


def test_sam_step_on_eight_devices_equals_one(setup):
    tx = ftsam_jax.sam(optax.sgd(0.01, momentum=0.9), 0.05)
    cfg = DetectDistillConfig(alpha_adv=1e-3)
    step = _step(setup, cfg, tx)
    one, m1 = _run(setup, cfg, tx, {"ikd": jnp.float32(1.0)}, step=step)
    eight, m8 = _run(setup, cfg, tx, {"ikd": jnp.float32(1.0)}, mesh=parallel.make_mesh(),
                     step=step)
    assert float(m1["loss"]) == pytest.approx(float(m8["loss"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 one.params, eight.params)


def test_student_without_teacher_needs_none():
    student = FCOS(num_classes=4, width=8, fpn_channels=16)
    make_detect_distill_step(student, None, optax.sgd(0.1),
                             DetectDistillConfig(base=None, alpha_adv=0.0), 4, 64)
    with pytest.raises(ValueError, match="teacher"):
        make_detect_distill_step(student, None, optax.sgd(0.1), DetectDistillConfig(), 4, 64)


def test_attack_raises_the_teachers_classification_loss(setup):
    teacher, _, t_params, batch = setup
    objective = detection_objective(4, 64)
    apply = lambda v, x: teacher.apply(v, x)
    gt = {k: batch[k] for k in ("boxes", "labels", "mask")}
    adv = jax.jit(lambda x: mi_di_fgsm(apply, {"params": t_params}, x, gt, jax.random.key(0),
                                       AttackConfig(), objective=objective))(batch["image"])
    x0 = batch["image"].astype(jnp.float32) / 255.0
    assert float(jnp.abs(adv - x0).max()) <= 8 / 255 + 1e-6
    loss = jax.jit(lambda x: objective(apply({"params": t_params}, x), gt))
    assert float(loss(adv)) > float(loss(x0))
