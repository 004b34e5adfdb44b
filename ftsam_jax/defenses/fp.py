"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune the last convolutional layer's
least active channels on benign data, then fine-tune.

1. Mean activation of every channel of the last stage, on the benign data: the model's pooled
   `features` (global average of the last stage's output, the input of the classifier).
2. Channels are pruned in order of increasing mean activation, by zeroing their rows of the
   classifier kernel, which is exactly zeroing that channel of the last stage's output (global
   average pooling then a dense layer). The search visits m = 0, s, 2s, ... with
   s = `ceil(C * prune_step_ratio)` and stops at the first step whose benign accuracy differs
   from the unpruned model's by `acc_ratio` (relative) or more. `keep` picks the model:
   - "first_beyond" (default; BackdoorBench's effective behaviour): step m > 0 prunes the first
     m - 1 channels of the order (`seq_sort[0:num_pruned - 1]`), and the model fine-tuned is the
     last one evaluated, i.e. the first step beyond the tolerance (or the last step if none is).
     `last_net` in `defense/fp.py` is the network being pruned itself (no copy), so after the
     `break` it already carries the mask of the failing step.
   - "last_within" (the rule as written in the reference and the FP paper): step m prunes m
     channels, and the last step within the tolerance is kept.
3. Fine-tuning of the pruned model on the benign data with the pruned rows held at zero (the
   mask is applied inside the loss, so their gradient, weight decay and momentum are all zero;
   BackdoorBench keeps `torch.nn.utils.prune`'s mask during fine-tuning, the same).

Settings: acc_ratio 0.1, once_prune_ratio 0.01 (6 of 512 channels per step), then SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 256, 100 epochs, CosineAnnealingLR(T_max=100) stepped per
epoch, crop+flip, plain cross-entropy, a uniformly drawn 5% of the training set
(`balanced=False`), last-epoch model. The `cpu` preset is the same; `smoke` fine-tunes 1 epoch.

Reference: BackdoorBench `defense/fp.py` + `config/defense/fp/cifar10.yaml`.

Differences from the reference:
- The stopping rule's accuracy is measured on the defender's benign data; BackdoorBench uses the
  clean *test* set, which a defender does not have (the FP paper uses held-out clean data).
- Activations are measured on the benign images without augmentation (BackdoorBench forwards
  its augmenting train loader once, in eval mode); both in inference mode.
- Accuracies during the search come from the cached features and the masked classifier
  (float32, host), identical to running the pruned model.
- Float32 fine-tuning; the config sets `amp: True`.

Assumption about the model: it sows its pooled last-stage features as `features` into the
`intermediates` collection and classifies them with a dense layer named `linear` (true of every
model in `ftsam_jax.models`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax import parallel
from ftsam_jax.defenses.base import BenignData
from ftsam_jax.training.epoch import apply_in_batches
from ftsam_jax.training.recipe import FitConfig, fit
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage
from ftsam_jax.training.step import classification_loss

__all__ = ["FinePruningConfig", "apply_channel_mask", "benign_features", "channel_mask", "fp",
           "fp_config", "pruning_order", "select_pruning"]

Variables = dict[str, Any]
CLASSIFIER = "linear"
FEATURES = "features"
KEEP_RULES = ("first_beyond", "last_within")


@dataclasses.dataclass(frozen=True)
class FinePruningConfig(FitConfig):
    """Fine-Pruning hyperparameters (see the module docstring): the pruning rule, and
    `FitConfig`'s fields for the fine-tuning with BackdoorBench's defaults (batch 256, cosine
    T_max 100, the last partial batch kept)."""

    acc_ratio: float = 0.1
    prune_step_ratio: float = 0.01
    keep: str = "first_beyond"
    batch_size: int = 256
    t_max: int | None = 100
    drop_last: bool = False
    eval_batch_size: int = 256


def fp_config(preset: str = "paper") -> FinePruningConfig:
    """BackdoorBench's FP; the smoke preset fine-tunes for 1 epoch."""
    epochs = {"paper": 100, "cpu": 100, "smoke": 1}[preset]
    return FinePruningConfig(epochs=epochs)


def benign_features(model: nn.Module, variables: Variables, images: np.ndarray,
                    mesh: jax.sharding.Mesh, batch_size: int = 256) -> np.ndarray:
    """Inference-mode pooled features (N, C) of uint8 or float [0, 1] images."""
    def features(v: Variables, x: jax.Array, y: jax.Array) -> jax.Array:
        del y
        _, mut = model.apply(v, x, train=False, mutable=["intermediates"])
        return mut["intermediates"][FEATURES][-1].astype(jnp.float32)

    return apply_in_batches(features, variables, images, np.zeros(len(images), np.int32), mesh,
                            batch_size)


def pruning_order(features: np.ndarray) -> np.ndarray:
    """Channels by increasing mean activation (stable for ties)."""
    return np.argsort(np.asarray(features, np.float64).mean(axis=0), kind="stable")


def channel_mask(order: np.ndarray, num_pruned: int) -> np.ndarray:
    """1 for kept channels, 0 for the first `num_pruned` channels of `order`."""
    mask = np.ones(len(order), np.float32)
    mask[order[:num_pruned]] = 0.0
    return mask


def select_pruning(features: np.ndarray, labels: np.ndarray, kernel: np.ndarray,
                   bias: np.ndarray, acc_ratio: float, step: int, keep: str = "last_within"
                   ) -> tuple[int, np.ndarray, list[tuple[int, float]]]:
    """The pruning search: returns (channels pruned, channel order, [(pruned, accuracy)]).

    keep: "last_within" (step m prunes m channels; the last step within the tolerance is kept)
    or "first_beyond" (BackdoorBench's effective rule: step m > 0 prunes m - 1 channels; the
    last step evaluated, i.e. the first beyond the tolerance, is kept). See the module docstring.
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"FP: unknown keep rule {keep!r}; choose one of {KEEP_RULES}")
    order = pruning_order(features)
    feats = np.asarray(features, np.float32)
    kernel, bias = np.asarray(kernel, np.float32), np.asarray(bias, np.float32)
    labels = np.asarray(labels)
    acc0, kept, history = 0.0, 0, []
    for m in range(0, feats.shape[1], step):
        num = m - 1 if keep == "first_beyond" and m > 0 else m
        logits = (feats * channel_mask(order, num)) @ kernel + bias
        acc = float(np.mean(np.argmax(logits, -1) == labels))
        history.append((num, acc))
        if m == 0:
            acc0 = acc
        within = abs(acc - acc0) / max(acc0, 1e-12) < acc_ratio
        if within or keep == "first_beyond":
            kept = num
        if not within:
            break
    return kept, order, history


def apply_channel_mask(params: Any, mask: jax.Array) -> Any:
    """Zeroes the classifier rows of pruned channels (functional)."""
    linear = params[CLASSIFIER]
    kernel = linear["kernel"] * jnp.asarray(mask, linear["kernel"].dtype)[:, None]
    return {**params, CLASSIFIER: {**linear, "kernel": kernel}}


def fp(model: nn.Module, variables: Variables, benign: BenignData, config: FinePruningConfig,
       rng: jax.Array, ctx: StageContext) -> Variables:
    """Fine-Pruning: activation-based pruning of the last stage, then fine-tuning."""
    prune_rng, ft_rng = jax.random.split(rng)
    linear = jax.device_get(variables["params"][CLASSIFIER])
    num_channels = int(np.shape(linear["kernel"])[0])
    step = max(1, math.ceil(num_channels * config.prune_step_ratio))

    def prune_epoch(state: dict[str, jax.Array], _rng: jax.Array):
        feats = benign_features(model, variables, benign.x, ctx.mesh, config.eval_batch_size)
        keep, order, history = select_pruning(feats, benign.y, linear["kernel"], linear["bias"],
                                              config.acc_ratio, step, keep=config.keep)
        mask = channel_mask(order, keep)
        metrics = {"pruned": float(keep), "acc_before": history[0][1],
                   "acc_after": dict(history)[keep]}
        return {"mask": parallel.replicate(mask, ctx.mesh)}, metrics

    masked = lambda st: {**variables, "params": apply_channel_mask(variables["params"],
                                                                    st["mask"])}
    state, _ = train_stage(Stage(
        "fp_prune", {"mask": np.ones(num_channels, np.float32)}, 1, epoch_fn=prune_epoch,
        evaluate=evaluate_variables(ctx, masked), rng=prune_rng), ctx)
    mask = jnp.asarray(jax.device_get(state["mask"]))
    pruned = {**variables, "params": apply_channel_mask(variables["params"], mask)}

    base_loss = classification_loss(model.apply)

    def masked_loss(params, batch_stats, batch, rng_):
        return base_loss(apply_channel_mask(params, mask), batch_stats, batch, rng_)

    out, _ = fit("fp_finetune", model, pruned, benign.x, benign.y, config, ft_rng,
                 ctx, loss_fn=masked_loss)
    out = {**out, "params": apply_channel_mask(out["params"], mask)}
    return jax.device_get(out)
