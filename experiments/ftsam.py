r"""FT-SAM end to end: data -> backdoored model -> defenses -> the paper's table.

    python -m experiments.ftsam --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
        --attack=blended --preset=cpu --defenses=ft,ftsam --workdir=runs/blended

Every setting is one field of one config tree, `experiments/configs/ftsam.py` (`ml_collections`,
every field spelled out with its preset value). The flags above are aliases of its fields
(`FLAG_ALIASES`: `--rho` is `--config.defense.ftsam.rho`; `--set=NAME.FIELD=VALUE` is
`--config.defense.NAME.FIELD=VALUE`), and any field can be set as with the flax examples, e.g.
`--config=experiments/configs/ftsam.py:cpu --config.defense.ftsam.rho=4`. `main` builds the tree
from the command line; `train_and_evaluate(config, workdir)` turns it into typed settings once
(`resolve_settings`: each defense's section into its dataclass, `DefenseSpec.config_cls`) and
runs it (tests call it).

Stages (each checkpointed with orbax; rerunning the same command resumes, finished stages are
skipped): (1) poison the training set, (2) train the backdoored model, (3) each defense in
`--defenses` from the backdoored weights on a benign subset, (4) metrics, `--analysis`; with
`--retune_attack` also a clean model trained on the clean training set (`models/clean`) and the
Retuning Attack (`ftsam_jax.retune`) on the undefended model, the clean one and every defense's,
each row's result under its `retune` key.
Writes into `--workdir`: results.json, results.md (the paper-style table), metrics.jsonl (one
line per epoch of every stage, with its learning rate), config.json, checkpoints/, curves.png
(each defense's C-Acc, ASR and learning rate against the epoch; `--eval_every=1` for every
epoch), and with --analysis analysis.json + PNG plots.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from experiments.cli import (
    InputError,
    check_batch_fits,
    comma_list,
    compute_dtype,
    config_from_flags,
    make_mesh,
    run,
)
from experiments.configs.ftsam import (
    FTSAM_RECIPES,
    PRESETS,
    RUN_KEYS,
    backdoored_schedule,
    get_config,
)
from experiments.curves import plot_defense_curves
from experiments.overrides import apply_set_items
from experiments.variants import DefenseColumn, column_base, column_section, parse_columns
from experiments.workdir import (
    RESULTS_FIX,
    MetricsLog,
    atomic_write,
    check_workdir,
    elapsed,
    lock_workdir,
    read_json,
    start_timer,
)
from ftsam_jax import metrics, parallel
from ftsam_jax.attacks import (
    ATTACKS,
    BackdoorData,
    build_backdoor_data,
    create_attack,
    ssba,
    trojannn,
)
from ftsam_jax.checkpoint import load_variables, save_variables
from ftsam_jax.data import Dataset, check_backdoor_target, load_dataset, normalization_for
from ftsam_jax.defenses import DEFENSES, BenignData, select_benign
from ftsam_jax.defenses.base import (
    BENIGN_SELECTIONS,
    PoisonedTrainData,
    benign_fingerprint,
    defended_parts,
    with_defaults,
)
from ftsam_jax.models import MODELS, create_model
from ftsam_jax.retune import RetuneConfig, RetuneData, retune, retune_data
from ftsam_jax.training.epoch import make_evaluator
from ftsam_jax.training.recipe import FitConfig, fit
from ftsam_jax.training.stage import StageContext, stage_rng

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS, sys_argv: list[str] | None = None) -> None:
    """The command line of `python -m experiments.ftsam` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests; `fv` and
    `sys_argv` for a parse of its own). Unset alias flags leave the config file's value."""
    string, integer, real, boolean, enum = (
        functools.partial(define, flag_values=fv) for define in (
            flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_bool,
            flags.DEFINE_enum))
    string("dataset", None, "TFDS name, 'cifar10'/'cifar100' (official python folder in "
           "--data_dir, else TFDS, else download), 'fashion_mnist' (the official IDX files in "
           "--data_dir) or 'npz:PATH'.")
    string("data_dir", None, "Official CIFAR python folder (or its parent), the folder of "
           "Fashion-MNIST's IDX files, or a TFDS data dir.")
    string("attack", None, f"One of {sorted(ATTACKS)}.")
    real("poison_ratio", None, "Share of the training set poisoned, in (0, 1].")
    integer("target", None, "Target class of all-to-one attacks.")
    string("trigger_path", None, "Blended: a picture to blend; lf: a .npy pattern.")
    string("model", None, f"One of {sorted(MODELS)}.")
    integer("width", None, "Model width.")
    integer("epochs", None, "Epochs of the backdoored model.")
    integer("batch_size", None, "Batch size of the backdoored model.")
    real("lr", None, "Learning rate of the backdoored model.")
    integer("seed", None, "Seed of everything (poisoning, init, order, defenses).")
    integer("defense_seed", None, "Seed of the defenses only (benign subset, their random "
            "streams; default --seed): repeat defenses on one backdoored model.")
    string("workdir", None, "Output and checkpoint folder (default: "
           "runs/<dataset>_<attack>_<preset>_s<seed>).")
    enum("preset", "paper", list(PRESETS), "paper: the reference recipe (PreActResNet18, SGD "
         "0.01/0.9/5e-4, cosine, 100 epochs, batch 128); cpu: width 16, 60 epochs at lr 0.05 "
         "(about 20 minutes on 2 CPU cores on the 5k CIFAR slice); smoke: a tiny net, seconds.")
    flags.DEFINE_list("defenses", None, "Defenses to run after the backdoored stage, e.g. "
                      "ft,ftsam: " + "; ".join(f"{n}: {s.summary}" for n, s in
                                               sorted(DEFENSES.items())) + ".", flag_values=fv)
    real("benign_ratio", None, "Share of the training set the defender holds.")
    enum("benign_selection", None, list(BENIGN_SELECTIONS), "reference: each defense draws its "
         "benign subset by its own rule (FT-SAM class-balanced, the others uniformly) from its "
         "own stream; shared: one class-balanced subset per defense seed, used by every "
         "defense of the run (paired comparisons).")
    real("rho", None, "FT-SAM neighbourhood radius.", lower_bound=0.0)
    enum("ftsam_recipe", None, list(FTSAM_RECIPES), "reference: BackdoorBench's (label "
         "smoothing 0.1, cyclic per-iteration cosine); paper: plain CE, cosine per epoch.")
    integer("defense_epochs", None, "Every selected defense's epochs.", lower_bound=1)
    integer("defense_batch_size", None, "Every selected defense's batch size.", lower_bound=1)
    flags.DEFINE_multi_string("set", [], "A defense setting NAME.FIELD=VALUE (repeatable), "
                              "e.g. ikd.alpha_adv=0 or ikd.teacher.rho=4: an alias of "
                              "--config.defense.NAME.FIELD=VALUE.", flag_values=fv)
    enum("dtype", None, ["float32", "bfloat16"], "Compute dtype.")
    integer("eval_every", None, "Evaluate C-Acc/ASR curves every k epochs and after the last. "
            "Evaluating 19k test images every epoch would dominate a GPU fine-tuning run.")
    integer("checkpoint_every", None, "Checkpoint every k epochs.")
    boolean("analysis", None, "Neuron norms / TAC before and after each defense, plots.")
    boolean("retune_attack", None, "The Retuning Attack (Min et al. 2024) on the undefended "
            "model, every defended one and a clean model trained on the same data: ASR after a "
            "short fine-tuning on 2% benign data holding 5 poisoned samples (settings: "
            "--config.retune.FIELD).")
    boolean("progress", None, "Progress bars.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/ftsam.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True,
        flag_values=fv, sys_argv=sys_argv)
    for name, alias in FLAG_ALIASES.items():
        fv[name].help += f" [{alias_note(alias)}]"


