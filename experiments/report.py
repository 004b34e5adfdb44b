r"""REPRODUCTION.md's and BENCHMARKS.md's tables, generated from the committed files under
`results/`.

    python -m experiments.report --check    # exit 1 when a generated table differs (CI runs it)
    python -m experiments.report --write    # rewrite the generated tables in place

A generated table sits between `<!-- report:NAME -->` and `<!-- /report:NAME -->` in a
document (`--document`, repeatable; default both); `BLOCKS[NAME]` makes its text from files under
`results/` only (table.json, results.json, results.md; the benchmarks' raw JSON, e.g.
`results/bench_cpu_*/` written by `experiments/studies/bench_cpu.sh`), so every number in it
comes from a committed result, and a result changed without its document (or the reverse) fails
the check. Prose around the tables is written by hand; a number in it should be one of a table's.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import flags

from experiments import report_bench
from experiments.cli import InputError, run
from experiments.table_render import (
    NO_DEFENSE,
    block_markdown,
    blocks,
    differences,
    differences_markdown,
    paper_markdown,
    retune_markdown,
)

FLAGS = flags.FLAGS
ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("REPRODUCTION.md", "BENCHMARKS.md")
MARKER = re.compile(r"<!-- report:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /report:(?P=name) -->",
                    re.DOTALL)


def define_flags() -> None:
    flags.DEFINE_bool("check", False, "Exit 1 when a generated table differs from its results.")
    flags.DEFINE_bool("write", False, "Rewrite the generated tables in place.")
    flags.DEFINE_multi_string("document", [str(ROOT / name) for name in DOCUMENTS],
                              "A document with generated tables (repeatable).")
    flags.DEFINE_string("results", str(ROOT / "results"), "The results folder.")


def _json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path} is missing")
    return json.loads(path.read_text())


def table_grid(folder: str, *, paper: bool = True, diffs: bool = True
               ) -> Callable[[Path], str]:
    """An `experiments.table` folder's grid (every block), with the paper's numbers and the
    paired differences it asked for."""
    def make(results: Path) -> str:
        table = _json(results / folder / "table.json")
        lines: list[str] = []
        for block in blocks(table):
            if block["benign_ratio"] is not None:
                lines += [f"Benign ratio {block['benign_ratio']:g}:", ""]
            lines += [*block_markdown(block["cells"], table["defenses"]), ""]
            if paper and block.get("paper"):
                lines += [paper_markdown(block["paper"], list(block["cells"]),
                                         table["defenses"], block["benign_ratio"]), ""]
            if diffs and block.get("differences"):
                # Recomputed from the cells (the pairs the table recorded): intervals over the
                # unit that was replicated, whatever rule the table was written with.
                pairs = list(dict.fromkeys((d["a"], d["b"]) for d in block["differences"]))
                lines += [*differences_markdown(differences(block["cells"], pairs)), ""]
        return "\n".join(lines).rstrip("\n") + "\n"
    return make


def table_per_seed(folder: str, key: str = "asr") -> Callable[[Path], str]:
    """Per attack and seeded column, the per-seed values of `key` (%) and the benign subsets'
    fingerprints where recorded."""
    def make(results: Path) -> str:
        table = _json(results / folder / "table.json")
        lines = [f"| Attack | Column | {key} per seed (%) |", "|---|---|---|"]
        for block in blocks(table):
            for attack, row in block["cells"].items():
                for column in table["defenses"]:
                    per_seed = row[column]["per_seed"]
                    if len(per_seed) < 2:
                        continue
                    values = " / ".join(f"{100 * p[key]:.2f} (s{p['seed']})" for p in per_seed)
                    name = attack if block["benign_ratio"] is None else (
                        f"{attack} ({block['benign_ratio']:g})")
                    lines.append(f"| {name} | {column} | {values} |")
        return "\n".join(lines) + "\n"
    return make


def workdirs_grid(folder: str) -> Callable[[Path], str]:
    """`experiments.ftsam` workdirs `FOLDER/*/results.json` (one per defense seed): a row per
    workdir with the backdoored model and every defense (C-Acc / ASR / DER, %)."""
    def make(results: Path) -> str:
        runs = sorted((results / folder).glob("*/results.json"))
        if not runs:
            raise InputError(f"{results / folder} holds no */results.json")
        loaded = {path.parent.name: json.loads(path.read_text()) for path in runs}
        columns = list(dict.fromkeys(d for r in loaded.values() for d in r["defenses"]))
        lines = ["| Run | " + " | ".join([NO_DEFENSE, *columns]) + " |",
                 "|---|" + "---:|" * (len(columns) + 1)]
        for name, r in loaded.items():
            bd = r["backdoored"]
            cells = [f"{100 * bd['clean_acc']:.2f} / {100 * bd['asr']:.2f}"]
            for d in columns:
                x = r["defenses"].get(d)
                cells.append("-" if x is None else " / ".join(
                    f"{100 * x[k]:.2f}" for k in ("clean_acc", "asr", "der")))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    return make


def results_md_table(folder: str) -> Callable[[Path], str]:
    """The tables of an experiment's results.md (what `experiments.detect` wrote), verbatim."""
    def make(results: Path) -> str:
        path = results / folder / "results.md"
        if not path.is_file():
            raise InputError(f"{path} is missing")
        lines = [line for line in path.read_text().splitlines() if not line.startswith("# ")]
        return "\n".join(lines).strip("\n") + "\n"
    return make


