r"""FT-SAM end to end: data -> backdoored model -> defenses -> the paper's table.

    python -m experiments.ftsam --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
        --attack=blended --preset=cpu --defenses=ft,ftsam --workdir=runs/blended

Every setting is one field of one config tree (`experiments/configs/ftsam.py`, `ml_collections`);
the flags above are shorthands for its fields, and any field can be set as with the flax
examples, e.g. `--config=experiments/configs/ftsam.py:cpu --config.defense.ftsam.rho=4`.
`main` only resolves the tree; `train_and_evaluate(config, workdir)` runs it (tests call it).

Stages (each checkpointed with orbax; rerunning the same command resumes, finished stages are
skipped): (1) poison the training set, (2) train the backdoored model, (3) each defense in
`--defenses` from the backdoored weights on a benign subset, (4) metrics, `--analysis`.
Writes into `--workdir`: results.json, results.md (the paper-style table), metrics.jsonl (one
line per epoch of every stage), config.json, checkpoints/, and with --analysis analysis.json +
PNG plots.
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

from experiments.cli import (
    InputError,
    check_batch_fits,
    comma_list,
    compute_dtype,
    config_from_flags,
    make_mesh,
    run,
)
from experiments.configs.ftsam import PRESETS, defense_defaults, get_config
from experiments.overrides import apply_overrides, settings_from_dict
from experiments.workdir import (
    MetricsLog,
    atomic_write,
    check_workdir,
    elapsed,
    lock_workdir,
    start_timer,
)
from ftsam_jax import metrics, parallel
from ftsam_jax.attacks import ATTACKS, BackdoorData, build_backdoor_data, create_attack
from ftsam_jax.checkpoint import load_variables, save_variables
from ftsam_jax.data import check_backdoor_target, load_dataset, normalization_for
from ftsam_jax.defenses import DEFENSES, BenignData, select_benign
from ftsam_jax.defenses.finetune import RECIPES
from ftsam_jax.fit import FitConfig, fit
from ftsam_jax.loop import make_evaluator
from ftsam_jax.models import MODELS, create_model
from ftsam_jax.runner import StageContext, stage_rng

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line of `python -m experiments.ftsam` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests)."""
    flags.DEFINE_string("dataset", "cifar10", "TFDS name, 'cifar10'/'cifar100' (official python "
                        "folder in --data_dir, else TFDS, else download) or 'npz:PATH'.")
    flags.DEFINE_string("data_dir", None, "Official CIFAR python folder (or its parent), or a TFDS "
                        "data dir.")
    flags.DEFINE_string("attack", "badnets", f"One of {sorted(ATTACKS)}.")
    flags.DEFINE_float("poison_ratio", 0.1, "Share of the training set poisoned, in (0, 1].")
    flags.DEFINE_integer("target", 0, "Target class of all-to-one attacks.")
    flags.DEFINE_string("trigger_path", None, "Blended: a picture to blend; lf: a .npy pattern.")
    flags.DEFINE_string("model", None, f"One of {sorted(MODELS)} (default: the preset's).")
    flags.DEFINE_integer("width", None, "Model width (default: the preset's).")
    flags.DEFINE_integer("epochs", None, "Epochs of the backdoored model (default: the preset's).")
    flags.DEFINE_integer("batch_size", None, "Batch size of the backdoored model.")
    flags.DEFINE_float("lr", None, "Learning rate of the backdoored model.")
    flags.DEFINE_integer("seed", 0, "Seed of everything (poisoning, init, order, defenses).")
    flags.DEFINE_integer("defense_seed", None, "Seed of the defenses only (benign subset, their "
                         "random streams; default --seed): repeat defenses on one backdoored "
                         "model.")
    flags.DEFINE_string("workdir", None, "Output and checkpoint folder (default: "
                        "runs/<dataset>_<attack>_<preset>_s<seed>).")
    flags.DEFINE_enum("preset", "paper", ["paper", "cpu", "smoke"],
                      "paper: the reference recipe (PreActResNet18, SGD 0.01/0.9/5e-4, cosine, "
                      "100 epochs, batch 128); cpu: width 16, 60 epochs at lr 0.05 (about 20 "
                      "minutes on 2 CPU cores on the 5k CIFAR slice); smoke: a tiny net, "
                      "seconds.")
    flags.DEFINE_list("defenses", [], "Defenses to run after the backdoored stage, e.g. ft,ftsam: "
                      + "; ".join(f"{n}: {s.summary}" for n, s in sorted(DEFENSES.items())) + ".")
    flags.DEFINE_float("benign_ratio", 0.05, "Share of the training set the defender holds.")
    flags.DEFINE_float("rho", None, "FT-SAM neighbourhood radius (default 2).")
    flags.DEFINE_enum("ftsam_recipe", "reference", ["reference", "paper"],
                      "reference: BackdoorBench's (label smoothing 0.1, cyclic per-iteration "
                      "cosine); paper: plain CE, cosine per epoch.")
    flags.DEFINE_integer("defense_epochs", None, "Override every defense's epochs.")
    flags.DEFINE_integer("defense_batch_size", None, "Override every defense's batch size.")
    flags.DEFINE_multi_string("set", [], "A defense setting NAME.FIELD=VALUE (repeatable), e.g. "
                              "ikd.alpha_adv=0 or ikd.teacher.rho=4; see each defense's config.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_integer("eval_every", None, "Evaluate C-Acc/ASR curves every k epochs and "
                         "after the last (default 5; 1 for smoke). Evaluating 19k test images "
                         "every epoch would dominate a GPU fine-tuning run.")
    flags.DEFINE_integer("checkpoint_every", 1, "Checkpoint every k epochs.")
    flags.DEFINE_bool("analysis", False, "Neuron norms / TAC before and after each defense, plots.")
    flags.DEFINE_bool("progress", True, "Progress bars.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/ftsam.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)

# Flags that are shorthands for top-level fields of the config tree (applied when given).
SHORTHANDS = ("dataset", "data_dir", "attack", "poison_ratio", "target", "trigger_path", "model",
              "width", "epochs", "batch_size", "lr", "seed", "defense_seed", "benign_ratio",
              "dtype", "eval_every", "checkpoint_every", "analysis", "progress", "defenses")
# BackdoorBench trains WaNet and Input-aware with a MultiStepLR whose milestones (100..400)
# never fire in 100 epochs: a constant learning rate. The paper preset keeps that.
CONSTANT_LR_ATTACKS = ("wanet", "input_aware")
# Config fields added to a defense after workdirs existed, with the value that reproduces what
# ran before: a stored record without such a field is compared as if it had that value (so old
# runs resume when the new field's default is the old behaviour, and are refused when it is not).
# FT's, FT-SAM's and FP's configs became FitConfigs (their fields were copies of it), which
# added the fields they had fixed: augment, drop_last (and for FP SAM's and label smoothing's).
_FIT_FIELDS = {"augment": True, "drop_last": False}
ADDED_DEFENSE_FIELDS: dict[str, dict[str, Any]] = {
    "anp": {"selection": "threshold", "sweep_max": 0.9, "sweep_step": 0.05, "acc_ratio": 0.1},
    "fp": {"keep": "last_within", **_FIT_FIELDS, "label_smoothing": 0.0, "sam": False,
           "rho": 2.0, "adaptive": True, "eta": 0.0, "group_size": None},
    "ibau": {"delta_space": "pixel"},
    "ft": _FIT_FIELDS,
    "ftsam": _FIT_FIELDS,
    "ikd": {"teacher": _FIT_FIELDS},
}
# Settings a defense fixes or derives itself: `--set` may not change them (it would be dropped).
FIXED_DEFENSE_FIELDS: dict[str, dict[str, str]] = {
    "ft": {"sam": "FT is plain fine-tuning; the ftsam defense is FT with SAM"},
    "ftsam": {"sam": "FT-SAM always uses SAM; the ft defense is FT without it"},
    "ikd": {"teacher.sam": "the teacher's SAM is ikd.teacher_sam",
            "teacher.batch_size": "the teacher's batch size is ikd.batch_size"},
}
# Settings whose change makes a workdir's checkpoints and results meaningless.
RUN_KEYS = ("dataset", "data_dir", "attack", "poison_ratio", "target", "trigger_path", "model",
            "width", "epochs", "batch_size", "lr", "seed", "preset", "dtype", "schedule")


# ----------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    run: dict[str, Any]
    benign_ratio: float
    defenses: tuple[str, ...]
    defense_configs: dict[str, Any]
    eval_every: int


def run_config() -> ml_collections.ConfigDict:
    """The run's config tree (`cli.config_from_flags`) with the defense shorthands
    (`--ftsam_recipe`, `--defense_epochs`, `--defense_batch_size`, `--rho`) applied."""
    bs = FLAGS.defense_batch_size
    if bs is not None and bs < 1:
        raise InputError(f"--defense_batch_size must be >= 1, got {bs}")
    if FLAGS.defense_epochs is not None and FLAGS.defense_epochs < 1:
        raise InputError("--defense_epochs must be >= 1")
    if FLAGS.rho is not None and FLAGS.rho < 0:
        raise InputError("--rho must be >= 0")
    cfg = config_from_flags(get_config, SHORTHANDS)
    selected = comma_list(cfg.defenses)
    preset_defaults = defense_defaults(cfg.preset)
    if FLAGS["ftsam_recipe"].present:
        if cfg.defense.ftsam.to_dict() != preset_defaults["ftsam"]:
            raise InputError("--ftsam_recipe replaces defense.ftsam: do not also change its fields")
        cfg.defense.ftsam = defense_defaults(cfg.preset, FLAGS.ftsam_recipe)["ftsam"]
    for name in selected:
        if name not in cfg.defense:
            continue  # an unknown defense: reported by resolve_settings
        fields = cfg.defense[name]
        for flag, field in (("defense_epochs", "epochs"), ("defense_batch_size", "batch_size")):
            if FLAGS[flag].value is not None and field in fields:
                fields[field] = FLAGS[flag].value
        if name == "ftsam" and FLAGS.rho is not None:
            fields.rho = FLAGS.rho
    return cfg


def resolve_settings(cfg: ml_collections.ConfigDict, num_devices: int, set_items: list[str]
                     ) -> Settings:
    """The config tree (+ `--set` items) -> settings; raises InputError for anything invalid,
    including a changed setting that nothing would use."""
    if cfg.preset not in PRESETS:
        raise InputError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.attack not in ATTACKS:
        raise InputError(f"unknown attack {cfg.attack!r}; choose one of {sorted(ATTACKS)}")
    if cfg.model not in MODELS:
        raise InputError(f"unknown model {cfg.model!r}; choose one of {sorted(MODELS)}")
    if not 0.0 < cfg.poison_ratio <= 1.0:
        raise InputError(f"--poison_ratio must lie in (0, 1], got {cfg.poison_ratio}")
    if not 0.0 < cfg.benign_ratio <= 1.0:
        raise InputError(f"--benign_ratio must lie in (0, 1], got {cfg.benign_ratio}")
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
    names = comma_list(cfg.defenses)
    unknown = [d for d in names if d not in DEFENSES]
    if unknown:
        raise InputError(f"unknown defenses {unknown}; choose from {sorted(DEFENSES)}")
    if len(set(names)) != len(names):
        raise InputError("--defenses lists a defense twice")
    schedule = "cosine_epoch"
    if cfg.preset == "paper" and cfg.attack in CONSTANT_LR_ATTACKS:
        schedule = "constant"
    run_cfg = {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "attack": cfg.attack,
               "poison_ratio": cfg.poison_ratio, "target": cfg.target,
               "trigger_path": cfg.trigger_path, "model": cfg.model, "width": cfg.width,
               "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "seed": cfg.seed, "preset": cfg.preset, "dtype": cfg.dtype, "schedule": schedule}

    # Each defense's settings: the tree's, then --set; a change to a defense that does not run,
    # or to a setting the defense fixes itself, is refused (it would be dropped).
    recipe = cfg.defense.ftsam.get("recipe", "reference")
    if recipe not in RECIPES:
        raise InputError(f"defense.ftsam.recipe must be one of {RECIPES}, got {recipe!r}")
    defaults = defense_defaults(cfg.preset, recipe)
    if set(cfg.defense) != set(defaults):
        extra = sorted(set(cfg.defense) - set(defaults))
        raise InputError(f"config defense.{extra[0]}: no such defense; defenses: "
                         f"{sorted(defaults)}")
    for name, values in cfg.defense.items():
        if name not in names and values.to_dict() != defaults[name]:
            raise InputError(f"config defense.{name} is changed but {name} is not in "
                             f"--defenses ({', '.join(names) or 'none'})")
    defense_configs = {}
    for name in names:
        spec = DEFENSES[name]
        template = (spec.default_config(cfg.preset, recipe) if name == "ftsam"
                    else spec.default_config(cfg.preset))
        try:
            defense_configs[name] = settings_from_dict(template, cfg.defense[name].to_dict())
        except (TypeError, ValueError) as e:
            raise InputError(f"config defense.{name}: {e}") from None
    defense_configs = apply_overrides(defense_configs, set_items)
    for name, fixed in FIXED_DEFENSE_FIELDS.items():
        for path, reason in fixed.items() if name in defense_configs else ():
            get = lambda tree, path=path: functools.reduce(
                lambda t, k: t[k], path.split("."), tree)
            if get(dataclasses.asdict(defense_configs[name])) != get(defaults[name]):
                raise InputError(f"{name}.{path} cannot be changed ({reason})")
    for name, dcfg in defense_configs.items():
        bs = getattr(dcfg, "batch_size", None)
        if bs is not None and bs % num_devices:
            raise InputError(f"defense {name}: batch size {bs} is not divisible by the number "
                             f"of devices ({num_devices}); set --defense_batch_size")
        cfg.defense[name] = dataclasses.asdict(dcfg)  # the resolved tree says what runs
    return Settings(run_cfg, cfg.benign_ratio, tuple(names), defense_configs, cfg.eval_every)


# ----------------------------------------------------------------------------------------------
# Files


def defense_record(cfg: Any, benign_ratio: float, defense_seed: int) -> dict[str, Any]:
    """A defense's settings as stored in results.json (and compared on rerun)."""
    return {"benign_ratio": benign_ratio, "defense_seed": defense_seed, **dataclasses.asdict(cfg)}


def with_defaults(record: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`record` with every key of `defaults` it lacks, nested records included."""
    out = {**defaults, **record}
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            out[key] = with_defaults(record[key], value)
    return out


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
        "| Defense | C-Acc | ASR | R-Acc | DER | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    bd = results["backdoored"]
    lines.append(f"| No defense | {pct(bd['clean_acc'])} | {pct(bd['asr'])} | "
                 f"{pct(bd['robust_acc'])} | - | {bd.get('seconds', 0):.0f} |")
    for name, r in results.get("defenses", {}).items():
        lines.append(f"| {name} | {pct(r['clean_acc'])} | {pct(r['asr'])} | "
                     f"{pct(r['robust_acc'])} | {pct(r['der'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Pipeline


def main(argv: list[str]) -> None:
    del argv
    mesh = make_mesh()
    cfg = run_config()
    workdir = Path(FLAGS.workdir or f"runs/{cfg.dataset.replace('/', '_').replace(':', '_')}"
                   f"_{cfg.attack}_{cfg.preset}_s{cfg.seed}")
    train_and_evaluate(cfg, workdir, mesh=mesh, set_items=FLAGS.set)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path, *,
                       mesh: Mesh | None = None, set_items: list[str] | None = None
                       ) -> dict[str, Any]:
    """Runs (or resumes) the config tree's run in `workdir`: poisoning, the backdoored model,
    each defense, the metrics; returns results.json's content. Bad settings raise InputError
    before anything is written."""
    workdir = Path(workdir)
    mesh = mesh or parallel.make_mesh()
    n_dev = mesh.devices.size
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # the caller's tree is not modified
    settings = resolve_settings(cfg, n_dev, list(set_items or []))
    run_cfg = settings.run
    check_workdir(workdir, run_cfg, RUN_KEYS)

    ds = load_dataset(cfg.dataset, cfg.data_dir)
    check_batch_fits(run_cfg["batch_size"], len(ds.y_train))
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
    try:
        attack = create_attack(cfg.attack, num_classes=ds.num_classes,
                               image_shape=ds.image_shape, target=cfg.target, **attack_kwargs)
    except ValueError as e:
        raise InputError(e) from None
    mean, std = normalization_for(ds)
    dtype = compute_dtype(cfg.dtype)
    model = create_model(run_cfg["model"], ds.num_classes, width=run_cfg["width"], mean=mean,
                         std=std, dtype=dtype)

    # Everything is valid: from here on the workdir is ours.
    lock_workdir(workdir)  # a second run on this workdir is refused
    config = {**run_cfg, "benign_ratio": settings.benign_ratio,
              "num_train": int(len(ds.y_train)), "num_test": int(len(ds.y_test)),
              "attack_config": attack.config(), "devices": n_dev,
              "device_kind": jax.devices()[0].device_kind}
    # "run" guards resume (RUN_KEYS); "config" is the whole resolved tree.
    atomic_write(workdir / "config.json", json.dumps(
        {"run": run_cfg, "config": json.loads(cfg.to_json())}, indent=2) + "\n")
    log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard")
    ctx = StageContext(mesh=mesh, seed=cfg.seed, workdir=workdir, progress=cfg.progress,
                       checkpoint_every=cfg.checkpoint_every, log=log,
                       eval_every=settings.eval_every)
    fit_cfg = FitConfig(epochs=run_cfg["epochs"], batch_size=run_cfg["batch_size"],
                        lr=run_cfg["lr"], schedule=run_cfg["schedule"], drop_last=True)

    # (1) Poisoning (and attacks that prepare triggers from data).
    t0 = start_timer(ctx)
    if attack.needs_fit:
        attack.fit(ds=ds, model=model, fit_config=fit_cfg, ratio=cfg.poison_ratio, ctx=ctx,
                   rng=stage_rng(cfg.seed, "attack"))
    bd = build_backdoor_data(ds, attack, cfg.poison_ratio, cfg.seed)
    config["num_poisoned"] = bd.num_poisoned if bd.train_transform is None else None
    evaluate = make_backdoor_evaluator(model, bd, mesh)
    ctx.evaluate = evaluate

    results_path = workdir / "results.json"
    results: dict[str, Any] = {}
    if results_path.is_file():
        results = json.loads(results_path.read_text())

    # (2) The backdoored model (Input-aware trains it inside `attack.fit`, timed from there).
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
                   "config": config,
                   "backdoored": {**evaluate(bd_vars),
                                  "seconds": elapsed(t0, ctx)},
                   "defenses": {}}
        write_results(workdir, results)

    # (3) Defenses, each from the backdoored weights, with its own random stream.
    defense_seed = cfg.seed if cfg.defense_seed is None else cfg.defense_seed
    for name in settings.defenses:
        spec, dcfg = DEFENSES[name], settings.defense_configs[name]
        record = json.loads(json.dumps(defense_record(dcfg, settings.benign_ratio,
                                                      defense_seed)))
        # A defense's checkpoints and result belong to its settings: refuse to mix.
        marker = workdir / "checkpoints" / f"{name}.settings.json"
        previous = results["defenses"].get(name, {}).get("config")
        if previous is None and marker.is_file():
            previous = json.loads(marker.read_text())
        if previous is not None:  # records written before --defense_seed (or a field) existed
            previous = with_defaults(previous, {"defense_seed": cfg.seed,
                                                **ADDED_DEFENSE_FIELDS.get(name, {})})
        if previous is not None and previous != record:
            changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in record.items()
                                if previous.get(k) != v)
            raise InputError(f"defense {name} in {workdir} was run with other settings "
                             f"({changed}); use another --workdir")
        if name in results["defenses"]:
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(record) + "\n")
        rng = stage_rng(defense_seed, f"defense/{name}")
        benign_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
        idx = select_benign(ds.y_train, settings.benign_ratio, benign_rng, spec.balanced)
        if not spec.uses_data:  # data-free (CLP): no image, only the input shape
            idx = idx[:0]
        benign = BenignData(ds.x_train[idx], ds.y_train[idx], ds.num_classes)
        t0 = start_timer(ctx)
        variables = spec.run(model, bd_vars, benign, dcfg, rng, ctx)
        save_variables(workdir / "models" / name, variables)
        r = evaluate(variables)
        r["der"] = metrics.der(results["backdoored"], r)
        r.update(seconds=elapsed(t0, ctx), benign_examples=int(len(idx)),
                 config=record)
        results["defenses"][name] = r
        write_results(workdir, results)

    # (4) Analysis: neuron norms and TAC of the last conv layer, before and after each defense.
    if cfg.analysis and jax.process_index() == 0:
        from ftsam_jax.analysis import run_analysis

        models = {"backdoored": bd_vars}
        models.update({name: load_variables(workdir / "models" / name, bd_vars)
                       for name in settings.defenses})
        mask = attack.test_mask(bd.y_test)
        run_analysis(model, models, bd.x_test[mask], bd.x_bd, workdir)

    print_summary(results, workdir)
    return results


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