def alias_note(alias: Any) -> str:
    """What an alias flag sets, and the config file's values, for --help."""
    if not isinstance(alias, str):
        paths = sorted({path for fields in alias.values() for path in fields})
        return "sets --config." + ", --config.".join(paths)
    if "*" in alias:
        return f"--config.{alias.replace('*', 'NAME')} of each selected defense NAME"
    values = {p: config_path.get_value(alias, get_config(p)) for p in PRESETS}
    shown = (repr(values["paper"]) if len(set(map(repr, values.values()))) == 1
             else ", ".join(f"{v!r} ({p})" for p, v in values.items()))
    return f"--config.{alias}; config file: {shown}"


# Every shorthand flag -> the config-tree field it sets, applied in this order when given
# (after `--config.` overrides; `--set` items after them). `defense.NAME.FIELD` applies when NAME
# is in `defenses` (`alias_paths`); `defense.*.FIELD`: every selected defense with that field.
# `ftsam_recipe` is a choice: its value sets the recipe's fields (FTSAM_RECIPES).
FLAG_ALIASES: dict[str, Any] = {
    **{name: name for name in (
        "dataset", "data_dir", "attack", "poison_ratio", "target", "trigger_path", "model",
        "width", "epochs", "batch_size", "lr", "seed", "defense_seed", "benign_ratio",
        "benign_selection", "dtype", "eval_every", "checkpoint_every", "analysis", "progress",
        "defenses", "retune_attack")},
    "ftsam_recipe": {recipe: {f"defense.ftsam.{k}": v for k, v in fields.items()}
                     for recipe, fields in FTSAM_RECIPES.items()},
    "rho": "defense.ftsam.rho",
    "defense_epochs": "defense.*.epochs",
    "defense_batch_size": "defense.*.batch_size",
}


