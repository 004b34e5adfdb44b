"""The distillation step: base KD on clean (SSA-augmented) images + IKD's adversarial feature
augmentation, as one pure, jit-compiled, data-parallel step.

    state, metrics = distill_step(state, teacher_vars, batch, rng)

built by `make_distill_step(model_s, model_t, tx, config)`. Per step:

1. `prepare` (no gradients anywhere; the teacher is wrapped in `stop_gradient`):
   - `active` = IKD phase: always, or `state.step < config.ikd_steps` (the official two-phase
     schedule: the DFA configs for epochs 1-16 of 24, i.e. the first 2/3, then the plain base-KD
     config without the adversarial loss and without the sample-specific pipeline);
   - adversarial images: `batch["adv"]` (precomputed once against the teacher, uint8 or float;
     the official way) or, with `adv_source="online"`, MI-DI-FGSM against the teacher on the
     (already geometrically augmented) clean batch, regenerated every step (only computed in
     the IKD phase, through `lax.cond`; on CPU, computed and selected: see `cond` below);
   - SSA (`ftsam_jax.distill.augment`): noise on the clean image only for "small" samples
     (p 0.3), the same random crop for clean and adversarial images otherwise; the branch comes
     from `batch["ssa_small"]` if present, else from the Fourier statistic; plain images outside
     the IKD phase;
   - the frozen teacher (inference mode) on the clean images (logits and `feat_levels`
     features) and on the adversarial images (`afa_layers` features).
2. `loss` of the trainable tree {"student": params, "align": 1x1 align convs}:
       ce_weight * CE(S(x), y) + kd_weight * KD_T(S(x), T(x))
       + sum_l w_l * D(F_S^l(x), F_T^l(x))                          (feature KD, clean)
       + [active] * alpha_adv * sum_l sum((A_l F_S^l(x_adv) - F_T^l(x_adv))^2) / N   (AFA)
   The student's clean pass runs in training mode and gives the new BatchNorm statistics; the
   adversarial pass also runs in training mode (batch statistics) but its statistics are
   dropped, so BN running averages come from the clean pass only.
3. The optimizer: any optax transformation over the trainable tree. A chain with
   `ftsam_jax.sam_gradient` (any `GradientTransformationExtraArgs`) also gets
   `grad_fn(p)`, the gradient of the same loss at p on the same prepared inputs (a SAM student;
   the perturbed pass's BN statistics are dropped, as in `ftsam_jax.training.step.sam_step`).

Batch keys: "image" (NHWC, uint8 or float [0, 1]; after the epoch's preprocessing), "label"
(int32), optional "adv" (same shape as "image"; needed with AFA and `adv_source="precomputed"`),
optional "ssa_small" (bool, the SSA branch per example). Metrics: "loss", "accuracy" (student,
clean images), "ce", and "kd" / "feat" / "afa" / "ikd" (1 in the IKD phase) when used.

Data parallel: run under `jax.jit` with the batch sharded on the mesh's 'data' axis and the
state and teacher replicated. Random draws depend only on the step key and the batch shape
(JAX's partitionable threefry), and BatchNorm without an axis name uses the global batch, so the
result does not depend on the number of devices (tested: 8 devices = 1 device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ftsam_jax.distill.adversarial import AttackConfig, eval_apply, mi_di_fgsm
from ftsam_jax.distill.augment import SSAConfig, ssa_classification
from ftsam_jax.distill.losses import afa_loss, feature_kd_loss, init_align, kd_loss
from ftsam_jax.training.epoch import to_float
from ftsam_jax.training.step import cross_entropy, init_variables

__all__ = ["DistillConfig", "DistillState", "StudentTeacherState", "bind_teacher",
           "create_distill_state", "init_alignment", "make_distill_fns", "make_distill_step"]

Params = Any
Variables = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

ADV_SOURCES = ("precomputed", "online")
FEAT_KINDS = ("mse", "attention")


def compute_both_branches() -> bool:
    """Whether the IKD/plain phase switch computes both branches and selects one (`jnp.where`)
    instead of `lax.cond`. True on CPU: XLA:CPU runs convolutions inside a conditional tens of
    times slower than at top level (PreAct-ResNet18 width 16, gradient of a 64-image batch:
    0.27 s plain, 10 s inside `lax.cond`), so computing the unused branch too is far cheaper.
    Both ways give the same values."""
    return jax.default_backend() == "cpu"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Loss weights, feature levels and mode flags of the distillation step.

    Attributes:
      ce_weight, label_smoothing: the task loss on the clean images.
      kd_weight, temperature: logit KD (T^2-scaled KL).
      feat_levels, feat_weights, feat_kind, attention_p: feature KD on the clean images
        ("mse" with an align conv when widths differ, or NAD's "attention" maps with power p).
      afa_layers, alpha_adv: IKD's adversarial feature loss (off when alpha_adv == 0 or no
        layers).
      adv_source: "precomputed" (`batch["adv"]`, made beforehand) or "online" (MI-DI-FGSM every
        step).
      attack: the MI-DI-FGSM settings for the online mode.
      ssa, ssa_config: sample-specific augmentation in the IKD phase.
      ikd_steps: the IKD phase ends at this step count (None: never); afterwards plain base KD.
    """

    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    feat_levels: tuple[str, ...] = ()
    feat_weights: tuple[float, ...] = ()
    feat_kind: str = "mse"
    attention_p: float = 2.0
    afa_layers: tuple[str, ...] = ()
    alpha_adv: float = 0.0
    adv_source: str = "precomputed"
    attack: AttackConfig = AttackConfig()
    ssa: bool = False
    ssa_config: SSAConfig = SSAConfig()
    ikd_steps: int | None = None

    def __post_init__(self) -> None:
        if self.adv_source not in ADV_SOURCES:
            raise ValueError(f"adv_source must be one of {ADV_SOURCES}, got {self.adv_source!r}")
        if self.feat_kind not in FEAT_KINDS:
            raise ValueError(f"feat_kind must be one of {FEAT_KINDS}, got {self.feat_kind!r}")
        if len(self.feat_levels) != len(self.feat_weights):
            raise ValueError(f"{len(self.feat_levels)} feat_levels but "
                             f"{len(self.feat_weights)} feat_weights")
        if self.temperature <= 0 or self.alpha_adv < 0:
            raise ValueError("temperature must be > 0 and alpha_adv >= 0")

    @property
    def uses_afa(self) -> bool:
        return self.alpha_adv > 0 and bool(self.afa_layers)

    @property
    def uses_teacher_clean(self) -> bool:
        return self.kd_weight > 0 or bool(self.feat_levels)

    @property
    def phased(self) -> bool:
        return self.ikd_steps is not None and (self.uses_afa or self.ssa)


