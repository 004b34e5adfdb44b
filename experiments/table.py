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
`lf_pattern.npy`; Input-aware has `models/input_aware` instead: classifier, generator and mask)
needs no checkpoint: committing those (a few MB at `cpu` width) lets a table go on later, on
another machine.
Defenses in `--seeded_defenses` run with every seed of `--defense_seeds`, the others with the
first. Rerunning the command skips finished cells and resumes interrupted ones from
their checkpoints. Writes `table.md` (rows: attacks and their average; column groups: No
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
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.cli import InputError, comma_list, config_from_flags, distinct_ints, fail, run
from experiments.configs.table import get_config
from experiments.paper import PAPER_TABLE1_SETTING, TABLE1
from experiments.workdir import atomic_write, check_workdir_path, lock_workdir
from ftsam_jax import metrics
from ftsam_jax.attacks import ATTACKS
from ftsam_jax.data import load_dataset
from ftsam_jax.defenses import DEFENSES

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line of `python -m experiments.table` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests); every flag but
    --workdir is a shorthand of `experiments/configs/table.py`'s field of the same name."""
    flags.DEFINE_string("dataset", None, "As in experiments.ftsam.")
    flags.DEFINE_string("data_dir", None, "As in experiments.ftsam.")
    flags.DEFINE_enum("preset", "cpu", ["paper", "cpu", "smoke"], "As in experiments.ftsam.")
    flags.DEFINE_list("attacks", None, "Rows of the table (default: the 7 attacks).")
    flags.DEFINE_list("defenses", None, "Column groups of the table (default: the 8 defenses).")
    flags.DEFINE_list("defense_seeds", None, "Defense seeds (benign subset and random streams).")
    flags.DEFINE_list("seeded_defenses", None, "Defenses run with every --defense_seeds seed "
                      "(default: all); the others run with the first seed only.")
    flags.DEFINE_integer("seed", None, "Seed of the backdoored models (poisoning, init, order).")
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
              "seed", "plot", "compilation_cache")


NO_DEFENSE = "No defense"
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def _names(values: list[str], known: dict[str, Any], name: str) -> list[str]:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise InputError(f"unknown --{name} {unknown}; choose from {sorted(known)}")
    if not values or len(set(values)) != len(values):
        raise InputError(f"--{name} must list distinct names, got {values}")
    return list(values)


def plan_cells(attacks: list[str], defenses: list[str], seeds: list[int],
               seeded: set[str]) -> list[tuple[str, str | None, int]]:
    """(attack, defense or None for the backdoored model, seed), in running order."""
    cells: list[tuple[str, str | None, int]] = []
    for a in attacks:
        cells.append((a, None, seeds[0]))
        for d in defenses:
            cells.extend((a, d, s) for s in (seeds if d in seeded else seeds[:1]))
    return cells


def cell_dir(root: Path, attack: str, seed: int) -> Path:
    return root / attack / f"ds{seed}"


def _results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _done(root: Path, cell: tuple[str, str | None, int]) -> bool:
    attack, defense, seed = cell
    res = _results(cell_dir(root, attack, seed))
    return ("backdoored" in res) if defense is None else defense in res.get("defenses", {})


def _share_backdoored(root: Path, attack: str, first: int, seed: int) -> None:
    """Copies the backdoored model's final variables (Input-aware's: `models/input_aware`), its
    row of results.json, an attack's cached trigger (LF's `lf_pattern.npy`) and the attack's
    stages' checkpoints (not the defenses') into seed's folder. The row and the variables
    suffice: a first seed's folder holding no checkpoints (a committed table) trains nothing
    again in the others."""
    origin, dst = cell_dir(root, attack, first), cell_dir(root, attack, seed)
    src = origin / "checkpoints"
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    first_results = _results(origin)
    if "backdoored" in first_results and "backdoored" not in _results(dst):
        row = {k: first_results[k] for k in ("dataset", "attack", "model", "config", "backdoored")
               if k in first_results}
        atomic_write(dst / "results.json", json.dumps({**row, "defenses": {}}, indent=2) + "\n")
    for name in ("backdoored", "input_aware"):  # Input-aware keeps its own networks
        model = origin / "models" / name
        if model.is_dir() and not (dst / "models" / name).exists():
            shutil.copytree(model, dst / "models" / name)
    for cached in origin.glob("*.npy"):
        if not (dst / cached.name).exists():
            shutil.copy2(cached, dst / cached.name)
    if not src.is_dir():
        return
    for entry in src.iterdir():
        stem = entry.name.removesuffix(".settings.json")
        target = dst / "checkpoints" / entry.name
        if stem in DEFENSES or target.exists() or not entry.is_dir():
            continue
        shutil.copytree(entry, target)


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