def alias_paths(tree: ml_collections.ConfigDict, path: str) -> list[str]:
    """The tree fields an alias path stands for: `defense.NAME.FIELD` only when NAME is in
    `defenses` (a shorthand never changes a defense that does not run, so a flag of
    `experiments.table` suits every cell; a variant column `NAME[...]` selects NAME's section);
    `defense.*.FIELD`: each selected defense with FIELD."""
    head, _, rest = path.partition(".")
    if head != "defense":
        return [path]
    name, _, field = rest.partition(".")
    selected = [n for n in dict.fromkeys(column_base(c) for c in comma_list(tree.defenses))
                if n in tree.defense]
    if name == "*":
        return [f"defense.{n}.{field}" for n in selected if field in tree.defense[n]]
    return [path] if name in selected else []


def config_tree(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    """The run's config tree from the command line: the config file (`--config`, or the one of
    `--preset`) with its `--config.` overrides, the alias flags, then the `--set` items."""
    tree = config_from_flags(get_config, FLAG_ALIASES, paths=alias_paths, flag_values=fv)
    apply_set_items(tree, fv.set)
    return tree


# ----------------------------------------------------------------------------------------------
# Settings: the tree, validated and turned into typed settings once


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's typed settings. `defenses` are the columns' names as written, `columns` and
    `defense_configs` are keyed by them."""

    run: dict[str, Any]
    benign_ratio: float
    benign_selection: str
    defenses: tuple[str, ...]
    columns: dict[str, DefenseColumn]
    defense_configs: dict[str, Any]
    eval_every: int
    retune: RetuneConfig | None = None


def resolve_settings(cfg: ml_collections.ConfigDict, num_devices: int) -> Settings:
    """The config tree -> typed settings (the tree is not modified); raises InputError for
    anything invalid, including a changed setting that nothing would use."""
    check_run_fields(cfg, num_devices)
    columns = selected_defenses(cfg)
    return Settings(run=run_record(cfg), benign_ratio=cfg.benign_ratio,
                    benign_selection=cfg.benign_selection,
                    defenses=tuple(c.name for c in columns),
                    columns={c.name: c for c in columns},
                    defense_configs=defense_settings(cfg, columns, num_devices),
                    eval_every=cfg.eval_every, retune=retune_settings(cfg))


def retune_settings(cfg: ml_collections.ConfigDict) -> RetuneConfig | None:
    """The Retuning Attack's settings when `retune_attack` (None otherwise); InputError for a
    field of the wrong range or name."""
    if not cfg.retune_attack:
        return None
    try:
        return RetuneConfig(**cfg.retune.to_dict())
    except (TypeError, ValueError) as e:
        raise InputError(f"config retune: {e}") from None


def check_run_fields(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
    """InputError for a run-level field (data, attack, the backdoored model, logging) out of
    its range."""
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.attack not in ATTACKS:
        raise InputError(f"unknown attack {cfg.attack!r}; choose one of {sorted(ATTACKS)}")
    if cfg.model not in MODELS:
        raise InputError(f"unknown model {cfg.model!r}; choose one of {sorted(MODELS)}")
    if cfg.attack != "trojannn" and \
            cfg.trojannn.to_dict() != get_config(cfg.preset).trojannn.to_dict():
        raise InputError("config trojannn is changed but --attack is not trojannn")
    if cfg.attack != "lc" and cfg.lc.to_dict() != get_config(cfg.preset).lc.to_dict():
        raise InputError("config lc is changed but --attack is not lc")
    if cfg.attack != "ssba" and cfg.ssba.to_dict() != get_config(cfg.preset).ssba.to_dict():
        raise InputError("config ssba is changed but --attack is not ssba")
    if not 0.0 < cfg.poison_ratio <= 1.0:
        raise InputError(f"--poison_ratio must lie in (0, 1], got {cfg.poison_ratio}")
    if not 0.0 < cfg.benign_ratio <= 1.0:
        raise InputError(f"--benign_ratio must lie in (0, 1], got {cfg.benign_ratio}")
    if cfg.benign_selection not in BENIGN_SELECTIONS:
        raise InputError(f"--benign_selection must be one of {list(BENIGN_SELECTIONS)}, got "
                         f"{cfg.benign_selection!r}")
    if cfg.width < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        raise InputError("--width and --epochs must be >= 1 and --lr > 0")
    if cfg.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.batch_size % num_devices:
        raise InputError(f"--batch_size {cfg.batch_size} is not divisible by the number of "
                         f"devices ({num_devices})")
    if cfg.checkpoint_every < 1:
        raise InputError("--checkpoint_every must be >= 1")
    if cfg.eval_every < 1:
        raise InputError("--eval_every must be >= 1")
    compute_dtype(cfg.dtype)


def selected_defenses(cfg: ml_collections.ConfigDict) -> list[DefenseColumn]:
    """The columns of `defenses`: defenses and variants `NAME[FIELD=VALUE,...]`."""
    return parse_columns(cfg.defenses, DEFENSES)


def run_record(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json's "run": the backdoored model's settings (`RUN_KEYS` guard a workdir)."""
    return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "attack": cfg.attack,
            "poison_ratio": cfg.poison_ratio, "target": cfg.target,
            "trigger_path": cfg.trigger_path, "model": cfg.model, "width": cfg.width,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "seed": cfg.seed, "preset": cfg.preset, "dtype": cfg.dtype,
            "schedule": backdoored_schedule(cfg.preset, cfg.attack),
            **({"trojannn": cfg.trojannn.to_dict()} if cfg.attack == "trojannn" else {}),
            **({"lc": cfg.lc.to_dict()} if cfg.attack == "lc" else {}),
            **({"ssba": cfg.ssba.to_dict()} if cfg.attack == "ssba" else {})}


