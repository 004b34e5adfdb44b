"""experiments.table's layout pieces in process (benign-ratio blocks, paired differences, the
variant axis figure, the benign selection of a table) and experiments.report's check, on
results files written by the test."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments import report, table
from experiments.cli import InputError
from experiments.configs.table import get_config
from experiments.table_render import axis_plot, differences, table_markdown, variant_axis
from tests.conftest import ROOT

SEEDS = (0, 1, 2)
COLUMNS = ("ft", "ftsam", "ftsam[rho=0]", "ftsam[rho=4]")


def fake_cell(folder, defenses, seed, with_backdoored):
    """A cell folder's results.json with made-up numbers that depend on column and seed."""
    rows = {}
    for k, d in enumerate(defenses):
        asr = 0.9 - 0.2 * k + 0.01 * seed ** 2
        rows[d] = {"clean_acc": 0.7 - 0.01 * k, "asr": asr, "robust_acc": 0.1, "der": 0.5 + k / 10,
                   "seconds": 1.0, "benign": {"selection": "shared", "count": 50,
                                              "sha256": f"s{seed}"},
                   "config": {"rho": [2.0, 2.0, 0.0, 4.0][k] if d.startswith("ftsam") else 2.0}}
    results = {"defenses": rows}
    if with_backdoored:
        results["backdoored"] = {"clean_acc": 0.72, "asr": 0.95, "robust_acc": 0.02}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results))


def resolved(**fields):
    tree = get_config("smoke")
    tree.attacks, tree.defenses, tree.defense_seeds = "badnets,blended", ",".join(COLUMNS), "0,1,2"
    for key, value in fields.items():
        tree[key] = value
    return table.resolve(tree)


def test_ratio_blocks_layout_differences_and_the_axis(tmp_path):
    cfg = resolved(benign_ratios="0.01,0.1", differences="ftsam:ft,ftsam:ftsam[rho=0]")
    cfg["benign_selection"] = "shared"
    assert cfg["ratios"] == [0.01, 0.1]
    cells = table.plan_cells(cfg["attacks"], cfg["defenses"], cfg["seeds"], cfg["seeded"],
                             cfg["ratios"])
    assert cells[0] == table.Cell("badnets", None, 0, 0.01)
    assert len(cells) == 2 * (1 + 2 * len(COLUMNS) * len(SEEDS))
    assert table.cell_dir(tmp_path, "badnets", 2, 0.1) == tmp_path / "badnets" / "ratio0.1" / "ds2"
    cmd = table.cell_command(tmp_path, table.Cell("badnets", "ftsam[rho=0]", 1, 0.1),
                             {**cfg, "data_dir": None}, [])
    assert "--benign_ratio=0.1" in cmd and "--benign_selection=shared" in cmd
    assert "--defenses=ftsam[rho=0]" in cmd
    for a in cfg["attacks"]:
        for r in cfg["ratios"]:
            for s in SEEDS:
                fake_cell(table.cell_dir(tmp_path, a, s, r), COLUMNS, s, r == 0.01 and s == 0)
    made = table.make_table(cfg, tmp_path, [])
    assert made["benign_ratios"] == [0.01, 0.1] and "cells" not in made
    first = made["blocks"][0]
    assert first["cells"]["badnets"]["No defense"]["asr"] == 0.95
    assert first["paper"]["blended"]["ftsam"] == [90.83, 3.01, 96.05]  # Table 3, 1%
    # Paired differences over seeds: mean, sample std and the t interval of the per-seed
    # differences (here ftsam - ft: ASR -0.2 at every seed, std 0: resolved).
    diff = {(d["attack"], d["b"]): d for d in first["differences"]}
    asr = diff[("badnets", "ft")]["asr"]
    assert asr["mean"] == pytest.approx(-0.2) and asr["n"] == 3 and asr["resolved"]
    clean = diff[("badnets", "ftsam[rho=0]")]["clean_acc"]
    assert clean["mean"] == pytest.approx(0.01) and clean["std"] == pytest.approx(0, abs=1e-12)
    # One backdoored model per attack: "all" is over the 2 models (each one's seed mean), not
    # over the 6 (attack, seed) pairs that share them.
    pooled = {d["b"]: d for d in first["differences"] if d["attack"] == "all"}
    assert pooled["ft"]["asr"]["n"] == 2 and pooled["ft"]["asr"]["mean"] == pytest.approx(-0.2)
    assert pooled["ft"]["pairs"] == 6 and pooled["ft"]["unit"] == "backdoored models"
    md = table_markdown(made)
    assert "## Benign ratio 0.01" in md and "## Benign ratio 0.1" in md
    assert "| badnets | ftsam − ft | 3 defense seeds of 1 model | " in md and "Table 3" in md
    assert "| all | ftsam − ft | 2 backdoored models (6 pairs) | " in md
    assert made["columns"]["ftsam[rho=4]"]["settings"] == {"rho": 4.0}
    axis = variant_axis(made)
    assert axis == {"field": "rho", "base": "ftsam",
                    "values": {"ftsam": 2.0, "ftsam[rho=0]": 0.0, "ftsam[rho=4]": 4.0}}
    axis_plot(made, axis, tmp_path / "rho.png")
    assert (tmp_path / "rho.png").stat().st_size > 0