@flax.struct.dataclass
class DistillState:
    """The student's training state; `align` holds the 1x1 align convs ({"feat": {level: ...},
    "afa": {level: ...}}, empty when the widths match), optimised together with `params`."""

    step: jax.Array
    params: Params
    batch_stats: Params
    opt_state: optax.OptState
    align: Params

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def trainable(self) -> Params:
        return {"student": self.params, "align": self.align}


@flax.struct.dataclass
class StudentTeacherState:
    """A `DistillState` plus the frozen teacher's variables, as one pytree: the state of
    `make_epoch_fn` / `run_stage` loops (the teacher is an argument of the jitted step rather
    than a compile-time constant, and it travels with the checkpoints)."""

    student: DistillState
    teacher: Variables

    @property
    def variables(self) -> Variables:
        return self.student.variables


def bind_teacher(distill_step: Callable[[DistillState, Variables, Batch, jax.Array],
                                        tuple[DistillState, Metrics]]
                 ) -> Callable[[StudentTeacherState, Batch, jax.Array],
                               tuple[StudentTeacherState, Metrics]]:
    """`step(state, batch, rng)` over a `StudentTeacherState` (for `loop.make_epoch_fn`)."""

    def step(state: StudentTeacherState, batch: Batch, rng: jax.Array):
        student, metrics = distill_step(state.student, state.teacher, batch, rng)
        return state.replace(student=student), metrics

    return step


def _features(model: nn.Module, variables: Variables, x: jax.Array, levels: tuple[str, ...],
              train: bool) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """(logits, {level: feature}, new batch_stats) of one forward pass."""
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    logits, mut = model.apply(variables, x, train=train, mutable=mutable)
    inter = mut["intermediates"]
    missing = [k for k in levels if k not in inter]
    if missing:
        raise ValueError(f"levels {missing} are not sown by {type(model).__name__}; it sows "
                         f"{sorted(inter)}")
    feats = {k: inter[k][-1] for k in levels}
    return logits, feats, mut.get("batch_stats", variables.get("batch_stats", {}))


