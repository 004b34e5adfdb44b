"""What `experiments.table` writes from its numbers: table.md (the paper's layout, a block per
benign ratio, the paper's numbers beside them, paired differences), table.png (heat maps) and
`table_FIELD.png` (ASR and C-Acc against a numeric setting of variant columns).

Everything here reads table.json's content only, so a committed table can be drawn again
(`experiments.report`) without running anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from experiments.paper import PAPER_TABLE1_SETTING, PAPER_TABLE3_SETTING, TABLE1, TABLE3
from ftsam_jax import metrics

__all__ = ["NO_DEFENSE", "axis_plot", "blocks", "differences", "paper_cells", "paper_markdown",
           "retune_markdown", "table_markdown", "table_plot", "variant_axis"]

NO_DEFENSE = "No defense"
METRICS = ("clean_acc", "asr", "robust_acc", "der")


def blocks(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's blocks: one per benign ratio (`--benign_ratios`), else the one of "cells"."""
    if table.get("blocks"):
        return table["blocks"]
    return [{"benign_ratio": None, "cells": table["cells"], "paper": table.get("paper", {}),
             "differences": table.get("differences", [])}]


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


def _average_row(cells: dict[str, Any], defenses: list[str]) -> list[str]:
    """The Average row: attack-averaged C-Acc / ASR and their DER, "-" unless every attack has
    the column."""
    def column(key: str, d: str | None) -> list[float] | None:
        values = []
        for row in cells.values():
            cell = row[NO_DEFENSE] if d is None else row[d]
            value = (cell or {}).get(key) if d is None else cell.get(key, {}).get("mean")
            if value is None:
                return None
            values.append(value)
        return values

    base = [column(k, None) for k in ("clean_acc", "asr")]
    if any(v is None for v in base):
        return ["Average", "-", *("-" for _ in defenses)]
    nd = (float(np.mean(base[0])), float(np.mean(base[1])))
    out = ["Average", f"{100 * nd[0]:.1f} / {100 * nd[1]:.1f}"]
    for d in defenses:
        dv = [column(k, d) for k in ("clean_acc", "asr")]
        if any(v is None for v in dv):
            out.append("-")
            continue
        m = (float(np.mean(dv[0])), float(np.mean(dv[1])))
        out.append(f"{100 * m[0]:.1f} / {100 * m[1]:.1f} / {100 * _average_der(nd, m):.1f}")
    return out


def block_markdown(cells: dict[str, Any], defenses: list[str]) -> list[str]:
    """One block's grid: attacks x (No defense, each column), C-Acc / ASR / DER, the Average."""
    rows = []
    for a, row in cells.items():
        base = row[NO_DEFENSE]
        out = [a, "-" if base is None else
               f"{100 * base['clean_acc']:.1f} / {100 * base['asr']:.1f}"]
        for d in defenses:
            r, n = row[d], len(row[d]["per_seed"])
            out.append(" / ".join(_fmt(r.get(k), n) for k in ("clean_acc", "asr", "der"))
                       if r["per_seed"] else "-")
        rows.append(out)
    return _grid(defenses, [*rows, _average_row(cells, defenses)])