def test_a_difference_that_spans_zero_is_not_resolved():
    cells = {"badnets": {c: {"per_seed": [{"seed": s, "clean_acc": 0.5, "asr": v, "der": 0.5}
                                          for s, v in zip(SEEDS, values, strict=True)]}
                         for c, values in (("a", (0.5, 0.2, 0.6)), ("b", (0.4, 0.4, 0.4)))}}
    d = differences(cells, [("a", "b")])[0]["asr"]
    diffs = np.array([0.1, -0.2, 0.2])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert d["ci_low"] == pytest.approx(diffs.mean() - half)
    assert d["ci_high"] == pytest.approx(diffs.mean() + half) and not d["resolved"]


@pytest.mark.parametrize("fields,message", [
    (dict(benign_ratios="0.05,x"), "--benign_ratios must be numbers"),
    (dict(benign_ratios="0.05,0.050"), "distinct numbers in (0, 1]"),
    (dict(benign_ratios="1.5"), "distinct numbers in (0, 1]"),
    (dict(differences="ftsam"), "expected A:B"),
    (dict(differences="ftsam:nad"), "'nad' is not a column"),
    (dict(defenses="ft,ft[sam=true]"), "ft.sam cannot be changed"),
    (dict(defenses="ft,ftsam[rho=x]"), "--defenses ftsam[rho=x]"),
    (dict(benign_selection="half"), "--benign_selection must be one of"),
    (dict(ftsam_flags=("--benign_selection=shared",)), "does not set itself"),
    (dict(benign_ratios="0.1", ftsam_flags=("--benign_ratio=0.2",)), "does not set itself"),
])
def test_bad_table_settings_are_input_errors(fields, message):
    with pytest.raises(InputError) as err:
        resolved(**fields)
    assert message in str(err.value)


def test_a_new_table_is_shared_an_old_one_keeps_reference(tmp_path):
    assert table.benign_selection(None, tmp_path) == "shared"
    assert table.benign_selection("reference", tmp_path) == "reference"
    (tmp_path / "table.json").write_text(json.dumps({"cells": {}}))  # before the setting
    assert table.benign_selection(None, tmp_path) == "reference"
    with pytest.raises(InputError, match="was run with --benign_selection=reference"):
        table.benign_selection("shared", tmp_path)


def test_report_check_finds_a_stale_table_and_write_fixes_it(tmp_path, monkeypatch):
    results = tmp_path / "results"
    fake_cell(results / "runs" / "ds0", ("ft", "ftsam"), 0, True)
    fake_cell(results / "runs" / "ds1", ("ft", "ftsam"), 1, True)
    monkeypatch.setitem(report.BLOCKS, "runs", report.workdirs_grid("runs"))
    doc = tmp_path / "R.md"
    doc.write_text("Intro 1.0\n\n<!-- report:runs -->\n| stale |\n<!-- /report:runs -->\n\nEnd\n")
    assert report.check(doc, results)  # differs
    doc.write_text(report.render(doc.read_text(), results))
    assert report.check(doc, results) == []
    text = doc.read_text()
    assert text.startswith("Intro 1.0\n\n<!-- report:runs -->\n| Run | No defense | ft | ftsam |")
    assert "| ds1 | 72.00 / 95.00 | 70.00 / 91.00 / 50.00 | 69.00 / 71.00 / 60.00 |" in text
    assert text.endswith("<!-- /report:runs -->\n\nEnd\n")
    fake_cell(results / "runs" / "ds1", ("ft", "ftsam"), 2, True)  # a result changed
    assert report.check(doc, results)
    doc.write_text("<!-- report:nope -->\nx\n<!-- /report:nope -->\n")
    with pytest.raises(InputError, match="unknown generated block 'nope'"):
        report.check(doc, results)


