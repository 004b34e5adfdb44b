"""The defense interface: `(model, backdoored variables, benign data, config, rng, ctx) ->
defended variables`, plus benign-subset sampling.

`ctx` (`ftsam_jax.training.stage.StageContext`) carries the mesh, the checkpoint folder (each
defense resumes exactly), progress bars, per-epoch logging and the optional curve evaluator. A
defense's random stream is the `rng` it is given; the pipeline derives it from the seed and the
defense's name, so adding a defense to a command never changes another's numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ftsam_jax.training.stage import StageContext

__all__ = ["BENIGN_SELECTIONS", "BenignData", "DefenseFn", "DefenseSpec", "Defended",
           "PoisonedTrainData", "benign_fingerprint", "defended_parts", "select_benign",
           "settings_from_dict", "with_defaults"]

# How a run's defenses get their benign subsets: `reference`, each by its own rule
# (`DefenseSpec.balanced`) from its own random stream, as BackdoorBench does; `shared`, one
# class-balanced subset per defense seed for every defense (paired comparisons).
BENIGN_SELECTIONS = ("reference", "shared")

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BenignData:
    """The defender's clean images (uint8 NHWC) and labels."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass(frozen=True)
class PoisonedTrainData:
    """What a training-time defense (AC, ABL; `DefenseSpec.training_time`) receives instead of
    a benign subset: the victim's whole training set as it was poisoned (uint8 NHWC images with
    the triggers baked in, the labels the model was trained on). `poison_mask` marks the images
    that were really poisoned, for the defense's record (its detection's precision and recall)
    only, never for its decisions."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    poison_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass(frozen=True)
class Defended:
    """What a defense returns when it has facts to record beside the defended variables (NC's
    anomaly indices and flagged labels): the pipeline writes `details` (JSON-serialisable)
    into the defense's row of results.json as "details"."""

    variables: Variables
    details: dict[str, Any]


DefenseFn = Callable[[nn.Module, Variables, BenignData, Any, jax.Array, StageContext],
                     Variables | Defended]


def defended_parts(out: Variables | Defended) -> tuple[Variables, dict[str, Any] | None]:
    """(variables, details or None) of a defense's return value."""
    if isinstance(out, Defended):
        return out.variables, out.details
    return out, None


@dataclasses.dataclass(frozen=True)
class DefenseSpec:
    """A registered defense: how it runs, the schema and preset values of its settings, and
    the rules of those settings (what it fixes itself, named variants, how records written by
    older versions are completed).

    Attributes:
      name: registry name (`--defenses`).
      run: the defense function.
      default_config: `preset -> settings` ("paper", "cpu", "smoke"): the dataclass's preset
        values (`experiments/configs/ftsam.py` spells the same values; a test keeps them equal).
      config_cls: the frozen settings dataclass, the schema (`config_from_dict`).
      balanced: draw the benign subset class-balanced (FT-SAM) instead of uniformly (FT).
      uses_data: False for data-free defenses (CLP).
      training_time: a training-time defense (AC, ABL): it receives the whole poisoned
        training set (`PoisonedTrainData`) instead of a benign subset, and the pipeline refuses
        it with an attack that poisons on the fly (no fixed poisoned set).
      summary: one line for --help and README.
      fixed: {dotted field: why}: settings the defense fixes or derives itself; a change to one
        is refused (it would be dropped).
      variant_field, variants: a field that names a variant of the settings (FT-SAM's `recipe`)
        and, per variant, the fields it sets (`preset_config(preset, variant)`).
      added_fields: fields added to the settings after workdirs existed, with the value that
        reproduces what ran before (nested dicts for nested settings): a stored record without
        one is completed with it (`complete_record`), so old runs resume when the new field's
        default is the old behaviour, and are refused when it is not.
    """

    name: str
    run: DefenseFn
    default_config: Callable[[str], Any]
    config_cls: type
    balanced: bool = False
    uses_data: bool = True
    training_time: bool = False
    summary: str = ""
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    variant_field: str | None = None
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    added_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def preset_config(self, preset: str, variant: str | None = None) -> Any:
        """The preset's settings, with `variant`'s fields (None: the preset's own variant)."""
        config = self.default_config(preset)
        if variant is None:
            return config
        if variant not in self.variants:
            raise ValueError(f"{self.variant_field} must be one of {tuple(self.variants)}, "
                             f"got {variant!r}")
        return dataclasses.replace(config, **self.variants[variant])

    def config_from_dict(self, values: Mapping[str, Any]) -> Any:
        """The settings of a config tree's section (`settings_from_dict(config_cls, values)`)."""
        return settings_from_dict(self.config_cls, values)

    def changed_fixed_fields(self, config: Any, reference: Any) -> list[str]:
        """The fields of `fixed` in which `config` differs from `reference` (the preset's)."""
        get = lambda tree, path: functools.reduce(lambda t, k: t[k], path.split("."), tree)
        a, b = dataclasses.asdict(config), dataclasses.asdict(reference)
        return [path for path in self.fixed if get(a, path) != get(b, path)]

    def complete_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """A stored settings record with every field added since (`added_fields`)."""
        return with_defaults(record, dict(self.added_fields))


