r"""The paper's Table 1 in one command: every attack x every defense, mean +- std over seeds.

    python -m experiments.table --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
        --preset=cpu --attacks=badnets,badnets_a2a,blended,sig,wanet,lf,input_aware \
        --defenses=ft,ftsam,fp,nad,anp,ibau,clp,ikd --defense_seeds=0,1,2 \
        --seeded_defenses=ft,ftsam --workdir=runs/table

Every cell runs through `experiments.ftsam` (a subprocess each, so one failing cell does not
stop the others): per attack, `WORKDIR/ATTACK/ds{s}` holds the run for defense seed s; the
backdoored model is trained once, in the first seed's folder, and its final variables
(`models/backdoored`), its row of results.json and its checkpoints are copied to the others
(nothing is trained twice; those folders are ordinary `experiments.ftsam` workdirs). A folder
whose results.json has the backdoored row and `models/backdoored` (for LF also its trigger
`lf_pattern.npy`, for TrojanNN `trojannn_trigger.npz`, for LC `lc_adversarial.npz`, for SSBA
`ssba_encoder.npz`; Input-aware has `models/input_aware` instead: classifier, generator and
mask) needs no checkpoint: committing those (a few MB at `cpu` width) lets a table go on
later, on another machine.
Defenses in `--seeded_defenses` run with every seed of `--defense_seeds`, the others with the
first. The training-time defenses (AC, ABL) take each attack's poisoned training set; on
WaNet and Input-aware, which poison on the fly, their cells are left out (`applicable`).

`--model_seeds=0,1,...` trains each attack's backdoored model once per model seed (its own
initialisation, poison draw and data order: the cell's `--seed`), the unit of replication of a
study; the defense seeds nest inside, `WORKDIR/ATTACK/m{m}/ds{s}`, and the cells run model seed by
model seed (every attack's first model, then the second ...), so a table stopped early already
holds whole models. Without it the table keeps the single-model layout (`--seed`).
A cell with the Retuning Attack (`--ftsam_flag=--retune_attack`) also needs a clean model per
model seed: the first attack's folder trains it, the other attacks' folders of the same model
seed get a copy (`models/clean`; it does not depend on the attack).

A column of `--defenses` is a defense or a variant of one, `NAME[FIELD=VALUE,...]`
(`experiments.variants`): `--defenses=ft,ftsam,ftsam[rho=0],ftsam[adaptive=false]` sets FT-SAM
beside its SAM-off control and plain SAM; a variant's cells are ordinary columns, named as
written. `--benign_selection` (passed to every cell) is `shared` for a new table: every defense
of a defense seed fine-tunes on the same class-balanced subset, so the columns are paired; a
table made before the setting existed keeps `reference` (each defense its own subset) and
resumes. `--benign_ratios=0.01,0.05,0.1` makes one block per ratio (the paper's Table 3), each
in `WORKDIR/ATTACK/ratioR/ds{s}`, the backdoored model still trained once per attack.
`--differences=ftsam:ft,ftsam:ftsam[rho=0]` adds the paired differences A - B per attack (mean
+- std over defense seeds and the 95% t interval; "not resolved" when it spans 0). When columns
of one defense differ in one numeric setting (`ftsam[rho=1]`, `ftsam`, `ftsam[rho=4]`),
`table_FIELD.png` draws ASR and C-Acc against it (mean +- std over seeds).

Rerunning the command skips finished cells and resumes interrupted ones from their
checkpoints. Writes `table.md` (rows: attacks and their average; column groups: No
defense and each defense with C-Acc / ASR / DER in %, mean +- std over seeds), `table.json`
(every number, per seed, and the failed cells), `table.png` (ASR and C-Acc heat maps) and
`logs/` (each cell's output).

The cells share JAX's persistent compilation cache (`WORKDIR/jax_cache`): cells of the same
shapes (every FT-SAM cell of a table, say) compile their steps once. Measured: a `smoke`
pipeline 21 s -> 14.5 s on CPU with identical numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.cli import InputError, comma_list, config_from_flags, distinct_ints, fail, run
from experiments.configs.table import get_config
from experiments.table_render import (
    METRICS,
    NO_DEFENSE,
    axis_plot,
    differences,
    paper_cells,
    table_markdown,
    table_plot,
    variant_axis,
)
from experiments.variants import DefenseColumn, parse_column, parse_columns
from experiments.workdir import (
    RESULTS_FIX,
    atomic_write,
    check_workdir_path,
    lock_workdir,
    read_json,
)
from ftsam_jax import metrics
from ftsam_jax.attacks import ATTACKS
from ftsam_jax.data import load_dataset
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses.base import BENIGN_SELECTIONS

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line of `python -m experiments.table` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests); every flag but
    --workdir is a shorthand of `experiments/configs/table.py`'s field of the same name."""
    flags.DEFINE_string("dataset", None, "As in experiments.ftsam.")
    flags.DEFINE_string("data_dir", None, "As in experiments.ftsam.")
    flags.DEFINE_enum("preset", "cpu", ["paper", "cpu", "smoke"], "As in experiments.ftsam.")
    flags.DEFINE_list("attacks", None, "Rows of the table (default: the 7 attacks).")
    flags.DEFINE_list("defenses", None, "Columns of the table (default: the 8 defenses): "
                      "defenses or variants NAME[FIELD=VALUE,...], e.g. ftsam[rho=0].")
    flags.DEFINE_list("defense_seeds", None, "Defense seeds (benign subset and random streams).")
    flags.DEFINE_list("seeded_defenses", None, "Defenses run with every --defense_seeds seed "
                      "(default: all); the others run with the first seed only.")
    flags.DEFINE_enum("benign_selection", None, list(BENIGN_SELECTIONS), "Passed to every "
                      "cell (default: shared for a new table, the table's own for an existing "
                      "one; see experiments.ftsam).")
    flags.DEFINE_list("benign_ratios", None, "One block of the table per benign ratio, e.g. "
                      "0.01,0.05,0.1 (the paper's Table 3); default: the cells' own ratio.")
    flags.DEFINE_list("differences", None, "Paired differences A:B (A - B over the defense "
                      "seeds, per attack) written under the table, e.g. ftsam:ft.")
    flags.DEFINE_integer("seed", None, "Seed of the backdoored models (poisoning, init, order).")
    flags.DEFINE_list("model_seeds", None, "Independent backdoored models per attack, one per "
                      "seed (ATTACK/m<seed>/ds<defense seed>); replaces --seed.")
    flags.DEFINE_multi_string("ftsam_flag", [], "A flag passed to every experiments.ftsam cell, "
                              "e.g. --ftsam_flag=--epochs=30 (repeatable).")
    flags.DEFINE_string("workdir", "runs/table", "Output folder.")
    flags.DEFINE_bool("plot", None, "Write table.png.")
    flags.DEFINE_string("compilation_cache", None, "Folder of JAX's persistent compilation "
                        "cache shared by the cells (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "WORKDIR/jax_cache; 'off': every cell compiles afresh). A cached "
                        "program is the same program: the numbers do not change.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole table, e.g. experiments/configs/table.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)


