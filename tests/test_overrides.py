"""`--set NAME.FIELD=VALUE` overrides of defense settings (experiments.overrides)."""

import pytest

from experiments.cli import InputError
from experiments.overrides import apply_overrides
from ftsam_jax.defenses import DEFENSES


def configs(*names):
    return {n: DEFENSES[n].default_config("cpu") for n in names}


def test_overrides_parse_by_field_type_and_reach_nested_settings():
    base = configs("ikd", "nad")
    out = apply_overrides(base, ["ikd.alpha_adv=0", "ikd.teacher_sam=false", "ikd.epochs=7",
                                 "ikd.teacher.rho=4", "ikd.betas=1,2,3",
                                 "ikd.afa_layers=layer3_1,layer4_1"])
    ikd = out["ikd"]
    assert ikd.alpha_adv == 0.0 and isinstance(ikd.alpha_adv, float)
    assert ikd.teacher_sam is False and ikd.epochs == 7 and ikd.teacher.rho == 4.0
    assert ikd.betas == (1.0, 2.0, 3.0) and ikd.afa_layers == ("layer3_1", "layer4_1")
    # Everything else, and the other defenses, untouched; the input is not modified.
    assert ikd.lr == base["ikd"].lr and ikd.teacher.epochs == base["ikd"].teacher.epochs
    assert out["nad"] == base["nad"] and base["ikd"].alpha_adv != 0.0


@pytest.mark.parametrize("item,message", [
    ("ikd.nope=1", "no setting 'nope'"),
    ("ft.epochs=3", "'ft' is not in --defenses"),
    ("ikd.epochs=many", "invalid literal"),
    ("ikd.teacher_sam=maybe", "expected true or false"),
    ("ikd.teacher=1", "is a group"),
    ("ikd.adv_source=sideways", "adv_source must be one of"),
    ("alpha_adv=0", "expected NAME.FIELD=VALUE"),
])
def test_bad_overrides_are_input_errors(item, message):
    with pytest.raises(InputError) as err:
        apply_overrides(configs("ikd"), [item])
    assert message in str(err.value)