def pooled_differences(folders: tuple[str, ...], pairs: tuple[tuple[str, str], ...]
                       ) -> Callable[[Path], str]:
    """Paired differences over the attacks of several `experiments.table` folders (one block,
    no benign ratios, every attack in one folder only): per attack, then every (attack, seed)
    pair pooled. A pair runs where both its columns are in every folder."""
    def make(results: Path) -> str:
        tables = [_json(results / folder / "table.json") for folder in folders]
        cells: dict[str, Any] = {}
        for folder, table in zip(folders, tables, strict=True):
            if "cells" not in table:
                raise InputError(f"{folder}: a table with benign-ratio blocks cannot be pooled")
            for attack, row in table["cells"].items():
                if attack in cells:
                    raise InputError(f"attack {attack!r} is in more than one of {folders}")
                cells[attack] = row
        have = set.intersection(*(set(t["defenses"]) for t in tables))
        present = [(a, b) for a, b in pairs if a in have and b in have]
        return "\n".join(differences_markdown(differences(cells, present))) + "\n"
    return make


def study_models(folder: str) -> Callable[[Path], str]:
    """A table of model seeds: per attack and model seed, the backdoored model's C-Acc / ASR
    and the clean model's C-Acc (%), from the cells' results.json."""
    def make(results: Path) -> str:
        table = _json(results / folder / "table.json")
        lines = ["| Attack | model seed | backdoored C-Acc | backdoored ASR | clean model C-Acc |",
                 "|---|---:|---:|---:|---:|"]
        for attack, row in table["cells"].items():
            clean = {p.get("model_seed"): p["clean_acc"]
                     for p in (row.get("retune") or {}).get("clean", [])}
            for p in (row[NO_DEFENSE] or {}).get("per_model", []):
                c = clean.get(p["model_seed"])
                lines.append(f"| {attack} | {p['model_seed']} | {100 * p['clean_acc']:.2f} | "
                             f"{100 * p['asr']:.2f} | {'-' if c is None else f'{100 * c:.2f}'} |")
        return "\n".join(lines) + "\n"
    return make


def study_retune(folder: str) -> Callable[[Path], str]:
    """The Retuning Attack block of a table (`table_render.retune_markdown`)."""
    def make(results: Path) -> str:
        table = _json(results / folder / "table.json")
        lines = retune_markdown(table["cells"], table["defenses"])
        return "\n".join(lines or ["No Retuning Attack record yet."]) + "\n"
    return make