SHORTHANDS = ("dataset", "data_dir", "attacks", "defenses", "defense_seeds", "seeded_defenses",
              "benign_selection", "benign_ratios", "differences", "seed", "model_seeds", "plot",
              "compilation_cache")


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


class Cell(NamedTuple):
    """One run of the table: an attack's backdoored model (defense None) or one column with one
    defense seed, at one benign ratio (None: the cells' preset's, the single-block layout), of
    the backdoored model of one model seed (None: the table's `--seed`, the one-model layout)."""

    attack: str
    defense: str | None
    seed: int
    ratio: float | None = None
    model_seed: int | None = None


def _names(values: list[str], known: Iterable[str], name: str) -> list[str]:
    known = list(known)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise InputError(f"unknown --{name} {unknown}; choose from {sorted(known)}")
    if not values or len(set(values)) != len(values):
        raise InputError(f"--{name} must list distinct names, got {values}")
    return list(values)


def plan_cells(attacks: list[str], defenses: list[str], seeds: list[int], seeded: set[str],
               ratios: Sequence[float | None] = (None,),
               model_seeds: Sequence[int | None] = (None,)) -> list[Cell]:
    """The cells in running order: per model seed, per attack its backdoored model (first
    ratio, first seed), then per ratio every column with its seeds."""
    cells: list[Cell] = []
    for m in model_seeds:
        for a in attacks:
            cells.append(Cell(a, None, seeds[0], ratios[0], m))
            for r in ratios:
                for d in defenses:
                    if not applicable(a, d):
                        continue
                    cells.extend(Cell(a, d, s, r, m)
                                 for s in (seeds if d in seeded else seeds[:1]))
    return cells