def table_markdown(table: dict[str, Any]) -> str:
    """The paper's Table 1 layout (a block per benign ratio: its Table 3): attacks x (No
    defense, each column), each cell C-Acc / ASR / DER (No defense: C-Acc / ASR), then the
    paper's numbers for the same cells and the paired differences asked for."""
    defenses = table["defenses"]
    selection = table.get("benign_selection", "reference")
    subsets = ("every defense of a defense seed on the same class-balanced benign subset "
               "(paired)" if selection == "shared" else
               "each defense on its own benign subset (BackdoorBench's rule and stream)")
    models = table.get("model_seeds")
    over = ("defense seeds" if not models else
            f"backdoored models (model seeds {models}, No defense: their mean) x defense seeds")
    lines = [f"# Backdoor defenses on {table['dataset']} (preset {table['preset']})", "",
             f"Each cell: C-Acc / ASR / DER in % (No defense: C-Acc / ASR), mean ± std over "
             f"{over} (seeds {table['defense_seeds']} for "
             f"{sorted(table['seeded_defenses'])}, the first for the others); {subsets}. The "
             "Average row's DER is computed from the averaged C-Acc and ASR, as the paper's is.",
             ""]
    for block in blocks(table):
        ratio = block["benign_ratio"]
        if ratio is not None:
            lines += [f"## Benign ratio {ratio:g}", ""]
        lines += block_markdown(block["cells"], defenses)
        if block.get("paper"):
            lines += ["", paper_markdown(block["paper"], list(block["cells"]), defenses,
                                         ratio)]
        if block.get("differences"):
            lines += ["", *differences_markdown(block["differences"])]
        retuned = retune_markdown(block["cells"], defenses)
        if retuned:
            lines += ["", *retuned]
        lines.append("")
    if table["failures"]:
        lines += ["Failed cells (see logs/):"]
        lines += [f"- {f['attack']} / {f['defense'] or 'backdoored'} / seed {f['seed']}"
                  + ("" if f.get("benign_ratio") is None else f" / ratio {f['benign_ratio']:g}")
                  + f": exit {f['exit_code']}: {f['error']}" for f in table["failures"]]
    return "\n".join(lines).rstrip("\n") + "\n"


def paper_cells(dataset: str, attacks: list[str], defenses: list[str],
                ratio: float | None = None) -> dict[str, Any]:
    """The FT-SAM paper's numbers (%) for these cells, CIFAR-10 only: Table 1, or with a benign
    ratio of its Table 3 (FT and FT-SAM; the No-defense column from Table 1). The paper's
    full-scale setting: compare directions, not values, with `cpu` cells."""
    if dataset != "cifar10":
        return {}
    if ratio is None:
        return {a: {c: list(v) for c, v in TABLE1[a].items() if c == "none" or c in defenses}
                for a in attacks if a in TABLE1}
    table3 = next((v for r, v in TABLE3.items() if math.isclose(r, ratio)), None)
    if table3 is None:
        return {}
    return {a: {"none": list(TABLE1[a]["none"]),
                **{c: list(v) for c, v in table3[a].items() if c in defenses}}
            for a in attacks if a in table3}


def paper_markdown(paper: dict[str, Any], attacks: list[str], defenses: list[str],
                   ratio: float | None = None) -> str:
    """The paper's numbers in table.md's layout ("n/a": a column not in the paper)."""
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
    setting = (PAPER_TABLE1_SETTING if ratio is None else
               f"{PAPER_TABLE3_SETTING}, benign ratio {ratio:g} (No defense: its Table 1)")
    return "\n".join([f"For comparison, {setting} (its Average row is over the attacks listed "
                      "here):", "", *_grid(defenses, rows)])


def _model_key(p: dict[str, Any]) -> tuple[int, int]:
    """A per-seed entry's (model seed, defense seed); -1 for the one model of a table without
    model seeds."""
    return (p.get("model_seed", -1), p["seed"])


