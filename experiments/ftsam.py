r"""FT-SAM end to end: data -> backdoored model -> defenses -> the paper's table.

    python -m experiments.ftsam --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
        --attack=blended --preset=cpu --defenses=ft,ftsam --workdir=runs/blended

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
import numpy as np
from absl import flags

from experiments.cli import InputError, check_batch_fits, make_mesh, run
from experiments.overrides import apply_overrides
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
from ftsam_jax.data import load_dataset, normalization_for
from ftsam_jax.defenses import DEFENSES, BenignData, select_benign
from ftsam_jax.fit import FitConfig, fit
from ftsam_jax.loop import make_evaluator
from ftsam_jax.models import MODELS, create_model
from ftsam_jax.runner import StageContext, stage_rng

FLAGS = flags.FLAGS
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
                     "random streams; default --seed): repeat defenses on one backdoored model.")
flags.DEFINE_string("workdir", None, "Output and checkpoint folder (default: "
                    "runs/<dataset>_<attack>_<preset>_s<seed>).")
flags.DEFINE_enum("preset", "paper", ["paper", "cpu", "smoke"],
                  "paper: the reference recipe (PreActResNet18, SGD 0.01/0.9/5e-4, cosine, 100 "
                  "epochs, batch 128); cpu: width 16, 60 epochs at lr 0.05 (about 20 minutes on "
                  "2 CPU cores on the 5k CIFAR slice); smoke: a tiny net, seconds.")
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

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(model="preactresnet18", width=64, epochs=100, batch_size=128, lr=0.01,
                  eval_every=5),
    "cpu": dict(model="preactresnet18", width=16, epochs=60, batch_size=128, lr=0.05,
                eval_every=5),
    "smoke": dict(model="tiny_cnn", width=8, epochs=2, batch_size=64, lr=0.05, eval_every=1),
}
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


def resolve_settings(num_devices: int) -> Settings:
    """Flags + preset -> settings; raises InputError for anything invalid."""
    p = PRESETS[FLAGS.preset]
    pick = lambda name: p[name] if getattr(FLAGS, name) is None else getattr(FLAGS, name)
    settings = {k: pick(k) for k in ("model", "width", "epochs", "batch_size", "lr")}
    if FLAGS.attack not in ATTACKS:
        raise InputError(f"unknown attack {FLAGS.attack!r}; choose one of {sorted(ATTACKS)}")
    if settings["model"] not in MODELS:
        raise InputError(f"unknown model {settings['model']!r}; choose one of {sorted(MODELS)}")
    if not 0.0 < FLAGS.poison_ratio <= 1.0:
        raise InputError(f"--poison_ratio must lie in (0, 1], got {FLAGS.poison_ratio}")
    if not 0.0 < FLAGS.benign_ratio <= 1.0:
        raise InputError(f"--benign_ratio must lie in (0, 1], got {FLAGS.benign_ratio}")
    if settings["width"] < 1 or settings["epochs"] < 1 or settings["lr"] <= 0:
        raise InputError("--width and --epochs must be >= 1 and --lr > 0")
    for name, value in (("--batch_size", settings["batch_size"]),
                        ("--defense_batch_size", FLAGS.defense_batch_size)):
        if value is not None and (value < 1 or value % num_devices):
            raise InputError(f"{name} {value} is not divisible by the number of devices "
                             f"({num_devices})")
    if FLAGS.defense_epochs is not None and FLAGS.defense_epochs < 1:
        raise InputError("--defense_epochs must be >= 1")
    if FLAGS.rho is not None and FLAGS.rho < 0:
        raise InputError("--rho must be >= 0")
    if FLAGS.checkpoint_every < 1:
        raise InputError("--checkpoint_every must be >= 1")
    unknown = [d for d in FLAGS.defenses if d not in DEFENSES]
    if unknown:
        raise InputError(f"unknown defenses {unknown}; choose from {sorted(DEFENSES)}")
    if len(set(FLAGS.defenses)) != len(FLAGS.defenses):
        raise InputError("--defenses lists a defense twice")
    schedule = "cosine_epoch"
    if FLAGS.preset == "paper" and FLAGS.attack in CONSTANT_LR_ATTACKS:
        schedule = "constant"
    run_cfg = {"dataset": FLAGS.dataset, "data_dir": FLAGS.data_dir, "attack": FLAGS.attack,
               "poison_ratio": FLAGS.poison_ratio, "target": FLAGS.target,
               "trigger_path": FLAGS.trigger_path, **settings, "seed": FLAGS.seed,
               "preset": FLAGS.preset, "dtype": FLAGS.dtype, "schedule": schedule}
    defense_configs = {}
    for name in FLAGS.defenses:
        spec = DEFENSES[name]
        cfg = (spec.default_config(FLAGS.preset, FLAGS.ftsam_recipe) if name == "ftsam"
               else spec.default_config(FLAGS.preset))
        overrides = {"epochs": FLAGS.defense_epochs, "batch_size": FLAGS.defense_batch_size,
                     "rho": FLAGS.rho if name == "ftsam" else None}
        fields = {f.name for f in dataclasses.fields(cfg)}
        defense_configs[name] = dataclasses.replace(
            cfg, **{k: v for k, v in overrides.items() if v is not None and k in fields})
    defaults = dict(defense_configs)
    defense_configs = apply_overrides(defense_configs, FLAGS.set)
    for name, fixed in FIXED_DEFENSE_FIELDS.items():
        for path, reason in fixed.items() if name in defense_configs else ():
            get = lambda cfg, path=path: functools.reduce(getattr, path.split("."), cfg)
            if get(defense_configs[name]) != get(defaults[name]):
                raise InputError(f"--set {name}.{path}: cannot be changed ({reason})")
    for name, cfg in defense_configs.items():
        bs = getattr(cfg, "batch_size", None)
        if bs is not None and bs % num_devices:
            raise InputError(f"defense {name}: batch size {bs} is not divisible by the number "
                             f"of devices ({num_devices}); set --defense_batch_size")
    eval_every = FLAGS.eval_every or p["eval_every"]
    if eval_every < 1:
        raise InputError("--eval_every must be >= 1")
    return Settings(run_cfg, FLAGS.benign_ratio, tuple(FLAGS.defenses), defense_configs,
                    eval_every)


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
    n_dev = mesh.devices.size
    settings = resolve_settings(n_dev)
    run_cfg = settings.run
    workdir = Path(FLAGS.workdir or f"runs/{FLAGS.dataset.replace('/', '_').replace(':', '_')}"
                   f"_{FLAGS.attack}_{FLAGS.preset}_s{FLAGS.seed}")
    check_workdir(workdir, run_cfg, RUN_KEYS)

    ds = load_dataset(FLAGS.dataset, FLAGS.data_dir)
    check_batch_fits(run_cfg["batch_size"], len(ds.y_train))
    if not 0 <= FLAGS.target < ds.num_classes:
        raise InputError(f"--target {FLAGS.target} is outside [0, {ds.num_classes})")
    attack_kwargs: dict[str, Any] = {}
    if FLAGS.trigger_path:
        key = {"blended": "pattern", "lf": "pattern_path"}.get(FLAGS.attack)
        if key is None:
            raise InputError(f"--trigger_path is not used by the {FLAGS.attack} attack")
        attack_kwargs[key] = FLAGS.trigger_path
    try:
        attack = create_attack(FLAGS.attack, num_classes=ds.num_classes,
                               image_shape=ds.image_shape, target=FLAGS.target, **attack_kwargs)
    except ValueError as e:
        raise InputError(e) from None
    mean, std = normalization_for(ds)
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    model = create_model(run_cfg["model"], ds.num_classes, width=run_cfg["width"], mean=mean,
                         std=std, dtype=dtype)

    # Everything is valid: from here on the workdir is ours.
    lock_workdir(workdir)  # a second run on this workdir is refused
    config = {**run_cfg, "benign_ratio": settings.benign_ratio,
              "num_train": int(len(ds.y_train)), "num_test": int(len(ds.y_test)),
              "attack_config": attack.config(), "devices": n_dev,
              "device_kind": jax.devices()[0].device_kind}
    atomic_write(workdir / "config.json", json.dumps({"run": run_cfg}, indent=2) + "\n")
    log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard")
    ctx = StageContext(mesh=mesh, seed=FLAGS.seed, workdir=workdir, progress=FLAGS.progress,
                       checkpoint_every=FLAGS.checkpoint_every, log=log,
                       eval_every=settings.eval_every)
    fit_cfg = FitConfig(epochs=run_cfg["epochs"], batch_size=run_cfg["batch_size"],
                        lr=run_cfg["lr"], schedule=run_cfg["schedule"], drop_last=True)

    # (1) Poisoning (and attacks that prepare triggers from data).
    t0 = start_timer(ctx)
    if attack.needs_fit:
        attack.fit(ds=ds, model=model, fit_config=fit_cfg, ratio=FLAGS.poison_ratio, ctx=ctx,
                   rng=stage_rng(FLAGS.seed, "attack"))
    bd = build_backdoor_data(ds, attack, FLAGS.poison_ratio, FLAGS.seed)
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
                         stage_rng(FLAGS.seed, "backdoored"), ctx,
                         train_transform=bd.train_transform)
        save_variables(bd_path, bd_vars)
    if "backdoored" not in results:
        results = {"dataset": ds.name, "attack": FLAGS.attack, "model": run_cfg["model"],
                   "config": config,
                   "backdoored": {**evaluate(bd_vars),
                                  "seconds": elapsed(t0, ctx)},
                   "defenses": {}}
        write_results(workdir, results)

    # (3) Defenses, each from the backdoored weights, with its own random stream.
    defense_seed = FLAGS.seed if FLAGS.defense_seed is None else FLAGS.defense_seed
    for name in settings.defenses:
        spec, cfg = DEFENSES[name], settings.defense_configs[name]
        record = json.loads(json.dumps(defense_record(cfg, settings.benign_ratio,
                                                      defense_seed)))
        # A defense's checkpoints and result belong to its settings: refuse to mix.
        marker = workdir / "checkpoints" / f"{name}.settings.json"
        previous = results["defenses"].get(name, {}).get("config")
        if previous is None and marker.is_file():
            previous = json.loads(marker.read_text())
        if previous is not None:  # records written before --defense_seed (or a field) existed
            previous = with_defaults(previous, {"defense_seed": FLAGS.seed,
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
        variables = spec.run(model, bd_vars, benign, cfg, rng, ctx)
        save_variables(workdir / "models" / name, variables)
        r = evaluate(variables)
        r["der"] = metrics.der(results["backdoored"], r)
        r.update(seconds=elapsed(t0, ctx), benign_examples=int(len(idx)),
                 config=record)
        results["defenses"][name] = r
        write_results(workdir, results)

    # (4) Analysis: neuron norms and TAC of the last conv layer, before and after each defense.
    if FLAGS.analysis and jax.process_index() == 0:
        from ftsam_jax.analysis import run_analysis

        models = {"backdoored": bd_vars}
        models.update({name: load_variables(workdir / "models" / name, bd_vars)
                       for name in settings.defenses})
        mask = attack.test_mask(bd.y_test)
        run_analysis(model, models, bd.x_test[mask], bd.x_bd, workdir)

    print_summary(results, workdir)


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
    run(main)