def applicable(attack: str, column: str) -> bool:
    """Whether a column can run on an attack: a training-time defense (AC, ABL) needs a fixed
    poisoned training set, which WaNet and Input-aware (poisoned on the fly) do not leave; the
    table leaves those cells out (a "n/a" in table.md), rather than failing them."""
    spec = DEFENSES[parse_column(column, DEFENSES).base]
    return not spec.training_time or ATTACKS[attack].poisoned_set


def cell_dir(root: Path, attack: str, seed: int, ratio: float | None = None,
             model_seed: int | None = None) -> Path:
    """`ROOT/ATTACK/ds{seed}`; `ROOT/ATTACK/ratio{r}/ds{seed}` in a table of benign ratios;
    `ROOT/ATTACK/m{model_seed}/...` in a table of model seeds."""
    folder = root / attack if model_seed is None else root / attack / f"m{model_seed}"
    folder = folder if ratio is None else folder / f"ratio{ratio:g}"
    return folder / f"ds{seed}"


def _dir(root: Path, cell: Cell) -> Path:
    return cell_dir(root, cell.attack, cell.seed, cell.ratio, cell.model_seed)


def _results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    return read_json(path, "the cell's results", RESULTS_FIX) if path.is_file() else {}


def _done(root: Path, cell: Cell) -> bool:
    res = _results(_dir(root, cell))
    return ("backdoored" in res) if cell.defense is None else cell.defense in res.get(
        "defenses", {})


def _is_defense_entry(name: str) -> bool:
    """Whether a checkpoint folder or marker belongs to a defense: its stages are named after
    it (`ft`, `nad_teacher`, ...) and a variant's files after the variant (`ftsam_rho=0`)."""
    stem = name.removesuffix(".settings.json")
    return any(stem == d or stem.startswith(d + "_") for d in DEFENSES)


def _share_backdoored(origin: Path, dst: Path) -> None:
    """Copies the backdoored model's final variables (Input-aware's: `models/input_aware`), its
    row of results.json, an attack's cached trigger (LF's `lf_pattern.npy`, TrojanNN's
    `trojannn_trigger.npz`, LC's adversarial images `lc_adversarial.npz`, SSBA's encoder
    `ssba_encoder.npz`) and the attack's
    stages' checkpoints (not the defenses') from the folder `origin` into `dst`. The row and
    the variables suffice: an origin holding no checkpoints (a committed table) trains nothing
    again in the others."""
    src = origin / "checkpoints"
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    first_results = _results(origin)
    if "backdoored" in first_results and "backdoored" not in _results(dst):
        # A Retuning Attack record belongs to its folder's defense seed: not copied.
        row = {k: _without_retune(first_results[k]) for k in
               ("dataset", "attack", "model", "config", "backdoored", "clean")
               if k in first_results}
        atomic_write(dst / "results.json", json.dumps({**row, "defenses": {}}, indent=2) + "\n")
    _copy_models(origin, dst, ("backdoored", "input_aware", "clean"))
    for cached in (*origin.glob("*.npy"), *origin.glob("*.npz")):  # LF, TrojanNN, LC, SSBA
        if not (dst / cached.name).exists():
            shutil.copy2(cached, dst / cached.name)
    if not src.is_dir():
        return
    for entry in src.iterdir():
        target = dst / "checkpoints" / entry.name
        if _is_defense_entry(entry.name) or target.exists() or not entry.is_dir():
            continue
        shutil.copytree(entry, target)


def _without_retune(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != "retune"} if isinstance(value, dict) else value


def _copy_models(origin: Path, dst: Path, names: Iterable[str]) -> None:
    """Copies `models/NAME` (and its `NAME.json` record) of each name from `origin` to `dst`
    where `dst` lacks it (Input-aware keeps its own networks, the Retuning Attack a clean
    model)."""
    for name in names:
        model = origin / "models" / name
        if model.is_dir() and not (dst / "models" / name).exists():
            shutil.copytree(model, dst / "models" / name)
        record = origin / "models" / f"{name}.json"
        if record.is_file() and not (dst / "models" / record.name).exists():
            shutil.copy2(record, dst / "models" / record.name)