def absolute_claim(folder: str, column: str = "ftsam", asr_max: float = 0.05,
                   cost_max: float = 0.015) -> Callable[[Path], str]:
    """The paper's absolute claim asked per attack: does `column` leave ASR <= `asr_max` at a
    C-Acc cost <= `cost_max` (the backdoored model's C-Acc minus the defended one's, each run
    against its own backdoored model)? On the mean over the attack's (model, defense seed)
    runs, with their range."""
    def make(results: Path) -> str:
        table = _json(results / folder / "table.json")
        lines = [f"| Attack | runs | {column} ASR: mean (range) | C-Acc cost: mean (range) | "
                 f"ASR <= {100 * asr_max:g} and cost <= {100 * cost_max:g} |",
                 "|---|---:|---|---|---|"]
        for attack, row in table["cells"].items():
            base = {p.get("model_seed"): p["clean_acc"]
                    for p in (row[NO_DEFENSE] or {}).get("per_model", [])}
            runs = [p for p in row[column]["per_seed"] if p.get("model_seed") in base]
            if not runs:
                continue
            asr = [100 * p["asr"] for p in runs]
            cost = [100 * (base[p["model_seed"]] - p["clean_acc"]) for p in runs]
            mean = lambda v: sum(v) / len(v)
            ok = mean(asr) <= 100 * asr_max and mean(cost) <= 100 * cost_max
            lines.append(f"| {attack} | {len(runs)} | {mean(asr):.2f} ({min(asr):.2f}-"
                         f"{max(asr):.2f}) | {mean(cost):+.2f} ({min(cost):+.2f} to "
                         f"{max(cost):+.2f}) | {'yes' if ok else 'no'} |")
        return "\n".join(lines) + "\n"
    return make


def stage_curve(path: str, stage: str) -> Callable[[Path], str]:
    """One stage's per-epoch curve from a committed metrics.jsonl: training accuracy, C-Acc
    and ASR (%) and the epoch's seconds, a row per evaluated epoch."""
    def make(results: Path) -> str:
        file = results / path
        if not file.is_file():
            raise InputError(f"{file} is missing")
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("stage") == stage and "clean_acc" in r]
        lines = ["| epoch | train accuracy | C-Acc | ASR | seconds |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['epoch']} | {100 * r['accuracy']:.2f} | {100 * r['clean_acc']:.2f} | "
                  f"{100 * r['asr']:.2f} | {r['seconds']:.0f} |" for r in rows]
        return "\n".join(lines) + "\n"
    return make


def _stage_of(column: str) -> str:
    """The metrics.jsonl stage a defense column writes: its defense's name, under the
    column's folder for a variant (`ftsam[rho=0]` -> `ftsam_rho=0/ftsam`)."""
    from experiments.variants import column_base, parse_column

    parsed = parse_column(column, [column_base(column)])
    return f"{parsed.folder}/{parsed.base}" if parsed.is_variant else parsed.base


def _interval_text(d: dict[str, Any], digits: str = ".1f", spread: str | None = None) -> str:
    """A `paired_difference` record as "mean ± std [low, high]" (signed, in `digits`; the std
    in `spread`, default the same), "not resolved" when the interval spans 0, "(one value)"
    without an interval."""
    text = f"{d['mean']:+{digits}} ± {d['std']:{spread or digits}}"
    if d["n"] < 2:
        return text + " (one value)"
    return (text + f" [{d['ci_low']:+{digits}}, {d['ci_high']:+{digits}}]"
            + ("" if d["resolved"] else " not resolved"))