def test_the_committed_cpu_table_resumes_as_reference_with_the_same_cells(tmp_path):
    """results/table_cpu (made before --benign_selection existed): rerunning its command with
    today's code runs no cell, keeps `reference` and gives the committed cells back."""
    committed = ROOT / "results" / "table_cpu"
    data = ROOT.parent / "shared" / "data" / "cifar10-subset"
    if not data.is_dir():
        pytest.skip("../shared/data is not present")
    for path in committed.glob("*/ds*/results.json"):
        target = tmp_path / path.relative_to(committed)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (tmp_path / "table.json").write_bytes((committed / "table.json").read_bytes())
    old = json.loads((committed / "table.json").read_text())
    tree = get_config("cpu")
    tree.data_dir, tree.plot = str(data), False
    tree.defense_seeds, tree.seeded_defenses = "0,1,2", "ft,ftsam"
    made = table.train_and_evaluate(tree, tmp_path)
    assert made["benign_selection"] == "reference" and made["failures"] == []
    assert made["cells"] == old["cells"]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_report_pools_paired_differences_over_the_attacks_of_two_tables(tmp_path):
    def write_table(folder, attacks, columns, asr):
        cells = {a: {c: {"per_seed": [{"seed": s, "clean_acc": 0.6, "asr": asr(a, c, s),
                                       "der": 0.5} for s in SEEDS]} for c in columns}
                 for a in attacks}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "table.json").write_text(
            json.dumps({"defenses": list(columns), "cells": cells}))

    def asr(attack, column, seed):  # SAM lowers ASR by 0.1 + 0.05 * seed + 0.02 * len(attack)
        return (0.8 - (0.1 + 0.05 * seed + 0.02 * len(attack)) * (column == "ftsam")
                - 0.01 * len(attack))

    write_table("iso", ("badnets", "sig"), ("ft", "ftsam", "ftsam[rho=0]", "x"), asr)
    write_table("lf", ("lf",), ("ft", "ftsam", "ftsam[rho=0]"), asr)
    make = report.pooled_differences(("iso", "lf"), (("ftsam", "ftsam[rho=0]"), ("ftsam", "x")))
    lines = make(tmp_path).splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| Attack")]
    one = "3 defense seeds of 1 model"
    assert [r.split(" | ")[0:3] for r in rows] == [
        ["| badnets", "ftsam − ftsam[rho=0]", one], ["| sig", "ftsam − ftsam[rho=0]", one],
        ["| lf", "ftsam − ftsam[rho=0]", one],
        ["| all", "ftsam − ftsam[rho=0]", "3 backdoored models (9 pairs)"]]
    # "all": one value per backdoored model (its seed mean), the t interval over the 3 models
    diffs = np.array([-(0.1 + 0.05 * np.mean(SEEDS) + 0.02 * len(a))
                      for a in ("badnets", "sig", "lf")])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert (f"{100 * diffs.mean():+.1f} ± {100 * diffs.std(ddof=1):.1f} "
            f"[{100 * (diffs.mean() - half):+.1f}, {100 * (diffs.mean() + half):+.1f}]") in rows[-1]
    write_table("again", ("lf",), ("ft", "ftsam"), asr)
    with pytest.raises(InputError, match="more than one"):
        report.pooled_differences(("lf", "again"), (("ftsam", "ft"),))(tmp_path)


