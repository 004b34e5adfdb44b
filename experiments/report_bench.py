"""BENCHMARKS.md's generated tables (`experiments.report`), made from a benchmark sitting's raw
JSON under `results/`:

- a CPU sitting of `experiments/studies/bench_cpu.sh` (`results/bench_cpu_DATE/`):
  `wW_rR_{jax,torch,jax_before}.json` (`experiments.bench --json` / the PyTorch peer / the
  bench with both CPU measures off, width W, round R), `ftsam_epoch_w16_{jax,jax_before}.json`,
  `detect.json`, `stages/{after,before}/metrics.jsonl` and `env.json` (machine, versions,
  commands);
- the GPU sitting of `experiments/gpu_rows.sh` (`results/bench_gpu_h200/`): `jax_f32.json`,
  `jax_bf16.json`, `torch_f32.json`, `torch_f32_cl.json`, `torch_amp.json`.

Each maker takes the results folder and returns the block's markdown; a missing file is an
`InputError` naming it.
"""

from __future__ import annotations

import json
import re
import statistics
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.cli import InputError

STEP_ROWS = ("train_step", "sam_step", "eval_step")
VARIANTS = ("jax", "torch", "jax_before")
ROUND_FILE = re.compile(r"w(?P<width>\d+)_r(?P<round>\d+)_(?P<variant>jax|torch|jax_before)\.json")


def _load(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e})") from None


