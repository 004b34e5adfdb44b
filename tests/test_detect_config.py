"""experiments.detect's settings in process: the config file, its resolution, resume guards."""

from __future__ import annotations

import json

import pytest

from experiments.cli import InputError
from experiments.configs.detect import LEGACY_VALUES, PRESETS, get_config
from experiments.detect import RUN_KEYS, method_config, resolve, seeds_phrase
from experiments.workdir import check_workdir
from ftsam_jax.detection.distill import DetectDistillConfig
from ftsam_jax.detection.fgd import FGDConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_values_match_the_library_defaults(preset):
    """A value the library also defaults is spelled in the config file with the same value,
    so the two cannot drift apart unnoticed."""
    tree = get_config(preset)
    assert tree.alpha_adv == DetectDistillConfig().alpha_adv
    assert method_config("fgd", resolve(tree, 1)).fgd == FGDConfig()
    # The fields added after older workdirs ran default to what those runs had.
    for key, value in LEGACY_VALUES.items():
        assert tree[key] == value, key


def test_resolve_records_every_setting_and_refuses_bad_values():
    cfg = resolve(get_config("smoke"), 8)
    assert set(RUN_KEYS) <= set(cfg) and cfg["seeds"] == [0] and cfg["seed0"] == 0
    assert json.loads(json.dumps(cfg)) == cfg
    for field, value, phrase in (("ikd_fraction", 1.5, "ikd_fraction"),
                                 ("noise_eps", -1.0, "noise_eps"),
                                 ("warmup_epochs", 2.0, "warmup_epochs"),
                                 ("teacher_extra_scenes", -1, "teacher_extra_scenes")):
        tree = get_config("smoke")
        tree[field] = value
        with pytest.raises(InputError, match=phrase):
            resolve(tree, 8)
    tree = get_config("smoke")
    tree.dataset, tree.teacher_extra_scenes = "coco:/somewhere", 10
    with pytest.raises(InputError, match="needs scenes: data"):
        resolve(tree, 8)


def test_older_workdirs_resume_and_changed_settings_are_refused(tmp_path):
    """A config.json written before the later fields existed still matches a default run; a
    changed later field (here paired_streams) is refused."""
    cfg = resolve(get_config("cpu"), 1)
    older = {k: v for k, v in cfg.items() if k not in LEGACY_VALUES}
    (tmp_path / "config.json").write_text(json.dumps({"run": older}))
    check_workdir(tmp_path, cfg, RUN_KEYS, legacy=LEGACY_VALUES)
    with pytest.raises(InputError, match="paired_streams: False -> True"):
        check_workdir(tmp_path, {**cfg, "paired_streams": True}, RUN_KEYS, legacy=LEGACY_VALUES)


def test_committed_detection_runs_still_match_their_settings():
    """results/detect_*/config.json (written before the later fields) resume under today's
    defaults: their run keys equal what the same command resolves to now."""
    from tests.conftest import ROOT

    for path in sorted(ROOT.glob("results/detect_*/config.json")):
        old = json.loads(path.read_text())["run"]
        tree = get_config(old.get("preset", "cpu"))
        for key in RUN_KEYS:
            if key in old and key in tree and key not in ("seed0",):
                tree[key] = tuple(old[key]) if isinstance(old[key], list) else old[key]
        tree.seeds = ",".join(str(s) for s in old["seeds"])
        tree.methods = ",".join(old["methods"])
        tree.dataset, tree.data_dir = old["dataset"], old["data_dir"]
        check_workdir(path.parent, resolve(tree, 1), RUN_KEYS, legacy=LEGACY_VALUES)


def test_results_header_names_each_rows_seeds_when_they_differ():
    ten = {"per_seed": [{"seed": s} for s in range(10)]}
    three = {"per_seed": [{"seed": s} for s in (2, 0, 1)]}
    assert seeds_phrase({"fgd": ten, "fgd_ikd": ten}) == f"seeds {list(range(10))}"
    assert seeds_phrase({"fgd": ten, "fgd_ikd": ten, "fgd_afa": three}) == (
        f"their seeds (fgd, fgd_ikd: {list(range(10))}; fgd_afa: [0, 1, 2])")