def test_model_seeds_are_the_unit_of_the_interval(tmp_path):
    """Two attacks x two backdoored models x two defense seeds: each model's difference is
    averaged over its defense seeds first, the interval is over the models (hand computed)."""
    cfg = resolved(model_seeds="3,5", defense_seeds="0,1", differences="ftsam:ft")
    cfg["benign_selection"] = "shared"
    assert cfg["model_seeds"] == [3, 5]
    cells = table.plan_cells(cfg["attacks"], ["ft"], [0, 1], {"ft"}, [None], cfg["model_seeds"])
    assert cells[:4] == [table.Cell("badnets", None, 0, None, 3), table.Cell("badnets", "ft", 0,
                         None, 3), table.Cell("badnets", "ft", 1, None, 3),
                         table.Cell("blended", None, 0, None, 3)]  # model seed by model seed
    assert table.cell_dir(tmp_path, "lf", 1, None, 5) == tmp_path / "lf" / "m5" / "ds1"
    cmd = table.cell_command(tmp_path, table.Cell("lf", "ft", 1, None, 5),
                             {**cfg, "data_dir": None}, [])
    assert "--seed=5" in cmd and "--defense_seed=1" in cmd

    def effect(a, m, s):  # ftsam - ft in ASR
        return -0.1 * (1 + (a == "blended")) - 0.03 * m - 0.01 * s

    for a in cfg["attacks"]:
        for m in (3, 5):
            for s in (0, 1):
                folder = table.cell_dir(tmp_path, a, s, None, m)
                folder.mkdir(parents=True)
                rows = {d: {"clean_acc": 0.8, "asr": 0.9 + effect(a, m, s) * (d == "ftsam"),
                            "robust_acc": 0.1, "der": 0.5, "seconds": 1.0}
                        for d in ("ft", "ftsam")}
                res = {"defenses": rows, "backdoored": {"clean_acc": 0.9 + 0.01 * m, "asr": 1.0,
                                                       "robust_acc": 0.0}}
                (folder / "results.json").write_text(json.dumps(res))
    cfg["defenses"], cfg["seeded"] = ["ft", "ftsam"], {"ft", "ftsam"}
    made = table.make_table(cfg, tmp_path, [])
    assert made["model_seeds"] == [3, 5]
    nd = made["cells"]["badnets"]["No defense"]
    assert nd["clean_acc"] == pytest.approx(0.94) and len(nd["per_model"]) == 2
    assert [(p["model_seed"], p["seed"]) for p in made["cells"]["badnets"]["ft"]["per_seed"]] \
        == [(3, 0), (3, 1), (5, 0), (5, 1)]
    diff = {d["attack"]: d for d in made["differences"]}
    for a in cfg["attacks"]:
        per_model = np.array([np.mean([effect(a, m, s) for s in (0, 1)]) for m in (3, 5)])
        half = stats.t.ppf(0.975, 1) * per_model.std(ddof=1) / math.sqrt(2)
        d = diff[a]["asr"]
        assert diff[a]["unit"] == "backdoored models" and d["n"] == 2
        assert d["mean"] == pytest.approx(per_model.mean())
        assert d["ci_low"] == pytest.approx(per_model.mean() - half)
    every = np.array([np.mean([effect(a, m, s) for s in (0, 1)]) for a in cfg["attacks"]
                      for m in (3, 5)])
    half = stats.t.ppf(0.975, 3) * every.std(ddof=1) / 2
    assert diff["all"]["asr"]["n"] == 4 and diff["all"]["pairs"] == 8
    assert diff["all"]["asr"]["ci_high"] == pytest.approx(every.mean() + half)
    assert "| all | ftsam − ft | 4 backdoored models (8 pairs) |" in table_markdown(made)