def _share_clean(root: Path, cell: Cell, attacks: list[str]) -> None:
    """Before an attack's backdoored cell: a clean model another attack's folder of the same
    model seed trained (`models/clean`; it does not depend on the attack) is copied in."""
    home = _dir(root, cell)
    if (home / "models" / "clean").exists():
        return
    for other in attacks:
        folder = cell_dir(root, other, cell.seed, cell.ratio, cell.model_seed)
        if other != cell.attack and (folder / "models" / "clean.json").is_file():
            (home / "models").mkdir(parents=True, exist_ok=True)
            _copy_models(folder, home, ("clean",))
            return


def cell_env(root: Path, cache: str | None) -> dict[str, str]:
    """The cells' environment: this one, with JAX's persistent compilation cache pointed at
    `cache` (None: an inherited $JAX_COMPILATION_CACHE_DIR, else ROOT/jax_cache; 'off': none)."""
    env = dict(os.environ)
    if cache == "off":
        env.pop(CACHE_ENV, None)
    elif cache:
        env[CACHE_ENV] = str(Path(cache).absolute())
    elif not env.get(CACHE_ENV):
        env[CACHE_ENV] = str((root / "jax_cache").absolute())
    return env


def cell_command(root: Path, cell: Cell, run: dict[str, Any], extra: list[str]) -> list[str]:
    """`python -m experiments.ftsam ...` for one cell with the table's `run` settings."""
    attack, defense, seed, ratio, model_seed = cell
    cmd = [sys.executable, "-m", "experiments.ftsam", f"--dataset={run['dataset']}",
           f"--attack={attack}", f"--preset={run['preset']}",
           f"--seed={run['seed'] if model_seed is None else model_seed}",
           f"--defense_seed={seed}", f"--defenses={defense or ''}",
           f"--workdir={_dir(root, cell)}", "--progress=false", *extra]
    if run.get("benign_selection"):
        cmd.append(f"--benign_selection={run['benign_selection']}")
    if ratio is not None:
        cmd.append(f"--benign_ratio={ratio:g}")
    if run["data_dir"]:
        cmd.append(f"--data_dir={run['data_dir']}")
    return cmd