def defense_settings(cfg: ml_collections.ConfigDict, columns: list[DefenseColumn],
                     num_devices: int) -> dict[str, Any]:
    """Each column's settings (its defense's dataclass, from the tree's `defense.NAME`, with a
    variant's overrides); a changed section of a defense that no column runs is refused (it
    would be dropped)."""
    unknown = sorted(set(cfg.defense) - set(DEFENSES))
    if unknown:
        raise InputError(f"config defense.{unknown[0]}: no such defense; defenses: "
                         f"{sorted(DEFENSES)}")
    bases = {c.base for c in columns}
    missing = sorted(bases - set(cfg.defense))
    if missing:
        raise InputError(f"config has no defense.{missing[0]} section")
    for name, section in cfg.defense.items():
        defense_config(name, section.to_dict(), cfg.preset, name in bases)
    configs = {}
    for column in columns:
        values = column_section(cfg.defense, column)
        config = defense_config(column.base, values, cfg.preset, True, column.name)
        bs = getattr(config, "batch_size", None)
        if bs is not None and bs % num_devices:
            raise InputError(f"defense {column.name}: batch size {bs} is not divisible by the "
                             f"number of devices ({num_devices}); set --defense_batch_size")
        configs[column.name] = config
    return configs


def defense_config(name: str, values: dict[str, Any], preset: str, selected: bool,
                   column: str | None = None) -> Any:
    """The settings of the tree's section `defense.NAME` (`DefenseSpec.config_from_dict`),
    checked against the preset's (`DefenseSpec.preset_config`): a defense that does not run
    must keep them, one that runs may not change what it fixes itself (`DefenseSpec.fixed`).
    None when not selected."""
    spec = DEFENSES[name]
    try:
        variant = values.get(spec.variant_field) if spec.variant_field else None
        reference = spec.preset_config(preset, variant)
    except ValueError as e:
        raise InputError(f"config defense.{name}.{e}") from None
    if not selected:
        if values != dataclasses.asdict(reference):
            raise InputError(f"config defense.{name} is changed but {name} is not in "
                             "--defenses")
        return None
    try:
        config = spec.config_from_dict(values)
    except (TypeError, ValueError) as e:
        raise InputError(f"config defense.{name}: {e}") from None
    changed = spec.changed_fixed_fields(config, reference)
    if changed:
        where = f"{column or name}: {name}" if column != name and column else name
        raise InputError(f"{where}.{changed[0]} cannot be changed ({spec.fixed[changed[0]]})")
    return config


def config_json(cfg: ml_collections.ConfigDict, settings: Settings) -> str:
    """config.json: "run" guards resume (`RUN_KEYS`); "config" is the whole tree, as run."""
    return json.dumps({"run": settings.run, "config": json.loads(cfg.to_json(sort_keys=True))},
                      indent=2) + "\n"


# ----------------------------------------------------------------------------------------------
# Files


def defense_record(cfg: Any, benign_ratio: float, defense_seed: int,
                   benign_selection: str) -> dict[str, Any]:
    """A defense's settings as stored in results.json (and compared on rerun)."""
    return {"benign_ratio": benign_ratio, "benign_selection": benign_selection,
            "defense_seed": defense_seed, **dataclasses.asdict(cfg)}


def check_defense_record(workdir: Path, results: dict[str, Any], column: DefenseColumn,
                         record: dict[str, Any], seed: int) -> None:
    """A column's checkpoints and result belong to its settings: InputError when the stored
    record (results.json's, else its checkpoints' marker) differs from `record`. A record
    written before a field existed is completed first (`DefenseSpec.complete_record`; before
    --defense_seed existed, the defenses ran with the run's seed; before --benign_selection,
    each drew its own subset: `reference`)."""
    name = column.name
    marker = workdir / "checkpoints" / f"{column.folder}.settings.json"
    previous = results["defenses"].get(name, {}).get("config")
    if previous is None and marker.is_file():
        previous = read_json(marker, "the settings marker", "delete it and the checkpoints of "
                             f"{name} (checkpoints/{column.folder}) to rerun {name}, or use "
                             "another --workdir")
    if previous is None:
        return
    previous = completed_record(column.base, previous, seed)
    if previous != record:
        changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in record.items()
                            if previous.get(k) != v)
        raise InputError(f"defense {name} in {workdir} was run with other settings "
                         f"({changed}); use another --workdir")


