"""NC: Neural Cleanse (Wang et al., IEEE S&P 2019).

Detection by trigger reverse-engineering, then mitigation by unlearning:

1. For every label t = 0..K-1, the smallest trigger that sends the benign images to t is
   searched: a mask m (H x W x 1, shared by the channels) and a pattern p (H x W x C), both in
   [0, 1] through m = tanh(a) / (2 + eps) + 0.5, p = tanh(b) / (2 + eps) + 0.5 (eps = 1e-7),
   stamped as x' = (1 - m) * x + m * p on the [0, 1] image (the model normalises inside; the
   same stamp as BackdoorBench's on normalised images, since the normalisation is affine per
   channel), minimising  CE(f(x'), t) + cost * |m|_1  with Adam (lr 0.1, betas (0.5, 0.9))
   over the benign subset (crop+flip), the classifier frozen in inference mode. a = b = 1 at
   the start (m = p = 0.88), the same for every label.
2. The cost is controlled per epoch from the epoch's mean attack accuracy acc (the batches'
   accuracies averaged) and mean |m|_1 reg (`schedule_epoch`, the published rules):
   - best: if acc >= 0.98 and reg < reg_best, the current (m, p) is the label's trigger;
   - early stop: once a best exists, an epoch whose reg_best >= 0.99 * (the previous minimum)
     counts, one that improves by more resets the count; the search stops when the count
     reaches 25 and the cost has been raised and lowered at least once each;
   - otherwise (no stop): with cost 0, 5 successful epochs in a row set cost = init_cost and
     reset the counters and flags (only reachable with `reset_cost_to_zero`); then 5 epochs in
     a row with acc >= 0.98 multiply the cost by 2, 5 in a row below divide it by 2^1.5
     (either resets its count); init_cost 1e-3; at most 80 epochs.
   A label never reaching the threshold keeps its last (m, p).
3. Outlier test on the masks' L1 norms l_k: median med, MAD = 1.4826 * median(|l - med|), the
   anomaly index of label k, |l_k - med| / MAD; label k is flagged when l_k <= med (the small
   side) and its index > 2. The published "anomaly index" of the model is that of the smallest
   norm (`min_anomaly_index`). With MAD = 0 a label at the median gets index 0 and any other
   index +inf (recorded as null).
4. No label flagged: the backdoored model is returned unchanged (its row's `details` say so).
   Otherwise the benign subset is split at random: the first (1 - 0.2) keep their images, the
   last 20% are stamped with the reversed trigger of each flagged label (one copy per label)
   keeping their true labels, and the model is fine-tuned on that set: SGD lr 0.01, momentum
   0.9, weight decay 5e-4, cosine per epoch (T_max = epochs), batch 256, 100 epochs, crop+flip.

Every label's search is one epoch of the resumable stage `nc_trigger` (checkpointed label by
label); inside, each trigger epoch is one compiled epoch (`make_epoch_fn`: a `lax.scan` on
accelerators, a compiled step per batch on CPU), the cost schedule runs on the host between
epochs (one sync per epoch). The label is a traced value, so one compilation serves all labels.
The unlearning is the stage `nc_unlearn`. Each row of results.json gets `details`: the norms,
anomaly indices, flagged labels, each label's search (epochs, final cost, attack accuracy of the
kept trigger, whether it reached the threshold) and whether the model was unlearned.

Settings (BackdoorBench `config/defense/nc/cifar10.yaml`): nc_epoch 80, mask_lr 0.1,
init_cost 1e-3, atk_succ_threshold 98 (%), patience 5, cost_multiplier 2, early stop on with
threshold 0.99 and patience 25, EPSILON 1e-7, ratio 0.05, unlearning_ratio 0.2, epochs 100,
batch 256, SGD 0.01 / 0.9 / 5e-4, CosineAnnealingLR (T_max 100). `cpu` is the same; `smoke`
runs 2 trigger epochs and 2 unlearning epochs at batch 64.

References: Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks, IEEE S&P 2019; code `bolunwang/backdoor` (`visualizer.py`, `mad_outlier_detection.py`,
commit e857774); BackdoorBench `defense/nc.py` + `config/defense/nc/cifar10.yaml` (commit
f02e353).

Differences from BackdoorBench (deliberate):
- The defended model is the unlearned one. BackdoorBench fine-tunes the model its trainer was
  built with and then saves a freshly loaded, untouched copy of the backdoored weights as the
  defense result (its per-epoch metrics do come from the fine-tuned model).
- The stamp for unlearning uses the reversed mask and pattern themselves, x' = (1 - m) x + m p
  on [0, 1] images rounded to uint8 after clipping. BackdoorBench stamps from the PNG files of
  the mask and of m * p written with min-max normalisation (so both are rescaled to [0, 1]
  before use), adds them as x (1 - m') + (m p)' * 255 and casts to uint8 before clipping
  (values above 255 wrap around).
- A label whose search never reaches the threshold keeps its last mask (the published
  `visualize`'s "save the final version"); BackdoorBench keeps the mask of the first epoch
  that did not stop early (its fallback is set once, then only replaced by a successful one).
- The unlearning set is built from the same benign subset as the search (split at random by
  the defense's stream); BackdoorBench draws a second random 5% subset (another
  `choose_index` call) and splits it by position.
- The attack threshold is a fraction (0.98) compared with the mean of the batch accuracies as
  fractions; BackdoorBench compares percentages (98) - the same rule.
- The last partial batch is filled from a second permutation (our epochs' `drop_last=False`),
  in both phases; PyTorch's DataLoader runs a smaller last batch.
- The classifier in the search is our frozen model in inference mode (`train=False`), the
  stamp in [0, 1] space before the model's own normalisation (equivalent, see 1.).
- `n_times_test` (1 in the config) is not a setting: one search per label. `cleaning_ratio`
  (parsed, unused there) does not exist here. `to_file` outputs are `details` in results.json.
- MAD = 0 is defined (see 3.); BackdoorBench divides by zero (inf / nan).
Differences of BackdoorBench (kept here) from the published code: a = b = 1 at the start
instead of a random mask and pattern; the cost starts at init_cost (the published default
resets it to 0 first: `reset_cost_to_zero=True` runs that); the attack threshold 0.98 (0.99
published), patience 5 epochs (5 mini-batch rounds of 1,000 samples in the GTSRB example) and
early-stop threshold 0.99 (1.0 in the example); tanh scaled by 1/(2 + eps), not 1/(2 - eps).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftsam_jax import parallel
from ftsam_jax.defenses.base import BenignData, Defended
from ftsam_jax.training.epoch import make_epoch_fn, standard_preprocess
from ftsam_jax.training.recipe import FitConfig, fit
from ftsam_jax.training.stage import StageContext, run_stage
from ftsam_jax.training.step import cross_entropy

__all__ = ["CostSchedule", "NCConfig", "TriggerState", "anomaly_indices", "flagged_labels",
           "mask_and_pattern", "nc", "nc_config", "reverse_engineer", "schedule_epoch",
           "stamp", "trigger_step", "unlearning_set"]

Variables = dict[str, Any]
EPSILON = 1e-7  # the tanh's scale 1 / (2 + EPSILON) keeps m and p inside (0, 1)
MAD_CONSTANT = 1.4826  # MAD of a normal distribution's sample -> its standard deviation


@dataclasses.dataclass(frozen=True)
class NCConfig:
    """Neural Cleanse hyperparameters (see the module docstring).

    Attributes:
      trigger_epochs: the search's maximum epochs per label (BackdoorBench's nc_epoch).
      batch_size: batch of both the search and the unlearning.
      mask_lr, betas: Adam of the search.
      init_cost, cost_multiplier, patience: the cost schedule (up x multiplier, down
        / multiplier^1.5, after `patience` epochs in a row above / below the threshold).
      attack_threshold: the attack accuracy (fraction) a trigger must reach.
      early_stop, early_stop_threshold, early_stop_patience: the search's early stop.
      reset_cost_to_zero: start the search at cost 0 (the published default).
      anomaly_threshold: a label whose anomaly index exceeds it (on the small side) is flagged.
      unlearning_ratio: the fraction of the benign subset stamped with each flagged trigger.
      epochs, lr, momentum, weight_decay, schedule, t_max: the unlearning's SGD recipe
        (t_max None: the epochs).
      augment: random crop (4-px padding) + horizontal flip, in the search and the unlearning.
    """

    trigger_epochs: int = 80
    batch_size: int = 256
    mask_lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    cost_multiplier: float = 2.0
    patience: int = 5
    attack_threshold: float = 0.98
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    reset_cost_to_zero: bool = False
    anomaly_threshold: float = 2.0
    unlearning_ratio: float = 0.2
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine_epoch"
    t_max: int | None = None
    augment: bool = True

    def __post_init__(self) -> None:
        finite = lambda v: isinstance(v, int | float) and math.isfinite(v)
        checks = [
            (self.trigger_epochs >= 1, f"trigger_epochs must be >= 1, got {self.trigger_epochs}"),
            (finite(self.mask_lr) and self.mask_lr > 0,
             f"mask_lr must be a finite number > 0, got {self.mask_lr}"),
            (len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}"),
            (finite(self.init_cost) and self.init_cost > 0,
             f"init_cost must be a finite number > 0, got {self.init_cost}"),
            (finite(self.cost_multiplier) and self.cost_multiplier > 1,
             f"cost_multiplier must be a finite number > 1, got {self.cost_multiplier}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (finite(self.attack_threshold) and 0 < self.attack_threshold <= 1,
             f"attack_threshold must lie in (0, 1] (a fraction), got {self.attack_threshold}"),
            (finite(self.early_stop_threshold) and 0 < self.early_stop_threshold <= 1,
             f"early_stop_threshold must lie in (0, 1], got {self.early_stop_threshold}"),
            (self.early_stop_patience >= 1,
             f"early_stop_patience must be >= 1, got {self.early_stop_patience}"),
            (finite(self.anomaly_threshold) and self.anomaly_threshold > 0,
             f"anomaly_threshold must be a finite number > 0, got {self.anomaly_threshold}"),
            (finite(self.unlearning_ratio) and 0 < self.unlearning_ratio < 1,
             f"unlearning_ratio must lie in (0, 1), got {self.unlearning_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.fit_config()  # FitConfig's checks (epochs, batch_size, lr, schedule)

    def fit_config(self) -> FitConfig:
        """The unlearning's recipe."""
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         momentum=self.momentum, weight_decay=self.weight_decay,
                         schedule=self.schedule, t_max=self.t_max, label_smoothing=0.0,
                         sam=False, augment=self.augment, drop_last=False)


