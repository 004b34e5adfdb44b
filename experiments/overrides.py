"""`--set=NAME.FIELD=VALUE`: an alias of `--config.defense.NAME.FIELD=VALUE`.

    --set=ikd.alpha_adv=0 --set=ikd.teacher_sam=false --set=ikd.teacher.rho=4

A dotted path walks into nested settings (`ikd.teacher` is the IKD teacher's fine-tuning
recipe). The value is parsed exactly as ml_collections parses `--config.PATH=VALUE`: by the type
of the tree's field, with `config_flags`' own parsers (bool true/false/1/0, int, float, str;
tuples as Python literals, e.g. `--set=ikd.betas=500,1000,1000` or
`--set=ikd.afa_layers="('layer3_1','layer4_1')"`), and set with `config_path.set_value`.
Anything that does not resolve raises `InputError` naming the item, so a typo is a one-line
error instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections.config_flags import config_flags, config_path

from experiments.cli import InputError, comma_list

__all__ = ["apply_set_items", "set_from_text"]


def set_from_text(tree: ml_collections.ConfigDict, path: str, text: str, where: str) -> None:
    """Sets the tree's field at `path` to `text` parsed by ml_collections' parser for the
    field's type (what `--config.PATH=TEXT` does); InputError prefixed with `where` else."""
    field_type = config_path.get_type(path, tree)
    parser = config_flags._FIELD_TYPE_TO_PARSER.get(field_type)  # what --config.PATH uses
    if parser is None:
        raise InputError(f"{where}: a {field_type.__name__} field cannot be set from the "
                         "command line")
    try:
        config_path.set_value(path, tree, parser.parse(text))
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {' '.join(str(a) for a in e.args) or e}") from None


def apply_set_items(tree: ml_collections.ConfigDict, items: Sequence[str]) -> None:
    """Applies every `NAME.FIELD=VALUE` of `items` to `tree.defense` (in place); NAME must be
    in the tree's `defenses` (a setting of a defense that does not run would be dropped)."""
    selected = [c.split("[", 1)[0].strip() for c in comma_list(tree.defenses)]  # variants too
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise InputError(f"--set {item!r}: expected NAME.FIELD=VALUE, e.g. ikd.alpha_adv=0")
        where = f"--set {item}"
        if parts[0] not in selected:
            raise InputError(f"{where}: {parts[0]!r} is not in --defenses "
                             f"({', '.join(selected) or 'none'})")
        if parts[0] not in tree.defense:
            raise InputError(f"{where}: no defense {parts[0]!r}; defenses: "
                             f"{sorted(tree.defense)}")
        node = tree.defense
        for parent, name in zip(parts, parts[1:], strict=False):
            node = node[parent]
            if not isinstance(node, ml_collections.ConfigDict):
                raise InputError(f"{where}: {parent!r} has no sub-settings")
            if name not in node:
                raise InputError(f"{where}: no setting {name!r}; settings: {sorted(node)}")
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise InputError(f"{where}: {parts[-1]!r} is a group; set one of its fields")
        set_from_text(tree, "defense." + ".".join(parts), text.strip(), where)