def completed_record(defense: str, record: dict[str, Any], seed: int) -> dict[str, Any]:
    """A stored settings record with every field added since it was written: before
    --defense_seed existed the defenses ran with the run's `seed`, before --benign_selection
    each drew its own subset (`reference`), and the defense's own `DefenseSpec.added_fields`."""
    return DEFENSES[defense].complete_record(with_defaults(
        record, {"defense_seed": seed, "benign_selection": "reference"}))


def write_results(workdir: Path, results: dict[str, Any]) -> None:
    atomic_write(workdir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(workdir / "results.md", results_table(results))


def results_table(results: dict[str, Any]) -> str:
    """The paper-style table (%), rows: No defense and each defense."""
    pct = lambda v: f"{100 * v:.2f}"
    lines = [
        f"# {results['attack']} on {results['dataset']} ({results['model']})",
        "",
        f"Poison ratio {results['config']['poison_ratio']}, target {results['config']['target']},"
        f" benign ratio {results['config']['benign_ratio']}, preset "
        f"{results['config']['preset']}, seed {results['config']['seed']}.",
        "",
    ]
    bd, defenses = results["backdoored"], results.get("defenses", {})
    # The Retuning Attack's columns only where a row has them (older tables keep their shape).
    rows = [bd, *defenses.values(), *([results["clean"]] if "clean" in results else [])]
    ra = any("retune" in r for r in rows)
    ra_head = " RA C-Acc | RA ASR |" if ra else ""

    def ra_cells(r: dict[str, Any]) -> str:
        if not ra:
            return ""
        t = r.get("retune")
        return " - | - |" if t is None else f" {pct(t['clean_acc'])} | {pct(t['asr'])} |"

    lines += [f"| Defense | C-Acc | ASR | R-Acc | DER |{ra_head} seconds |",
              "|---|---:|---:|---:|---:|" + "---:|" * (3 if ra else 1)]
    lines.append(f"| No defense | {pct(bd['clean_acc'])} | {pct(bd['asr'])} | "
                 f"{pct(bd['robust_acc'])} | - |{ra_cells(bd)} {bd.get('seconds', 0):.0f} |")
    for name, r in defenses.items():
        lines.append(f"| {name} | {pct(r['clean_acc'])} | {pct(r['asr'])} | "
                     f"{pct(r['robust_acc'])} | {pct(r['der'])} |{ra_cells(r)} "
                     f"{r['seconds']:.0f} |")
    if "clean" in results:
        c = results["clean"]
        lines.append(f"| Clean model | {pct(c['clean_acc'])} | {pct(c['asr'])} | "
                     f"{pct(c['robust_acc'])} | - |{ra_cells(c)} {c.get('seconds', 0):.0f} |")
    if ra:
        lines += ["", "RA: the Retuning Attack (Min et al. 2024) on the row's model: C-Acc and "
                  "ASR after fine-tuning on 2% benign data holding a few poisoned samples."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Pipeline


def main(argv: list[str]) -> None:
    del argv
    mesh = make_mesh()  # joins a multi-process launch first
    config = config_tree()
    workdir = Path(FLAGS.workdir or default_workdir(config))
    results = train_and_evaluate(config, workdir, mesh=mesh)
    print_summary(results, workdir)


def default_workdir(cfg: ml_collections.ConfigDict) -> str:
    dataset = cfg.dataset.replace("/", "_").replace(":", "_")
    return f"runs/{dataset}_{cfg.attack}_{cfg.preset}_s{cfg.seed}"


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path, *,
                       mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs (or resumes) the config tree's run in `workdir`: poisoning, the backdoored model,
    each defense, the metrics; returns results.json's content. Bad settings raise InputError
    before anything is written; the tree is not modified."""
    workdir, mesh = Path(workdir), mesh or parallel.make_mesh()
    settings = resolve_settings(cfg, mesh.devices.size)
    check_workdir(workdir, settings.run, RUN_KEYS)
    ds, attack, model = load_inputs(cfg, settings)

    # Everything is valid: from here on the workdir is ours.
    lock_workdir(workdir)  # a second run on this workdir is refused
    summary = {**settings.run, "benign_ratio": settings.benign_ratio,
               "num_train": int(len(ds.y_train)), "num_test": int(len(ds.y_test)),
               "attack_config": attack.config(), "devices": mesh.devices.size,
               "device_kind": jax.devices()[0].device_kind}
    atomic_write(workdir / "config.json", config_json(cfg, settings))
    ctx = StageContext(mesh=mesh, seed=cfg.seed, workdir=workdir, progress=cfg.progress,
                       checkpoint_every=cfg.checkpoint_every,
                       log=MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard"),
                       eval_every=settings.eval_every)
    bd, bd_vars, results = backdoored_stage(cfg, settings, ds, attack, model, summary, ctx)
    defense_seed = cfg.seed if cfg.defense_seed is None else cfg.defense_seed
    retuner = None
    if settings.retune is not None:
        retuner = make_retuner(cfg, settings.retune, ds, bd, model, ctx, defense_seed)
        clean_vars = clean_stage(cfg, ds, model, results, ctx)
        retuner(results["backdoored"], bd_vars, "backdoored")
        retuner(results["clean"], clean_vars, "clean")
        write_results(workdir, results)
    for name in settings.defenses:
        defense_stage(name, settings, ds, bd, model, bd_vars, results, ctx, defense_seed)
        if retuner is not None and "retune" not in results["defenses"][name]:
            folder = settings.columns[name].folder
            retuner(results["defenses"][name],
                    load_variables(workdir / "models" / folder, bd_vars), folder)
            write_results(workdir, results)
    if settings.defenses and jax.process_index() == 0:
        plot_defense_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    if cfg.analysis and jax.process_index() == 0:
        analysis_stage(model, attack, bd, bd_vars, settings, workdir)
    return results


def load_inputs(cfg: ml_collections.ConfigDict, settings: Settings) -> tuple[Dataset, Any, Any]:
    """The data set, the attack and the model; InputError for settings the data refutes."""
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    check_batch_fits(cfg.batch_size, len(ds.y_train))
    if not 0 <= cfg.target < ds.num_classes:
        raise InputError(f"--target {cfg.target} is outside [0, {ds.num_classes})")
    if not ATTACKS[cfg.attack].always_all_to_all:  # ASR needs test images of other classes
        check_backdoor_target(ds, cfg.target)
    attack_kwargs: dict[str, Any] = {}
    if cfg.trigger_path:
        key = {"blended": "pattern", "lf": "pattern_path"}.get(cfg.attack)
        if key is None:
            raise InputError(f"--trigger_path is not used by the {cfg.attack} attack")
        attack_kwargs[key] = cfg.trigger_path
    if cfg.attack == "trojannn":
        attack_kwargs.update(cfg.trojannn.to_dict())
    if cfg.attack == "lc":
        attack_kwargs.update(cfg.lc.to_dict())
    if cfg.attack == "ssba":
        attack_kwargs.update(cfg.ssba.to_dict())
    try:
        attack = create_attack(cfg.attack, num_classes=ds.num_classes,
                               image_shape=ds.image_shape, target=cfg.target, **attack_kwargs)
    except ValueError as e:
        raise InputError(e) from None
    if settings.retune is not None and not attack.poisoned_set:
        raise InputError(f"--retune_attack: the Retuning Attack needs the attack's poisoned "
                         f"training images; {cfg.attack} poisons each batch on the fly")
    timed = [n for n in settings.defenses if DEFENSES[settings.columns[n].base].training_time]
    if timed and not attack.poisoned_set:
        raise InputError(f"--defenses {timed[0]}: a training-time defense needs the attack's "
                         f"poisoned training images; {cfg.attack} poisons each batch on the fly")
    mean, std = normalization_for(ds)
    model = create_model(cfg.model, ds.num_classes, width=cfg.width, mean=mean, std=std,
                         dtype=compute_dtype(cfg.dtype))
    if cfg.attack == "trojannn":  # the layer and its neurons exist in this model
        try:
            trojannn.check_layer(model, ds.image_shape, attack.layer, attack.num_neurons)
        except ValueError as e:
            raise InputError(e) from None
    if cfg.attack == "ssba" and attack.batch_size > len(ds.y_train):
        raise InputError(f"ssba: batch_size {attack.batch_size} is larger than the training set "
                         f"({len(ds.y_train)} images)")
    return ds, attack, model


def backdoored_stage(cfg: ml_collections.ConfigDict, settings: Settings, ds: Dataset,
                     attack: Any, model: Any, summary: dict[str, Any], ctx: StageContext
                     ) -> tuple[BackdoorData, Any, dict[str, Any]]:
    """(1) Poisoning (and attacks that prepare triggers from data), (2) the backdoored model,
    trained, resumed or (finished earlier) loaded; sets `ctx.evaluate`. Returns the poisoned
    data, the backdoored variables and results.json's content (with its row)."""
    run_cfg, workdir = settings.run, Path(ctx.workdir)
    fit_cfg = FitConfig(epochs=run_cfg["epochs"], batch_size=run_cfg["batch_size"],
                        lr=run_cfg["lr"], schedule=run_cfg["schedule"], drop_last=True)
    t0 = start_timer(ctx)
    if attack.needs_fit:
        # LF's universal perturbation, TrojanNN's trigger and LC's adversarial images are made
        # against the run's clean model (trained only if the attack asks for it: a cached one
        # needs none).
        try:
            attack.fit(ds=ds, model=model, fit_config=fit_cfg, ratio=cfg.poison_ratio, ctx=ctx,
                       rng=stage_rng(cfg.seed, "attack"),
                       clean_model=functools.partial(train_clean, cfg, ds, model, ctx))
        except ssba.EncoderRefused as e:  # SSBA's encoder does not carry its code
            raise InputError(e) from None
        if attack.fit_record is not None:  # TrojanNN's trigger: its neurons, activations
            summary["attack_fit"] = attack.fit_record
    bd = build_backdoor_data(ds, attack, cfg.poison_ratio, cfg.seed)
    summary["num_poisoned"] = bd.num_poisoned if bd.train_transform is None else None
    evaluate = ctx.evaluate = make_backdoor_evaluator(model, bd, ctx.mesh)
    results_path = workdir / "results.json"
    results = read_json(results_path, "the results", RESULTS_FIX) if results_path.is_file() else {}

    # Input-aware trains the backdoored model inside `attack.fit`, timed from there.
    if attack.trained_variables is None:
        t0 = start_timer(ctx)
    bd_path = workdir / "models" / "backdoored"
    if attack.trained_variables is not None:
        bd_vars = attack.trained_variables
    elif "backdoored" in results and bd_path.is_dir():
        # Finished earlier: its final variables suffice (a table's committed models carry no
        # optimizer checkpoints).
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jnp.zeros((1, *ds.image_shape), jnp.float32))
        bd_vars = load_variables(bd_path, shapes)
    else:
        bd_vars, _ = fit("backdoored", model, None, bd.x_train, bd.y_train, fit_cfg,
                         stage_rng(cfg.seed, "backdoored"), ctx,
                         train_transform=bd.train_transform)
        save_variables(bd_path, bd_vars)
    if "backdoored" not in results:
        results = {"dataset": ds.name, "attack": cfg.attack, "model": run_cfg["model"],
                   "config": summary,
                   "backdoored": {**evaluate(bd_vars), "seconds": elapsed(t0, ctx)},
                   "defenses": {}}
        write_results(workdir, results)
    return bd, bd_vars, results


def clean_stage(cfg: ml_collections.ConfigDict, ds: Dataset, model: Any,
                results: dict[str, Any], ctx: StageContext) -> Any:
    """The clean model (`train_clean`) and its row `results["clean"]`, evaluated on this run's
    test sets (its ASR: how often a clean model puts triggered images in the target class)."""
    variables = train_clean(cfg, ds, model, ctx)
    if "clean" not in results:
        record = read_json(Path(ctx.workdir) / "models" / "clean.json", "the clean model's "
                           "record", "delete it and models/clean to train the clean model again")
        seconds = float(record.get("seconds", 0.0))
        results["clean"] = {**ctx.evaluate(variables), "seconds": seconds}
    return variables


def train_clean(cfg: ml_collections.ConfigDict, ds: Dataset, model: Any,
                ctx: StageContext) -> Any:
    """A clean model: the backdoored model's recipe on the clean training set, from its own
    stream (`clean` of the run's seed): the Retuning Attack's reference point and LF's
    surrogate. It does not depend on the attack, so `experiments.table` copies `models/clean`
    (with `models/clean.json`, its training time) between the attacks of a model seed.
    Trained, resumed or loaded."""
    workdir = Path(ctx.workdir)
    path, record = workdir / "models" / "clean", workdir / "models" / "clean.json"
    t0 = start_timer(ctx)
    if path.is_dir() and record.is_file():
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jnp.zeros((1, *ds.image_shape), jnp.float32))
        return load_variables(path, shapes)
    else:
        fit_cfg = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            schedule=backdoored_schedule(cfg.preset, "badnets"), drop_last=True)
        variables, _ = fit("clean", model, None, ds.x_train, ds.y_train, fit_cfg,
                           stage_rng(cfg.seed, "clean"), ctx)
        save_variables(path, variables)
        atomic_write(record, json.dumps({"seconds": elapsed(t0, ctx), "seed": cfg.seed}) + "\n")
    return variables