def defense_rebound(folder: str, columns: tuple[str, ...] = ("ft", "ftsam"),
                    early: int = 50, first: int = 5) -> Callable[[Path], str]:
    """Issue 35's (C): does a defense's ASR fall early and climb back? Per backdoored model and
    column, from each defense seed's metrics.jsonl (the evaluated epochs): the lowest ASR over
    the evaluated epochs `first`..`early`, the last epoch's ASR, and the rebound r = last −
    lowest (averaged over the model's defense seeds); then r's mean and 95% t interval over the
    backdoored models (`metrics.paired_difference` against 0). A defense counts only once its
    row is in the cell's results.json (finished: its last record is its last epoch)."""
    from experiments.curves import defense_curves
    from ftsam_jax.metrics import paired_difference

    def make(results: Path) -> str:
        root = results / folder
        lines = [f"| Attack | model seed | column | defense seeds | lowest ASR, epochs "
                 f"{first}-{early} (its epoch) | last epoch's ASR | rebound |",
                 "|---|---:|---|---:|---|---|---:|"]
        per_column: dict[str, list[float]] = {c: [] for c in columns}
        for model_dir in sorted(root.glob("*/m*")):
            for column in columns:
                lows, lasts, cells = [], [], []
                for cell in sorted(model_dir.glob("ds*")):
                    done = cell / "results.json"
                    if not done.is_file() or column not in json.loads(done.read_text()).get(
                            "defenses", {}):
                        continue
                    records = [r for r in defense_curves(cell / "metrics.jsonl")
                               .get(_stage_of(column), []) if "asr" in r]
                    head = [r for r in records if first <= r["epoch"] <= early]
                    if not head or records[-1]["epoch"] <= early:
                        continue
                    low = min(head, key=lambda r: r["asr"])
                    lows.append((100 * low["asr"], low["epoch"]))
                    lasts.append((100 * records[-1]["asr"], records[-1]["epoch"]))
                    cells.append(cell.name.removeprefix("ds"))
                if not cells:
                    continue
                rebound = sum(b[0] - a[0] for a, b in zip(lows, lasts, strict=True)) / len(cells)
                per_column[column].append(rebound)
                lines.append(
                    f"| {model_dir.parent.name} | {model_dir.name.removeprefix('m')} | {column} | "
                    f"{', '.join(cells)} | {' / '.join(f'{v:.1f} ({e})' for v, e in lows)} | "
                    f"{' / '.join(f'{v:.1f} ({e})' for v, e in lasts)} | {rebound:+.1f} |")
        lines += ["", "| column | over | rebound: mean ± std [95% t interval] |", "|---|---|---|"]
        for column, values in per_column.items():
            if not values:
                continue
            d = paired_difference(values, [0.0] * len(values))
            lines.append(f"| {column} | {d['n']} backdoored model{'s' * (d['n'] != 1)} | "
                         f"{_interval_text(d)} |")
        return "\n".join(lines) + "\n"
    return make


def knob_study(folder: str, base: str = "ftsam") -> Callable[[Path], str]:
    """Issue 35's (B): the knob columns' grid and their paired differences against `base`
    (intervals over backdoored models, from the cells), after the pre-stated check that every
    knob column of a cell tuned on the same benign subset as `base` (equal sha256); a study
    not run yet is said to be so."""
    grid = table_grid(folder, paper=False)

    def make(results: Path) -> str:
        if not (results / folder / "table.json").is_file():
            return f"Not run yet (`results/{folder}` has no table.json).\n"
        table = _json(results / folder / "table.json")
        checked, mismatched = 0, []
        for attack, columns in table["cells"].items():
            reference = {(r.get("model_seed"), r["seed"]): r.get("benign", {}).get("sha256")
                         for r in columns.get(base, {}).get("per_seed", [])}
            for column, cell in columns.items():
                if column in (base, "No defense", "retune") or "per_seed" not in cell:
                    continue
                for r in cell["per_seed"]:
                    checked += 1
                    want = reference.get((r.get("model_seed"), r["seed"]))
                    if want is None or r.get("benign", {}).get("sha256") != want:
                        mismatched.append(f"{attack}/m{r.get('model_seed')}/ds{r['seed']} "
                                          f"{column}")
        check = (f"Benign subsets: all {checked} knob runs used their `{base}` cell's subset "
                 "(equal sha256)." if not mismatched else
                 f"Benign subsets DIFFER from `{base}`'s in: {', '.join(mismatched)}.")
        return grid(results).rstrip("\n") + "\n\n" + check + "\n"
    return make