def run_cell(root: Path, cell: tuple[str, str | None, int], first_seed: int,
             extra: list[str], env: dict[str, str] | None = None,
             run: dict[str, Any] | None = None) -> tuple[int, str]:
    """Runs one cell as `python -m experiments.ftsam` (in `env`, default this process's) with
    the table's `run` settings (dataset, data_dir, preset, seed; default: the flags'); returns
    (exit code, last stderr line)."""
    run = run or {k: FLAGS[k].value for k in ("dataset", "data_dir", "preset", "seed")}
    attack, defense, seed = cell
    folder = cell_dir(root, attack, seed)
    if seed != first_seed:
        _share_backdoored(root, attack, first_seed, seed)
    cmd = [sys.executable, "-m", "experiments.ftsam", f"--dataset={run['dataset']}",
           f"--attack={attack}", f"--preset={run['preset']}", f"--seed={run['seed']}",
           f"--defense_seed={seed}", f"--defenses={defense or ''}", f"--workdir={folder}",
           "--progress=false", *extra]
    if run["data_dir"]:
        cmd.append(f"--data_dir={run['data_dir']}")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{attack}_{defense or 'backdoored'}_ds{seed}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, text=True, env=env)
        cli.children.add(proc)  # an interrupted table passes the signal on
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
            seeded: set[str]) -> dict[str, Any]:
    """table.json's "cells": per attack, the backdoored model and each defense per seed."""
    cells: dict[str, Any] = {}
    for a in attacks:
        base = _results(cell_dir(root, a, seeds[0])).get("backdoored")
        row: dict[str, Any] = {NO_DEFENSE: None if base is None else {
            k: base[k] for k in ("clean_acc", "asr", "robust_acc")}}
        for d in defenses:
            per_seed = []
            for s in (seeds if d in seeded else seeds[:1]):
                r = _results(cell_dir(root, a, s)).get("defenses", {}).get(d)
                if r is not None:
                    per_seed.append({"seed": s, **{k: r[k] for k in
                                                   ("clean_acc", "asr", "robust_acc", "der")},
                                     "seconds": r.get("seconds")})
            row[d] = {"per_seed": per_seed, **({k: _mean_std([p[k] for p in per_seed])
                                                for k in ("clean_acc", "asr", "robust_acc",
                                                          "der")} if per_seed else {})}
        cells[a] = row
    return cells


def _fmt(stat: dict[str, float] | None, n: int) -> str:
    if not stat:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return text + (f" ± {100 * stat['std']:.1f}" if n > 1 else "")


def _average_der(no_defense: tuple[float, float], defended: tuple[float, float]) -> float:
    """The paper's Average-row DER: the DER of the attack-averaged (C-Acc, ASR) pairs
    (fractions), not the mean of the per-attack DERs."""
    return metrics.der({"clean_acc": no_defense[0], "asr": no_defense[1]},
                       {"clean_acc": defended[0], "asr": defended[1]})