def make_retuner(cfg: ml_collections.ConfigDict, config: RetuneConfig, ds: Dataset,
                 bd: BackdoorData, model: Any, ctx: StageContext, defense_seed: int):
    """`(row, variables, label) -> None`: the Retuning Attack on a model, its record under
    `row["retune"]` (skipped when there). Every row of the run is retuned on the same RA set
    in the same order (one draw per defense seed and run seed): the rows are paired."""
    try:
        data: RetuneData = retune_data(ds.x_train, ds.y_train, bd, config, stage_rng(
            defense_seed, f"retune/data/seed{cfg.seed}"))
    except ValueError as e:
        raise InputError(f"--retune_attack: {e}") from None
    rng = stage_rng(defense_seed, f"retune/train/seed{cfg.seed}")
    settings = {**dataclasses.asdict(config), "defense_seed": defense_seed}

    def run_one(row: dict[str, Any], variables: Any, label: str) -> None:
        if "retune" in row:
            if row["retune"].get("config") != settings:
                raise InputError(f"the Retuning Attack in {ctx.workdir} ran with other settings "
                                 f"({row['retune'].get('config')}); use another --workdir")
            return
        row["retune"] = {**retune(f"retune/{label}", model, variables, data, config, rng, ctx,
                                  ctx.evaluate), "config": settings}

    return run_one