def nc_config(preset: str = "paper") -> NCConfig:
    """BackdoorBench's settings; `cpu` the same; `smoke` 2 + 2 epochs at batch 64."""
    if preset == "smoke":
        return NCConfig(trigger_epochs=2, epochs=2, batch_size=64)
    if preset not in ("paper", "cpu"):
        raise ValueError(f"unknown preset {preset!r}")
    return NCConfig()


# ----------------------------------------------------------------------------------------------
# The cost schedule (host side, one call per epoch)


@dataclasses.dataclass(frozen=True)
class CostSchedule:
    """The search's schedule state between epochs (the published `visualize` loop's locals)."""

    cost: float
    reg_best: float = math.inf
    up_counter: int = 0
    down_counter: int = 0
    set_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    early_stop_counter: int = 0
    early_stop_reg_best: float = math.inf

    @classmethod
    def start(cls, config: NCConfig) -> CostSchedule:
        return cls(cost=0.0 if config.reset_cost_to_zero else config.init_cost)


def schedule_epoch(s: CostSchedule, acc: float, reg: float, config: NCConfig
                   ) -> tuple[CostSchedule, bool, bool]:
    """One epoch's end: `(schedule, improved, stop)` from the epoch's mean attack accuracy
    `acc` (fraction) and mean mask L1 norm `reg`. `improved`: the current trigger becomes the
    label's best; `stop`: the search ends now (the cost is then left as it is)."""
    success = acc >= config.attack_threshold
    improved = success and reg < s.reg_best
    reg_best = reg if improved else s.reg_best
    es_counter, es_best, stop = s.early_stop_counter, s.early_stop_reg_best, False
    if config.early_stop:
        if reg_best < math.inf:
            es_counter = es_counter + 1 if reg_best >= config.early_stop_threshold * es_best else 0
        es_best = min(es_best, reg_best)
        stop = s.up_flag and s.down_flag and es_counter >= config.early_stop_patience
    s = dataclasses.replace(s, reg_best=reg_best, early_stop_counter=es_counter,
                            early_stop_reg_best=es_best)
    if stop:
        return s, improved, True
    cost, up, down, set_counter = s.cost, s.up_counter, s.down_counter, s.set_counter
    up_flag, down_flag = s.up_flag, s.down_flag
    if cost == 0 and success:
        set_counter += 1
        if set_counter >= config.patience:
            cost, up, down, up_flag, down_flag = config.init_cost, 0, 0, False, False
    else:
        set_counter = 0
    up, down = (up + 1, 0) if success else (0, down + 1)
    if up >= config.patience:
        up, cost, up_flag = 0, cost * config.cost_multiplier, True
    elif down >= config.patience:
        down, cost, down_flag = 0, cost / config.cost_multiplier ** 1.5, True
    return dataclasses.replace(s, cost=cost, up_counter=up, down_counter=down,
                               set_counter=set_counter, up_flag=up_flag,
                               down_flag=down_flag), improved, False