def neuron_tests(folder: str) -> Callable[[Path], str]:
    """Issue 35's (A) from `experiments.neurons`' neurons.json: its "all" block (every
    backdoored model of every attack), the primary D = s(ftsam) − s(ft) of
    `high_tac_log_change` and the pre-stated secondaries, each with its 95% t interval over
    the backdoored models; a study not analysed yet is said to be so."""
    rows = (("primary", "ftsam - ft", "high_tac_log_change"),
            ("secondary", "ftsam - ftsam[rho=0]", "high_tac_log_change"),
            ("secondary", "backdoored", "spearman_norm_tac"),
            ("secondary", "ftsam - ft", "std_ratio"),
            ("secondary", "ftsam - ft", "spearman_grad_tac"))

    def make(results: Path) -> str:
        path = results / folder / "neurons.json"
        if not path.is_file():
            return f"Not run yet (`results/{folder}` has no neurons.json).\n"
        pooled = _json(path).get("all", {})
        lines = [f"Backdoored models: {', '.join(pooled.get('models', [])) or 'none'}.", "",
                 "| test | quantity | metric | mean ± std [95% t interval] | n |",
                 "|---|---|---|---|---:|"]
        for kind, what, key in rows:
            source = (pooled.get("intervals", {}).get(what, {}) if " - " not in what else
                      pooled.get("differences", {}).get(what, {}))
            d = source.get(key)
            if d is None:
                lines.append(f"| {kind} | {what} | {key} | - | 0 |")
                continue
            lines.append(f"| {kind} | {what} | {key} | {_interval_text(d, '.4g', '.3g')} | "
                         f"{d['n']} |")
        return "\n".join(lines) + "\n"
    return make


