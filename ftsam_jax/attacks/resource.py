"""An attack's generated resource (TrojanNN's trigger, LC's adversarial images, SSBA's
encoder), cached in the run's workdir as one npz: its arrays and a JSON record whose "key"
names what made it (the attack's settings, the training data's SHA-256, the model it was made
against), so a rerun reuses it and a changed setting or data set makes it again.

The file is written by a temporary file and a rename inside `checkpoint.writing`: a reader sees
the old file or the new one, and a write the disk refuses is a `WriteError` naming the file
(one line and exit 1 in the entry points; the same command resumes once there is room).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from ftsam_jax.checkpoint import writing

__all__ = ["data_fingerprint", "load_resource", "model_description", "save_resource"]


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the training images and labels (shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_description(model: nn.Module) -> dict[str, str]:
    """The model's class and fields, as strings (part of a cache key)."""
    fields = {f.name: repr(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    return {"class": type(model).__name__, **fields}


def load_resource(path: Path, key: Any, what: str
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, record) of the resource cached at `path` when its record's key is `key`; None
    when there is none or it was made with another key (it is made again). ValueError naming
    the file (`what`: e.g. "trojannn: the cached trigger") when it cannot be read."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            record = json.loads(str(z["record"]))
            arrays = {k: np.asarray(z[k]) for k in z.files if k != "record"}
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{what} {path} cannot be read: {e}; delete it to make it "
                         "again") from None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    return arrays, record


def save_resource(path: Path, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Writes the arrays and `record` (with its "key") to `path` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, record=np.asarray(json.dumps(record, sort_keys=True)), **arrays)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
