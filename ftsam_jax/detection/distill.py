"""IKD for detection: the student's detection loss + a base feature distiller (FGD or MGD) on
the FPN levels + adversarial feature augmentation (AFA), as one pure step
`detect_distill_step(state, teacher_params, batch, rng)`.

During the IKD phase (the official first 16 of 24 epochs; `batch["ikd"]` = 1) the objective is

    L = L_det(S; x) + sum_l [ KD(F^l_S(x), F^l_T(x); GT) + alpha_adv * sum (F^l_S(x_adv)
        - F^l_T(x_adv))^2 / N ]

(IKD paper Sec. 3.3; official `FGDDistiller` / `MGDDistiller.forward_train` + `AdvFeatureLoss`),
with KD the base distiller (`DetectDistillConfig.base`: `FGDConfig`, `MGDConfig`, any
`ftsam_jax.detection.base.FeatureDistiller`; the IKD terms never look at which), x the
sample-specifically augmented image and x_adv the teacher's precomputed MI-DI-FGSM image (same
geometry, no noise: `ftsam_jax.distill.augment.ssa_boxes`); after it (`batch["ikd"]` = 0) the
AFA term is off and the objective is the plain base KD. The teacher is frozen (its parameters
are an argument, never differentiated); the trainable set is the student and the base
distiller's modules (`params[base.name]`).
`detection_objective` is the teacher's summed focal classification loss on the ground truth,
what the official attack ascends (`mi_di_fgsm(..., objective=...)`).

Default alpha_adv = 1e-5, the official RetinaNet/RepPoints configs' value for 256-channel
features (to be rescaled for the compact detector on a held-out split, as FGD's weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ftsam_jax.detection.base import DistillInputs, FeatureDistiller
from ftsam_jax.detection.fgd import FGDConfig
from ftsam_jax.detection.losses import detection_loss, focal_sum
from ftsam_jax.detection.step import batch_targets
from ftsam_jax.distill.augment import SSAConfig, ssa_boxes
from ftsam_jax.training.epoch import to_float

__all__ = ["DetectDistillConfig", "DetectDistillState", "adversarial_set",
           "create_detect_distill_state", "detection_objective", "make_detect_distill_step"]

Batch = dict[str, jax.Array]
# The base distiller's key is fold_in(step rng, BASE_STREAM): its draws (MGD's masks) are
# independent of SSA's, which uses the step rng itself.
BASE_STREAM = 0x6D6764


@dataclasses.dataclass(frozen=True)
class DetectDistillConfig:
    """base: the base feature distiller (FGDConfig, MGDConfig; None: none); alpha_adv: the
    AFA weight (0: no AFA); levels: the FPN features distilled."""

    base: FeatureDistiller | None = FGDConfig()
    alpha_adv: float = 1e-5
    levels: Sequence[str] = ("p3", "p4", "p5")

    def record(self) -> dict[str, Any]:
        """The settings as results.json records them: {base name: its fields (absent without
        one), "alpha_adv", "levels"} (an FGD run's record as before the base interface)."""
        out = {} if self.base is None else {self.base.name: dataclasses.asdict(self.base)}
        return json.loads(json.dumps({**out, "alpha_adv": self.alpha_adv,
                                      "levels": list(self.levels)}))


@flax.struct.dataclass
class DetectDistillState:
    """params = {"student": detector params, base.name: {level: the base distiller's
    modules}} (e.g. "fgd": {level: {"student", "teacher"}} relation modules)."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState


def detection_objective(num_classes: int, image_size: int) -> Callable[[Any, Batch], jax.Array]:
    """`(detector outputs, {"boxes", "labels", "mask"}) -> summed focal classification loss`."""

    def objective(outputs: dict[str, jax.Array], gt: Batch) -> jax.Array:
        return focal_sum(outputs["cls"], batch_targets(gt, image_size)["labels"], num_classes)

    return objective


def _features(model: nn.Module, params: Any, x: jax.Array, levels: Sequence[str]
              ) -> tuple[dict[str, jax.Array], list[jax.Array]]:
    out, state = model.apply({"params": params}, x, mutable=["intermediates"])
    return out, [state["intermediates"][name][0] for name in levels]


def create_detect_distill_state(student: nn.Module, tx: optax.GradientTransformation,
                                rng: jax.Array, image_size: int, config: DetectDistillConfig,
                                student_params: Any | None = None,
                                teacher: nn.Module | None = None) -> DetectDistillState:
    """The student's params (fresh or given) and, with a base distiller, its modules
    (`config.base.init`: sized from the student's features and the teacher's, whose shapes
    come from `teacher`, else are taken to equal the student's). Built as one compiled program
    (eager, its many small ops each compile on first use)."""

    def build(rng: jax.Array, given: Any | None) -> dict[str, Any]:
        k_model, k_base = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        student_params = student.init(k_model, x)["params"] if given is None else given
        params: dict[str, Any] = {"student": student_params}
        if config.base is not None:
            _, feats = _features(student, student_params, x, config.levels)
            t_feats = feats if teacher is None else jax.eval_shape(
                lambda k, x: _features(teacher, teacher.init(k, x)["params"], x,
                                       config.levels)[1], k_model, x)
            params[config.base.name] = config.base.init(k_base, tuple(config.levels), feats,
                                                        t_feats)
        return params

    params = jax.jit(build)(rng, student_params)
    return DetectDistillState(step=jnp.zeros([], jnp.int32), params=params,
                              opt_state=tx.init(params))


def make_detect_distill_step(student: nn.Module, teacher: nn.Module | None,
                             tx: optax.GradientTransformation, config: DetectDistillConfig,
                             num_classes: int, image_size: int, *,
                             ikd_steps: int | None = None, ssa: SSAConfig | None = None
                             ) -> Callable[[DetectDistillState, Any, Batch, jax.Array],
                                           tuple[DetectDistillState, dict[str, jax.Array]]]:
    """`step(state, teacher_params, batch, rng)`; batch: "image", "boxes", "labels", "mask",
    and for AFA "adv" (same geometry as "image"). The IKD phase is `batch["ikd"]` (1.0 / 0.0)
    if given, else `state.step < ikd_steps` (always on when `ikd_steps` is None). With `ssa`,
    the IKD phase applies the official sample-specific augmentation to (image, adv, boxes)
    jointly (`ssa_boxes`: noise for all-small images, a random crop otherwise). Any optax chain
    works, SAM included (it gets `grad_fn`)."""
    hw = (image_size, image_size)
    levels = tuple(config.levels)
    base = config.base
    needs_teacher = base is not None or config.alpha_adv > 0
    if needs_teacher and teacher is None:
        raise ValueError("the base distiller (FGD, MGD) and AFA need a teacher")

    def loss_fn(params: Any, teacher_params: Any, batch: Batch, rng: jax.Array):
        x = to_float(batch["image"])
        out, fs = _features(student, params["student"], x, levels)
        parts = detection_loss(out["cls"], out["ltrb"], out["ctr"],
                               batch_targets(batch, image_size), num_classes)
        total = parts["loss"]
        metrics = {"det": parts["loss"]}
        if needs_teacher:
            teacher_params = jax.lax.stop_gradient(teacher_params)
            _, ft = _features(teacher, teacher_params, x, levels)
        if base is not None:
            inputs = DistillInputs(boxes=batch["boxes"], valid=batch["mask"], image_hw=hw,
                                   rng=jax.random.fold_in(rng, BASE_STREAM))
            kd = base.loss(params[base.name], levels, fs, ft, inputs)
            total, metrics[base.name] = total + kd, kd
        if config.alpha_adv > 0 and "adv" in batch:
            xa = to_float(batch["adv"])
            _, fsa = _features(student, params["student"], xa, levels)
            _, fta = _features(teacher, teacher_params, xa, levels)
            n = xa.shape[0]
            afa = config.alpha_adv * sum(jnp.sum((s - t) ** 2) / n
                                         for s, t in zip(fsa, fta, strict=True))
            afa = afa * batch.get("ikd", jnp.ones((), jnp.float32))
            total, metrics["afa"] = total + afa, afa
        metrics["loss"] = total
        return total, metrics

    def step(state: DetectDistillState, teacher_params: Any, batch: Batch, rng: jax.Array):
        if "ikd" in batch:
            phase = jnp.asarray(batch["ikd"], jnp.float32)
        elif ikd_steps is not None:
            phase = (state.step < ikd_steps).astype(jnp.float32)
        else:
            phase = jnp.ones((), jnp.float32)
        batch = {**batch, "ikd": phase}
        if ssa is not None:
            image = to_float(batch["image"])
            adv = to_float(batch["adv"]) if "adv" in batch else image
            aug = ssa_boxes(rng, image, adv, batch["boxes"], batch["mask"], ssa)
            on = phase > 0
            batch.update(image=jnp.where(on, aug["image"], image),
                         boxes=jnp.where(on, aug["boxes"], batch["boxes"].astype(jnp.float32)),
                         mask=jnp.where(on, aug["valid"], batch["mask"]))
            if "adv" in batch:
                batch["adv"] = jnp.where(on, aug["adv"], adv)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, teacher_params, batch, rng)
        grad_fn = lambda p: jax.grad(lambda q: loss_fn(q, teacher_params, batch, rng)[0])(p)
        updates, opt_state = optax.with_extra_args_support(tx).update(
            grads, state.opt_state, state.params, grad_fn=grad_fn)
        return state.replace(step=state.step + 1,
                             params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    return step


@functools.cache
def _objective(num_classes: int, image_size: int) -> Callable[[Any, Batch], jax.Array]:
    """One objective per (classes, size): every adversarial set of a run shares one compiled
    attack."""
    return detection_objective(num_classes, image_size)


def adversarial_set(teacher: nn.Module, params: Any, data: Any, rng: jax.Array, mesh: Any,
                    batch_size: int, attack: Any = None) -> Any:
    """uint8 MI-DI-FGSM images of a detection split (`DetectionData`) against the teacher's
    classification loss (`detection_objective`; `attack`: an `AttackConfig`, default its eps
    8/255, 5 steps): the AFA inputs. Example i uses key fold_in(rng, i), so the set depends
    neither on the batch size nor on the device count."""
    from ftsam_jax.distill.adversarial import AttackConfig, precompute_adversarial

    gt = {"boxes": data.boxes, "labels": data.labels, "mask": data.mask}
    return precompute_adversarial(
        teacher.apply, {"params": params}, data.images, gt, rng, mesh=mesh,
        batch_size=batch_size, config=attack or AttackConfig(),
        objective=_objective(len(data.class_names), data.images.shape[1]))