def mgd_study(folder: str = "detect_mgd", powered: str = "detect_powered"
              ) -> Callable[[Path], str]:
    """Issue 34's pre-stated MGD study (REPRODUCTION.md), from its committed parts: (a) per eps
    AP(fgd_afa) − AP(fgd) on the val scenes, paired by seed with the committed `fgd` (eps 8:
    the committed `fgd_afa`), and the teacher's AP on that eps's adversarial images; the
    choices of choice.json (E*, n, A* and the held-out means); (b) AP(mgd_ikd) − AP(mgd), the
    primary, and the secondaries mgd − fgd and mgd − student; AP and AP_S points, 95% t
    intervals over seeds. Parts not run yet are said to be so."""
    from ftsam_jax.metrics import paired_difference

    def per_seed(results: dict[str, Any], method: str, key: str) -> dict[int, float]:
        rows = results.get("students", {}).get(method, {}).get("per_seed", [])
        return {r["seed"]: 100 * r[key] for r in rows}

    def diff(a: dict[int, float], b: dict[int, float]) -> str:
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return "-"
        d = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
        if d["n"] < 2:
            return f"{d['mean']:+.2f} (1 seed)"
        return f"{_interval_text(d, '.2f')} ({d['n']} seeds)"

    def make(results: Path) -> str:
        root = results / folder
        if not root.is_dir():
            return f"Not run yet (`results/{folder}` does not exist).\n"
        base = _json(results / powered / "results.json")
        fgd = {k: per_seed(base, "fgd", k) for k in ("ap", "ap_s")}
        lines = ["(a) AFA's attack strength, val scenes, against the committed `fgd` seeds:", "",
                 "| eps (/255) | teacher AP on its adversarial images | AP(fgd_afa) − AP(fgd) | "
                 "AP_S difference |", "|---:|---:|---|---|"]
        for eps in (1, 2, 4, 8):
            part = base if eps == 8 else (_json(root / f"eps{eps}" / "results.json")
                                          if (root / f"eps{eps}" / "results.json").is_file()
                                          else None)
            if part is None:
                lines.append(f"| {eps} | not run yet | | |")
                continue
            adv = part.get("teacher", {}).get("ap_adv")
            if isinstance(adv, dict):
                adv = adv.get(f"eps={eps:g}/255,steps=5")
            adv_text = "-" if adv is None else f"{100 * adv:.1f}"
            lines.append(f"| {eps} | {adv_text} | "
                         f"{diff(per_seed(part, 'fgd_afa', 'ap'), fgd['ap'])} | "
                         f"{diff(per_seed(part, 'fgd_afa', 'ap_s'), fgd['ap_s'])} |")
        choice_path = root / "choice.json"
        lines += [""]
        if choice_path.is_file():
            c = _json(choice_path)
            held = ", ".join(f"{k}: {v:.2f}" for k, v in c["heldout_ap_mean"].items())
            lines.append(f"The choice (held-out split): E* = {c['eps']:g}/255 (mean held-out AP "
                         f"of fgd_afa by eps: {held}); n = {c['n']} pairs (s = {c['s']:.2f}).")
            if "mgd_alpha" in c:
                held = ", ".join(f"{k}: {v:.2f}" for k, v in c["heldout_mgd_ap_mean"].items())
                lines.append(f"A* = {c['mgd_alpha']:g} (mean held-out AP of mgd by alpha_mgd: "
                             f"{held}).")
        else:
            lines.append("The choice (choice.json): not made yet.")
        lines += [""]
        mgd_path = root / "mgd" / "results.json"
        if not mgd_path.is_file():
            lines.append("(b) MGD with and without IKD: not run yet.")
            return "\n".join(lines) + "\n"
        part = _json(mgd_path)
        lines += ["(b) paired by seed (same initialisation and batch order), AP and AP_S points:",
                  "", "| difference | AP | AP_S |", "|---|---|---|"]
        for label, (ra, ma), (rb, mb) in (
                ("mgd_ikd − mgd (primary)", (part, "mgd_ikd"), (part, "mgd")),
                ("mgd − fgd", (part, "mgd"), (base, "fgd")),
                ("mgd − student", (part, "mgd"), (base, "student"))):
            cells = [diff(per_seed(ra, ma, k), per_seed(rb, mb, k)) for k in ("ap", "ap_s")]
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        return "\n".join(lines) + "\n"
    return make


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _attack_fit_text(attack: str, fit: dict[str, Any], attack_config: dict[str, Any]) -> str:
    """One line of an attack's resource record (results.json config.attack_fit)."""
    if attack == "ssba":
        return (f"encoder: test bit accuracy {_pct(fit.get('test_bit_accuracy'))}% (exact code "
                f"{_pct(fit.get('test_exact_code_rate'))}%), PSNR {fit.get('test_psnr', 0):.1f} "
                f"dB (min {fit.get('test_psnr_min', 0):.1f}), max change "
                f"{fit.get('test_max_abs_change', '-')} grey levels")
    if attack == "lc":
        return (f"source model ({fit.get('source', '-')}): test accuracy "
                f"{_pct(fit.get('source_model_test_acc'))}%, on the {fit.get('num_perturbed', 0)} "
                f"target-class images {_pct(fit.get('source_model_acc_original'))}% before and "
                f"{_pct(fit.get('source_model_acc_perturbed'))}% after PGD (L-inf max "
                f"{255 * fit.get('linf_max', 0.0):.1f}/255)")
    if attack == "trojannn":
        def mean(values: Any) -> str:
            return "-" if not values else f"{sum(values) / len(values):.2f}"
        return (f"neurons {fit.get('neurons')} of the clean model (accuracy "
                f"{_pct(fit.get('clean_model_acc'))}%): activation on the trigger alone "
                f"{mean(fit.get('trigger_activation_start'))} -> "
                f"{mean(fit.get('trigger_activation_end'))} (target "
                f"{attack_config.get('target_value', '-')}), on triggered test images "
                f"{mean(fit.get('triggered_activation_start'))} -> "
                f"{mean(fit.get('triggered_activation_end'))}, clean images "
                f"{mean(fit.get('clean_activation'))}")
    return "-"


