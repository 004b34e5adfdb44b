"""Sharpness-aware minimisation and path-aware minimisation as optax gradient transformations,
and a norm projection.

`sam_gradient` is a *stage* of an optax chain: it receives the loss gradient at the current
weights plus a `grad_fn` (an optax "extra argument") and hands the gradient at the perturbed
weights to the rest of the chain, so weight decay, momentum, clipping, masking and schedules
compose with it as usual::

    tx = optax.chain(
        ftsam_jax.sam_gradient(rho=2.0, adaptive=True),   # FT-SAM (Zhu et al., 2023)
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.01, momentum=0.9),
    )
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)

`grad_fn(p)` must return only the gradient of the loss at `p` (no aux): statistics such as
BatchNorm running averages are taken from the caller's clean pass, never from the perturbed one.

`pam_gradient` is the same kind of stage for PAM (Min et al., NeurIPS 2024): the weights are
perturbed along the path towards the backdoored weights (kept in its state) instead of along the
loss gradient, so it takes the same `grad_fn` and composes with any chain the same way.

`norm_projection` is the *last* stage of a chain: it turns the chain's update into the one that
lands the chosen weights on a sphere of fixed Frobenius norm (FST's head projection).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["NormProjectionState", "PAMState", "SAMState", "norm_projection", "pam",
           "pam_gradient", "path_perturbation", "sam", "sam_gradient", "sam_perturbation"]

Params = Any
GradFn = Callable[[Params], Params]


class SAMState(NamedTuple):
    """State of `sam_gradient`.

    Attributes:
      count: number of updates so far; the argument of a `rho` schedule.
    """

    count: jax.Array


def sam_perturbation(
    grads: Params,
    params: Params,
    rho: float | jax.Array,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> Params:
    """The first-order worst-case weight perturbation (FT-SAM Eq. 4, ASAM Eq. 13).

    e = rho * T**2 * g / (||T g||_2 + eps), with T = |w| + eta elementwise (adaptive) or T = 1,
    and one global L2 norm over the whole tree.
    """
    if adaptive:
        scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
        scaled = jax.tree.map(jnp.multiply, scale, grads)  # T g
        norm = optax.tree.norm(scaled)
        return jax.tree.map(lambda t, tg: (rho / (norm + eps)) * t * tg, scale, scaled)
    norm = optax.tree.norm(grads)
    return jax.tree.map(lambda g: (rho / (norm + eps)) * g, grads)


def sam_gradient(
    rho: float | optax.ScalarOrSchedule,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Replaces the loss gradient by the gradient at the SAM-perturbed weights.

    Given the gradient g at w, computes e = rho * T**2 g / (||T g|| + eps) and returns
    grad_fn(w + e). With `adaptive=False` this is SAM (T = 1); with `adaptive=True` it is ASAM
    (T = |w| + eta). FT-SAM uses `adaptive=True, eta=0.0, rho=2.0` over all parameters.

    Args:
      rho: radius of the neighbourhood; a float or an optax schedule of the update count.
      adaptive: scale the neighbourhood elementwise by |w| + eta (ASAM).
      eta: offset of the adaptive scale, so that zero weights are still perturbed.
      eps: added to the norm; an all-zero gradient gives a zero perturbation, not NaN.

    Returns:
      A `GradientTransformationExtraArgs` whose `update(grads, state, params, *, grad_fn)`
      needs `params` and the extra argument `grad_fn(p) -> gradient at p` (same tree).

    Stages before it in a chain change only the gradient that sets the perturbation's
    *direction*: e is invariant to rescaling that gradient (it is normalised), so a global-norm
    clip placed before `sam_gradient` has no effect, while a stage that changes the direction
    (masking, noise) changes e. The gradient handed on is `grad_fn`'s at w + e, untouched by
    earlier stages: put clipping, masking or weight decay *after* `sam_gradient` to act on it.

    References:
      Foret et al., Sharpness-Aware Minimization, ICLR 2021 (arXiv 2010.01412);
      Kwon et al., ASAM, ICML 2021 (arXiv 2102.11600);
      Zhu et al., FT-SAM, ICCV 2023 (arXiv 2304.11823), Eq. 4 and 6.
    """

    def init_fn(params: Params) -> SAMState:
        del params
        return SAMState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Params,
        state: SAMState,
        params: Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[Params, SAMState]:
        del extra_args
        if params is None or grad_fn is None:
            raise ValueError("sam_gradient needs `params` and the extra argument `grad_fn`.")
        radius = rho(state.count) if callable(rho) else rho
        e = sam_perturbation(updates, params, radius, adaptive=adaptive, eta=eta, eps=eps)
        perturbed = jax.tree.map(lambda w, d: w + d.astype(w.dtype), params, e)
        new_updates = grad_fn(perturbed)
        new_updates = jax.tree.map(lambda n, g: n.astype(g.dtype), new_updates, updates)
        return new_updates, SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    optimizer: optax.GradientTransformation,
    rho: float | optax.ScalarOrSchedule,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(sam_gradient(rho, **kwargs), optimizer)`: SAM in front of any optimizer."""
    return optax.chain(sam_gradient(rho, **kwargs), optimizer)


class NormProjectionState(NamedTuple):
    """State of `norm_projection`.

    Attributes:
      count: number of updates so far.
    """

    count: jax.Array


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree key path as a tuple of names (dict keys, attribute names, indices)."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def norm_projection(
    target_norms: Mapping[tuple[str, ...], float],
) -> optax.GradientTransformation:
    """Projects chosen weights onto a sphere of fixed Frobenius norm after every update.

    For every leaf W at a path of `target_norms` (with norm r), the update u of the chain before
    is replaced by u' = (W + u) * r / ||W + u||_F - W, so that after `optax.apply_updates` the
    weights are W' = W + u' = proj(W + u): the step the chain proposes, then the rescaling
    W <- W * r / ||W||_F applied *after* the optimiser step (FST, Min et al. 2023). Other leaves
    pass through. One norm over the whole leaf (all its elements); an all-zero W + u has no
    direction and is left unscaled. Put it last in a chain (after the learning rate): it acts on
    the final parameter update, not on a gradient, so momentum traces before it keep the raw
    gradients, as in PyTorch where the projection edits the weights outside the optimiser.

    Args:
      target_norms: `{path: r}`, each path a tuple of names into the params tree (dict keys, e.g.
        `("linear", "kernel")`), r > 0 the norm its leaf keeps.

    Returns:
      A `GradientTransformation` whose `update(updates, state, params)` needs `params`.
      ValueError when a path names no leaf of the params tree or r is not positive.

    References:
      Min et al., Towards Stable Backdoor Purification through Feature Shift Tuning, NeurIPS 2023
      (arXiv 2310.01875): the head's weight norm kept at its value before re-initialisation.
    """
    targets = {tuple(str(k) for k in path): r for path, r in target_norms.items()}
    for path, r in targets.items():
        if not isinstance(r, jax.Array) and not r > 0:
            raise ValueError(f"norm_projection: the norm of {'/'.join(path)} must be > 0, "
                             f"got {r}")

    def check(params: Params) -> None:
        leaves = {_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        missing = sorted(set(targets) - leaves)
        if missing:
            raise ValueError(f"norm_projection: no parameter at {'/'.join(missing[0])}")

    def init_fn(params: Params) -> NormProjectionState:
        check(params)
        return NormProjectionState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Params, state: NormProjectionState, params: Params | None = None,
    ) -> tuple[Params, NormProjectionState]:
        if params is None:
            raise ValueError("norm_projection needs `params`.")
        check(params)

        def project(path: tuple[Any, ...], u: jax.Array, w: jax.Array) -> jax.Array:
            r = targets.get(_path_names(path))
            if r is None:
                return u
            new = w + u.astype(w.dtype)
            norm = jnp.sqrt(jnp.sum(jnp.square(new.astype(jnp.float32))))
            scale = jnp.where(norm > 0, jnp.asarray(r, jnp.float32) / norm, 1.0)
            return (new * scale.astype(w.dtype) - w).astype(u.dtype)

        new_updates = jax.tree_util.tree_map_with_path(project, updates, params)
        return new_updates, NormProjectionState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


class PAMState(NamedTuple):
    """State of `pam_gradient`.

    Attributes:
      count: number of updates so far; the argument of a `rho` schedule.
      anchor: theta_0, the weights the path leads to (the backdoored model), same tree as the
        params; part of the state so that it is checkpointed with the optimizer.
    """

    count: jax.Array
    anchor: Params


def path_perturbation(
    params: Params,
    anchor: Params,
    rho: float | jax.Array,
    *,
    eps: float = 1e-12,
) -> Params:
    """PAM's weight perturbation: a step of length rho from theta_t towards theta_0.

    e = rho * (theta_0 - theta_t) / (||theta_0 - theta_t||_2 + eps), one global L2 norm over the
    whole tree. At theta_t = theta_0 (the first step from the backdoored model) e = 0.
    """
    path = jax.tree.map(lambda a, w: a.astype(w.dtype) - w, anchor, params)
    norm = optax.tree.norm(path)
    return jax.tree.map(lambda d: (rho / (norm + eps)) * d, path)


def pam_gradient(
    rho: float | optax.ScalarOrSchedule,
    *,
    anchor: Params | None = None,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Replaces the loss gradient by the gradient at weights moved along the backdoor path.

    Path-Aware Minimization: with theta_0 the backdoored weights and theta_t the current ones,

        e_t = rho * (theta_0 - theta_t) / ||theta_0 - theta_t||_2,
        g_t = grad L(theta_t + e_t),

    and the rest of the chain steps theta_t with g_t (PAM: SGD, theta_{t+1} = theta_t - lr g_t
    with momentum). Minimising the loss at points pushed towards the backdoored model drives the
    model further from it along the backdoor-connected path. It is SAM's two-pass step with a
    fixed direction: the path, not the loss gradient, so the incoming gradient is not used (pass
    any tree of the params' shape, e.g. zeros; only its dtypes are kept).

    Args:
      rho: length of the step along the path; a float or an optax schedule of the update count.
        When ||theta_0 - theta_t|| < rho the perturbed point lies beyond theta_0.
      anchor: theta_0; None (default) takes the params given to `init`, i.e. the weights the
        tuning starts from (the backdoored model).
      eps: added to the norm; at theta_t = theta_0 the perturbation is 0, not NaN.

    Returns:
      A `GradientTransformationExtraArgs` whose `update(grads, state, params, *, grad_fn)` needs
      `params` and the extra argument `grad_fn(p) -> gradient at p` (same tree). Its state
      (`PAMState`) holds the anchor.

    References:
      Min, Qin, Zhang, Shen, Cheng, Uncovering, Explaining, and Mitigating the Superficial
      Safety of Backdoor Defense, NeurIPS 2024 (arXiv 2410.09838), Path-Aware Minimization;
      released as `fine_tune/BTIDBF/sam.py` class `PAM` in
      `AISafety-HKUST/stable_backdoor_purification` (commit 37d2ef5).
    """

    def init_fn(params: Params) -> PAMState:
        theta0 = params if anchor is None else anchor
        if jax.tree.structure(theta0) != jax.tree.structure(params):
            raise ValueError("pam_gradient: the anchor's tree differs from the params' tree")
        theta0 = jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), theta0, params)
        return PAMState(count=jnp.zeros([], jnp.int32), anchor=theta0)

    def update_fn(
        updates: Params,
        state: PAMState,
        params: Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[Params, PAMState]:
        del extra_args
        if params is None or grad_fn is None:
            raise ValueError("pam_gradient needs `params` and the extra argument `grad_fn`.")
        radius = rho(state.count) if callable(rho) else rho
        e = path_perturbation(params, state.anchor, radius, eps=eps)
        new_updates = grad_fn(jax.tree.map(lambda w, d: w + d, params, e))
        new_updates = jax.tree.map(lambda n, g: n.astype(g.dtype), new_updates, updates)
        return new_updates, PAMState(count=optax.safe_increment(state.count),
                                     anchor=state.anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pam(
    optimizer: optax.GradientTransformation,
    rho: float | optax.ScalarOrSchedule,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(pam_gradient(rho, **kwargs), optimizer)`: PAM in front of any optimizer."""
    return optax.chain(pam_gradient(rho, **kwargs), optimizer)