def test_report_blocks_of_a_model_seed_study(tmp_path):
    """The paper's absolute claim per attack (each run's C-Acc cost against its own backdoored
    model), the per-model table and a stage's curve, on files written here."""
    def run(m, s, asr, acc):
        return {"model_seed": m, "seed": s, "clean_acc": acc, "asr": asr, "robust_acc": 0.5,
                "der": 0.5, "retune": {"clean_acc": acc, "asr": 0.5}}

    cells = {
        "badnets": {"No defense": {"clean_acc": 0.925, "asr": 1.0, "robust_acc": 0.0,
                                   "per_model": [{"model_seed": 0, "clean_acc": 0.93, "asr": 1.0},
                                                 {"model_seed": 1, "clean_acc": 0.92, "asr": 1.0}]},
                    "ftsam": {"per_seed": [run(0, 0, 0.02, 0.925), run(0, 1, 0.04, 0.92),
                                           run(1, 0, 0.01, 0.91), run(1, 1, 0.03, 0.915)]},
                    "retune": {"backdoored": [], "clean": [
                        {"model_seed": 0, "seed": 0, "clean_acc": 0.94, "asr": 0.01,
                         "retune": {"clean_acc": 0.94, "asr": 0.02}}]}},
        "blended": {"No defense": {"clean_acc": 0.93, "asr": 1.0, "robust_acc": 0.0,
                                   "per_model": [{"model_seed": 0, "clean_acc": 0.93, "asr": 1.0}]},
                    "ftsam": {"per_seed": [run(0, 0, 0.2, 0.92)]}},
    }
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "table.json").write_text(json.dumps({"defenses": ["ftsam"],
                                                           "cells": cells}))
    claim = report.absolute_claim("s")(tmp_path).splitlines()
    # badnets: ASR mean 2.5 (1-4), cost (0.5 + 1.0 + 1.0 + 0.5) / 4 = 0.75 points: yes
    assert claim[2] == "| badnets | 4 | 2.50 (1.00-4.00) | +0.75 (+0.50 to +1.00) | yes |"
    assert claim[3].startswith("| blended | 1 | 20.00 ") and claim[3].endswith("| no |")
    models = report.study_models("s")(tmp_path)
    assert "| badnets | 0 | 93.00 | 100.00 | 94.00 |" in models
    assert "| badnets | 1 | 92.00 | 100.00 | - |" in models
    assert "| Clean model |" in report.study_retune("s")(tmp_path)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"stage": "backdoored", "epoch": 1, "accuracy": 0.5, "clean_acc": 0.6, "asr": 0.9,
         "seconds": 90.4},
        {"stage": "backdoored", "epoch": 2, "accuracy": 0.6, "seconds": 80.0},  # not evaluated
        {"stage": "ft", "epoch": 1, "accuracy": 0.7, "clean_acc": 0.7, "asr": 0.1,
         "seconds": 3.0}]) + "\n")
    curve = report.stage_curve("m.jsonl", "backdoored")(tmp_path).splitlines()
    assert curve[2:] == ["| 1 | 50.00 | 60.00 | 90.00 | 90 |"]