def _rows(info: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    rows = {r["row"]: r for r in info.get("rows", [])}
    if not rows:
        raise InputError(f"{path} holds no rows")
    return rows


def _rounds(folder: Path) -> dict[int, dict[int, dict[str, dict[str, dict[str, Any]]]]]:
    """{width: {round: {variant: {row: row dict}}}} from the folder's wW_rR_VARIANT.json."""
    out: dict[int, dict[int, dict[str, dict[str, dict[str, Any]]]]] = {}
    for path in sorted(folder.glob("w*_r*_*.json")):
        m = ROUND_FILE.fullmatch(path.name)
        if m:
            rounds = out.setdefault(int(m["width"]), {})
            rounds.setdefault(int(m["round"]), {})[m["variant"]] = _rows(_load(path), str(path))
    if not out:
        raise InputError(f"{folder} holds no wW_rR_{{jax,torch,jax_before}}.json")
    for width, rounds in out.items():
        for r, variants in rounds.items():
            missing = [v for v in VARIANTS if v not in variants]
            if missing:
                raise InputError(f"{folder}: width {width} round {r} lacks {missing}")
    return dict(sorted(out.items()))


def _prose(text: str) -> str:
    """A paragraph of a block, wrapped as the documents are."""
    return textwrap.fill(text, 96, break_long_words=False, break_on_hyphens=False)


def _ratios(a: list[float], b: list[float]) -> str:
    return _per_round([x / y for x, y in zip(a, b, strict=True)], ".2f")


def _per_round(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def bench_cpu_env(folder: str) -> Callable[[Path], str]:
    """The sitting's machine, versions and settings, from env.json and the peer's JSON."""
    def make(results: Path) -> str:
        env = _load(results / folder / "env.json")
        m, v = env["machine"], env["versions"]
        threads = sorted({_load(p).get("threads")
                          for p in (results / folder).glob("w*_torch.json")})
        torch = (f"PyTorch {v['torch']} ({'/'.join(map(str, threads))} threads) in a scratch "
                 "virtualenv" if threads else f"PyTorch {v['torch']}")
        dirty = " plus uncommitted changes" if env.get("dirty") else ""
        first_load = env["commands"][0]["load_before"] if env.get("commands") else "?"
        return _prose(
                f"Measured {env['date'][:10]} by `experiments/studies/bench_cpu.sh` at commit "
                f"{env['commit'][:7]}{dirty}, {env['wall_s']} s in all: {m['cpu_model']}, "
                f"{m['nproc']} cores{' (' + m['hypervisor'] + ')' if m.get('hypervisor') else ''}"
                f", {m['mem_gib']:g} GiB; Python {v['python']}, jax/jaxlib {v['jax']}/"
                f"{v['jaxlib']} ({len(v['jax_devices'])} CPU device), numpy {v['numpy']}; "
                f"{torch}. Load average (1/5/15 min) {first_load} at the start, {m['load_end']} "
                f"at the end. Raw outputs, the command lines and this record: "
                f"`results/{folder}/`.") + "\n"
    return make


def bench_cpu_vs_torch(folder: str) -> Callable[[Path], str]:
    """Per width and step row, images/s of JAX, the PyTorch peer and JAX before, and their
    ratios, each cell one value per round."""
    def make(results: Path) -> str:
        data = _rounds(results / folder)
        lines = ["| width | row | JAX | PyTorch | JAX before | JAX / PyTorch | before / PyTorch "
                 "| JAX / before |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for width, rounds in data.items():
            for row in STEP_ROWS:
                ips = {v: [rounds[r][v][row]["img_per_s"] for r in sorted(rounds)]
                       for v in VARIANTS if all(row in rounds[r][v] for r in rounds)}
                if len(ips) < len(VARIANTS):
                    continue
                j, t, b = ips["jax"], ips["torch"], ips["jax_before"]
                lines.append(" | ".join([
                    f"| {width}", row, _per_round(j, ".1f"), _per_round(t, ".1f"),
                    _per_round(b, ".1f"), _ratios(j, t), _ratios(b, t), _ratios(j, b)]) + " |")
        n = max(len(r) for r in data.values())
        rounds_text = " / ".join(f"round {k}" for k in range(1, n + 1))
        lines += ["", _prose(f"Images/s ({rounds_text}), batch 128, float32; a ratio above 1: "
                             "the first is faster.")]
        return "\n".join(lines) + "\n"
    return make


def bench_cpu_compile(folder: str) -> Callable[[Path], str]:
    """Compile (first call) seconds of JAX and JAX before, per round, and their mean ratio."""
    def make(results: Path) -> str:
        data = _rounds(results / folder)
        lines = ["| width | row | JAX compile s | JAX before compile s | before / JAX |",
                 "|---|---|---:|---:|---:|"]
        for width, rounds in data.items():
            for row in STEP_ROWS:
                try:
                    j = [rounds[r]["jax"][row]["compile_s"] for r in sorted(rounds)]
                    b = [rounds[r]["jax_before"][row]["compile_s"] for r in sorted(rounds)]
                except KeyError:
                    continue
                lines.append(f"| {width} | {row} | {_per_round(j, '.2f')} | {_per_round(b, '.2f')}"
                             f" | {statistics.mean(b) / statistics.mean(j):.2f} |")
        return "\n".join(lines) + "\n"
    return make


def bench_cpu_ftsam_epoch(folder: str) -> Callable[[Path], str]:
    """The width-16 `ftsam_epoch` row, JAX and JAX before; and, where the sitting has width-64
    step rows, the time of 100 full-width FT-SAM epochs estimated from its `sam_step` row."""
    def make(results: Path) -> str:
        lines = ["| variant | compile s | steady epoch s | img/s | 100 epochs, compile included |",
                 "|---|---:|---:|---:|---:|"]
        epoch = {}
        for name, label in (("jax", "JAX"), ("jax_before", "JAX before")):
            path = results / folder / f"ftsam_epoch_w16_{name}.json"
            epoch[name] = r = _rows(_load(path), str(path))["ftsam_epoch"]
            lines.append(f"| {label} | {r['compile_s']:.2f} | {r['ms_per_call'] / 1e3:.2f} | "
                         f"{r['img_per_s']:.1f} | {r['est_seconds_for_epochs']:,.0f} s "
                         f"({r['est_seconds_for_epochs'] / 60:.1f} min) |")
        r = epoch["jax"]
        lines += ["", _prose(f"One epoch: {r['examples']:,} images, {r['steps_per_epoch']} SAM "
                             f"steps of batch {r['batch_size']} ({r['mode']}); {r['epochs']} "
                             f"epochs = compile + {r['epochs'] - 1} x the steady epoch.")]
        data = _rounds(results / folder)
        if 64 in data and all("sam_step" in v["jax"] for v in data[64].values()):
            per_call = statistics.mean(
                v["jax"]["sam_step"]["ms_per_call"] / 1e3 for v in data[64].values())
            calls = r["epochs"] * r["steps_per_epoch"] * r["batch_size"] / 128
            lines += ["", _prose(
                      "At full width (64), from the `sam_step` rows above "
                      f"({per_call:.2f} s per call of batch 128, mean over the rounds): "
                      f"{r['epochs']} epochs x "
                      f"{r['steps_per_epoch']} steps of batch {r['batch_size']} = {calls:,.0f} "
                      f"calls ~ {calls * per_call / 3600:.1f} hours (an estimate from the step "
                      "row, not a run).")]
        return "\n".join(lines) + "\n"
    return make


def bench_cpu_detect(folder: str) -> Callable[[Path], str]:
    """The detection rows."""
    def make(results: Path) -> str:
        path = results / folder / "detect.json"
        rows = _rows(_load(path), str(path))
        lines = ["| row | compile s | ms / call | img/s | image side, batch |",
                 "|---|---:|---:|---:|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['compile_s']:.2f} | {r['ms_per_call']:.1f} | "
                         f"{r['img_per_s']:.1f} | {r.get('image_size', '-')}, "
                         f"{r.get('batch_size', '-')} |")
        return "\n".join(lines) + "\n"
    return make


def _epochs(path: Path) -> dict[str, list[dict[str, Any]]]:
    if not path.is_file():
        raise InputError(f"{path} is missing")
    stages: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            stages.setdefault(record["stage"], []).append(record)
    return stages


def bench_cpu_stages(folder: str) -> Callable[[Path], str]:
    """Seconds per epoch of each stage of the `experiments.ftsam` runs, before and now (their
    metrics.jsonl), and the ratio of their steady-state epochs (neither the first, which
    compiles, nor one with an evaluation)."""
    def make(results: Path) -> str:
        runs = {v: _epochs(results / folder / "stages" / v / "metrics.jsonl")
                for v in ("before", "after")}
        n = max(len(e) for stages in runs.values() for e in stages.values())
        lines = ["| stage | " + " | ".join(f"epoch {k}" for k in range(1, n + 1))
                 + " | stage total |", "|---|" + "---:|" * (n + 1)]
        ratios = []
        for stage in runs["after"]:
            steady = {}
            for v, label in (("before", "before"), ("after", "now")):
                epochs = runs[v].get(stage, [])
                secs = [f"{e['seconds']:.1f}" for e in epochs] + [""] * (n - len(epochs))
                lines.append(f"| {stage}, {label} | " + " | ".join(secs)
                             + f" | {sum(e['seconds'] for e in epochs):.1f} s |")
                steady[v] = [e["seconds"] for e in epochs
                             if e["epoch"] > 1 and "clean_acc" not in e]
            if steady["before"] and steady["after"]:
                ratio = statistics.mean(steady["before"]) / statistics.mean(steady["after"])
                ratios.append(f"{stage} {ratio:.2f}x")
        lines += ["", _prose("Steady-state epochs (neither the first, which compiles, nor one "
                             "with an evaluation), before / now: "
                             + (", ".join(ratios) if ratios else "none in these runs") + ".")]
        return "\n".join(lines) + "\n"
    return make


GPU_COLUMNS = (("jax_f32", "JAX float32"), ("torch_f32", "PyTorch float32"),
               ("torch_f32_cl", "PyTorch f32 channels_last"), ("jax_bf16", "JAX bfloat16"),
               ("torch_amp", "PyTorch AMP bf16 + channels_last"))


def bench_gpu_vs_torch(folder: str) -> Callable[[Path], str]:
    """The GPU sitting's step rows, images/s (ms per call), and JAX over the best PyTorch of
    the same precision."""
    def make(results: Path) -> str:
        cols = {name: _rows(_load(results / folder / f"{name}.json"), f"{folder}/{name}.json")
                for name, _ in GPU_COLUMNS}
        lines = ["| row | " + " | ".join(label for _, label in GPU_COLUMNS) + " |",
                 "|---|" + "---:|" * len(GPU_COLUMNS)]
        for row in STEP_ROWS:
            cells = []
            for name, _ in GPU_COLUMNS:
                r = cols[name][row]
                digits = 2 if name.startswith("jax") else 1
                cells.append(f"{r['img_per_s']:,.0f} ({r['ms_per_call']:.{digits}f})")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        short = {"train_step": "train", "sam_step": "SAM", "eval_step": "eval"}
        parts = []
        for dtype, jax_name, peers in (("float32", "jax_f32", ("torch_f32", "torch_f32_cl")),
                                       ("bfloat16", "jax_bf16", ("torch_amp",))):
            best = {row: max(cols[p][row]["img_per_s"] for p in peers) for row in STEP_ROWS}
            parts.append(f"{dtype} " + ", ".join(
                f"{short[row]} {cols[jax_name][row]['img_per_s'] / best[row]:.2f}x"
                for row in STEP_ROWS))
        lines += ["", _prose("JAX / best PyTorch of the same precision: " + "; ".join(parts)
                             + ".")]
        return "\n".join(lines) + "\n"
    return make


def bench_gpu_ftsam_epoch(folder: str) -> Callable[[Path], str]:
    """The GPU sitting's `ftsam_epoch` row per dtype."""
    def make(results: Path) -> str:
        lines = ["| dtype | compile s | steady epoch | 100 epochs, compile included |",
                 "|---|---:|---:|---:|"]
        for name in ("jax_f32", "jax_bf16"):
            info = _load(results / folder / f"{name}.json")
            r = _rows(info, f"{folder}/{name}.json")["ftsam_epoch"]
            lines.append(f"| {info['dtype']} | {r['compile_s']:.1f} | {r['ms_per_call']:.1f} ms "
                         f"({r['img_per_s']:,.0f} img/s) | "
                         f"**{r['est_seconds_for_epochs']:.1f} s** |")
        return "\n".join(lines) + "\n"
    return make


BENCH_CPU = "bench_cpu_2026-12-06"
BENCH_GPU = "bench_gpu_h200"

BLOCKS: dict[str, Callable[[Path], str]] = {
    "bench_cpu_env": bench_cpu_env(BENCH_CPU),
    "bench_cpu_vs_torch": bench_cpu_vs_torch(BENCH_CPU),
    "bench_cpu_compile": bench_cpu_compile(BENCH_CPU),
    "bench_cpu_ftsam_epoch": bench_cpu_ftsam_epoch(BENCH_CPU),
    "bench_cpu_detect": bench_cpu_detect(BENCH_CPU),
    "bench_cpu_stages": bench_cpu_stages(BENCH_CPU),
    "bench_gpu_vs_torch": bench_gpu_vs_torch(BENCH_GPU),
    "bench_gpu_ftsam_epoch": bench_gpu_ftsam_epoch(BENCH_GPU),
}
