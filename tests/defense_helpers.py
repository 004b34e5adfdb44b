"""What the defense tests share: tiny random variables made without an eager init, a tiny
benign set, a stage context, bit-equality of variable trees. (The `mesh` fixture is
conftest's.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftsam_jax.defenses import BenignData
from ftsam_jax.training.stage import StageContext


def random_variables(model: Any, seed: int = 0, image_shape: tuple[int, ...] = (8, 8, 3), *,
                     kernel_gain: float = 1.0, scale: tuple[float, float] = (0.2, 2.0),
                     var: tuple[float, float] = (0.3, 3.0)) -> dict[str, Any]:
    """NumPy-random variables of `model`: conv/dense kernels ~ N(0, (gain / sqrt(fan_in))^2),
    BN scales and running variances uniform in `scale` / `var`, biases and running means
    ~ N(0, 0.3^2) (a freshly initialised BN is trivial)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    out = {}
    for key, leaf in sorted(traverse_util.flatten_dict(shapes).items()):
        shape, name = leaf.shape, key[-1]
        if name == "kernel":
            value = rng.normal(0.0, kernel_gain / np.sqrt(np.prod(shape[:-1])), shape)
        elif name == "scale":
            value = rng.uniform(*scale, shape)
        elif name == "var":
            value = rng.uniform(*var, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        out[key] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def tiny_benign(num_classes: int, n: int = 32, image_shape: tuple[int, ...] = (8, 8, 3),
                seed: int = 0) -> BenignData:
    """`n` random uint8 images with random labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
    return BenignData(x, rng.integers(0, num_classes, n).astype(np.int32), num_classes)


def ctx_for(mesh: Any, workdir: Path | None, log: Callable[..., None] | None = None,
            evaluate: Callable[[Any], dict[str, float]] | None = None) -> StageContext:
    return StageContext(mesh=mesh, seed=0, workdir=workdir, progress=False, log=log,
                        evaluate=evaluate)


def assert_same(a: Any, b: Any) -> None:
    """The same tree, every leaf bit for bit."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def interrupt_after(epochs: int, run: Callable[[], Any], monkeypatch: Any) -> None:
    """Calls `run()` with the stage machinery told to stop after `epochs` epochs of this
    process (`FTSAM_JAX_INTERRUPT_AFTER`) and checks that it stopped (KeyboardInterrupt); the
    caller then reruns it to test the resume."""
    import pytest

    from ftsam_jax.training import stage as stage_mod

    monkeypatch.setattr(stage_mod, "_epochs_run_in_process", 0)
    monkeypatch.setenv("FTSAM_JAX_INTERRUPT_AFTER", str(epochs))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.delenv("FTSAM_JAX_INTERRUPT_AFTER")
