r"""Defense columns: a registered defense, or a variant of one with some of its settings
overridden, written `NAME[FIELD=VALUE,...]`.

    --defenses=ft,ftsam,ftsam[rho=0],ftsam[adaptive=false],ikd[teacher.rho=4,alpha_adv=0]

A variant runs the defense `NAME` with its section of the config tree (`defense.NAME`, with
every flag and `--config.` override given for it) and then the variant's own values, each parsed
as `--config.defense.NAME.FIELD=VALUE` would be (ml_collections' parser for the field's type;
dotted fields walk into nested settings). A variant is a column of its own: its result is
stored under the name as written, its files under `folder` (`ftsam[rho=0]` -> `ftsam_rho=0`:
checkpoints/ftsam_rho=0/, models/ftsam_rho=0/), and its random stream is derived from its name,
so adding a variant never changes another column's numbers. What a defense fixes itself stays
fixed (`ft[sam=true]` is refused: that is `ftsam`).

`ftsam[rho=0]` is the SAM-off control: FT-SAM's recipe (benign subset, label smoothing,
schedule, batch, epochs) with a zero perturbation, i.e. plain gradient steps
(`ftsam_jax.training.recipe.fit` skips the second pass when rho is 0).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from experiments.cli import InputError, comma_list
from experiments.overrides import set_from_text

__all__ = ["DefenseColumn", "column_base", "column_section", "parse_columns"]

_COLUMN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(.*)\])?$", re.DOTALL)
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class DefenseColumn:
    """One column of `--defenses`.

    Attributes:
      name: as written (results.json's key, the table's column, the random stream's name).
      base: the registered defense it runs.
      overrides: (dotted field, value text) pairs, in the order written; empty: the defense.
    """

    name: str
    base: str
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def is_variant(self) -> bool:
        return bool(self.overrides)

    @property
    def folder(self) -> str:
        """The column's name on disk: the defense's own name, or `BASE_FIELD=VALUE_...`."""
        if not self.overrides:
            return self.base
        parts = [f"{field}={re.sub(r'[^A-Za-z0-9.+-]+', '_', text).strip('_')}"
                 for field, text in self.overrides]
        return "_".join([self.base, *parts])


def column_base(text: str) -> str:
    """The defense a column's text names (`"ftsam[rho=0]"` -> `"ftsam"`)."""
    return text.split("[", 1)[0].strip()


def parse_column(text: str, known: Iterable[str]) -> DefenseColumn:
    """`NAME` or `NAME[FIELD=VALUE,...]` -> DefenseColumn; InputError for anything else."""
    name = text.strip()
    match = _COLUMN.match(name)
    if match is None:
        raise InputError(f"--defenses {name!r}: expected NAME or NAME[FIELD=VALUE,...], e.g. "
                         "ftsam[rho=0]")
    base, inner = match.group(1), match.group(2)
    known = sorted(known)
    if base not in known:
        raise InputError(f"unknown defenses [{base!r}]; choose from {known}")
    if inner is None:
        return DefenseColumn(name, base)
    overrides: list[tuple[str, str]] = []
    for item in comma_list(inner) if inner.strip() else [""]:
        field, sep, value = item.partition("=")
        field = field.strip()
        if not sep or not _FIELD.match(field) or not value.strip() or "[" in value:
            raise InputError(f"--defenses {name!r}: {item.strip()!r} is not FIELD=VALUE (e.g. "
                             f"{base}[rho=0])")
        if field in dict(overrides):
            raise InputError(f"--defenses {name!r}: {field} is set twice")
        overrides.append((field, value.strip()))
    return DefenseColumn(name, base, tuple(overrides))


def parse_columns(text: str, known: Iterable[str]) -> list[DefenseColumn]:
    """Every column of a `--defenses` value; InputError for bad text, a column written twice,
    or two columns whose folders would collide."""
    known = list(known)
    columns = [parse_column(item, known) for item in comma_list(text)]
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise InputError("--defenses lists a defense twice")
    folders: dict[str, str] = {}
    for c in columns:
        if c.folder in folders:
            raise InputError(f"--defenses: {folders[c.folder]!r} and {c.name!r} would share the "
                             f"folder {c.folder}; write one of them differently")
        folders[c.folder] = c.name
    return columns


def column_section(defense: Mapping[str, Any], column: DefenseColumn) -> dict[str, Any]:
    """The settings section of `column` as a plain dict: the tree's `defense[column.base]`
    with the column's overrides applied (a copy; the tree is not changed)."""
    tree = ml_collections.ConfigDict()
    tree.defense = ml_collections.ConfigDict()
    tree.defense[column.base] = copy.deepcopy(defense[column.base])
    for field, text in column.overrides:
        where = f"--defenses {column.name}"
        node: Any = tree.defense[column.base]
        parts = field.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join([column.base, *parts[:depth]])
                raise InputError(f"{where}: no setting {part!r} in {parent}; settings: "
                                 f"{sorted(node) if isinstance(node, Mapping) else []}")
            node = node[part]
        if isinstance(node, ml_collections.ConfigDict):
            raise InputError(f"{where}: {field!r} is a group; set one of its fields")
        set_from_text(tree, f"defense.{column.base}.{field}", text, where)
    return tree.defense[column.base].to_dict()
