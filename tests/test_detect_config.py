"""experiments.detect's settings in process: the config file, its resolution, resume guards."""

from __future__ import annotations

import json

import pytest

from experiments.cli import InputError
from experiments.configs.detect import LEGACY_VALUES, PRESETS, get_config
from experiments.detect import (
    RUN_KEYS,
    adv_key,
    attack_config,
    method_config,
    method_parts,
    paired_lines,
    resolve,
    results_table,
    seeds_phrase,
    upgrade_results,
)
from experiments.workdir import check_workdir
from ftsam_jax.detection.distill import DetectDistillConfig
from ftsam_jax.detection.fgd import FGDConfig
from ftsam_jax.detection.mgd import MGDConfig
from ftsam_jax.distill.adversarial import AttackConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_values_match_the_library_defaults(preset):
    """A value the library also defaults is spelled in the config file with the same value,
    so the two cannot drift apart unnoticed."""
    tree = get_config(preset)
    assert tree.alpha_adv == DetectDistillConfig().alpha_adv
    assert method_config("fgd", resolve(tree, 1)).base == FGDConfig()
    assert method_config("mgd_ikd", resolve(tree, 1)).base == MGDConfig()
    assert attack_config(resolve(tree, 1)) == AttackConfig()  # AFA's official 8/255, 5 steps
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
                                 ("teacher_extra_scenes", -1, "teacher_extra_scenes"),
                                 ("afa_eps", -1.0, "--afa_eps"),
                                 ("afa_eps", float("nan"), "--afa_eps"),
                                 ("afa_steps", 0, "--afa_steps"),
                                 ("mgd_alpha", -1e-5, "mgd_alpha"),
                                 ("mgd_lambda", 1.0, "mgd_lambda")):
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


def test_methods_name_their_base_and_ikd_terms():
    cfg = resolve(get_config("smoke"), 1)
    assert method_parts("student") == (None, False, None)
    assert method_parts("fgd_noise") == ("fgd", False, "noise")
    for base in ("fgd", "mgd"):
        assert method_parts(base) == (base, False, None)
        assert method_parts(f"{base}_ssa") == (base, True, None)
        assert method_parts(f"{base}_afa") == (base, False, "adv")
        assert method_parts(f"{base}_ikd") == (base, True, "adv")
    # the IKD terms' settings are the same whichever base runs
    assert method_config("mgd_ikd", cfg).alpha_adv == method_config("fgd_ikd", cfg).alpha_adv
    assert method_config("mgd", cfg).alpha_adv == 0.0
    # results.json's record: an FGD method's as before the base interface
    assert method_config("fgd", cfg).record() == {
        "fgd": {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lam": 5e-6, "temperature": 0.5},
        "alpha_adv": 0.0, "levels": ["p3", "p4", "p5"]}
    assert method_config("mgd_afa", cfg).record()["mgd"] == {"alpha": 2e-5, "ratio": 0.65}
    tree = get_config("smoke")
    tree.afa_eps, tree.afa_steps = 2.0, 3
    assert attack_config(resolve(tree, 1)) == AttackConfig(eps=2 / 255, steps=3)


def test_older_results_keep_their_teacher_ap_adv_under_the_default_strength():
    """An older results.json's single ap_adv (eps 8/255, 5 steps) is keyed on reading; the
    table's line for the default strength reads as before; other strengths are listed."""
    cfg = resolve(get_config("smoke"), 1)
    metrics = {k: 0.5 for k in ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100")}
    old = {"dataset": cfg["dataset"], "config": {**cfg, "train_images": 64, "val_images": 32},
           "teacher": {**metrics, "ap_adv": 0.125, "seconds": 1.0}, "students": {}}
    for key in ("afa_eps", "afa_steps", "mgd_alpha", "mgd_lambda"):
        del old["config"][key]  # written before these fields existed
    new = upgrade_results(json.loads(json.dumps(old)))
    assert new["teacher"]["ap_adv"] == {"eps=8/255,steps=5": 0.125} == {adv_key(8.0, 5): 0.125}
    line = ("Teacher AP on its adversarial evaluation images: 12.5 (clean 50.0).")
    assert line in results_table(new).splitlines()
    new["teacher"]["ap_adv"][adv_key(2.0, 5)] = 0.25
    new["config"].update(afa_eps=2.0, afa_steps=5)
    assert ("Teacher AP on its adversarial evaluation images (MI-DI-FGSM, eps 2/255, 5 steps): "
            "25.0 (clean 50.0). At other strengths (other runs from this teacher): "
            "eps=8/255,steps=5 12.5.") in results_table(new).splitlines()

    # the students removed by hand (to train them again): read as none trained yet
    del old["students"]
    assert upgrade_results(json.loads(json.dumps(old)))["students"] == {}


def test_paired_lines_by_hand():
    """results.md's differences against FGD: paired by seed, mean ± sample std and the 95%
    t interval over the seeds both methods ran, "not resolved" where it spans 0."""
    def run(aps, ap_ss, seeds):
        return {"per_seed": [{"seed": s, "ap": a, "ap_s": b}
                             for s, a, b in zip(seeds, aps, ap_ss, strict=True)]}

    results = {"config": {"paired_streams": True}, "students": {
        "fgd": run([0.10, 0.20, 0.30], [0.10, 0.10, 0.10], [0, 1, 2]),
        "fgd_ikd": run([0.12, 0.25, 0.31, 0.9], [0.11, 0.115, 0.12, 0.9], [0, 1, 2, 3]),
        "student": run([0.5], [0.5], [7])}}  # no seed in common with fgd: no line
    lines = paired_lines(results)
    assert "same init and batch order for every method of a seed" in lines[1]
    # AP: differences 2, 5, 1 points (seed 3 is fgd_ikd's alone): mean 8/3, std sqrt(13/3),
    # half-width t(0.975, 2) * std / sqrt(3) = 4.3027 * 2.0817 / 1.7321 = 5.171.
    # AP_S: 1, 1.5, 2: mean 1.5, std 0.5, half-width 4.3027 * 0.5 / 1.7321 = 1.242.
    assert lines[3:] == ["- fgd_ikd: AP +2.67 ± 2.08 [-2.50, +7.84] not resolved, "
                         "AP_S +1.50 ± 0.50 [+0.26, +2.74] (3 seeds)"]
    results["config"]["paired_streams"] = False
    assert "each method draws its own init and order" in paired_lines(results)[1]
    assert paired_lines({**results, "students": {"student": results["students"]["student"]}}) \
        == []