def init_alignment(model_s: nn.Module, student_vars: Variables, model_t: nn.Module | None,
                   teacher_vars: Variables | None, image_shape: tuple[int, ...],
                   config: DistillConfig, rng: jax.Array) -> Params:
    """1x1 align convs for the levels whose channel counts differ (mse feature KD and AFA)."""
    align: dict[str, dict[str, Any]] = {"feat": {}, "afa": {}}
    if model_t is None or teacher_vars is None:
        return align
    x = jnp.zeros((1, *image_shape), jnp.float32)
    levels = tuple(dict.fromkeys(config.feat_levels + config.afa_layers))
    if not levels:
        return align
    fs = jax.eval_shape(lambda v: _features(model_s, v, x, levels, False)[1], student_vars)
    ft = jax.eval_shape(lambda v: _features(model_t, v, x, levels, False)[1], teacher_vars)
    wanted = [("afa", k) for k in config.afa_layers if config.uses_afa]
    if config.feat_kind == "mse":
        wanted += [("feat", k) for k in config.feat_levels]
    for i, (group, k) in enumerate(wanted):
        cs, ct = fs[k].shape[-1], ft[k].shape[-1]
        if fs[k].shape[:-1] != ft[k].shape[:-1]:
            raise ValueError(f"level {k}: student {fs[k].shape} and teacher {ft[k].shape} "
                             "differ in spatial size")
        if cs != ct:
            align[group][k] = init_align(jax.random.fold_in(rng, i), cs, ct)
    return align


def create_distill_state(model_s: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                         image_shape: tuple[int, ...], *, variables: Variables | None = None,
                         model_t: nn.Module | None = None, teacher_vars: Variables | None = None,
                         config: DistillConfig = DistillConfig()) -> DistillState:
    """Initialises the student (or takes `variables`), the align convs and the optimizer."""
    init_rng, align_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model_s, init_rng, image_shape, train=False)
    align = init_alignment(model_s, variables, model_t, teacher_vars, image_shape, config,
                           align_rng)
    params = variables["params"]
    return DistillState(step=jnp.zeros([], jnp.int32), params=params,
                        batch_stats=variables.get("batch_stats", {}),
                        opt_state=tx.init({"student": params, "align": align}), align=align)


