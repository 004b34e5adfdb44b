"""CLP: data-free backdoor removal by Channel Lipschitzness-based Pruning (Zheng et al., ECCV
2022).

For every convolution followed by a BatchNorm, the upper bound of channel k's Lipschitz constant
is UCLC_k = ||W_k||_2 * |gamma_k| / sigma_k: the spectral norm of the k-th output filter
reshaped to a (C_in, kh*kw) matrix, times the BN scale over the BN running standard deviation.
Within each layer, channels with UCLC_k > mean + u * std (std with Bessel's correction, as
`torch.Tensor.std`) are pruned by zeroing that BN channel's scale and bias, so the channel's
output is 0. No data is used.

Settings: u = 3; sigma_k = sqrt(running_var) without the BN epsilon (a zero variance is
floored at 1e-12 instead of dividing by zero); strict `>`; every preset the same.

Reference: BackdoorBench `defense/clp.py` (`CLP_prune`) + `config/defense/clp/cifar10.yaml`
(u 3; u_min 0, u_max 10, u_num 21 only drive a sweep logged for plots: the saved model is pruned
with u = 3, as here), after the original `rkteddy/channel-Lipschitzness-based-pruning`.

Differences from the reference: after a down-sampling block of PreAct-ResNet18 the next `bn1`
(`layer2_1`, `layer3_1`, `layer4_1`) is paired with the residual branch's `conv2` instead of
the 1x1 shortcut conv that module registration order gives (deliberate, see below); the
zero-variance floor. (CLP is not in the FT-SAM paper's table.)

Conv/BN pairing (the one assumption about the model): each BatchNorm is paired with the
convolution *executed* last before it with as many output channels as the BN has features,
found by intercepting one abstract forward pass (`flax.linen.intercept_methods`), so no model
code changes and every model in `ftsam_jax.models` works:

- conv-BN-ReLU nets (VGG, TinyCNN): conv{i} -> bn{i}, as in the original code.
- Pre-activation ResNets (BN *before* conv): each BN is paired with the conv whose output it
  normalises: `layer1_0/bn1` with the stem `conv1`; `layer{i}_{j}/bn2` with
  `layer{i}_{j}/conv1`; the next block's `bn1` with the previous block's `conv2` (its input is
  conv2's output plus the shortcut). The last conv (`layer4_1/conv2`) feeds no BN and is not
  scored. Deviation: BackdoorBench pairs by module *registration* order, so after a
  down-sampling block it pairs the next `bn1` with the 1x1 `shortcut` conv instead of `conv2`;
  we use the residual branch's `conv2`.

Zeroing a pre-activation BN channel removes that channel from the residual branch only; the
identity shortcut still carries it (the same as BackdoorBench on PreAct-ResNet18). CLP is
deterministic and instantaneous; it runs as one checkpointed stage (`clp_prune`) so a rerun
restores instead of recomputing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftsam_jax import parallel
from ftsam_jax.defenses.base import BenignData
from ftsam_jax.training.stage import Stage, StageContext, evaluate_variables, train_stage

__all__ = ["CLPConfig", "channel_lipschitz", "clp", "clp_config", "clp_prune_variables",
           "conv_bn_pairs"]

Variables = dict[str, Any]
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CLPConfig:
    """u: prune channels whose UCLC exceeds mean + u * std of their layer."""

    u: float = 3.0


def clp_config(preset: str = "paper") -> CLPConfig:
    """CLP has no training; every preset is the paper's u = 3."""
    if preset not in ("paper", "cpu", "smoke"):
        raise ValueError(f"unknown preset {preset!r}")
    return CLPConfig()


def _get(tree: Any, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def conv_bn_pairs(model: nn.Module, variables: Variables,
                  image_shape: tuple[int, ...] = (32, 32, 3)) -> list[tuple[Path, Path]]:
    """(conv path, BN path) pairs: each BN with the last conv executed before it that has as
    many output channels as the BN has features (see the module docstring)."""
    events: list[tuple[str, Path, int]] = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__":
            if isinstance(mod, nn.Conv):
                events.append(("conv", tuple(mod.path), int(mod.features)))
            elif isinstance(mod, nn.BatchNorm):
                events.append(("bn", tuple(mod.path), int(args[0].shape[-1])))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image_shape), jnp.float32),
                                             train=False), variables)
    pairs, last_conv = [], {}
    for kind, path, channels in events:
        if kind == "conv":
            last_conv[channels] = path
        elif channels in last_conv:
            pairs.append((last_conv[channels], path))
    return pairs


def channel_lipschitz(kernel: np.ndarray, scale: np.ndarray, var: np.ndarray) -> np.ndarray:
    """UCLC_k = sigma_max(W_k) * |gamma_k| / sqrt(var_k) for a flax kernel (kh, kw, in, out)."""
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = kernel.shape
    per_channel = np.moveaxis(kernel, 3, 0).reshape(cout, kh * kw, cin)
    sigma = np.linalg.svd(per_channel, compute_uv=False).max(axis=-1)
    std = np.sqrt(np.maximum(np.asarray(var, np.float64), 1e-12))
    return sigma * np.abs(np.asarray(scale, np.float64)) / std


def clp_prune_variables(variables: Variables, pairs: list[tuple[Path, Path]], u: float
                        ) -> tuple[Variables, dict[Path, np.ndarray]]:
    """Zeroes the BN scale/bias of every channel with UCLC > mean + u * std (host arrays).

    Returns the new variables and, per BN path, the pruned channel indices.
    """
    params = jax.tree.map(np.array, jax.device_get(variables["params"]))
    stats = jax.device_get(variables["batch_stats"])
    pruned: dict[Path, np.ndarray] = {}
    for conv_path, bn_path in pairs:
        bn = _get(params, bn_path)
        lips = channel_lipschitz(_get(params, conv_path)["kernel"], bn["scale"],
                                 _get(stats, bn_path)["var"])
        std = lips.std(ddof=1) if lips.size > 1 else 0.0
        index = np.flatnonzero(lips > lips.mean() + u * std)
        bn["scale"][index] = 0.0
        bn["bias"][index] = 0.0
        pruned[bn_path] = index
    return {**variables, "params": params}, pruned


def clp(model: nn.Module, variables: Variables, benign: BenignData | None, config: CLPConfig,
        rng: jax.Array, ctx: StageContext) -> Variables:
    """Data-free CLP; `benign` is ignored except for the input shape of the abstract trace."""
    del rng
    shape = (32, 32, 3)
    if benign is not None and np.ndim(benign.x) == 4:
        shape = tuple(int(s) for s in np.shape(benign.x)[1:])
    pairs = conv_bn_pairs(model, variables, shape)
    if not pairs:
        raise ValueError("CLP found no convolution followed by a BatchNorm in this model")

    def epoch_fn(state: Variables, _rng: jax.Array):
        out, pruned = clp_prune_variables(state, pairs, config.u)
        metrics = {"pruned": float(sum(len(v) for v in pruned.values()))}
        return parallel.replicate(out, ctx.mesh), metrics

    state, _ = train_stage(Stage("clp_prune", variables, 1, epoch_fn=epoch_fn,
                                 evaluate=evaluate_variables(ctx, lambda v: v)), ctx)
    return jax.device_get(state)
