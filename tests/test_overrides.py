"""`--set NAME.FIELD=VALUE`: an alias of `--config.defense.NAME.FIELD=VALUE`, parsed by
ml_collections' parser of the field's type (experiments.overrides)."""

import pytest

from experiments.cli import InputError
from experiments.configs.ftsam import get_config
from experiments.overrides import apply_set_items


def tree(defenses="ikd,nad"):
    cfg = get_config("cpu")
    cfg.defenses = defenses
    return cfg


def test_set_items_parse_by_field_type_and_reach_nested_settings():
    cfg, base = tree(), tree()
    apply_set_items(cfg, ["ikd.alpha_adv=0", "ikd.teacher_sam=false", "ikd.epochs=7",
                          "ikd.teacher.rho=4", "ikd.betas=1,2,3",
                          "ikd.afa_layers=('layer3_1','layer4_1')", "ikd.attack.pad_value=0.5"])
    ikd = cfg.defense.ikd
    assert ikd.alpha_adv == 0.0 and isinstance(ikd.alpha_adv, float)
    assert ikd.teacher_sam is False and ikd.epochs == 7 and ikd.teacher.rho == 4.0
    assert ikd.betas == (1, 2, 3) and ikd.afa_layers == ("layer3_1", "layer4_1")
    assert ikd.attack.pad_value == 0.5
    # Everything else, and the other defenses, untouched.
    assert ikd.lr == base.defense.ikd.lr and ikd.teacher.epochs == base.defense.ikd.teacher.epochs
    assert cfg.defense.nad.to_dict() == base.defense.nad.to_dict()


def test_a_none_field_takes_its_type_from_the_config_file():
    cfg = tree("anp,fp")
    apply_set_items(cfg, ["anp.step_size=0.1", "fp.group_size=4"])
    assert cfg.defense.anp.step_size == 0.1 and cfg.defense.fp.group_size == 4
    with pytest.raises(InputError, match="fp.group_size=four"):
        apply_set_items(cfg, ["fp.group_size=four"])


@pytest.mark.parametrize("item,message", [
    ("ikd.nope=1", "no setting 'nope'"),
    ("ikd.teacher.nope=1", "no setting 'nope'"),
    ("ft.epochs=3", "'ft' is not in --defenses"),
    ("magic.rho=1", "'magic' is not in --defenses"),
    ("ikd.epochs=many", "invalid literal"),
    ("ikd.epochs=1.5", "invalid literal"),
    ("ikd.lr=fast", "could not convert"),
    ("ikd.teacher_sam=maybe", "Non-boolean argument"),
    ("ikd.teacher=1", "is a group"),
    ("ikd.alpha_adv.x=1", "'alpha_adv' has no sub-settings"),
    ("alpha_adv=0", "expected NAME.FIELD=VALUE"),
    ("ikd.alpha_adv", "expected NAME.FIELD=VALUE"),
])
def test_bad_set_items_are_one_line_input_errors_naming_the_item(item, message):
    with pytest.raises(InputError) as err:
        apply_set_items(tree(), [item])
    assert message in str(err.value) and item.split("=")[0] in str(err.value)
    assert "\n" not in str(err.value)