def test_report_rebound_of_asr_within_a_defense(tmp_path):
    """Issue 35 (C): per model, the lowest ASR up to the early epoch and the last epoch's,
    their difference averaged over defense seeds, and its interval over models, computed by
    hand here; a variant column is read from its own stage, other stages are ignored; epochs
    before the first (5) are not in the lowest; a defense not yet in results.json (running: its
    last record is not its last epoch) is left out."""
    def write(cell, curves, finished):
        cell.mkdir(parents=True)
        lines = [{"stage": "backdoored", "epoch": 1, "asr": 0.0, "clean_acc": 0.9}]
        for stage, asrs in curves.items():
            lines.append({"stage": stage, "epoch": 1, "asr": 0.0, "clean_acc": 0.9})
            lines += [{"stage": stage, "epoch": 5 * (i + 1), "asr": a, "clean_acc": 0.9}
                      for i, a in enumerate(asrs)]
            lines.append({"stage": "retune/" + stage, "epoch": 1, "asr": 1.0})
        (cell / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        (cell / "results.json").write_text(json.dumps({"defenses": dict.fromkeys(finished, {})}))

    # epochs (1,) 5, 10, 15, 20; early = 10: lowest over epochs 5-10, last = epoch 20
    write(tmp_path / "s" / "blended" / "m0" / "ds0",
          {"ftsam": [0.5, 0.2, 0.3, 0.6], "ftsam_rho=0/ftsam": [0.9, 0.8, 0.8, 0.7]},
          ["ftsam", "ftsam[rho=0]"])
    write(tmp_path / "s" / "blended" / "m0" / "ds1", {"ftsam": [0.4, 0.1, 0.1, 0.2]}, ["ftsam"])
    write(tmp_path / "s" / "lf" / "m1" / "ds0", {"ftsam": [0.3, 0.3, 0.2, 0.3]}, ["ftsam"])
    # running: ftsam at epoch 15 of 20, not in results.json yet
    write(tmp_path / "s" / "lf" / "m1" / "ds1", {"ftsam": [0.9, 0.1, 0.5]}, [])
    text = report.defense_rebound("s", ("ftsam", "ftsam[rho=0]"), early=10)(tmp_path)
    lines = text.splitlines()
    # blended m0: (60 - 20 + 20 - 10) / 2 = +25.0; lf m1: 30 - 30 = 0.0; rho=0: 70 - 80 = -10
    assert "| blended | 0 | ftsam | 0, 1 | 20.0 (10) / 10.0 (10) | 60.0 (20) / 20.0 (20) | " \
           "+25.0 |" in lines
    assert "| lf | 1 | ftsam | 0 | 30.0 (5) | 30.0 (20) | +0.0 |" in lines
    assert "| blended | 0 | ftsam[rho=0] | 0 | 80.0 (10) | 70.0 (20) | -10.0 |" in lines
    half = stats.t.ppf(0.975, 1) * np.std([25.0, 0.0], ddof=1) / math.sqrt(2)
    assert (f"| ftsam | 2 backdoored models | +12.5 ± {np.std([25.0, 0.0], ddof=1):.1f} "
            f"[{12.5 - half:+.1f}, {12.5 + half:+.1f}] not resolved |") in lines
    assert "| ftsam[rho=0] | 1 backdoored model | -10.0 ± 0.0 (one value) |" in lines


def test_the_papers_table1_is_transcribed_from_the_reference_notes():
    """experiments.paper.TABLE1 against ../shared/reference/ftsam-paper.md's Table 1: every
    attack row, every column (AC, NC and ABL included), every number."""
    from experiments.paper import TABLE1

    ref = ROOT.parent / "shared" / "reference" / "ftsam-paper.md"
    if not ref.is_file():
        pytest.skip("../shared/reference is not beside the checkout")
    lines = ref.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### Table 1: CIFAR-10"))
    rows = [line for line in lines[start:start + 20] if line.startswith("| ")
            and not line.startswith(("| Attack", "| **Avg"))]
    names = {"BadNets-A2O": "badnets", "BadNets-A2A": "badnets_a2a", "Blended": "blended",
             "Input-aware": "input_aware", "CLA (LC)": "lc", "LF": "lf", "SIG": "sig",
             "SSBA": "ssba", "Trojan": "trojannn", "WaNet": "wanet"}
    columns = ["none", "ft", "fp", "nad", "ac", "nc", "anp", "abl", "ibau", "ftsam"]
    parsed = {}
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        parsed[names[cells[0]]] = {c: tuple(float(x) for x in v.split("/"))
                                   for c, v in zip(columns, cells[1:], strict=True)}
    assert parsed == TABLE1


def test_the_table_leaves_out_training_time_defenses_on_attacks_without_a_poisoned_set():
    """AC and ABL (and their variants) need a fixed poisoned training set: WaNet's and
    Input-aware's cells of them are not planned (not failed); every other cell is."""
    cells = table.plan_cells(["badnets", "wanet", "input_aware"],
                             ["ft", "ac", "abl[gamma=0.3]"], [0, 1], {"ft"})
    planned = {(c.attack, c.defense, c.seed) for c in cells}
    assert ("badnets", "ac", 0) in planned and ("badnets", "abl[gamma=0.3]", 0) in planned
    assert ("wanet", "ft", 1) in planned and ("input_aware", None, 0) in planned
    assert not {(a, d) for a, d, _ in planned if a != "badnets"} & {
        ("wanet", "ac"), ("wanet", "abl[gamma=0.3]"), ("input_aware", "ac"),
        ("input_aware", "abl[gamma=0.3]")}
    assert len(cells) == 3 * (1 + 2) + 2  # backdoored + ft's two seeds each, badnets' ac, abl


def test_report_knob_block_checks_the_benign_subsets(tmp_path):
    """Issue 35 (B): the knob grid with its differences, after checking that every knob run
    tuned on its base cell's benign subset (a tampered fingerprint is named); a missing study
    says it has not run."""
    make = report.knob_study("k")
    assert make(tmp_path).startswith("Not run yet")
    table = json.loads((ROOT / "results" / "fmnist_cpu" / "table.json").read_text())
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "table.json").write_text(json.dumps(table))
    text = make(tmp_path)
    runs = sum(len(c[col]["per_seed"]) for c in table["cells"].values()
               for col in ("ft", "ftsam[rho=0]") if col in c)
    assert f"all {runs} knob runs used their `ftsam` cell's subset" in text
    assert "| Attack |" in text
    table["cells"]["blended"]["ft"]["per_seed"][1]["benign"]["sha256"] = "0" * 64
    (tmp_path / "k" / "table.json").write_text(json.dumps(table))
    assert "Benign subsets DIFFER from `ftsam`'s in: blended/m0/ds1 ft." in make(tmp_path)