def _detection_text(defense: str, details: dict[str, Any]) -> str:
    """One cell of a defense's detection record (its results.json row's `details`)."""
    if defense == "nc":
        flagged = details.get("flagged") or []
        index = details.get("min_anomaly_index")
        head = "flagged " + ", ".join(str(v) for v in flagged) if flagged else "none flagged"
        return f"{head} (index {'-' if index is None else f'{index:.2f}'})"
    if defense == "ac":
        return (f"removed {details.get('removed', 0)}, precision {_pct(details.get('precision'))}, "
                f"recall {_pct(details.get('recall'))}")
    if defense == "abl":
        return (f"isolated {details.get('isolated', 0)}, precision "
                f"{_pct(details.get('precision'))}, recall {_pct(details.get('recall'))}")
    return "-"


def table_records(folder: str, attacks: tuple[str, ...] = ("lc", "ssba", "trojannn"),
                  defenses: tuple[str, ...] = ("nc", "ac", "abl")) -> Callable[[Path], str]:
    """Issues 32 and 33's records in an `experiments.table` folder, from each attack's first
    cell (`ATTACK/ds0/results.json`): the resources the new attacks made (SSBA's encoder, LC's
    source model and perturbations, TrojanNN's neurons before / after) and the detections of
    the new defenses (NC's flagged labels and anomaly index, AC's and ABL's precision and
    recall against the attack's poison indices). Cells not run yet are said to be."""
    def make(results: Path) -> str:
        root = results / folder
        cells = {}
        for cell in sorted(root.glob("*/ds0/results.json")):
            cells[cell.parent.parent.name] = json.loads(cell.read_text())
        lines = ["| attack | its resource (results.json `config.attack_fit`) |", "|---|---|"]
        for attack in attacks:
            config = cells.get(attack, {}).get("config", {})
            fit = config.get("attack_fit")
            text = ("not run yet" if fit is None else
                    _attack_fit_text(attack, fit, config.get("attack_config", {})))
            lines.append(f"| {attack} | {text} |")
        lines += ["", "| attack | " + " | ".join(defenses) + " |",
                  "|---|" + "---|" * len(defenses)]
        from experiments.table import applicable

        for attack, r in cells.items():
            row = [(_detection_text(d, r["defenses"][d].get("details", {}))
                    if d in r.get("defenses", {}) else
                    "not run yet" if applicable(attack, d) else "n/a (poisons on the fly)")
                   for d in defenses]
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"
    return make


# SAM on FT's own recipe (no label smoothing, cosine per epoch): issue 22's 2x2 of recipe x SAM.
FT_RECIPE_SAM = "ftsam[label_smoothing=0,schedule=cosine_epoch]"

