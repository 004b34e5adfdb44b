"""XLA compiler options for the project's compiled steps, and `jit`, which applies them.

On CPU, jaxlib 0.10 routes convolutions through YNNPACK by default. Measured on the
development machine (2-core Xeon, AVX-512, BENCHMARKS.md), the PreAct-ResNet18 train step runs
1.4x faster when convolutions go to XLA's Eigen kernels instead, while dots and reductions stay
on YNNPACK (turning YNNPACK off entirely is worse: BatchNorm's reductions then become
`reduce-window` loops, 30-60 ms each at width 64). `CPU_OPTIONS` says exactly that.

The options are passed per computation (`jax.jit(..., compiler_options=...)`), never through
`XLA_FLAGS`, so importing this library changes nothing for other code. A jaxlib that does not
know an option is detected once by compiling a trivial function; the options are then dropped
(with a warning), not an error. `FTSAM_JAX_XLA_OPTIONS=0` turns them off for A/B runs.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ENV_SWITCH = "FTSAM_JAX_XLA_OPTIONS"

CPU_OPTIONS: dict[str, str] = {
    # Default in jaxlib 0.10: every YNNPACK fusion type; without INDIVIDUAL_CONVOLUTION the
    # convolutions and their gradients are emitted by XLA:CPU (Eigen).
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def enabled() -> bool:
    """False when the environment switch turns the tuned options off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's compiler takes the options (compiles a tiny function)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(
            jnp.zeros((2,), jnp.float32)).compile()
    except Exception as e:  # an unknown option or enum value: INVALID_ARGUMENT at compile
        warnings.warn(f"XLA options {dict(items)} not accepted by this jaxlib ({e}); "
                      "compiling with XLA's defaults", RuntimeWarning, stacklevel=3)
        return False
    return True


def compiler_options() -> dict[str, str]:
    """The options for computations on JAX's default backend ({} off CPU or when switched off)."""
    if jax.default_backend() != "cpu" or not enabled():
        return {}
    items = tuple(sorted(CPU_OPTIONS.items()))
    return dict(items) if _accepted(items) else {}


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
    """`jax.jit` with `compiler_options()` merged in (explicit `compiler_options` win)."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)