def defense_stage(name: str, settings: Settings, ds: Dataset, bd: BackdoorData, model: Any,
                  bd_vars: Any, results: dict[str, Any], ctx: StageContext,
                  defense_seed: int) -> None:
    """(3) One column (a defense or a variant of one) from the backdoored weights, with its own
    random stream (from the defense seed and its name) and files (`DefenseColumn.folder`);
    skipped when finished earlier. Adds its row to `results`, with the benign subset's
    fingerprint ("benign": selection, count, sha256 of the sorted indices), or for a
    training-time defense (AC, ABL), which gets the whole poisoned training set instead,
    "training_set": its count and how many of it were poisoned."""
    column, dcfg = settings.columns[name], settings.defense_configs[name]
    spec, workdir = DEFENSES[column.base], Path(ctx.workdir)
    record = json.loads(json.dumps(defense_record(
        dcfg, settings.benign_ratio, defense_seed, settings.benign_selection)))
    check_defense_record(workdir, results, column, record, ctx.seed)
    if name in results["defenses"]:
        return
    marker = workdir / "checkpoints" / f"{column.folder}.settings.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, json.dumps(record) + "\n")
    rng = stage_rng(defense_seed, f"defense/{name}")
    if spec.training_time:  # the victim's poisoned training set (AC, ABL)
        data: BenignData | PoisonedTrainData = PoisonedTrainData(
            bd.x_train, bd.y_train, ds.num_classes, bd.poison_mask)
        seen = {"training_set": {"count": int(len(bd.y_train)), "poisoned": bd.num_poisoned}}
    else:
        idx = benign_indices(ds.y_train, settings, spec.balanced, rng, defense_seed, ctx.seed)
        if not spec.uses_data:  # data-free (CLP): no image, only the input shape
            idx = idx[:0]
        data = BenignData(ds.x_train[idx], ds.y_train[idx], ds.num_classes)
        seen = {"benign_examples": int(len(idx)),
                "benign": {"selection": settings.benign_selection, **benign_fingerprint(idx)}}
    # A variant's stages keep their own checkpoints (checkpoints/FOLDER/STAGE).
    ctx = dataclasses.replace(ctx, scope=column.folder if column.is_variant else None)
    t0 = start_timer(ctx)
    variables, details = defended_parts(spec.run(model, bd_vars, data, dcfg, rng, ctx))
    save_variables(workdir / "models" / column.folder, variables)
    r = ctx.evaluate(variables)
    r["der"] = metrics.der(results["backdoored"], r)
    r.update(seconds=elapsed(t0, ctx), **seen, config=record)
    if details is not None:  # a defense's own facts (NC's anomaly indices, ...)
        r["details"] = details
    results["defenses"][name] = r
    write_results(workdir, results)


