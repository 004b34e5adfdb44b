"""A run's defense curves: C-Acc, ASR and the learning rate against the epoch, one line per
stage of a defense, from the run's metrics.jsonl (`experiments.ftsam` writes `curves.png`).

With `--eval_every=1` every epoch is evaluated, so a backdoor that falls early in a defense and
comes back later (or the reverse) shows; the learning-rate panel shows the schedule each stage
ran (FT's cosine per epoch, FT-SAM's cyclic per-iteration cosine).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["NOT_DEFENSES", "defense_curves", "plot_defense_curves"]

# Stages of a run that are not a defense's: the models the defenses start from or compare to,
# an attack's own training, the Retuning Attack.
NOT_DEFENSES = ("backdoored", "clean", "lf_surrogate", "input_aware")
# the learning-rate panel: columns on one schedule draw one curve; a style each keeps them apart
LR_STYLES = ("-", "--", ":", "-.")


def defense_curves(metrics_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Per defense stage (as named in metrics.jsonl: `ft`, `ftsam_rho=0/ftsam`, ...), its
    epochs' records, in order; stages of `NOT_DEFENSES` and the Retuning Attack left out."""
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    if not metrics_path.is_file():
        return {}
    for line in metrics_path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        stage = str(record.get("stage", ""))
        if stage.startswith("retune/") or any(stage == n or stage.startswith(n + "_")
                                               for n in NOT_DEFENSES):
            continue
        curves.setdefault(stage, {})[int(record["epoch"])] = record  # a rerun's line wins
    return {stage: [by_epoch[e] for e in sorted(by_epoch)] for stage, by_epoch in curves.items()}


def plot_defense_curves(metrics_path: Path, path: Path) -> bool:
    """Writes `path` (ASR, C-Acc, lr against epoch; one line per defense stage); False when no
    defense stage has an evaluated epoch (nothing written)."""
    curves = {s: r for s, r in defense_curves(metrics_path).items()
              if any("clean_acc" in x for x in r)}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (stage, records) in enumerate(curves.items()):
        for ax, key, scale in ((axes[0], "asr", 100), (axes[1], "clean_acc", 100),
                               (axes[2], "lr", 1)):
            points = [(r["epoch"], scale * r[key]) for r in records if key in r]
            if points:
                style = (dict(marker=".") if key != "lr"
                         else dict(linestyle=LR_STYLES[i % len(LR_STYLES)]))
                ax.plot(*zip(*points, strict=True), label=stage, **style)
    for ax, title in zip(axes, ("ASR (%)", "C-Acc (%)", "learning rate"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
