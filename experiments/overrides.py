"""`--set NAME.FIELD=VALUE`: command-line overrides of a defense's (frozen dataclass) settings.

    --set=ikd.alpha_adv=0 --set=ikd.teacher_sam=false --set=ikd.teacher.rho=4

A dotted path walks into nested settings (`ikd.teacher` is the IKD teacher's fine-tuning
recipe). The value is parsed by the field's type: bool (true/false/1/0), int, float, str, or a
comma-separated tuple. Anything that does not resolve raises `InputError`, so a typo is a
one-line error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.cli import InputError

__all__ = ["apply_overrides", "parse_value", "settings_from_dict"]

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _scalar(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(f"expected true or false, got {text!r}")
        return _BOOLS[text.lower()]
    return kind(text)


def parse_value(text: str, current: Any, annotation: str) -> Any:
    """`text` converted to the type of the field (from its value, else its annotation)."""
    if isinstance(current, tuple) or (current is None and annotation.startswith("tuple")):
        element = type(current[0]) if current else (float if "float" in annotation else str)
        return tuple(_scalar(t.strip(), element) for t in text.split(",") if t.strip())
    if current is None:
        if text.lower() == "none":
            return None
        kind = next((k for k in (bool, int, float) if k.__name__ in annotation), str)
        return _scalar(text, kind)
    return _scalar(text, type(current))


def _replace(cfg: Any, path: list[str], text: str, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    name = path[0]
    if name not in fields:
        raise InputError(f"--set {where}: no setting {name!r}; settings: {sorted(fields)}")
    current = getattr(cfg, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise InputError(f"--set {where}: {name!r} has no sub-settings")
        value = _replace(current, path[1:], text, where)
    elif dataclasses.is_dataclass(current):
        raise InputError(f"--set {where}: {name!r} is a group; set one of its fields")
    else:
        try:
            value = parse_value(text, current, str(fields[name].type))
        except ValueError as e:
            raise InputError(f"--set {where}: {e}") from None
    try:
        return dataclasses.replace(cfg, **{name: value})
    except (TypeError, ValueError) as e:
        raise InputError(f"--set {where}: {e}") from None


def apply_overrides(configs: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """`configs` ({defense name: settings}) with every `NAME.FIELD=VALUE` of `assignments`."""
    configs = dict(configs)
    for item in assignments:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise InputError(f"--set {item!r}: expected NAME.FIELD=VALUE, e.g. ikd.alpha_adv=0")
        if parts[0] not in configs:
            raise InputError(f"--set {item}: {parts[0]!r} is not in --defenses "
                             f"({', '.join(configs) or 'none'})")
        configs[parts[0]] = _replace(configs[parts[0]], parts[1:], text.strip(), item)
    return configs


def settings_from_dict(template: Any, values: dict[str, Any]) -> Any:
    """The frozen dataclass `template` with the fields of `values` (a config tree's plain dict:
    nested dicts for nested settings, lists or tuples for tuples). Unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(template)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"no setting {unknown[0]!r}; settings: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        current = getattr(template, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{name!r} is a group of settings, got {value!r}")
            value = settings_from_dict(current, value)
        elif isinstance(value, list):
            value = tuple(value)
        if isinstance(current, tuple) and current and isinstance(value, tuple):
            element = type(current[0])
            if element is float:
                value = tuple(float(v) if type(v) is int else v for v in value)
            if not all(isinstance(v, element) for v in value):
                raise ValueError(f"{name!r} must be a tuple of {element.__name__}, got {value!r}")
        if current is not None and value is not None and not dataclasses.is_dataclass(current):
            kind = type(current)
            if isinstance(current, float) and type(value) is int:
                value = float(value)
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{name!r} must be {kind.__name__}, got {value!r}")
        kwargs[name] = value
    return dataclasses.replace(template, **kwargs)