# ----------------------------------------------------------------------------------------------
# The search


@flax.struct.dataclass
class TriggerState:
    """One label's search: the mask's and pattern's tanh-space variables, Adam's state, the
    current cost, the target label and the frozen model (carried, not trained)."""

    step: jax.Array
    mask_logit: jax.Array  # (H, W, 1)
    pattern_logit: jax.Array  # (H, W, C)
    opt_state: optax.OptState
    cost: jax.Array
    target: jax.Array
    model: Variables


def mask_and_pattern(mask_logit: jax.Array, pattern_logit: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """m = tanh(a) / (2 + eps) + 0.5, p = tanh(b) / (2 + eps) + 0.5."""
    return (jnp.tanh(mask_logit) / (2 + EPSILON) + 0.5,
            jnp.tanh(pattern_logit) / (2 + EPSILON) + 0.5)


def stamp(images: Any, mask: Any, pattern: Any) -> Any:
    """x' = (1 - m) * x + m * p (images in [0, 1], NHWC; m broadcast over the channels)."""
    return (1 - mask) * images + mask * pattern


def trigger_step(state: TriggerState, batch: dict[str, jax.Array], rng: jax.Array, *,
                 apply_fn: Any, tx: optax.GradientTransformation
                 ) -> tuple[TriggerState, dict[str, jax.Array]]:
    """One Adam step on CE(f(x'), target) + cost * |m|_1 (the mask's L1 before the step)."""
    del rng
    target = jnp.full(batch["image"].shape[:1], state.target, jnp.int32)

    def loss_fn(logit_vars):
        m, p = mask_and_pattern(*logit_vars)
        logits = apply_fn(state.model, stamp(batch["image"], m, p), train=False)
        ce = cross_entropy(logits, target).mean()
        reg = jnp.sum(jnp.abs(m))
        return ce + state.cost * reg, (ce, reg, logits)

    params = (state.mask_logit, state.pattern_logit)
    (loss, (ce, reg, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    mask_logit, pattern_logit = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == target)
    return state.replace(step=state.step + 1, mask_logit=mask_logit,
                         pattern_logit=pattern_logit, opt_state=opt_state), {
        "loss": loss, "ce": ce, "reg": reg, "accuracy": acc}


def reverse_engineer(model: nn.Module, variables: Variables, benign: BenignData,
                     config: NCConfig, rng: jax.Array, ctx: StageContext
                     ) -> dict[str, np.ndarray]:
    """Every label's trigger: the stage `nc_trigger`, one epoch per label (resumable label by
    label). Returns host arrays: masks (K, H, W, 1), patterns (K, H, W, C), l1_norms (K,),
    epochs (K,) run, final_cost (K,), attack_acc (K,) of the kept trigger's epoch, found (K,)
    whether the threshold was reached."""
    mesh = ctx.mesh
    parallel.check_batch_size(config.batch_size, mesh)
    repl = parallel.replicated(mesh)
    k_count = benign.num_classes
    h, w, c = benign.x.shape[1:]
    tx = optax.adam(config.mask_lr, b1=config.betas[0], b2=config.betas[1])
    model_vars = {"params": variables["params"], **(
        {"batch_stats": variables["batch_stats"]} if "batch_stats" in variables else {})}
    epoch = make_epoch_fn(partial(trigger_step, apply_fn=model.apply, tx=tx), mesh=mesh,
                          num_examples=len(benign.y), batch_size=config.batch_size,
                          preprocess=standard_preprocess(config.augment), drop_last=False)
    images = jax.device_put(benign.x, repl)
    labels = jax.device_put(np.asarray(benign.y, np.int32), repl)
    ones = lambda *shape: jnp.ones(shape, jnp.float32)  # a = b = 1: m = p = 0.88

    def search(label: int, rng_: jax.Array) -> tuple[dict[str, Any], float]:
        logit_vars = (ones(h, w, 1), ones(h, w, c))
        state = jax.device_put(TriggerState(
            jnp.zeros([], jnp.int32), *logit_vars, tx.init(logit_vars), jnp.zeros([]),
            jnp.int32(label), model_vars), repl)
        sched = CostSchedule.start(config)
        best, last_loss, e = None, math.nan, 0
        for e in range(config.trigger_epochs):
            state = state.replace(cost=jax.device_put(jnp.float32(sched.cost), repl))
            state, metrics = epoch(state, images, labels, jax.random.fold_in(rng_, e))
            acc, reg = float(metrics["accuracy"]), float(metrics["reg"])
            last_loss = float(metrics["loss"])
            sched, improved, stop = schedule_epoch(sched, acc, reg, config)
            if improved:
                best = (*jax.device_get(mask_and_pattern(state.mask_logit,
                                                         state.pattern_logit)), acc)
            if stop:
                break
        found = best is not None
        if best is None:  # never successful: the last trigger
            best = (*jax.device_get(mask_and_pattern(state.mask_logit, state.pattern_logit)),
                    acc)
        m, p, best_acc = best
        return {"mask": np.asarray(m, np.float32), "pattern": np.asarray(p, np.float32),
                "epochs": e + 1, "cost": sched.cost, "acc": best_acc, "found": found}, last_loss

    def one_label(st: dict[str, Any], rng_: jax.Array) -> tuple[dict[str, Any], dict]:
        st = jax.device_get(st)
        label = int(st["label"])
        out, loss = search(label, rng_)
        st = dict(st)
        st["masks"] = st["masks"].copy()
        st["masks"][label] = out["mask"]
        st["patterns"] = st["patterns"].copy()
        st["patterns"][label] = out["pattern"]
        norm = float(np.sum(np.abs(out["mask"]), dtype=np.float32))
        for key, value in (("l1_norms", norm), ("epochs", out["epochs"]),
                           ("final_cost", out["cost"]), ("attack_acc", out["acc"]),
                           ("found", out["found"])):
            st[key] = st[key].copy()
            st[key][label] = value
        st["label"] = np.int32(label + 1)
        metrics = {"loss": loss, "label": float(label), "l1_norm": norm,
                   "epochs": float(out["epochs"]), "cost": float(out["cost"]),
                   "attack_acc": float(out["acc"]), "found": float(out["found"])}
        return jax.device_put(st, repl), metrics

    init = {"label": np.int32(0),
            "masks": np.zeros((k_count, h, w, 1), np.float32),
            "patterns": np.zeros((k_count, h, w, c), np.float32),
            "l1_norms": np.zeros((k_count,), np.float32),
            "epochs": np.zeros((k_count,), np.int32),
            "final_cost": np.zeros((k_count,), np.float32),
            "attack_acc": np.zeros((k_count,), np.float32),
            "found": np.zeros((k_count,), np.int32)}
    st, _ = run_stage("nc_trigger", parallel.replicate(init, mesh), one_label, k_count, ctx,
                      rng=rng)
    out = {k: np.asarray(v) for k, v in jax.device_get(st).items()}
    del out["label"]
    return out


# ----------------------------------------------------------------------------------------------
# The outlier test


def anomaly_indices(norms: Any) -> tuple[np.ndarray, float, float]:
    """(|l_k - med| / MAD per label, med, MAD) with MAD = 1.4826 * median(|l - med|); with
    MAD = 0: 0 at the median, +inf elsewhere."""
    norms = np.asarray(norms, np.float64)
    med = float(np.median(norms))
    dev = np.abs(norms - med)
    mad = MAD_CONSTANT * float(np.median(dev))
    if mad > 0:
        return dev / mad, med, mad
    return np.where(dev > 0, np.inf, 0.0), med, mad


def flagged_labels(norms: Any, threshold: float = 2.0) -> list[int]:
    """Labels with l_k <= median and anomaly index > threshold, smallest norm first."""
    norms = np.asarray(norms, np.float64)
    index, med, _ = anomaly_indices(norms)
    flagged = [k for k in range(len(norms)) if norms[k] <= med and index[k] > threshold]
    return sorted(flagged, key=lambda k: (norms[k], k))


# ----------------------------------------------------------------------------------------------
# Unlearning


def unlearning_set(benign: BenignData, masks: np.ndarray, patterns: np.ndarray,
                   flagged: list[int], ratio: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(images uint8, labels, stamped count): the benign subset in a random order, its first
    int(n * (1 - ratio)) images as they are, then the rest once per flagged label with that
    label's trigger stamped (x' rounded to uint8 after clipping to [0, 1]), true labels kept."""
    order = rng.permutation(len(benign.y))
    n_clean = int(len(order) * (1 - ratio))
    clean, rest = order[:n_clean], order[n_clean:]
    xs, ys = [benign.x[clean]], [benign.y[clean]]
    x_rest = benign.x[rest].astype(np.float32) / 255.0
    for label in flagged:
        stamped = stamp(x_rest, masks[label], patterns[label])
        xs.append(np.round(np.clip(stamped, 0.0, 1.0) * 255.0).astype(np.uint8))
        ys.append(benign.y[rest])
    return (np.concatenate(xs), np.concatenate(ys).astype(np.int32),
            len(rest) * len(flagged))


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def nc(model: nn.Module, variables: Variables, benign: BenignData, config: NCConfig,
       rng: jax.Array, ctx: StageContext) -> Defended:
    """Reverse-engineers a trigger per label, flags outliers by MAD; unlearns the flagged
    triggers, or returns the model unchanged when none is flagged. `Defended.details`: the
    detection's record (see the module docstring)."""
    search_rng, split_rng, unlearn_rng = jax.random.split(rng, 3)
    found = reverse_engineer(model, variables, benign, config, search_rng, ctx)
    norms = found["l1_norms"]
    index, med, mad = anomaly_indices(norms)
    flagged = flagged_labels(norms, config.anomaly_threshold)
    details: dict[str, Any] = {
        "l1_norms": [float(v) for v in norms],
        "anomaly_index": _finite_or_none(index),
        "min_anomaly_index": _finite_or_none(index[[int(np.argmin(norms))]])[0],
        "median": med, "mad": mad, "threshold": config.anomaly_threshold,
        "flagged": flagged,
        "search": {"epochs": [int(v) for v in found["epochs"]],
                   "final_cost": [float(v) for v in found["final_cost"]],
                   "attack_acc": [float(v) for v in found["attack_acc"]],
                   "found": [bool(v) for v in found["found"]]},
    }
    if not flagged:
        details.update(unlearned=False, note="no label flagged: the backdoored model is "
                                             "returned unchanged")
        return Defended(variables, details)
    generator = np.random.default_rng(np.asarray(jax.random.key_data(split_rng)).ravel())
    x, y, stamped = unlearning_set(benign, found["masks"], found["patterns"], flagged,
                                   config.unlearning_ratio, generator)
    out, _ = fit("nc_unlearn", model, variables, x, y, config.fit_config(), unlearn_rng, ctx)
    details.update(unlearned=True, unlearning_examples=int(len(y)), stamped_examples=stamped)
    return Defended(out, details)
