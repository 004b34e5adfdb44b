r"""The paper's neuron analysis on the cells of an `experiments.table` study (FT-SAM Fig. 1, 2, 4,
5 and 6 a/b), resumable, with intervals over backdoored models.

    python -m experiments.neurons --study=results/fmnist_cpu

The study is laid out as `experiments.table --model_seeds` writes it:
`STUDY/ATTACK/m<model seed>/ds<defense seed>/` with config.json, results.json,
models/backdoored and models/<column folder> of each defense column (models/ft, models/ftsam,
models/ftsam_rho=0, ...). For every such cell this command rebuilds the data set and the attack
exactly as `experiments.ftsam` did (the cell's config.json tree, `load_inputs`,
`build_backdoor_data`; LF reads the cell's cached `lf_pattern.npy`, Input-aware its
`models/input_aware`; nothing is trained), checks the rebuild against results.json (the
backdoored model's C-Acc and ASR re-measured with `make_backdoor_evaluator`, each column's
benign subset re-derived with `benign_indices` and compared with its recorded fingerprint), and
measures on the last convolution (`ftsam_jax.analysis.last_conv_path`):

- every neuron's weight norm and TAC (`neuron_norms`, `tac`) for the backdoored model and each
  defended one, and their Spearman rank correlation per model (Fig. 2, last column; Fig. 4);
- the norm distribution's spread before and after each defense (Fig. 5): std, std / mean, and
  the share of the summed norm held by the top-5% TAC neurons of the backdoored model;
- per defense the pre-stated statistic of "FT-SAM shrinks the norms of high-TAC neurons more
  than FT" (Fig. 2 bottom, Fig. 4): `high_tac_log_change`, the mean over the top-5% TAC neurons
  of log(norm_after / norm_before) minus the same mean over the other neurons (negative: the
  high-TAC neurons shrank more, relative to the rest);
- Fig. 6 a/b: each FT-family column's per-neuron gradient norm at the defense's first step
  (the backdoored weights, BatchNorm in training mode, the column's loss: plain or
  label-smoothed cross-entropy), on a fixed batch of `--grad_images` images of the column's
  benign subset, without augmentation. For FT (and `ftsam[rho=0]`, whose steps are plain) the
  loss gradient; for FT-SAM the gradient at the perturbed weights w + e, i.e. what
  `ftsam_jax.optim.sam_gradient` hands on (FT-SAM Eq. 4 and 6); with its Spearman correlation
  against the backdoored model's TAC.

Per cell it writes `analysis/analysis.json` (every number, per-neuron arrays included) and
`analysis/norm_vs_tac.png`, `analysis/norm_hist.png`, `analysis/grad_vs_tac.png`; a cell whose
analysis.json exists, was made with the same `--tac_images`, `--grad_images` and `--top_share`
and covers every column of its results.json is skipped (`--force` recomputes). Then
`STUDY/neurons.json` and `STUDY/neurons.md`: per attack and model seed the correlations and
statistics (each defense's averaged over its defense seeds first), their mean and 95% t
interval over backdoored models (the unit of replication), and the paired differences of
`--differences` (default ftsam - ft and ftsam - ftsam[rho=0]) over models (a model's
difference averaged over the defense seeds both columns have),
`ftsam_jax.metrics.paired_difference`; and the same intervals and differences over every
backdoored model of every attack ("all": the unit of the pre-stated tests in REPRODUCTION.md).

References: Zhu et al., Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization, ICCV 2023 (arXiv 2304.11823), Fig. 1, 2, 4, 5, 6 and Eq. 4, 6; Zheng et al.,
Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022 (TAC); BackdoorBench
`analysis/visual_tac.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from experiments import ftsam
from experiments.cli import InputError, comma_list, make_mesh, run
from experiments.variants import parse_column
from experiments.workdir import atomic_write, read_json
from ftsam_jax import metrics
from ftsam_jax.analysis import last_conv_path, neuron_norms, tac
from ftsam_jax.attacks import BackdoorData, build_backdoor_data
from ftsam_jax.checkpoint import load_variables
from ftsam_jax.data import DataError
from ftsam_jax.defenses import DEFENSES
from ftsam_jax.defenses.base import benign_fingerprint
from ftsam_jax.optim import sam_gradient
from ftsam_jax.training.epoch import to_float
from ftsam_jax.training.recipe import FitConfig
from ftsam_jax.training.stage import StageContext, stage_rng
from ftsam_jax.training.step import classification_loss

__all__ = ["analyse_cell", "find_cells", "first_batch_gradient_norms", "high_tac_log_change",
           "spearman", "summarize", "top_tac_mask"]

FLAGS = flags.FLAGS

# The defenses whose first step the gradient analysis (Fig. 6 a/b) reproduces: fine-tuning,
# plain or sharpness-aware, from the backdoored weights.
FINETUNE_DEFENSES = ("ft", "ftsam")
# Per-column quantities of analysis.json summarised over models in neurons.json.
COLUMN_METRICS = ("spearman_norm_tac", "spearman_norm_tac_backdoored", "std_norm", "cv_norm",
                  "std_ratio", "top_tac_norm_share", "high_tac_log_change",
                  "spearman_log_change_tac", "mean_grad_norm", "spearman_grad_tac")
BACKDOORED_METRICS = ("spearman_norm_tac", "std_norm", "cv_norm", "top_tac_norm_share")
# The paired differences of neurons.json: the pre-stated statistic first.
DIFFERENCE_METRICS = ("high_tac_log_change", "std_ratio", "spearman_grad_tac", "mean_grad_norm")


def define_flags() -> None:
    """The command line of `python -m experiments.neurons` (defined only when it runs)."""
    flags.DEFINE_string("study", None, "An experiments.table study: STUDY/ATTACK/m<s>/ds<s>/.")
    flags.DEFINE_list("attacks", None, "Only these attacks (default: every folder of STUDY).")
    flags.DEFINE_list("columns", None, "Defense columns to analyse (default: every column of a "
                      "cell's results.json whose defense is ft or ftsam, variants included).")
    flags.DEFINE_integer("tac_images", 1024, "Poisoned test images (and their clean "
                         "originals) TAC is averaged over (the first ones of the ASR set).")
    flags.DEFINE_integer("grad_images", 256, "Benign images of the first-batch gradient "
                         "(Fig. 6 a/b): a fixed draw from the column's benign subset.")
    flags.DEFINE_float("top_share", 0.05, "Share of neurons (by the backdoored model's TAC) "
                       "that count as high-TAC.")
    flags.DEFINE_list("differences", ["ftsam:ft", "ftsam:ftsam[rho=0]"], "Paired differences "
                      "A:B over backdoored models in neurons.json (pairs missing a column are "
                      "left out).")
    flags.DEFINE_bool("verify", True, "Re-measure the backdoored model's C-Acc and ASR on the "
                      "rebuilt test sets and refuse a cell that does not match results.json.")
    flags.DEFINE_bool("force", False, "Recompute cells whose analysis.json exists.")


# ----------------------------------------------------------------------------------------------
# The numbers (pure functions of per-neuron arrays)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rank correlation (`scipy.stats.spearmanr`); None where it is undefined (a
    constant vector)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    rho = float(stats.spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def top_tac_mask(tac_values: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the k = max(1, round(share * n)) neurons of largest TAC (ties by index)."""
    t = np.asarray(tac_values, np.float64)
    k = min(t.size, max(1, round(share * t.size)))
    mask = np.zeros(t.size, bool)
    mask[np.argsort(-t, kind="stable")[:k]] = True
    return mask