def test_report_neuron_block_reads_the_pooled_tests(tmp_path):
    """Issue 35 (A): the primary and secondaries from neurons.json's "all" block (made here by
    experiments.neurons.summarize from three models' reports), the primary's interval by hand."""
    from experiments import neurons

    def cell(attack, m, stats):
        base = {"clean_acc": 0.9, "asr": 1.0, "spearman_norm_tac": 0.5, "std_norm": 0.1,
                "cv_norm": 0.2, "top_tac_norm_share": 0.1}
        cols = {n: {**base, "spearman_norm_tac_backdoored": 0.4, "std_ratio": 1.0,
                    "high_tac_log_change": v, "spearman_log_change_tac": -0.1,
                    "mean_grad_norm": 1.0, "spearman_grad_tac": 0.0} for n, v in stats.items()}
        return {"attack": attack, "model_seed": m, "defense_seed": 0,
                "models": {"backdoored": base, **cols}}

    make = report.neuron_tests("s")
    assert make(tmp_path).startswith("Not run yet")
    reports = [cell("badnets", 0, {"ft": 0.0, "ftsam": -0.3}),
               cell("blended", 0, {"ft": 0.1, "ftsam": -0.1}),
               cell("lf", 0, {"ft": 0.0, "ftsam": -0.4})]
    summary = neurons.summarize(reports, [("ftsam", "ft"), ("ftsam", "ftsam[rho=0]")])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "neurons.json").write_text(json.dumps(summary))
    lines = make(tmp_path).splitlines()
    assert lines[0] == "Backdoored models: badnets/m0, blended/m0, lf/m0."
    d = [-0.3, -0.2, -0.4]
    half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / math.sqrt(3)
    assert (f"| primary | ftsam - ft | high_tac_log_change | {np.mean(d):+.4g} ± "
            f"{np.std(d, ddof=1):.3g} [{np.mean(d) - half:+.4g}, {np.mean(d) + half:+.4g}] | 3 |"
            ) in lines
    assert "| secondary | ftsam - ftsam[rho=0] | high_tac_log_change | - | 0 |" in lines
    assert any(line.startswith("| secondary | backdoored | spearman_norm_tac | +0.5 ± 0")
               for line in lines)