def run_cell(root: Path, cell: Cell, origin: Cell, extra: list[str],
             env: dict[str, str] | None = None, run: dict[str, Any] | None = None
             ) -> tuple[int, str]:
    """Runs one cell as `python -m experiments.ftsam` (in `env`, default this process's) with
    the table's `run` settings (dataset, data_dir, preset, seed, benign_selection; default:
    the flags'); a cell outside `origin`'s folder (the attack's backdoored cell) gets its
    backdoored model from there first. Returns (exit code, last stderr line)."""
    run = run or {k: FLAGS[k].value for k in ("dataset", "data_dir", "preset", "seed",
                                             "benign_selection")}
    folder, home = _dir(root, cell), _dir(root, origin)
    if folder != home:
        _share_backdoored(home, folder)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    label = ("backdoored" if cell.defense is None else
             parse_column(cell.defense, DEFENSES).folder)
    ratio = "" if cell.ratio is None else f"_ratio{cell.ratio:g}"
    model = "" if cell.model_seed is None else f"_m{cell.model_seed}"
    log = logs / f"{cell.attack}{model}_{label}{ratio}_ds{cell.seed}.log"
    with open(log, "w") as fh:
        # An interrupted table passes its signal on to the cell and starts no other.
        proc = cli.start_child(cell_command(root, cell, run, extra), stdout=fh,
                               stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, stderr = proc.communicate()
        finally:
            cli.children.discard(proc)
        fh.write(stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else "")


def _mean_std(values: list[float]) -> dict[str, float]:
    mean, std = metrics.mean_std(values)
    return {"mean": mean, "std": std}


def collect(root: Path, attacks: list[str], defenses: list[str], seeds: list[int],
            seeded: set[str], ratio: float | None = None, home_ratio: float | None = None,
            model_seeds: Sequence[int | None] = (None,)) -> dict[str, Any]:
    """One block's "cells": per attack the backdoored model (from its folder at `home_ratio`,
    the first ratio; with model seeds the mean over the models and "per_model") and each
    column per (model seed,) seed, at benign ratio `ratio`; with the Retuning Attack, "retune":
    its records on the undefended and the clean models per (model seed, seed)."""
    one_model = list(model_seeds) == [None]
    cells: dict[str, Any] = {}
    for a in attacks:
        per_model, reference = [], {"backdoored": [], "clean": []}
        for m in model_seeds:
            tag = {} if m is None else {"model_seed": m}
            base = _results(cell_dir(root, a, seeds[0], home_ratio, m)).get("backdoored")
            if base is not None:
                per_model.append({**tag, **{k: base[k] for k in ("clean_acc", "asr",
                                                                 "robust_acc")}})
            for s in seeds:
                res = _results(cell_dir(root, a, s, ratio, m))
                for key in reference:
                    if "retune" in res.get(key, {}):
                        reference[key].append({**tag, "seed": s, "clean_acc":
                                               res[key]["clean_acc"], "asr": res[key]["asr"],
                                               "retune": res[key]["retune"]})
        if one_model:
            no_defense = per_model[0] if per_model else None
        else:
            no_defense = None if not per_model else {
                **{k: float(sum(p[k] for p in per_model) / len(per_model))
                   for k in ("clean_acc", "asr", "robust_acc")}, "per_model": per_model}
        row: dict[str, Any] = {NO_DEFENSE: no_defense}
        for d in defenses:
            per_seed = []
            for m in model_seeds:
                for s in (seeds if d in seeded else seeds[:1]):
                    r = _results(cell_dir(root, a, s, ratio, m)).get("defenses", {}).get(d)
                    if r is not None:
                        per_seed.append({**({} if m is None else {"model_seed": m}), "seed": s,
                                         **{k: r[k] for k in METRICS},
                                         "seconds": r.get("seconds"),
                                         **({"benign": r["benign"]} if "benign" in r else {}),
                                         **({"retune": r["retune"]} if "retune" in r else {})})
            row[d] = {"per_seed": per_seed, **({k: _mean_std([p[k] for p in per_seed])
                                                for k in METRICS} if per_seed else {})}
        if any(reference.values()):
            row["retune"] = reference
        cells[a] = row
    return cells


def column_records(root: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """table.json's "columns": each column's defense, overrides, and the values it ran with of
    every field a column of the same defense overrides (from its first finished cell)."""
    fields: dict[str, set[str]] = {}
    for c in cfg["columns"]:
        fields.setdefault(c.base, set()).update(f for f, _ in c.overrides)
    out = {}
    for c in cfg["columns"]:
        record = next((r["config"] for a in cfg["attacks"] for ratio in cfg["ratios"]
                       for m in cfg["model_seeds"] for s in cfg["seeds"]
                       if (r := _results(cell_dir(root, a, s, ratio, m)).get("defenses", {})
                           .get(c.name)) and "config" in r), {})
        settings = {}
        for f in sorted(fields[c.base]):
            value: Any = record
            for part in f.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            settings[f] = value
        out[c.name] = {"base": c.base, "overrides": dict(c.overrides), "settings": settings}
    return out


def _differences(text: str, defenses: list[str]) -> list[tuple[str, str]]:
    """`A:B,C:D` -> [(A, B), (C, D)] (columns of the table); InputError else."""
    pairs = []
    for item in comma_list(text):
        left, sep, right = item.partition(":")
        pair = (left.strip(), right.strip())
        if not sep or not all(pair):
            raise InputError(f"--differences {item!r}: expected A:B (A - B), e.g. ftsam:ft")
        missing = [c for c in pair if c not in defenses]
        if missing:
            raise InputError(f"--differences {item!r}: {missing[0]!r} is not a column of "
                             f"--defenses")
        pairs.append(pair)
    return pairs


def _ratios(text: str) -> list[float | None]:
    """`--benign_ratios` -> the blocks' ratios ([None]: one block at the cells' own ratio)."""
    if not comma_list(text):
        return [None]
    try:
        ratios = [float(item) for item in comma_list(text)]
    except ValueError:
        raise InputError(f"--benign_ratios must be numbers, got {text!r}") from None
    if any(not 0.0 < r <= 1.0 for r in ratios) or len({f"{r:g}" for r in ratios}) != len(ratios):
        raise InputError(f"--benign_ratios must be distinct numbers in (0, 1], got {text!r}")
    return ratios


def check_columns(preset: str, columns: list[DefenseColumn]) -> None:
    """InputError for a column whose settings experiments.ftsam would refuse (a variant's
    unknown or fixed field, a value of the wrong type), before any cell runs."""
    from experiments import ftsam

    probe = ftsam.get_config(preset)
    probe.defenses = ",".join(c.name for c in columns)
    ftsam.defense_settings(probe, columns, 1)


def resolve(tree: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config tree -> the table's settings; InputError for anything invalid."""
    attacks = _names(comma_list(tree.attacks), ATTACKS, "attacks")
    columns = parse_columns(tree.defenses, DEFENSES)
    if not columns:
        raise InputError(f"--defenses must list distinct names, got {tree.defenses!r}")
    check_columns(tree.preset, columns)
    defenses = [c.name for c in columns]
    seeds = distinct_ints(tree.defense_seeds, "defense_seeds")
    model_seeds: list[int | None] = (distinct_ints(tree.model_seeds, "model_seeds")
                                     if comma_list(tree.model_seeds) else [None])
    seeded = set(defenses if tree.seeded_defenses is None else
                 [c.name for c in parse_columns(tree.seeded_defenses, DEFENSES)])
    if seeded - set(defenses):
        raise InputError(f"--seeded_defenses {sorted(seeded - set(defenses))} are not in "
                         "--defenses")
    ratios = _ratios(tree.benign_ratios)
    if tree.benign_selection not in (None, *BENIGN_SELECTIONS):
        raise InputError(f"--benign_selection must be one of {list(BENIGN_SELECTIONS)}, got "
                         f"{tree.benign_selection!r}")
    own = ["dataset", "data_dir", "attack", "preset", "seed", "defense_seed", "defenses",
           "workdir", "benign_selection", *(["benign_ratio"] if ratios != [None] else [])]
    for f in tree.ftsam_flags:
        if not f.startswith("--") or f.lstrip("-").split("=", 1)[0] in own:
            raise InputError(f"--ftsam_flag={f}: pass a flag (--name=value) that the table "
                             "does not set itself")
    return {"dataset": tree.dataset, "data_dir": tree.data_dir, "preset": tree.preset,
            "seed": tree.seed, "attacks": attacks, "columns": columns, "defenses": defenses,
            "seeds": seeds, "seeded": seeded, "ratios": ratios, "model_seeds": model_seeds,
            "benign_selection": tree.benign_selection,
            "differences": _differences(tree.differences, defenses),
            "ftsam_flags": list(tree.ftsam_flags), "plot": tree.plot,
            "compilation_cache": tree.compilation_cache}


def benign_selection(given: str | None, root: Path) -> str:
    """The table's benign selection: the one given, else the one its table.json records
    (`reference` for a table made before the setting existed), else `shared` for a new table.
    InputError when given differs from what the table already ran with."""
    path = root / "table.json"
    recorded = (read_json(path, "the table", "delete it and rerun the same command to write "
                          "it anew from the cells").get("benign_selection", "reference")
                if path.is_file() else None)
    if given is not None and recorded is not None and given != recorded:
        raise InputError(f"the table in {root} was run with --benign_selection={recorded}; "
                         "use another --workdir")
    return given or recorded or "shared"


def run_cells(cfg: dict[str, Any], root: Path,
              after_cell: Callable[[list[dict[str, Any]]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Runs every cell not done yet (a cell that fails is recorded, the others go on; a
    backdoored model that fails skips its attack's cells); calls `after_cell(failures)` after
    each cell that ran; returns the failures."""
    env = cell_env(root, cfg["compilation_cache"])
    cells = plan_cells(cfg["attacks"], cfg["defenses"], cfg["seeds"], cfg["seeded"],
                       cfg["ratios"], cfg["model_seeds"])
    failures: list[dict[str, Any]] = []
    failed_attacks: set[str] = set()
    ran_any = False
    for k, cell in enumerate(cells, 1):
        ratio = "" if cell.ratio is None else f" / ratio {cell.ratio:g}"
        model = "" if cell.model_seed is None else f" / model {cell.model_seed}"
        label = (f"[{k}/{len(cells)}] {cell.attack}{model} / {cell.defense or 'backdoored'} / "
                 f"seed {cell.seed}{ratio}")
        failure = {"attack": cell.attack, "defense": cell.defense, "seed": cell.seed,
                   "benign_ratio": cell.ratio,
                   **({} if cell.model_seed is None else {"model_seed": cell.model_seed})}
        if _done(root, cell):
            print(f"{label}: done earlier", flush=True)
            continue
        if (cell.attack, cell.model_seed) in failed_attacks:
            failures.append({**failure, "exit_code": None, "error": "backdoored model failed"})
            print(f"{label}: skipped (the backdoored model failed)", flush=True)
            continue
        print(f"{label}: running ({len(cells) - k} after it)", flush=True)
        cli.current_task = f"in cell {label} (its log: {root / 'logs'})"
        t0 = time.perf_counter()
        origin = Cell(cell.attack, None, cfg["seeds"][0], cfg["ratios"][0], cell.model_seed)
        if cell.defense is None:
            _share_clean(root, cell, cfg["attacks"])
        code, error = run_cell(root, cell, origin, cfg["ftsam_flags"], env, cfg)
        cli.wait_for_exit()  # stopped by our own interruption: not a failed cell
        if code == 2 and not ran_any:  # bad input (flags, data): every cell would say the same
            fail(error.removeprefix("error: ") or "experiments.ftsam refused its input")
        ran_any = True
        if code != 0:
            failures.append({**failure, "exit_code": code, "error": error})
            if cell.defense is None:
                failed_attacks.add((cell.attack, cell.model_seed))
            print(f"{label}: FAILED (exit {code}): {error}", flush=True)
        else:
            print(f"{label}: finished in {time.perf_counter() - t0:.0f} s", flush=True)
        if after_cell is not None:
            after_cell(failures)
    return failures


def make_table(cfg: dict[str, Any], root: Path, failures: list[dict[str, Any]]
               ) -> dict[str, Any]:
    """table.json's content from the cells' results.json files."""
    a, d, s, ratios = cfg["attacks"], cfg["defenses"], cfg["seeds"], cfg["ratios"]
    block_list = []
    for r in ratios:
        cells = collect(root, a, d, s, cfg["seeded"], r, ratios[0], cfg["model_seeds"])
        block_list.append({"benign_ratio": r, "cells": cells,
                           "paper": paper_cells(cfg["dataset"], a, d, r),
                           "differences": differences(cells, cfg["differences"])})
    table = {"dataset": cfg["dataset"], "preset": cfg["preset"], "seed": cfg["seed"],
             "attacks": a, "defenses": d, "defense_seeds": s,
             **({} if cfg["model_seeds"] == [None] else {"model_seeds": cfg["model_seeds"]}),
             "seeded_defenses": sorted(cfg["seeded"]), "ftsam_flags": cfg["ftsam_flags"],
             "benign_selection": cfg["benign_selection"],
             "columns": column_records(root, cfg), "failures": failures}
    if ratios == [None]:
        return {**table, **{k: v for k, v in block_list[0].items() if k != "benign_ratio"}}
    return {**table, "benign_ratios": ratios, "blocks": block_list}


def train_and_evaluate(tree: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) the table's cells in `workdir` and writes table.json and table.md
    (after every cell, and at the end), table.png (and `table_FIELD.png` for variants of one
    numeric field); returns the table (its "failures" list the cells that failed)."""
    cfg, root = resolve(tree), Path(workdir)
    check_workdir_path(root)
    cfg["benign_selection"] = benign_selection(cfg["benign_selection"], root)
    load_dataset(cfg["dataset"], cfg["data_dir"])  # bad data: one message, before any cell
    lock_workdir(root, "logs")  # a second table on this workdir is refused

    def write(failures: list[dict[str, Any]]) -> dict[str, Any]:
        table = make_table(cfg, root, failures)
        atomic_write(root / "table.json", json.dumps(table, indent=2) + "\n")
        atomic_write(root / "table.md", table_markdown(table))
        return table

    # table.json and table.md follow the cells (an interrupted table keeps what finished).
    table = write(run_cells(cfg, root, after_cell=write))
    if cfg["plot"]:
        table_plot(table, root / "table.png")
        axis = variant_axis(table)
        if axis is not None:
            axis_plot(table, axis, root / f"table_{axis['field'].replace('.', '_')}.png")
    return table


def main(argv: list[str]) -> None:
    del argv
    tree = config_from_flags(get_config, SHORTHANDS)
    if FLAGS.ftsam_flag:
        tree.ftsam_flags = tuple(FLAGS.ftsam_flag)
    table = train_and_evaluate(tree, FLAGS.workdir)
    root = Path(FLAGS.workdir)
    print()
    print(table_markdown(table))
    print(f"table: {root / 'table.md'}  numbers: {root / 'table.json'}")
    if table["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    run(main)