def with_defaults(record: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`record` with every key of `defaults` it lacks, nested records included."""
    out = {**defaults, **record}
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            out[key] = with_defaults(record[key], value)
    return out


def settings_from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    """The frozen settings dataclass `cls` from a config tree's plain dict: every field given
    (nested dicts for nested settings, lists or tuples for tuples), each of the type of the
    field's default (ints accepted for floats; a None default takes any value). Unknown and
    missing fields are errors (ValueError, as are the dataclass's own checks)."""
    template = cls()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"no setting {unknown[0]!r}; settings: {sorted(names)}")
    missing = [name for name in names if name not in values]
    if missing:
        raise ValueError(f"setting {missing[0]!r} is missing")
    return cls(**{name: _typed(name, getattr(template, name), values[name]) for name in names})


def _typed(name: str, current: Any, value: Any) -> Any:
    """`value` for the field `name` whose default is `current`; ValueError if of another type."""
    if dataclasses.is_dataclass(current):
        if not isinstance(value, Mapping):
            raise ValueError(f"{name!r} is a group of settings, got {value!r}")
        return settings_from_dict(type(current), value)
    if isinstance(value, list):
        value = tuple(value)
    joined = [v for v in value if isinstance(v, str) and "," in v] if isinstance(
        value, tuple) else []
    if joined:  # "a,b" read as one name: ml_collections parses tuples as Python literals
        parts = tuple(p.strip() for p in joined[0].split(","))
        raise ValueError(f"{name!r} holds the name {joined[0]!r}; write a tuple of names as a "
                         f"Python literal, e.g. {parts!r}")
    if isinstance(current, tuple) and current and isinstance(value, tuple):
        element = type(current[0])
        if element is float:
            value = tuple(float(v) if type(v) is int else v for v in value)
        if not all(isinstance(v, element) for v in value):
            raise ValueError(f"{name!r} must be a tuple of {element.__name__}, got {value!r}")
    if current is not None and value is not None:
        kind = type(current)
        if isinstance(current, float) and type(value) is int:
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{name!r} must be {kind.__name__}, got {value!r}")
    return value


def benign_fingerprint(indices: np.ndarray) -> dict[str, Any]:
    """{"count", "sha256"} of a benign subset: the SHA-256 of its sorted indices as int64
    bytes (little-endian), so two runs can be checked to have used the same images."""
    ordered = np.sort(np.asarray(indices, np.int64)).astype("<i8")
    return {"count": int(ordered.size), "sha256": hashlib.sha256(ordered.tobytes()).hexdigest()}


def select_benign(labels: np.ndarray, ratio: float, rng: np.random.Generator,
                  balanced: bool) -> np.ndarray:
    """Indices of the defender's benign subset.

    balanced: int(N * ratio / C) images of every class (BackdoorBench's `choose_by_class`, used
    by FT-SAM); otherwise int(N * ratio) images uniformly (`choose_index`, used by FT and the
    other baselines; BackdoorBench `utils/choose_index.py`). At least one image either way.
    """
    labels = np.asarray(labels)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"benign ratio must lie in (0, 1], got {ratio}")
    if not balanced:
        count = max(1, int(ratio * len(labels)))
        return np.sort(rng.choice(len(labels), size=count, replace=False))
    classes = np.unique(labels)
    per_class = max(1, int(len(labels) * ratio / len(classes)))
    chosen = [rng.choice(np.flatnonzero(labels == c),
                         size=min(per_class, int(np.sum(labels == c))), replace=False)
              for c in classes]
    return np.sort(np.concatenate(chosen))