def make_distill_fns(model_s: nn.Module, model_t: nn.Module, config: DistillConfig
                     ) -> tuple[Callable[..., Batch], Callable[..., Any]]:
    """The two halves of the step, exposed for tests and custom loops.

    `prepare(teacher_vars, batch, rng, step) -> inputs` (augmentation, adversarial images,
    teacher outputs; all under stop_gradient) and
    `loss(trainable, batch_stats, inputs) -> (loss, (logits, new_batch_stats, parts))`.
    """
    cfg = config
    t_apply = eval_apply(model_t)
    afa_layers = tuple(cfg.afa_layers)
    feat_levels = tuple(cfg.feat_levels)

    def is_active(step: jax.Array) -> jax.Array:
        if cfg.ikd_steps is None:
            return jnp.asarray(True)
        return step < cfg.ikd_steps

    select = compute_both_branches()

    def cond(active: jax.Array, on: Callable[[], Any], off: Callable[[], Any]) -> Any:
        if not cfg.phased:
            return on()
        if select:
            return jax.tree.map(lambda a, b: jnp.where(active, a, b), on(), off())
        return jax.lax.cond(active, on, off)

    def prepare(teacher_vars: Variables, batch: Batch, rng: jax.Array, step: jax.Array
                ) -> Batch:
        teacher_vars = jax.lax.stop_gradient(teacher_vars)
        clean = to_float(batch["image"])
        labels = batch["label"]
        active = is_active(step)
        ssa_rng, atk_rng = jax.random.split(rng)
        inputs: Batch = {"label": labels, "active": active}
        adv = None
        if cfg.uses_afa:
            if cfg.adv_source == "precomputed":
                if "adv" not in batch:
                    raise ValueError("AFA with adv_source='precomputed' needs batch['adv']")
                adv = to_float(batch["adv"])
            else:
                adv = cond(active,
                           lambda: mi_di_fgsm(t_apply, teacher_vars, clean, labels, atk_rng,
                                              cfg.attack),
                           lambda: clean)
        if cfg.ssa:
            out = ssa_classification(ssa_rng, clean, adv, cfg.ssa_config,
                                     small=batch.get("ssa_small"))
            clean = jnp.where(active, out["image"], clean)
            if adv is not None:
                adv = jnp.where(active, out["adv"], adv)
        inputs["image"] = clean
        if cfg.uses_teacher_clean:
            t_logits, t_feats, _ = _features(model_t, teacher_vars, clean, feat_levels, False)
            inputs["t_logits"] = t_logits
            inputs["t_feats"] = t_feats
        if cfg.uses_afa:
            inputs["adv"] = adv

            def teacher_adv() -> dict[str, jax.Array]:
                return _features(model_t, teacher_vars, adv, afa_layers, False)[1]

            shapes = jax.eval_shape(teacher_adv)
            inputs["t_adv_feats"] = cond(
                active, teacher_adv,
                lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        return jax.lax.stop_gradient(inputs)

    def loss(trainable: Params, batch_stats: Params, inputs: Batch):
        params, align = trainable["student"], trainable["align"]
        variables = {"params": params, "batch_stats": batch_stats}
        logits, feats, new_stats = _features(model_s, variables, inputs["image"], feat_levels,
                                             True)
        ce = cross_entropy(logits, inputs["label"], cfg.label_smoothing).mean()
        total = cfg.ce_weight * ce
        parts = {"ce": ce}
        if cfg.kd_weight > 0:
            parts["kd"] = kd_loss(logits, inputs["t_logits"], cfg.temperature)
            total = total + cfg.kd_weight * parts["kd"]
        if feat_levels:
            parts["feat"] = feature_kd_loss(feats, inputs["t_feats"], cfg.feat_weights,
                                            feat_levels, cfg.feat_kind, cfg.attention_p,
                                            align=align["feat"])
            total = total + parts["feat"]
        if cfg.uses_afa:
            def afa() -> jax.Array:
                # Batch statistics for the adversarial pass, but its BN update is dropped.
                _, adv_feats, _ = _features(model_s, variables, inputs["adv"], afa_layers, True)
                return afa_loss(adv_feats, inputs["t_adv_feats"], cfg.alpha_adv, afa_layers,
                                align=align["afa"])

            parts["afa"] = cond(inputs["active"], afa, lambda: jnp.zeros((), jnp.float32))
            total = total + parts["afa"]
        if cfg.phased:
            parts["ikd"] = inputs["active"].astype(jnp.float32)
        return total, (logits, new_stats, parts)

    return prepare, loss


def make_distill_step(model_s: nn.Module, model_t: nn.Module, tx: optax.GradientTransformation,
                      config: DistillConfig = DistillConfig(), *, sam: bool | None = None
                      ) -> Callable[[DistillState, Variables, Batch, jax.Array],
                                    tuple[DistillState, Metrics]]:
    """`distill_step(state, teacher_vars, batch, rng) -> (state, metrics)` (module docstring).

    `sam=None` passes `grad_fn` to `tx.update` whenever `tx` accepts extra arguments (every
    `optax.chain`; only `sam_gradient` uses it); True/False forces it.
    """
    prepare, loss_fn = make_distill_fns(model_s, model_t, config)
    use_grad_fn = isinstance(tx, optax.GradientTransformationExtraArgs) if sam is None else sam

    def distill_step(state: DistillState, teacher_vars: Variables, batch: Batch,
                     rng: jax.Array) -> tuple[DistillState, Metrics]:
        inputs = prepare(teacher_vars, batch, rng, state.step)
        trainable = state.trainable
        (loss, (logits, batch_stats, parts)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable, state.batch_stats, inputs)
        if use_grad_fn:
            def grad_fn(p: Params) -> Params:
                return jax.grad(lambda q: loss_fn(q, state.batch_stats, inputs)[0])(p)

            updates, opt_state = tx.update(grads, state.opt_state, trainable, grad_fn=grad_fn)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        new_state = state.replace(step=state.step + 1, params=new["student"],
                                  align=new["align"], batch_stats=batch_stats,
                                  opt_state=opt_state)
        metrics = {"loss": loss,
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == inputs["label"]), **parts}
        return new_state, metrics

    return distill_step