def differences(cells: dict[str, Any], pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per attack and pair (A, B): the paired difference A - B of C-Acc, ASR and DER, with its
    95% t interval over the unit that was replicated (`ftsam_jax.metrics.paired_difference`:
    mean, std, n, interval, `resolved`). Each difference is first averaged over the defense
    seeds of one backdoored model; with two or more backdoored models of an attack the
    interval is over them ("unit": "backdoored models"), with one it is over that model's
    defense seeds ("defense seeds": they share the model, so it says nothing about another
    backdoored model). With more than one attack, a row "all" gives the interval over every
    backdoored model of every attack (one value per model)."""
    out, pooled = [], {}
    for a, row in cells.items():
        for left, right in pairs:
            by_key = [{_model_key(p): p for p in row[c]["per_seed"]} for c in (left, right)]
            keys = sorted(set(by_key[0]) & set(by_key[1]))
            if not keys:
                continue
            models = sorted({m for m, _ in keys})
            entry: dict[str, Any] = {"attack": a, "a": left, "b": right,
                                     "seeds": sorted({s for _, s in keys}),
                                     "models": len(models), "pairs": len(keys),
                                     "unit": "backdoored models" if len(models) > 1 else
                                     "defense seeds"}
            for k in ("clean_acc", "asr", "der"):
                diff = {key: by_key[0][key][k] - by_key[1][key][k] for key in keys}
                per_model = [float(np.mean([diff[key] for key in keys if key[0] == m]))
                             for m in models]
                pooled.setdefault((left, right), {}).setdefault(k, []).extend(per_model)
                values = per_model if len(models) > 1 else [diff[key] for key in keys]
                entry[k] = metrics.paired_difference(values, [0.0] * len(values))
            out.append(entry)
            pooled[(left, right)].setdefault("pairs", []).append(len(keys))
    if len(cells) > 1:
        for (left, right), by_key in pooled.items():
            out.append({"attack": "all", "a": left, "b": right, "models": len(by_key["asr"]),
                        "pairs": int(sum(by_key["pairs"])), "unit": "backdoored models",
                        **{k: metrics.paired_difference(v, [0.0] * len(v))
                           for k, v in by_key.items() if k != "pairs"}})
    return out


def _unit(row: dict[str, Any]) -> str:
    """What a difference's interval is over, e.g. "3 defense seeds of 1 model"."""
    if "unit" not in row:  # recorded before the unit existed: over (attack, seed) pairs
        return f"{row.get('pairs') or len(row['seeds'])} pairs"
    plural = lambda n, word: f"{n} {word}" + ("s" if n != 1 else "")
    if row["unit"] == "defense seeds":
        return plural(row["pairs"], "defense seed") + " of 1 model"
    return f"{plural(row['models'], 'backdoored model')} ({plural(row['pairs'], 'pair')})"


def differences_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The paired differences as a markdown table (percentage points)."""
    def cell(d: dict[str, Any]) -> str:
        text = f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f}"
        if d["n"] < 2:
            return text + " (one value)"
        interval = f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
        return f"{text} {interval}" + ("" if d["resolved"] else " not resolved")

    lines = ["Paired differences A − B (percentage points: mean ± std [95% t interval] over the "
             "unit named; each backdoored model's difference is first averaged over its "
             "defense seeds; \"not resolved\" when the interval spans 0; \"all\": every "
             "backdoored model of every attack):", "",
             "| Attack | A − B | over | ΔC-Acc | ΔASR | ΔDER |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['attack']} | {r['a']} − {r['b']} | {_unit(r)} | "
              f"{cell(r['clean_acc'])} | {cell(r['asr'])} | {cell(r['der'])} |" for r in rows]
    return lines


def retune_markdown(cells: dict[str, Any], defenses: list[str]) -> list[str]:
    """The Retuning Attack per attack: each model's C-Acc / ASR after RA (%), mean ± std over
    its (model, defense seed) runs; rows without RA records are left out."""
    cols = ["No defense", *defenses, "Clean model"]
    rows = []
    for a, row in cells.items():
        ref = row.get("retune")
        runs = {"No defense": (ref or {}).get("backdoored", []),
                "Clean model": (ref or {}).get("clean", []),
                **{d: [p for p in row[d]["per_seed"] if "retune" in p] for d in defenses}}
        if not any(runs.values()):
            continue
        out = [a]
        for c in cols:
            if not runs[c]:
                out.append("-")
                continue
            stats = [metrics.mean_std([p["retune"][k] for p in runs[c]])
                     for k in ("clean_acc", "asr")]
            n = len(runs[c])
            out.append(" / ".join(_fmt({"mean": m, "std": sd}, n) for m, sd in stats))
        rows.append(out)
    if not rows:
        return []
    head = ["Attack", *cols]
    return ["The Retuning Attack (Min et al. 2024): C-Acc / ASR (%) after fine-tuning each "
            "model on 2% benign data holding a few poisoned samples, mean ± std over its runs "
            "(backdoored models x defense seeds):", "",
            "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _grid_values(table: dict[str, Any], key: str) -> tuple[np.ndarray, list[str], list[str]]:
    cols = [NO_DEFENSE, *table["defenses"]]
    labels, rows = [], []
    for block in blocks(table):
        ratio = block["benign_ratio"]
        for a, row in block["cells"].items():
            labels.append(a if ratio is None else f"{a} ({ratio:g})")
            values = []
            for c in cols:
                cell = row[c]
                if c == NO_DEFENSE:
                    values.append(np.nan if cell is None else 100 * cell[key])
                else:
                    values.append(100 * cell[key]["mean"] if key in cell else np.nan)
            rows.append(values)
    return np.asarray(rows, np.float64).reshape(len(labels), len(cols)), labels, cols


def table_plot(table: dict[str, Any], path: Path) -> None:
    """Two heat maps (ASR, C-Acc) of attack (per ratio) x (No defense + columns), seed means
    in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {key: _grid_values(table, key) for key in ("asr", "clean_acc")}
    _, labels, cols = grids["asr"]
    fig, axes = plt.subplots(1, 2, figsize=(1.2 * len(cols) * 2 + 2, 0.5 * len(labels) + 2))
    for ax, key, title, cmap in ((axes[0], "asr", "ASR (%)", "Reds"),
                                 (axes[1], "clean_acc", "C-Acc (%)", "Greens")):
        grid = grids[key][0]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(len(labels)):
            for j in range(len(cols)):
                text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
                dark = not np.isnan(grid[i, j]) and grid[i, j] > 60
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def variant_axis(table: dict[str, Any]) -> dict[str, Any] | None:
    """{"field", "base", "values": {column: number}} when at least two columns of one defense
    differ in one numeric setting only (every variant overrides that field, and nothing else),
    each column at the value it ran with (table.json's "columns": "settings"); else None."""
    columns = table.get("columns", {})
    variants = [c for c in columns.values() if c["overrides"]]
    fields = {tuple(sorted(c["overrides"])) for c in variants}
    bases = {c["base"] for c in variants}
    if len(fields) != 1 or len(bases) != 1 or len(next(iter(fields))) != 1:
        return None
    field, base = next(iter(fields))[0], next(iter(bases))
    values: dict[str, float] = {}
    for name, c in columns.items():
        value = c.get("settings", {}).get(field)
        if c["base"] != base or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        values[name] = float(value)
    return {"field": field, "base": base, "values": values} if len(values) >= 2 else None


def axis_plot(table: dict[str, Any], axis: dict[str, Any], path: Path) -> None:
    """ASR and C-Acc (mean ± std over defense seeds) against `axis["field"]`, one line per
    attack (and benign ratio): the paper's Figure 3 for rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(axis["values"].items(), key=lambda kv: kv[1])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for block in blocks(table):
        ratio = block["benign_ratio"]
        for a, row in block["cells"].items():
            for ax, key in zip(axes, ("asr", "clean_acc"), strict=True):
                points = [(v, row[c][key]) for c, v in order if key in row[c]]
                if not points:
                    continue
                x = [v for v, _ in points]
                ax.errorbar(x, [100 * s["mean"] for _, s in points],
                            yerr=[100 * s["std"] for _, s in points], marker="o", capsize=3,
                            label=a if ratio is None else f"{a} ({ratio:g})")
    for ax, title in zip(axes, ("ASR (%)", "C-Acc (%)"), strict=True):
        ax.set_xscale("log", base=2) if all(v > 0 for _, v in order) else None
        ax.set_xlabel(f"{axis['base']} {axis['field']}")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