def benign_indices(labels: np.ndarray, settings: Settings, balanced: bool, rng: jax.Array,
                   defense_seed: int, run_seed: int) -> np.ndarray:
    """The defender's benign subset. `reference`: the defense's own rule (`balanced`) from its
    own stream `rng`; `shared`: one class-balanced subset drawn from the defense seed and the
    run seed only, the same for every defense of the run."""
    if settings.benign_selection == "shared":
        rng = stage_rng(defense_seed, f"benign/shared/seed{run_seed}")
        balanced = True
    generator = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
    return select_benign(labels, settings.benign_ratio, generator, balanced)


def analysis_stage(model: Any, attack: Any, bd: BackdoorData, bd_vars: Any,
                   settings: Settings, workdir: Path) -> None:
    """(4) Neuron norms and TAC of the last conv layer, before and after each defense."""
    from ftsam_jax.analysis import run_analysis

    models = {"backdoored": bd_vars}
    models.update({name: load_variables(workdir / "models" / settings.columns[name].folder,
                                        bd_vars) for name in settings.defenses})
    mask = attack.test_mask(bd.y_test)
    run_analysis(model, models, bd.x_test[mask], bd.x_bd, workdir)


def make_backdoor_evaluator(model: Any, bd: BackdoorData, mesh: Any):
    """variables -> {"clean_acc", "asr", "robust_acc"} on the clean and poisoned test sets."""
    eval_bs = max(mesh.devices.size, 512 // mesh.devices.size * mesh.devices.size)
    evaluator = make_evaluator(model.apply, mesh=mesh, batch_size=eval_bs)
    repl = parallel.replicated(mesh)
    sets = {k: jax.device_put(v, repl) for k, v in
            {"x": bd.x_test, "y": bd.y_test, "xb": bd.x_bd, "yb": bd.y_bd}.items()}

    def evaluate(variables: dict[str, Any]) -> dict[str, float]:
        variables = jax.device_put(variables, repl)
        clean = evaluator(variables, sets["x"], sets["y"])
        poisoned = evaluator(variables, sets["xb"], sets["yb"])
        return metrics.backdoor_metrics(np.asarray(clean["preds"]), bd.y_test,
                                        np.asarray(poisoned["preds"]), bd.y_bd, bd.y_bd_true)

    return evaluate


def print_summary(results: dict[str, Any], workdir: Path) -> None:
    print()
    print(results_table(results))
    print(f"results: {workdir / 'results.json'}  table: {workdir / 'results.md'}")


if __name__ == "__main__":
    define_flags()
    run(main)