BLOCKS: dict[str, Callable[[Path], str]] = {
    "table_cpu": table_grid("table_cpu"),
    "table_cpu_per_seed": table_per_seed("table_cpu"),
    "table_cpu_benign2500": table_grid("table_cpu_benign2500", paper=False),
    "table_paper_gpu": table_grid("table_paper_gpu"),
    # Issues 32 and 33: the new attacks' resources and the new defenses' detections.
    "table_cpu_records": table_records("table_cpu"),
    "table_cpu_variants": workdirs_grid("table_cpu_variants"),
    "lf_backdoorbench": workdirs_grid("lf_backdoorbench"),
    "detect_powered": results_md_table("detect_powered"),
    "detect_pilot_e12": results_md_table("detect_pilot/e12"),
    "detect_pilot_e24": results_md_table("detect_pilot/e24"),
    "detect_teacher": results_md_table("detect_teacher_study/scenes16k_flip_e20"),
    "detect_cpu": results_md_table("detect_cpu"),
    # Issue 22's studies (experiments/studies/ftsam_isolation_cpu.sh: experiments.table runs).
    "ftsam_iso": table_grid("ftsam_iso", paper=False),
    "ftsam_iso_per_seed": table_per_seed("ftsam_iso"),
    "ftsam_iso_lf": table_grid("ftsam_iso_lf", paper=False),
    "ftsam_iso_lf_per_seed": table_per_seed("ftsam_iso_lf"),
    "ftsam_iso_pooled": pooled_differences(
        ("ftsam_iso", "ftsam_iso_lf"),
        (("ftsam", "ftsam[rho=0]"), ("ftsam", "ft"), ("ftsam[rho=0]", "ft"),
         ("ftsam", "ftsam[adaptive=false]"), (FT_RECIPE_SAM, "ft"), ("ftsam", FT_RECIPE_SAM))),
    "ftsam_table3": table_grid("ftsam_table3"),
    "ftsam_table3_per_seed": table_per_seed("ftsam_table3"),
    "ftsam_rho": table_grid("ftsam_rho", paper=False),
    # Issue 31's full-size study (experiments/studies/fmnist_cpu.sh, model seeds).
    "fmnist_pilot": stage_curve("fmnist_cpu/badnets/m0/ds0/metrics.jsonl", "backdoored"),
    "fmnist_cpu": table_grid("fmnist_cpu", paper=False),
    "fmnist_cpu_models": study_models("fmnist_cpu"),
    "fmnist_cpu_retune": study_retune("fmnist_cpu"),
    "fmnist_cpu_claim": absolute_claim("fmnist_cpu"),
    # Issue 35 (C): ASR's rebound within a defense, from the study's metrics.jsonl.
    "fmnist_cpu_rebound": defense_rebound("fmnist_cpu"),
    # Issue 34: the MGD study (experiments/studies/detect_mgd_cpu.sh).
    "detect_mgd": mgd_study(),
    # Issue 35 (A): the neuron analysis of the study's models (experiments.neurons).
    "fmnist_neurons": neuron_tests("fmnist_cpu"),
    # Issue 35 (B): the knob columns beside ftsam (fmnist_cpu.sh --knobs).
    "fmnist_knobs_cpu": knob_study("fmnist_knobs_cpu"),
    # BENCHMARKS.md's (experiments/report_bench.py: the benchmark sittings' raw JSON).
    **report_bench.BLOCKS,
}


def render(document: str, results: Path) -> str:
    """The document with every generated block made again from `results`."""
    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise InputError(f"unknown generated block {name!r}; known: {sorted(BLOCKS)}")
        return f"<!-- report:{name} -->\n{BLOCKS[name](results)}<!-- /report:{name} -->"

    return MARKER.sub(fill, document)


def check(path: Path, results: Path) -> list[str]:
    """The unified diff between the document and its regeneration (empty: up to date)."""
    current = path.read_text()
    return list(difflib.unified_diff(current.splitlines(), render(current, results).splitlines(),
                                     str(path), "regenerated from results/", lineterm=""))


def main(argv: list[str]) -> None:
    del argv
    paths, results = [Path(p) for p in FLAGS.document], Path(FLAGS.results)
    for path in paths:
        if not path.is_file():
            raise InputError(f"--document {path} is not a file")
    if FLAGS.check == FLAGS.write:
        raise InputError("give one of --check and --write")
    stale = []
    for path in paths:
        names = [m.group("name") for m in MARKER.finditer(path.read_text())]
        if FLAGS.write:
            path.write_text(render(path.read_text(), results))
            print(f"{path}: {len(names)} generated tables written")
            continue
        diff = check(path, results)
        if diff:
            print("\n".join(diff[:200]))
            stale.append(str(path))
        else:
            print(f"{path}: {len(names)} generated tables match results/")
    if stale:
        print(f"\n{', '.join(stale)} differ from what results/ gives: run python -m "
              "experiments.report --write and commit", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    run(main)
