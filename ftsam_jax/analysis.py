"""The paper's neuron analysis: weight norms and TAC of the last conv layer, and plots.

- Neuron weight norm (FT-SAM Fig. 2, 4, 5): the L2 norm of each output channel's filter of the
  last convolution (PreAct-ResNet18: `layer4_1/conv2`, 512 neurons at full width).
- TAC, trigger-activated change (Zheng et al., ECCV 2022, used by FT-SAM Fig. 2, 4): for each
  channel k of that layer's output, the mean over test images x (true label != target) of
  sum_{h,w} |f_k(x_poisoned) - f_k(x)|, as BackdoorBench's `visual_tac.py` computes it.

`run_analysis` writes analysis.json and three PNGs into the workdir: norm vs TAC per model,
norm histograms per model, and C-Acc/ASR curves over the defense epochs (from metrics.jsonl).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from ftsam_jax import xla
from ftsam_jax.models import VGG, PreActResNet, TinyCNN

__all__ = ["last_conv_path", "neuron_norms", "run_analysis", "tac"]


def last_conv_path(model: nn.Module) -> tuple[str, ...]:
    """Module path of the model's last convolution."""
    if isinstance(model, PreActResNet):
        return (f"layer{len(model.stage_sizes)}_{model.stage_sizes[-1] - 1}", "conv2")
    if isinstance(model, VGG):
        return (f"conv{sum(1 for v in model.cfg if v != 'M') - 1}",)
    if isinstance(model, TinyCNN):
        return ("conv2",)
    raise ValueError(f"no analysis layer known for {type(model).__name__}")


def neuron_norms(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
    """L2 norm of every output channel's filter (kernel layout HWIO)."""
    kernel = params
    for p in path:
        kernel = kernel[p]
    k = np.asarray(kernel["kernel"], np.float64)
    return np.sqrt((k**2).reshape(-1, k.shape[-1]).sum(0))


def layer_output(model: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                 path: tuple[str, ...], batch_size: int = 256) -> np.ndarray:
    """The output of module `path` (inference mode) for uint8 or [0, 1] images."""

    @xla.jit
    def run(x):
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
        _, state = model.apply(variables, x, train=False, capture_intermediates=lambda m, _: (
            m.scope is not None and tuple(m.scope.path) == path), mutable=["intermediates"])
        out = state["intermediates"]
        for p in path:
            out = out[p]
        return out["__call__"][0].astype(np.float32)

    return np.concatenate([np.asarray(run(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def tac(model: nn.Module, variables: Mapping[str, Any], clean: np.ndarray, poisoned: np.ndarray,
        path: tuple[str, ...]) -> np.ndarray:
    """Per-channel mean over images of sum over positions |f(poisoned) - f(clean)|."""
    f_clean = layer_output(model, variables, clean, path)
    f_bd = layer_output(model, variables, poisoned, path)
    return np.abs(f_bd - f_clean).sum(axis=(1, 2)).mean(0)


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation; None (JSON null) where undefined, e.g. a constant vector."""
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def run_analysis(model: nn.Module, models: Mapping[str, Mapping[str, Any]], x_clean: np.ndarray,
                 x_poisoned: np.ndarray, workdir: Path, max_images: int = 512
                 ) -> dict[str, Any]:
    """Norms and TAC for each model in `models` ({"backdoored": vars, "<defense>": vars}).

    `x_clean` and `x_poisoned` are paired test images (poisoned versions of the same images).
    TAC is measured with each model's own features; the neuron order is the backdoored model's,
    so `tac_backdoored` ranks the neurons by how backdoor-related they were before defense.
    """
    workdir = Path(workdir)
    path = last_conv_path(model)
    n = min(max_images, len(x_clean))
    report: dict[str, Any] = {"layer": "/".join(path), "images": n, "models": {}}
    bd_tac = None
    for name, variables in models.items():
        norms = neuron_norms(variables["params"], path)
        t = tac(model, variables, x_clean[:n], x_poisoned[:n], path)
        if bd_tac is None:
            bd_tac = t
        report["models"][name] = {
            "norms": norms.round(6).tolist(), "tac": t.round(6).tolist(),
            "mean_norm": float(norms.mean()), "std_norm": float(norms.std()),
            "corr_norm_tac_backdoored": _corr(norms, bd_tac),
        }
    base = np.asarray(report["models"][next(iter(models))]["norms"])
    for entry in report["models"].values():
        entry["corr_norm_change_tac_backdoored"] = _corr(np.asarray(entry["norms"]) - base,
                                                         bd_tac)
    (workdir / "analysis.json").write_text(json.dumps(report, indent=1) + "\n")
    _plots(report, bd_tac, workdir)
    return report


def _plots(report: dict[str, Any], bd_tac: np.ndarray, workdir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, entry in report["models"].items():
        ax.scatter(bd_tac, entry["norms"], s=8, alpha=0.6, label=name)
    ax.set_xlabel(f"TAC of the backdoored model ({report['layer']})")
    ax.set_ylabel("neuron weight norm")
    ax.set_title("Neuron norm vs trigger-activated change")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "norm_vs_tac.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, entry in report["models"].items():
        ax.hist(entry["norms"], bins=40, alpha=0.5, label=name)
    ax.set_xlabel("neuron weight norm")
    ax.set_ylabel("neurons")
    ax.set_title(f"Weight norms of {report['layer']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "norm_hist.png", dpi=120)
    plt.close(fig)

    metrics_path = workdir / "metrics.jsonl"
    if not metrics_path.is_file():
        return
    curves: dict[str, list[dict[str, Any]]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["stage"] != "backdoored" and "asr" in rec:
            curves.setdefault(rec["stage"], []).append(rec)
    if not curves:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.get_cmap("tab20").colors
    for i, (stage, recs) in enumerate(curves.items()):
        epochs = [r["epoch"] for r in recs]
        style = dict(label=stage, color=colors[i % len(colors)], marker="o", markersize=3)
        axes[0].plot(epochs, [100 * r["clean_acc"] for r in recs], **style)
        axes[1].plot(epochs, [100 * r["asr"] for r in recs], **style)
    for ax, title in zip(axes, ("C-Acc (%)", "ASR (%)"), strict=True):
        ax.set_xlabel("defense epoch (pruning stages: step)")
        ax.set_title(title)
    # One legend beside the plots: single-point stages (pruning) show as markers.
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(workdir / "defense_curves.png", dpi=120)
    plt.close(fig)