def test_report_mgd_block_pairs_seeds_with_the_committed_students(tmp_path):
    """Issue 34's block: (a) per eps fgd_afa − fgd paired by seed against the committed fgd,
    the teacher's adversarial AP keyed by strength; the choice; (b) the primary mgd_ikd − mgd
    by hand; parts not run are said to be."""
    def students(**methods):
        return {m: {"per_seed": [{"seed": s, "ap": ap, "ap_s": ap / 2} for s, ap in v.items()]}
                for m, v in methods.items()}

    make = report.mgd_study("m", "p")
    assert make(tmp_path).startswith("Not run yet")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "results.json").write_text(json.dumps({
        "teacher": {"ap_adv": 0.0}, "students": students(
            fgd={0: 0.10, 1: 0.12, 2: 0.11}, fgd_afa={0: 0.11, 1: 0.12, 2: 0.12},
            student={0: 0.08, 1: 0.09, 2: 0.085})}))
    (tmp_path / "m" / "eps2").mkdir(parents=True)
    (tmp_path / "m" / "eps2" / "results.json").write_text(json.dumps({
        "teacher": {"ap_adv": {"eps=2/255,steps=5": 0.155}},
        "students": students(fgd_afa={0: 0.12, 1: 0.13, 2: 0.12})}))
    text = make(tmp_path)
    lines = text.splitlines()
    assert "| 1 | not run yet | | |" in lines
    def text_of(d, note=" not resolved"):
        half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d))
        m = np.mean(d)
        return (f"{m:+.2f} ± {np.std(d, ddof=1):.2f} [{m - half:+.2f}, {m + half:+.2f}]{note} "
                f"({len(d)} seeds)")

    # eps 2: fgd_afa 12, 13, 12 against fgd 10, 12, 11; eps 8: the committed 11, 12, 12
    assert f"| 2 | 15.5 | {text_of([2.0, 1.0, 1.0])} | {text_of([1.0, 0.5, 0.5])} |" in lines
    assert f"| 8 | 0.0 | {text_of([1.0, 0.0, 1.0])} | {text_of([0.5, 0.0, 0.5])} |" in lines
    assert "The choice (choice.json): not made yet." in lines
    assert "(b) MGD with and without IKD: not run yet." in lines
    (tmp_path / "m" / "choice.json").write_text(json.dumps({
        "eps": 2, "heldout_ap_mean": {"1": 9.0, "2": 9.5}, "n": 8, "s": 0.6,
        "mgd_alpha": 0.002, "heldout_mgd_ap_mean": {"2e-5": 9.1, "2e-3": 9.9}}))
    (tmp_path / "m" / "mgd").mkdir()
    (tmp_path / "m" / "mgd" / "results.json").write_text(json.dumps({"students": students(
        mgd={0: 0.10, 1: 0.11}, mgd_ikd={0: 0.105, 1: 0.12})}))
    lines = make(tmp_path).splitlines()
    assert "A* = 0.002 (mean held-out AP of mgd by alpha_mgd: 2e-5: 9.10, 2e-3: 9.90)." in lines
    assert (f"| mgd_ikd − mgd (primary) | {text_of([0.5, 1.0])} | {text_of([0.25, 0.5])} |"
            in lines)
    # mgd 10, 11 against the committed student 8, 9: the same +2 on both seeds
    assert "| mgd − student | +2.00 ± 0.00 [+2.00, +2.00] (2 seeds) | " \
        "+1.00 ± 0.00 [+1.00, +1.00] (2 seeds) |" in lines


def test_report_records_of_the_new_attacks_and_defenses(tmp_path):
    """Issues 32/33: an attack's resource record and the defenses' detections, read from each
    attack's ds0 results.json; a missing one is 'not run yet', AC on an on-the-fly attack
    'n/a'."""
    def cell(attack, config, defenses):
        folder = tmp_path / "t" / attack / "ds0"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"config": config,
                                                         "defenses": defenses}))

    cell("ssba", {"attack_fit": {"test_bit_accuracy": 0.98765, "test_exact_code_rate": 0.5,
                                 "test_psnr": 31.25, "test_psnr_min": 27.0,
                                 "test_max_abs_change": 40}}, {})
    cell("badnets", {}, {
        "nc": {"details": {"flagged": [0], "min_anomaly_index": 3.456}},
        "ac": {"details": {"removed": 600, "precision": 0.5, "recall": None}},
        "abl": {"details": {"isolated": 51, "precision": 1.0, "recall": 51 / 517}}})
    cell("wanet", {}, {"nc": {"details": {"flagged": [], "min_anomaly_index": None}}})
    lines = report.table_records("t")(tmp_path).splitlines()
    assert ("| ssba | encoder: test bit accuracy 98.8% (exact code 50.0%), PSNR 31.2 dB (min "
            "27.0), max change 40 grey levels |") in lines
    assert "| lc | not run yet |" in lines and "| trojannn | not run yet |" in lines
    assert ("| badnets | flagged 0 (index 3.46) | removed 600, precision 50.0, recall - | "
            "isolated 51, precision 100.0, recall 9.9 |") in lines
    assert ("| wanet | none flagged (index -) | n/a (poisons on the fly) | "
            "n/a (poisons on the fly) |") in lines