def _grid(defenses: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table in the paper's layout: one column per defense, cells "a / b / c"."""
    head = ["Attack", "No defense", *defenses]
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def table_markdown(table: dict[str, Any]) -> str:
    """The paper's Table 1 layout: attacks x (No defense, each defense), each cell
    C-Acc / ASR / DER (No defense: C-Acc / ASR), then the paper's numbers for the same cells."""
    defenses, cells = table["defenses"], table["cells"]
    lines = [f"# Backdoor defenses on {table['dataset']} (preset {table['preset']})", "",
             f"Each cell: C-Acc / ASR / DER in % (No defense: C-Acc / ASR), mean ± std over "
             f"defense seeds (seeds {table['defense_seeds']} for "
             f"{sorted(table['seeded_defenses'])}, the first for the others). The Average row's "
             "DER is computed from the averaged C-Acc and ASR, as the paper's is.", ""]
    averages: dict[str, list[float]] = {}

    def add_avg(key: str, value: float | None) -> None:
        if value is not None:
            averages.setdefault(key, []).append(value)

    rows = []
    for a, row in cells.items():
        base = row[NO_DEFENSE]
        out = [a, "-" if base is None else
               f"{100 * base['clean_acc']:.1f} / {100 * base['asr']:.1f}"]
        if base is not None:
            add_avg("nd/clean_acc", base["clean_acc"])
            add_avg("nd/asr", base["asr"])
        for d in defenses:
            r, n = row[d], len(row[d]["per_seed"])
            out.append(" / ".join(_fmt(r.get(k), n) for k in ("clean_acc", "asr", "der"))
                       if r["per_seed"] else "-")
            for k in ("clean_acc", "asr"):
                add_avg(f"{d}/{k}", r[k]["mean"] if k in r else None)
        rows.append(out)
    full = lambda key: len(averages.get(key, [])) == len(cells)
    mean = lambda key: float(np.mean(averages[key]))
    out = ["Average", f"{100 * mean('nd/clean_acc'):.1f} / {100 * mean('nd/asr'):.1f}"
           if full("nd/clean_acc") else "-"]
    for d in defenses:
        keys = ("nd/clean_acc", "nd/asr", f"{d}/clean_acc", f"{d}/asr")
        if all(full(k) for k in keys):
            m = [mean(k) for k in keys]
            der = _average_der((m[0], m[1]), (m[2], m[3]))
            out.append(f"{100 * m[2]:.1f} / {100 * m[3]:.1f} / {100 * der:.1f}")
        else:
            out.append("-")
    lines += _grid(defenses, [*rows, out])
    if table.get("paper"):
        lines += ["", paper_markdown(table["paper"], list(cells), defenses)]
    if table["failures"]:
        lines += ["", "Failed cells (see logs/):"]
        lines += [f"- {f['attack']} / {f['defense'] or 'backdoored'} / seed {f['seed']}: "
                  f"exit {f['exit_code']}: {f['error']}" for f in table["failures"]]
    return "\n".join(lines) + "\n"


def paper_cells(dataset: str, attacks: list[str], defenses: list[str]) -> dict[str, Any]:
    """table.json's "paper": the FT-SAM paper's Table 1 numbers (%) for these cells, CIFAR-10
    only (the paper's full-scale setting: compare directions, not values, with `cpu` cells)."""
    if dataset != "cifar10":
        return {}
    return {a: {c: list(v) for c, v in TABLE1[a].items() if c == "none" or c in defenses}
            for a in attacks if a in TABLE1}


def paper_markdown(paper: dict[str, Any], attacks: list[str], defenses: list[str]) -> str:
    """The paper's numbers in table.md's layout ("n/a": a defense not in the paper)."""
    join = lambda values: " / ".join(f"{v:.2f}" for v in values)
    rows = [[a, join(paper[a]["none"]),
             *(join(paper[a][d]) if d in paper[a] else "n/a" for d in defenses)]
            for a in attacks if a in paper]
    names = [r[0] for r in rows]
    if names:
        mean = lambda c, i: float(np.mean([paper[a][c][i] for a in names]))
        out = ["Average", join((mean("none", 0), mean("none", 1)))]
        for d in defenses:
            if all(d in paper[a] for a in names):
                der = _average_der((mean("none", 0) / 100, mean("none", 1) / 100),
                                   (mean(d, 0) / 100, mean(d, 1) / 100))
                out.append(join((mean(d, 0), mean(d, 1), 100 * der)))
            else:
                out.append("n/a")
        rows.append(out)
    return "\n".join([f"For comparison, {PAPER_TABLE1_SETTING} (its Average row is over the "
                      "attacks listed here):", "", *_grid(defenses, rows)])


def table_plot(table: dict[str, Any], path: Path) -> None:
    """Two heat maps (ASR, C-Acc) of attack x (No defense + defenses), seed means in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks, cols = list(table["cells"]), [NO_DEFENSE, *table["defenses"]]
    fig, axes = plt.subplots(1, 2, figsize=(1.2 * len(cols) * 2 + 2, 0.5 * len(attacks) + 2))
    for ax, key, title, cmap in ((axes[0], "asr", "ASR (%)", "Reds"),
                                 (axes[1], "clean_acc", "C-Acc (%)", "Greens")):
        grid = np.full((len(attacks), len(cols)), np.nan)
        for i, a in enumerate(attacks):
            for j, c in enumerate(cols):
                cell = table["cells"][a][c]
                if c == NO_DEFENSE and cell is not None:
                    grid[i, j] = 100 * cell[key]
                elif c != NO_DEFENSE and key in cell:
                    grid[i, j] = 100 * cell[key]["mean"]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(len(attacks)):
            for j in range(len(cols)):
                text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
                dark = not np.isnan(grid[i, j]) and grid[i, j] > 60
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve(tree: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config tree -> the table's settings; InputError for anything invalid."""
    attacks = _names(comma_list(tree.attacks), ATTACKS, "attacks")
    defenses = _names(comma_list(tree.defenses), DEFENSES, "defenses")
    seeds = distinct_ints(tree.defense_seeds, "defense_seeds")
    seeded = set(defenses if tree.seeded_defenses is None else
                 _names(comma_list(tree.seeded_defenses), DEFENSES, "seeded_defenses"))
    if seeded - set(defenses):
        raise InputError(f"--seeded_defenses {sorted(seeded - set(defenses))} are not in "
                         "--defenses")
    for f in tree.ftsam_flags:
        name = f.lstrip("-").split("=", 1)[0]
        if not f.startswith("--") or name in ("dataset", "data_dir", "attack", "preset", "seed",
                                              "defense_seed", "defenses", "workdir"):
            raise InputError(f"--ftsam_flag={f}: pass a flag (--name=value) that the table "
                             "does not set itself")
    return {"dataset": tree.dataset, "data_dir": tree.data_dir, "preset": tree.preset,
            "seed": tree.seed, "attacks": attacks, "defenses": defenses, "seeds": seeds,
            "seeded": seeded, "ftsam_flags": list(tree.ftsam_flags), "plot": tree.plot,
            "compilation_cache": tree.compilation_cache}


def run_cells(cfg: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Runs every cell not done yet (a cell that fails is recorded, the others go on; a
    backdoored model that fails skips its attack's cells); returns the failures."""
    env = cell_env(root, cfg["compilation_cache"])
    cells = plan_cells(cfg["attacks"], cfg["defenses"], cfg["seeds"], cfg["seeded"])
    failures: list[dict[str, Any]] = []
    failed_attacks: set[str] = set()
    ran_any = False
    for k, cell in enumerate(cells, 1):
        attack, defense, seed = cell
        label = f"[{k}/{len(cells)}] {attack} / {defense or 'backdoored'} / seed {seed}"
        if _done(root, cell):
            print(f"{label}: done earlier", flush=True)
            continue
        if attack in failed_attacks:
            failures.append({"attack": attack, "defense": defense, "seed": seed,
                             "exit_code": None, "error": "backdoored model failed"})
            print(f"{label}: skipped (the backdoored model failed)", flush=True)
            continue
        print(f"{label}: running ({len(cells) - k} after it)", flush=True)
        cli.current_task = f"in cell {label} (its log: {root / 'logs'})"
        t0 = time.perf_counter()
        code, error = run_cell(root, cell, cfg["seeds"][0], cfg["ftsam_flags"], env, cfg)
        if code == 2 and not ran_any:  # bad input (flags, data): every cell would say the same
            fail(error.removeprefix("error: ") or "experiments.ftsam refused its input")
        ran_any = True
        if code != 0:
            failures.append({"attack": attack, "defense": defense, "seed": seed,
                             "exit_code": code, "error": error})
            if defense is None:
                failed_attacks.add(attack)
            print(f"{label}: FAILED (exit {code}): {error}", flush=True)
            continue
        print(f"{label}: finished in {time.perf_counter() - t0:.0f} s", flush=True)
    return failures


def train_and_evaluate(tree: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) the table's cells in `workdir` and writes table.json, table.md and
    table.png; returns the table (its "failures" list the cells that failed)."""
    cfg, root = resolve(tree), Path(workdir)
    check_workdir_path(root)
    load_dataset(cfg["dataset"], cfg["data_dir"])  # bad data: one message, before any cell
    lock_workdir(root, "logs")  # a second table on this workdir is refused
    failures = run_cells(cfg, root)
    a, d, s = cfg["attacks"], cfg["defenses"], cfg["seeds"]
    table = {"dataset": cfg["dataset"], "preset": cfg["preset"], "seed": cfg["seed"],
             "attacks": a, "defenses": d, "defense_seeds": s,
             "seeded_defenses": sorted(cfg["seeded"]), "ftsam_flags": cfg["ftsam_flags"],
             "cells": collect(root, a, d, s, cfg["seeded"]), "failures": failures,
             "paper": paper_cells(cfg["dataset"], a, d)}
    atomic_write(root / "table.json", json.dumps(table, indent=2) + "\n")
    atomic_write(root / "table.md", table_markdown(table))
    if cfg["plot"]:
        table_plot(table, root / "table.png")
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