def norm_share(norms: np.ndarray, mask: np.ndarray) -> float | None:
    """The share of the summed norm held by the neurons of `mask` (Fig. 5's spread)."""
    total = float(np.sum(norms))
    return float(np.sum(norms[mask]) / total) if total > 0 else None


def log_norm_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """log(norm_after / norm_before) per neuron (nan where either norm is 0)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(after / before)
    return np.where((before > 0) & (after > 0), out, np.nan)


def high_tac_log_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray
                        ) -> float | None:
    """The pre-stated statistic: mean log(norm_after / norm_before) over the high-TAC neurons
    (`mask`) minus the same mean over the others (FT-SAM Fig. 2 bottom, Fig. 4: FT-SAM shrinks
    the high-TAC neurons' norms more). None where undefined (an empty side, a zero norm)."""
    change = log_norm_change(before, after)
    if mask.all() or not mask.any() or not np.all(np.isfinite(change)):
        return None
    return float(change[mask].mean() - change[~mask].mean())


def spread(norms: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """Fig. 5: mean, std (ddof 0), std / mean and the top-TAC neurons' share of the norm."""
    mean, std = float(np.mean(norms)), float(np.std(norms))
    return {"mean_norm": mean, "std_norm": std, "cv_norm": std / mean if mean > 0 else None,
            "top_tac_norm_share": norm_share(norms, mask)}


# ----------------------------------------------------------------------------------------------
# Fig. 6 a/b: the gradient of the defense's first step


def first_batch_gradient_norms(model: Any, variables: dict[str, Any], images: np.ndarray,
                               labels: np.ndarray, path: tuple[str, ...], *,
                               label_smoothing: float = 0.0, rho: float = 0.0,
                               adaptive: bool = True, eta: float = 0.0
                               ) -> dict[str, np.ndarray]:
    """Per-neuron L2 norms of the gradient w.r.t. the kernel of module `path` on one batch
    (FT-SAM Fig. 6 a/b), BatchNorm in training mode as in a training step.

    Returns {"plain": the loss gradient's norms} and, with rho > 0, {"sam": the norms of the
    gradient at the perturbed weights w + e that `sam_gradient(rho, adaptive, eta)` hands on
    (FT-SAM Eq. 4 and 6)}.
    """
    loss_fn = classification_loss(model.apply, label_smoothing)
    params, stats = variables["params"], variables.get("batch_stats", {})
    batch = {"image": to_float(jnp.asarray(images)), "label": jnp.asarray(labels, jnp.int32)}
    rng = jax.random.key(0)

    def grad(p: Any) -> Any:
        return jax.grad(lambda q: loss_fn(q, stats, batch, rng)[0])(p)

    plain = jax.jit(grad)(params)
    out = {"plain": neuron_norms(jax.device_get(plain), path)}
    if rho > 0:
        tx = sam_gradient(rho, adaptive=adaptive, eta=eta)

        @jax.jit
        def sam(p: Any, g: Any) -> Any:
            return tx.update(g, tx.init(p), p, grad_fn=grad)[0]

        out["sam"] = neuron_norms(jax.device_get(sam(params, plain)), path)
    return out


# ----------------------------------------------------------------------------------------------
# Cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One folder of the study: an attack, a backdoored model (its seed), a defense seed."""

    attack: str
    model_seed: int
    defense_seed: int
    path: Path

    @property
    def label(self) -> str:
        return f"{self.attack}/m{self.model_seed}/ds{self.defense_seed}"


def _seed(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def find_cells(study: Path, attacks: Sequence[str] | None = None) -> list[Cell]:
    """The cells `STUDY/ATTACK/m<s>/ds<s>/` holding config.json and results.json, by attack,
    model seed and defense seed."""
    cells = []
    for attack_dir in sorted(p for p in study.iterdir() if p.is_dir()):
        if attacks is not None and attack_dir.name not in attacks:
            continue
        for m_dir in attack_dir.iterdir():
            m = _seed(m_dir.name, "m")
            if m is None or not m_dir.is_dir():
                continue
            for ds_dir in m_dir.iterdir():
                s = _seed(ds_dir.name, "ds")
                if s is not None and (ds_dir / "config.json").is_file() and (
                        ds_dir / "results.json").is_file():
                    cells.append(Cell(attack_dir.name, m, s, ds_dir))
    return sorted(cells, key=lambda c: (c.attack, c.model_seed, c.defense_seed))


def cell_columns(results: dict[str, Any], path: Path, wanted: Sequence[str] | None
                 ) -> dict[str, str]:
    """The columns to analyse: name -> model folder, in results.json's order (finished and with
    their model on disk)."""
    out = {}
    for name in results.get("defenses", {}):
        column = parse_column(name, DEFENSES)
        if wanted is None and column.base not in FINETUNE_DEFENSES:
            continue
        if wanted is not None and name not in wanted:
            continue
        if (path / "models" / column.folder).is_dir():
            out[name] = column.folder
    return out


def cell_settings(tree: ml_collections.ConfigDict) -> ftsam.Settings:
    """The typed settings `load_inputs` and `benign_indices` read, from a cell's config tree
    (the defenses' sections are not validated: each column's own settings are in results.json).
    """
    ftsam.check_run_fields(tree, 1)
    return ftsam.Settings(run=ftsam.run_record(tree), benign_ratio=tree.benign_ratio,
                          benign_selection=tree.benign_selection, defenses=(), columns={},
                          defense_configs={}, eval_every=1, retune=None)


def rebuild(cell: Cell, tree: ml_collections.ConfigDict, settings: ftsam.Settings, mesh: Any
            ) -> tuple[Any, Any, Any, BackdoorData, dict[str, Any]]:
    """The cell's data set, attack, model, poisoned data and backdoored variables, as
    `experiments.ftsam` built them; nothing is trained (an attack that needs a fit reads its
    cached result from the cell: LF `lf_pattern.npy`, Input-aware `models/input_aware`)."""
    ds, attack, model = ftsam.load_inputs(tree, settings)
    if attack.needs_fit:
        cached = {"lf": "lf_pattern.npy", "input_aware": "models/input_aware",
                  "trojannn": "trojannn_trigger.npz", "lc": "lc_adversarial.npz",
                  "ssba": "ssba_encoder.npz"}.get(tree.attack)
        if cached is None or not (cell.path / cached).exists():
            raise InputError(f"{cell.label}: the {tree.attack} attack's trigger is not cached in "
                             f"the cell ({cached}); it would have to be made again")
        ctx = StageContext(mesh=mesh, seed=tree.seed, workdir=cell.path, progress=False)

        def no_clean_model() -> None:
            raise InputError(f"{cell.label}: the attack asked for a clean model")

        run_cfg = settings.run
        fit_cfg = FitConfig(epochs=run_cfg["epochs"], batch_size=run_cfg["batch_size"],
                            lr=run_cfg["lr"], schedule=run_cfg["schedule"], drop_last=True)
        attack.fit(ds=ds, model=model, fit_config=fit_cfg, ratio=tree.poison_ratio, ctx=ctx,
                   rng=stage_rng(tree.seed, "attack"), clean_model=no_clean_model)
    bd = build_backdoor_data(ds, attack, tree.poison_ratio, tree.seed)
    if attack.trained_variables is not None:
        bd_vars = attack.trained_variables
    else:
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jnp.zeros((1, *ds.image_shape), jnp.float32))
        bd_vars = load_variables(cell.path / "models" / "backdoored", shapes)
    return ds, attack, model, bd, bd_vars


def column_benign(cell: Cell, name: str, record: dict[str, Any], labels: np.ndarray,
                  settings: ftsam.Settings, run_seed: int) -> np.ndarray:
    """The column's benign subset re-derived (`benign_indices` with the cell's settings and the
    column's own stream); InputError unless it matches results.json's fingerprint."""
    spec = DEFENSES[parse_column(name, DEFENSES).base]
    selection = record.get("config", {}).get("benign_selection", settings.benign_selection)
    ratio = record.get("config", {}).get("benign_ratio", settings.benign_ratio)
    defense_seed = record.get("config", {}).get("defense_seed", cell.defense_seed)
    own = dataclasses.replace(settings, benign_selection=selection, benign_ratio=ratio)
    idx = ftsam.benign_indices(labels, own, spec.balanced, stage_rng(defense_seed,
                               f"defense/{name}"), defense_seed, run_seed)
    stored = record.get("benign")
    if stored is not None and (stored.get("sha256") != benign_fingerprint(idx)["sha256"]):
        raise InputError(f"{cell.label}: {name}'s benign subset does not re-derive to the one "
                         "results.json records")
    return idx


def analyse_cell(cell: Cell, mesh: Any, *, columns: Sequence[str] | None = None,
                 tac_images: int = 1024, grad_images: int = 256, top_share: float = 0.05,
                 verify: bool = True) -> dict[str, Any]:
    """analysis.json's content for one cell (see the module docstring)."""
    config = read_json(cell.path / "config.json", "the cell's config")
    results = read_json(cell.path / "results.json", "the cell's results")
    if "backdoored" not in results:
        raise InputError(f"{cell.label}: results.json has no backdoored row yet")
    tree = ml_collections.ConfigDict(config["config"])
    settings = cell_settings(tree)
    ds, attack, model, bd, bd_vars = rebuild(cell, tree, settings, mesh)
    report: dict[str, Any] = {
        "cell": cell.label, "attack": cell.attack, "model_seed": cell.model_seed,
        "defense_seed": cell.defense_seed, "dataset": tree.dataset, "model": tree.model,
        "width": tree.width, "poison_ratio": tree.poison_ratio, "target": tree.target,
        "settings": {"tac_images": tac_images, "grad_images": grad_images,
                     "top_share": top_share}}
    if verify:
        measured = ftsam.make_backdoor_evaluator(model, bd, mesh)(bd_vars)
        stored = results["backdoored"]
        tol = 1.5 / min(len(bd.y_test), len(bd.y_bd))
        diffs = {k: abs(measured[k] - stored[k]) for k in ("clean_acc", "asr")}
        if max(diffs.values()) > tol:
            raise InputError(f"{cell.label}: the rebuilt data do not reproduce results.json "
                             f"(backdoored {measured} vs {stored})")
        report["verified"] = {"measured": measured, "max_abs_difference": max(diffs.values())}

    path = last_conv_path(model)
    # The ASR set's images and their clean originals, paired (as `analysis_stage` pairs them).
    x_clean = bd.x_test[attack.test_mask(bd.y_test)][:tac_images]
    x_poisoned = bd.x_bd[:tac_images]
    names = cell_columns(results, cell.path, columns)
    models = {"backdoored": bd_vars}
    models.update({n: load_variables(cell.path / "models" / f, bd_vars) for n, f in names.items()})
    norms = {n: neuron_norms(v["params"], path) for n, v in models.items()}
    tacs = {n: tac(model, v, x_clean, x_poisoned, path) for n, v in models.items()}
    top = top_tac_mask(tacs["backdoored"], top_share)
    report.update(layer="/".join(path), neurons=int(top.size), tac_images=int(len(x_clean)),
                  top_share=top_share, top_tac_neurons=np.flatnonzero(top).tolist())
    entries: dict[str, Any] = {}
    for n in models:
        row = results["backdoored"] if n == "backdoored" else results["defenses"][n]
        entry: dict[str, Any] = {
            "folder": "backdoored" if n == "backdoored" else names[n],
            "clean_acc": row["clean_acc"], "asr": row["asr"],
            "norms": _floats(norms[n]), "tac": _floats(tacs[n]),
            "spearman_norm_tac": spearman(norms[n], tacs[n]),
            "spearman_norm_tac_backdoored": spearman(norms[n], tacs["backdoored"]),
            **spread(norms[n], top)}
        if n != "backdoored":
            change = log_norm_change(norms["backdoored"], norms[n])
            entry.update(
                log_norm_change=[None if not math.isfinite(c) else round(float(c), 8)
                                 for c in change],
                std_ratio=_ratio(entry["std_norm"], entries["backdoored"]["std_norm"]),
                high_tac_log_change=high_tac_log_change(norms["backdoored"], norms[n], top),
                spearman_log_change_tac=(spearman(change, tacs["backdoored"])
                                         if np.all(np.isfinite(change)) else None))
        entries[n] = entry
    report["models"] = entries
    report["gradients"] = gradients(cell, results, names, settings, ds, model, bd_vars, path,
                                    tacs["backdoored"], top, grad_images, tree.seed)
    for n, g in report["gradients"].items():
        entries[n]["mean_grad_norm"] = g["mean_grad_norm"]
        entries[n]["spearman_grad_tac"] = g["spearman_grad_tac"]
    return report


def gradients(cell: Cell, results: dict[str, Any], names: dict[str, str],
              settings: ftsam.Settings, ds: Any, model: Any, bd_vars: dict[str, Any],
              path: tuple[str, ...], bd_tac: np.ndarray, top: np.ndarray, grad_images: int,
              run_seed: int) -> dict[str, Any]:
    """Fig. 6 a/b for each FT-family column: the gradient norms of its first step."""
    out = {}
    for name in names:
        record = results["defenses"][name]
        if parse_column(name, DEFENSES).base not in FINETUNE_DEFENSES:
            continue
        c = record.get("config", {})
        idx = column_benign(cell, name, record, ds.y_train, settings, run_seed)
        pick = np.sort(np.random.default_rng(0).permutation(idx)[:grad_images])
        rho = float(c.get("rho", 0.0)) if c.get("sam", False) else 0.0
        g = first_batch_gradient_norms(
            model, bd_vars, ds.x_train[pick], ds.y_train[pick], path,
            label_smoothing=float(c.get("label_smoothing", 0.0)), rho=rho,
            adaptive=bool(c.get("adaptive", True)), eta=float(c.get("eta", 0.0)))
        used = g.get("sam", g["plain"])
        out[name] = {
            "sam": rho > 0, "rho": rho, "label_smoothing": float(c.get("label_smoothing", 0.0)),
            "adaptive": bool(c.get("adaptive", True)), "images": int(len(pick)),
            "benign": benign_fingerprint(idx), "batch": benign_fingerprint(pick),
            "grad_norms": _floats(used), "plain_grad_norms": _floats(g["plain"]),
            "mean_grad_norm": float(used.mean()),
            "mean_plain_grad_norm": float(g["plain"].mean()),
            "spearman_grad_tac": spearman(used, bd_tac),
            "spearman_plain_grad_tac": spearman(g["plain"], bd_tac),
            "top_tac_grad_share": norm_share(used, top)}
    return out


def _floats(a: np.ndarray) -> list[float]:
    return [round(float(v), 8) for v in np.asarray(a)]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------------------------
# Plots


def plot_cell(report: dict[str, Any], folder: Path) -> None:
    """norm_vs_tac.png (one panel per model, its own TAC), norm_hist.png (norms before/after)
    and grad_vs_tac.png (first-step gradient norms against the backdoored model's TAC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, layer = report["models"], report["layer"]
    top = np.zeros(report["neurons"], bool)
    top[report["top_tac_neurons"]] = True
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, (name, e) in zip(axes[0], models.items(), strict=True):
        t, n = np.asarray(e["tac"]), np.asarray(e["norms"])
        ax.scatter(t[~top], n[~top], s=8, alpha=0.6)
        ax.scatter(t[top], n[top], s=12, color="tab:red", label="top TAC (backdoored)")
        ax.set_title(f"{name}: Spearman {_fmt(e['spearman_norm_tac'])}", fontsize="small")
        ax.set_xlabel(f"TAC ({layer})")
    axes[0][0].set_ylabel("neuron weight norm")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(f"{report['cell']}: norm vs TAC (FT-SAM Fig. 2, 4)", fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "norm_vs_tac.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in models.items():
        ax.hist(e["norms"], bins=40, alpha=0.45, label=f"{name} (std {e['std_norm']:.3g})")
    ax.set_xlabel("neuron weight norm")
    ax.set_ylabel("neurons")
    ax.set_title(f"{report['cell']}: weight norms of {layer} (FT-SAM Fig. 5)", fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "norm_hist.png", dpi=110)
    plt.close(fig)

    grads = report["gradients"]
    if not grads:
        return
    bd_tac = np.asarray(models["backdoored"]["tac"])
    fig, axes = plt.subplots(1, len(grads), figsize=(4 * len(grads), 3.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], grads.items(), strict=True):
        ax.scatter(bd_tac, g["grad_norms"], s=8, alpha=0.6)
        kind = "SAM gradient at w+e" if g["sam"] else "loss gradient"
        ax.set_title(f"{name}: {kind}\nSpearman {_fmt(g['spearman_grad_tac'])}",
                     fontsize="small")
        ax.set_xlabel("TAC of the backdoored model")
    axes[0][0].set_ylabel("gradient norm, first batch")
    fig.suptitle(f"{report['cell']}: first-step gradient norms (FT-SAM Fig. 6 a/b)",
                 fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "grad_vs_tac.png", dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3, style: str = "f") -> str:
    return "-" if value is None else f"{value:.{digits}{style}}"


# ----------------------------------------------------------------------------------------------
# The study


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval over backdoored models (`paired_difference` against 0)."""
    return _finite(metrics.paired_difference(list(values), [0.0] * len(values)))


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: an unbounded interval (one model) as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


def _model_record(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One backdoored model's numbers: each column's averaged over its defense seeds, and per
    defense seed the values the paired differences need."""
    record: dict[str, Any] = {"defense_seeds": [r["defense_seed"] for r in cells],
                              "columns": {}}
    record["backdoored"] = {k: cells[0]["models"]["backdoored"][k]
                            for k in ("clean_acc", "asr", *BACKDOORED_METRICS)}
    names = dict.fromkeys(n for r in cells for n in r["models"] if n != "backdoored")
    for n in names:
        rows = [(r["defense_seed"], r["models"][n]) for r in cells if n in r["models"]]
        record["columns"][n] = {
            "defense_seeds": [ds for ds, _ in rows],
            **{k: _mean([row.get(k) for _, row in rows])
               for k in ("clean_acc", "asr", *COLUMN_METRICS)},
            "per_seed": {str(ds): {k: row.get(k) for k in DIFFERENCE_METRICS}
                         for ds, row in rows}}
    return record


def _paired_on_seeds(record: dict[str, Any], a: str, b: str, k: str) -> float | None:
    """A model's difference a - b of metric k, averaged over the defense seeds where both
    columns have it (a seed one column lacks is left out of both)."""
    if a not in record["columns"] or b not in record["columns"]:
        return None
    sa, sb = record["columns"][a]["per_seed"], record["columns"][b]["per_seed"]
    common = [s for s in sa if s in sb and sa[s][k] is not None and sb[s][k] is not None]
    return float(np.mean([sa[s][k] - sb[s][k] for s in common])) if common else None


def _over_models(models: dict[str, dict[str, Any]], differences: Sequence[tuple[str, str]]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Intervals of each metric and the paired differences over the backdoored models given
    (keyed by a label; each model's own numbers are seed averages)."""
    intervals: dict[str, Any] = {"backdoored": {}}
    for k in BACKDOORED_METRICS:
        vals = [v["backdoored"][k] for v in models.values() if v["backdoored"][k] is not None]
        if vals:
            intervals["backdoored"][k] = interval(vals)
    for n in dict.fromkeys(n for v in models.values() for n in v["columns"]):
        intervals[n] = {}
        for k in COLUMN_METRICS:
            vals = [v["columns"][n][k] for v in models.values()
                    if n in v["columns"] and v["columns"][n][k] is not None]
            if vals:
                intervals[n][k] = interval(vals)
    diffs: dict[str, Any] = {}
    for a, b in differences:
        pair: dict[str, Any] = {}
        for k in DIFFERENCE_METRICS:
            per_model = {label: _paired_on_seeds(v, a, b, k) for label, v in models.items()}
            kept = [label for label, d in per_model.items() if d is not None]
            if kept:
                pair[k] = {**interval([per_model[label] for label in kept]), "models": kept}
        if pair:
            diffs[f"{a} - {b}"] = pair
    return intervals, diffs


def summarize(reports: Sequence[dict[str, Any]], differences: Sequence[tuple[str, str]]
              ) -> dict[str, Any]:
    """neurons.json's "attacks": per attack and model seed each metric (a column's averaged
    over its defense seeds first), their interval over models, and the paired differences
    (each model's difference averaged over the defense seeds both columns have); and "all":
    the same intervals and differences over every backdoored model of every attack (the
    pre-stated tests' unit)."""
    out: dict[str, Any] = {}
    pooled: dict[str, dict[str, Any]] = {}
    for attack in sorted({r["attack"] for r in reports}):
        mine = [r for r in reports if r["attack"] == attack]
        models = {str(m): _model_record([r for r in mine if r["model_seed"] == m])
                  for m in sorted({r["model_seed"] for r in mine})}
        intervals, diffs = _over_models(models, differences)
        for d in (d for pair in diffs.values() for d in pair.values()):
            d["model_seeds"] = [int(m) for m in d.pop("models")]
        out[attack] = {"models": models, "intervals": intervals, "differences": diffs}
        pooled.update({f"{attack}/m{m}": rec for m, rec in models.items()})
    intervals, diffs = _over_models(pooled, differences)
    return {"attacks": out, "all": {"models": list(pooled), "intervals": intervals,
                                    "differences": diffs}}


def neurons_markdown(summary: dict[str, Any]) -> str:
    """neurons.md: per attack a table of the models' numbers, the intervals, the differences."""
    lines = ["# Neuron analysis (FT-SAM Fig. 2, 4, 5, 6 a/b)", "",
             f"Last conv layer; high-TAC neurons: the top {100 * summary['top_share']:g}% by the "
             "backdoored model's TAC. Statistic `high_tac_log_change` (pre-stated): mean "
             "log(norm after / norm before) over the high-TAC neurons minus the same over the "
             "others; negative: the defense shrank the high-TAC neurons more than the rest. "
             "`grad~TAC`: Spearman of the first-batch gradient norm (FT: loss gradient; FT-SAM: "
             "the SAM gradient at w+e) against the backdoored model's TAC. Each model's defended "
             "numbers are averaged over its defense seeds; intervals are 95% t intervals over "
             "backdoored models.", ""]
    for attack, block in summary["attacks"].items():
        lines += [f"## {attack}", "",
                  "| model | column | C-Acc | ASR | norm~TAC | std norm | top share | "
                  "log-change stat | grad~TAC | mean grad |", "|---|---|---:|---:|---:|---:|"
                  "---:|---:|---:|---:|"]
        for m, rec in block["models"].items():
            b = rec["backdoored"]
            lines.append(f"| m{m} | backdoored | {100 * b['clean_acc']:.2f} | "
                         f"{100 * b['asr']:.2f} | {_fmt(b['spearman_norm_tac'])} | "
                         f"{_fmt(b['std_norm'], 4)} | {_fmt(b['top_tac_norm_share'], 4)} | - | - "
                         "| - |")
            for n, c in rec["columns"].items():
                lines.append(
                    f"| m{m} | {n} | {100 * c['clean_acc']:.2f} | {100 * c['asr']:.2f} | "
                    f"{_fmt(c['spearman_norm_tac'])} | {_fmt(c['std_norm'], 4)} | "
                    f"{_fmt(c['top_tac_norm_share'], 4)} | "
                    f"{_fmt(c['high_tac_log_change'], 3, 'g')} | "
                    f"{_fmt(c['spearman_grad_tac'])} | {_fmt(c['mean_grad_norm'], 3, 'g')} |")
        lines += ["", "Over backdoored models (mean [95% t interval], n):", ""]
        lines += _over_models_lines(block, ("spearman_norm_tac", "high_tac_log_change",
                                            "spearman_grad_tac"), "")
    pooled = summary.get("all")
    if pooled and pooled["models"]:
        lines += ["## all: every backdoored model of every attack", "",
                  f"Models: {', '.join(pooled['models'])}. Over backdoored models (mean [95% t "
                  "interval], n):", ""]
        lines += _over_models_lines(pooled, ("spearman_norm_tac", "high_tac_log_change",
                                             "std_ratio", "spearman_grad_tac"),
                                    " (the pre-stated tests)")
    if summary["failures"]:
        lines += ["## Cells not analysed", ""]
        lines += [f"- {f['cell']}: {f['error']}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def _over_models_lines(block: dict[str, Any], keys: Sequence[str], note: str) -> list[str]:
    """neurons.md's lines of a block's intervals (the metrics `keys`) and its paired
    differences (headed "Paired differences over backdoored models" + `note`)."""
    lines = [f"- {n} {k}: {_interval_text(metrics_[k])}"
             for n, metrics_ in block["intervals"].items() for k in keys if k in metrics_]
    if block["differences"]:
        lines += ["", f"Paired differences over backdoored models{note}:", ""]
        for pair, ks in block["differences"].items():
            for k, d in ks.items():
                state = "resolved" if d["resolved"] else "not resolved"
                lines.append(f"- {pair}, {k}: {_interval_text(d)} ({state})")
    return [*lines, ""]


def _interval_text(d: dict[str, Any]) -> str:
    if d["ci_low"] is None:
        return f"{d['mean']:.4g} (n = {d['n']}, no interval)"
    return f"{d['mean']:.4g} [{d['ci_low']:.4g}, {d['ci_high']:.4g}], n = {d['n']}"


def _differences(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        a, sep, b = item.partition(":")
        if not sep or not a.strip() or not b.strip():
            raise InputError(f"--differences {item!r}: expected A:B, e.g. ftsam:ft")
        pairs.append((a.strip(), b.strip()))
    return pairs


def _covered(existing: dict[str, Any], results: dict[str, Any], path: Path,
             columns: Sequence[str] | None, settings: dict[str, Any]) -> bool:
    """Whether an analysis.json was made with these settings and holds every column the cell
    now has."""
    return (existing.get("settings") == settings
            and set(cell_columns(results, path, columns)) <= set(existing.get("models", {})))


def run_study(study: Path, *, attacks: Sequence[str] | None = None,
              columns: Sequence[str] | None = None, tac_images: int = 1024,
              grad_images: int = 256, top_share: float = 0.05, verify: bool = True,
              force: bool = False, differences: Sequence[tuple[str, str]] = (),
              mesh: Any = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Analyses every cell (resumable) and writes neurons.json / neurons.md; returns the
    summary."""
    if not study.is_dir():
        raise InputError(f"--study {study} is not a folder")
    if tac_images < 1 or grad_images < 1 or not 0 < top_share < 1:
        raise InputError("--tac_images and --grad_images must be >= 1, --top_share in (0, 1)")
    cells = find_cells(study, attacks)
    if not cells:
        raise InputError(f"--study {study}: no cell ATTACK/m<s>/ds<s>/ with config.json and "
                         "results.json")
    mesh = mesh if mesh is not None else make_mesh()
    reports, failures = [], []
    for i, cell in enumerate(cells, 1):
        folder = cell.path / "analysis"
        target = folder / "analysis.json"
        if target.is_file() and not force:
            existing = read_json(target, "the cell's analysis")
            results = read_json(cell.path / "results.json", "the cell's results")
            settings = {"tac_images": tac_images, "grad_images": grad_images,
                        "top_share": top_share}
            if _covered(existing, results, cell.path, columns, settings):
                log(f"[{i}/{len(cells)}] {cell.label}: done earlier")
                reports.append(existing)
                continue
        log(f"[{i}/{len(cells)}] {cell.label}: analysing")
        try:
            report = analyse_cell(cell, mesh, columns=columns, tac_images=tac_images,
                                  grad_images=grad_images, top_share=top_share, verify=verify)
        except (InputError, DataError) as e:
            failures.append({"cell": cell.label, "error": " ".join(str(e).split())})
            log(f"[{i}/{len(cells)}] {cell.label}: failed: {failures[-1]['error']}")
            continue
        folder.mkdir(exist_ok=True)
        plot_cell(report, folder)
        atomic_write(target, json.dumps(report, indent=1) + "\n")
        reports.append(report)
    summary = {"study": str(study), "top_share": top_share,
               "cells": [r["cell"] for r in reports], "failures": failures,
               **summarize(reports, differences)}
    atomic_write(study / "neurons.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(study / "neurons.md", neurons_markdown(summary))
    return summary


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.study:
        raise InputError("--study is required")
    attacks = None if FLAGS.attacks is None else comma_list(",".join(FLAGS.attacks))
    summary = run_study(Path(FLAGS.study), attacks=attacks, columns=FLAGS.columns,
                        tac_images=FLAGS.tac_images, grad_images=FLAGS.grad_images,
                        top_share=FLAGS.top_share, verify=FLAGS.verify, force=FLAGS.force,
                        differences=_differences(FLAGS.differences))
    print(f"neurons: {Path(FLAGS.study) / 'neurons.json'}  {Path(FLAGS.study) / 'neurons.md'}")
    if summary["failures"]:
        raise InputError(f"{len(summary['failures'])} cell(s) not analysed: "
                         f"{summary['failures'][0]['cell']}: {summary['failures'][0]['error']}")


if __name__ == "__main__":
    define_flags()
    run(main)
