"""What the tests of the attacks with a generated resource (TrojanNN, LC, SSBA) share: a tiny
data set, a stage context on the 8-device mesh, and `attack.fit` with a given clean model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from ftsam_jax.data.datasets import Dataset
from ftsam_jax.training.recipe import FitConfig
from ftsam_jax.training.stage import StageContext
from tests.conftest import small_mesh


def tiny_dataset(shape: tuple[int, ...], n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """Random uint8 images, labels cycling over 4 classes."""
    rng = np.random.default_rng(seed)
    img = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return Dataset("tiny", img(n_train), np.arange(n_train, dtype=np.int32) % 4, img(n_test),
                   np.arange(n_test, dtype=np.int32) % 4, ("a", "b", "c", "d"))


def ctx_for(workdir: Path | None = None) -> StageContext:
    return StageContext(mesh=small_mesh(), seed=0, workdir=workdir, progress=False)


def fit_with(attack: Any, ds: Dataset, model: Any, variables: Any, batch_size: int,
             workdir: Path | None = None, calls: list[int] | None = None) -> None:
    """`attack.fit` whose clean model is `variables` (each request appended to `calls`)."""
    def clean_model() -> Any:
        if calls is not None:
            calls.append(1)
        return variables

    attack.fit(ds=ds, model=model, fit_config=FitConfig(epochs=1, batch_size=batch_size),
               ctx=ctx_for(workdir), rng=jax.random.key(0), clean_model=clean_model)
