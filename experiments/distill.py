r"""IKD for classification: a teacher, then students distilled with each method.

    python -m experiments.distill --dataset=cifar10 --data_dir=../shared/data/cifar10-subset \
        --preset=cpu --methods=ce,kd,kd_afa,kd_afa_ssa --seeds=0,1,2 --workdir=runs/distill

Methods (Liang et al., ACM MM 2023, adapted to classification as `ftsam_jax.distill` documents):
- `ce`: the student alone, cross-entropy.
- `kd`: (1 - a) CE + a T^2 KL(teacher || student) at temperature T (Hinton et al.; a 0.9, T 4).
- `kd_afa`: kd + IKD's adversarial feature augmentation: the student matches the teacher's
  features (`--afa_layers`, through 1x1 align convs when widths differ) on adversarial images
  made once against the teacher (MI-DI-FGSM, eps 8/255, 5 steps), weighted by `--alpha_adv`,
  for the first 2/3 of the epochs (the official two-phase schedule), plain kd after.
- `kd_afa_ssa`: kd_afa + the sample-specific augmentation (the Fourier-statistic analogue of the
  official small-object rule) in the IKD phase.
Writes results.json ({"teacher": {"clean_acc"}, "students": {method: {"clean_acc", "seconds",
...}}, "config"}), results.md (mean ± std over `--seeds`), metrics.jsonl, checkpoints/. Rerun
the same command to resume; finished students are not re-run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments.cli import (
    InputError,
    check_batch_fits,
    comma_list,
    compute_dtype,
    config_from_flags,
    distinct_ints,
    make_mesh,
    run,
)
from experiments.configs.distill import get_config
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
from ftsam_jax import distill, metrics, parallel
from ftsam_jax.data import load_dataset, normalization_for
from ftsam_jax.models import MODELS, create_model
from ftsam_jax.training.epoch import make_evaluator, steps_per_epoch
from ftsam_jax.training.recipe import FitConfig, fit, make_optimizer
from ftsam_jax.training.stage import Stage, StageContext, stage_rng, train_stage

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line of `python -m experiments.distill` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests)."""
    flags.DEFINE_string("dataset", "cifar10", "TFDS name, 'cifar10'/'cifar100' or 'npz:PATH'.")
    flags.DEFINE_string("data_dir", None, "Official CIFAR python folder or a TFDS data dir.")
    flags.DEFINE_string("teacher", None, f"Teacher model, one of {sorted(MODELS)}.")
    flags.DEFINE_integer("teacher_width", None, "Teacher width.")
    flags.DEFINE_string("student", None, f"Student model, one of {sorted(MODELS)}.")
    flags.DEFINE_integer("student_width", None, "Student width.")
    flags.DEFINE_list("methods", ["ce", "kd", "kd_afa", "kd_afa_ssa"], "Student methods.")
    flags.DEFINE_list("seeds", ["0"], "Student seeds (the teacher uses the first).")
    flags.DEFINE_integer("epochs", None, "Student epochs.")
    flags.DEFINE_integer("teacher_epochs", None, "Teacher epochs.")
    flags.DEFINE_integer("batch_size", None, "Batch size (teacher and students).")
    flags.DEFINE_float("lr", None, "SGD learning rate (teacher and students; cosine per epoch).")
    flags.DEFINE_float("kd_alpha", 0.9, "Weight of the KD term; CE gets 1 - kd_alpha.")
    flags.DEFINE_float("temperature", 4.0, "KD temperature.")
    flags.DEFINE_list("afa_layers", None, "Feature levels of the AFA loss (default: the preset's, "
                      "stage3,stage4 for PreActResNet18).")
    flags.DEFINE_float("alpha_adv", 1e-4, "AFA weight (on a sum over C*H*W per image).")
    flags.DEFINE_enum("adv_source", "precomputed", ["precomputed", "online"],
                      "precomputed: adversarial images made once (official); online: every step.")
    flags.DEFINE_float("ssa_quantile", 0.5, "SSA: training-set quantile of the high-frequency "
                       "share below which an image takes the noise branch.")
    flags.DEFINE_string("workdir", None, "Output folder (default runs/distill_<dataset>_<preset>).")
    flags.DEFINE_enum("preset", "paper", ["paper", "cpu", "smoke"],
                      "paper: PreActResNet18 w64 -> w16, 100/100 epochs; cpu: w16 -> w4, 30/30 "
                      "epochs; smoke: tiny nets, seconds.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_integer("eval_every", None, "Evaluate students every k epochs.")
    flags.DEFINE_bool("progress", True, "Progress bars.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/distill.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)

METHODS = ("ce", "kd", "kd_afa", "kd_afa_ssa")
SHORTHANDS = ("dataset", "data_dir", "teacher", "teacher_width", "student", "student_width",
              "methods", "seeds", "epochs", "teacher_epochs", "batch_size", "lr", "kd_alpha",
              "temperature", "afa_layers", "alpha_adv", "adv_source", "ssa_quantile", "dtype",
              "eval_every", "progress")
RUN_KEYS = ("dataset", "data_dir", "teacher", "teacher_width", "student", "student_width",
            "epochs", "teacher_epochs", "batch_size", "lr", "kd_alpha", "temperature",
            "afa_layers", "alpha_adv", "adv_source", "ssa_quantile", "preset", "dtype")


def resolve(tree: ml_collections.ConfigDict, num_devices: int) -> dict[str, Any]:
    """The config tree -> the run's settings (a plain dict); InputError for anything invalid."""
    cfg = {k: tree[k] for k in ("teacher", "teacher_width", "student", "student_width",
                                "epochs", "teacher_epochs", "batch_size", "lr", "eval_every")}
    cfg["afa_layers"] = comma_list(tree.afa_layers)
    for role in ("teacher", "student"):
        if cfg[role] not in MODELS:
            raise InputError(f"unknown {role} model {cfg[role]!r}; choose one of "
                             f"{sorted(MODELS)}")
    methods = comma_list(tree.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"unknown methods {bad}; choose from {list(METHODS)}")
    seeds = distinct_ints(tree.seeds, "seeds")
    if min(cfg["epochs"], cfg["teacher_epochs"], cfg["teacher_width"], cfg["student_width"],
           cfg["eval_every"]) < 1 or cfg["lr"] <= 0:
        raise InputError("epochs, widths and --eval_every must be >= 1 and --lr > 0")
    if cfg["batch_size"] < 1 or cfg["batch_size"] % num_devices:
        raise InputError(f"--batch_size {cfg['batch_size']} is not divisible by the number of "
                         f"devices ({num_devices})")
    if not 0.0 <= tree.kd_alpha <= 1.0 or tree.temperature <= 0 or tree.alpha_adv < 0:
        raise InputError("--kd_alpha must lie in [0, 1], --temperature > 0, --alpha_adv >= 0")
    if not 0.0 < tree.ssa_quantile < 1.0:
        raise InputError("--ssa_quantile must lie in (0, 1)")
    if tree.adv_source not in ("precomputed", "online"):
        raise InputError(f"--adv_source must be precomputed or online, got {tree.adv_source!r}")
    compute_dtype(tree.dtype)
    return {"dataset": tree.dataset, "data_dir": tree.data_dir, **cfg,
            "methods": methods, "seeds": seeds, "kd_alpha": tree.kd_alpha,
            "temperature": tree.temperature, "alpha_adv": tree.alpha_adv,
            "adv_source": tree.adv_source, "ssa_quantile": tree.ssa_quantile,
            "preset": tree.preset, "dtype": tree.dtype, "progress": tree.progress}


def upgrade_run(run: dict[str, Any]) -> dict[str, Any]:
    """An older config.json's run settings in today's names, those of the IKD defense:
    `afa_levels` is `afa_layers`, `--adv_source=batch` is `precomputed`."""
    run = dict(run)
    if "afa_levels" in run:
        run["afa_layers"] = run.pop("afa_levels")
    if run.get("adv_source") == "batch":
        run["adv_source"] = "precomputed"
    return run


def method_config(method: str, cfg: dict[str, Any], ikd_steps: int, ssa_threshold: float
                  ) -> distill.DistillConfig:
    """The DistillConfig of one student method."""
    if method == "ce":
        return distill.DistillConfig(ce_weight=1.0)
    base = dict(ce_weight=1.0 - cfg["kd_alpha"], kd_weight=cfg["kd_alpha"],
                temperature=cfg["temperature"])
    if method == "kd":
        return distill.DistillConfig(**base)
    return distill.DistillConfig(
        **base, afa_layers=tuple(cfg["afa_layers"]), alpha_adv=cfg["alpha_adv"],
        adv_source=cfg["adv_source"], ikd_steps=ikd_steps, ssa=method == "kd_afa_ssa",
        ssa_config=distill.SSAConfig(threshold=ssa_threshold))


def results_table(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"# Distillation on {cfg['dataset']}: {cfg['teacher']} (w{cfg['teacher_width']}) -> "
             f"{cfg['student']} (w{cfg['student_width']})", "",
             f"Preset {cfg['preset']}, student epochs {cfg['epochs']}, seeds {cfg['seeds']}, "
             f"alpha_adv {cfg['alpha_adv']}, AFA layers {cfg['afa_layers']}.", "",
             "| Model | C-Acc (%) | seeds | seconds |", "|---|---:|---:|---:|",
             f"| teacher | {100 * results['teacher']['clean_acc']:.2f} | 1 | "
             f"{results['teacher']['seconds']:.0f} |"]
    for method, r in results["students"].items():
        n = len(r["per_seed"])
        std = f" ± {100 * r['clean_acc_std']:.2f}" if n > 1 else ""
        lines.append(f"| {method} | {100 * r['clean_acc']:.2f}{std} | {n} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def ikd_steps(cfg: dict[str, Any], num_train: int) -> int:
    """The IKD phase: the first 2/3 of the student's epochs, in steps."""
    spe = steps_per_epoch(num_train, cfg["batch_size"], drop_last=True)
    return int(round(2 / 3 * cfg["epochs"])) * spe


def build_models(cfg: dict[str, Any], ds: Any) -> tuple[Any, Any]:
    """(teacher, student) for the data set; InputError if an AFA level is not a feature."""
    mean, std = normalization_for(ds)
    dtype = compute_dtype(cfg["dtype"])
    teacher = create_model(cfg["teacher"], ds.num_classes, width=cfg["teacher_width"], mean=mean,
                           std=std, dtype=dtype)
    student = create_model(cfg["student"], ds.num_classes, width=cfg["student_width"],
                           mean=mean, std=std, dtype=dtype)
    probe = jnp.zeros((1, *ds.image_shape), jnp.float32)
    for model, role in ((teacher, "teacher"), (student, "student")):
        _, inter = jax.eval_shape(lambda m=model: m.init_with_output(
            jax.random.key(0), probe, mutable=["params", "batch_stats", "intermediates"]))
        missing = [lv for lv in cfg["afa_layers"] if lv not in inter["intermediates"]]
        if missing and any(m.startswith("kd_afa") for m in cfg["methods"]):
            raise InputError(f"--afa_layers {missing} are not features of the {role} "
                             f"({sorted(inter['intermediates'])})")
    return teacher, student


def train_teacher(cfg: dict[str, Any], ds: Any, teacher: Any, ctx: StageContext,
                  results: dict[str, Any], evaluate: Any, path: Path) -> tuple[Any, dict]:
    """The teacher's variables (trained or resumed) and results with its row."""
    t0 = start_timer(ctx)
    t_cfg = FitConfig(epochs=cfg["teacher_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"])
    ctx.evaluate = evaluate
    t_vars, _ = fit("teacher", teacher, None, ds.x_train, ds.y_train, t_cfg,
                    stage_rng(cfg["seeds"][0], "teacher"), ctx)
    ctx.evaluate = None
    if "teacher" not in results:
        results = {"teacher": {**evaluate(t_vars), "seconds": elapsed(t0, ctx)},
                   "students": {}, "config": {**cfg, "num_train": int(len(ds.y_train)),
                                              "num_test": int(len(ds.y_test)),
                                              "devices": ctx.mesh.devices.size,
                                              "device_kind": jax.devices()[0].device_kind}}
        atomic_write(path, json.dumps(results, indent=2) + "\n")
    return t_vars, results


def student_stage(cfg: dict[str, Any], ds: Any, models: tuple[Any, Any], t_vars: Any,
                  method: str, seed: int, data: dict[str, Any], ssa_threshold: float,
                  evaluate: Any) -> Stage:
    """One method's student for one seed (SGD 0.9 / 5e-4, cosine per epoch; the IKD phase is
    the first 2/3 of the epochs)."""
    teacher, student = models
    d_cfg = method_config(method, cfg, ikd_steps(cfg, len(ds.y_train)), ssa_threshold)
    tx = make_optimizer(FitConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                  lr=cfg["lr"]), len(ds.y_train))
    init_rng, run_rng = jax.random.split(stage_rng(seed, f"student/{method}"))
    state = distill.StudentTeacherState(
        distill.create_distill_state(student, tx, init_rng, ds.image_shape, model_t=teacher,
                                     teacher_vars=t_vars, config=d_cfg), t_vars)
    step = distill.bind_teacher(distill.make_distill_step(student, teacher, tx, d_cfg))
    use_adv = "adv" in data and d_cfg.uses_afa and d_cfg.adv_source == "precomputed"
    return Stage(f"student_{method}_s{seed}", state, cfg["epochs"], step=step,
                 data={"image": data["image"], "label": data["label"],
                       **({"adv": data["adv"]} if use_adv else {})},
                 batch_size=cfg["batch_size"], preprocess=distill.joint_preprocess(),
                 evaluate=evaluate, rng=run_rng)


def train_students(cfg: dict[str, Any], ds: Any, models: tuple[Any, Any], t_vars: Any,
                   ctx: StageContext, results: dict[str, Any], path: Path) -> None:
    """Every method x seed not in results.json yet; each finished seed is written at once."""
    teacher, student = models
    repl = parallel.replicated(ctx.mesh)
    s_evaluator = make_evaluator(student.apply, mesh=ctx.mesh, batch_size=_eval_batch(ctx.mesh))
    x_test, y_test = jax.device_put(ds.x_test, repl), jax.device_put(ds.y_test, repl)
    data = {"image": jax.device_put(ds.x_train, repl), "label": jax.device_put(ds.y_train, repl)}
    if (any(m.startswith("kd_afa") for m in cfg["methods"])
            and cfg["adv_source"] == "precomputed"):
        # Adversarial images against the teacher, once (deterministic; recomputed on rerun).
        data["adv"] = jax.device_put(distill.precompute_adversarial(
            distill.eval_apply(teacher), t_vars, ds.x_train, ds.y_train,
            stage_rng(cfg["seeds"][0], "adversarial"), mesh=ctx.mesh, batch_size=256), repl)
    ssa_threshold = distill.fourier_threshold(ds.x_train, cfg["ssa_quantile"])
    evaluate = lambda st: {"clean_acc": float(s_evaluator(st.variables, x_test,
                                                          y_test)["accuracy"])}
    for method in cfg["methods"]:
        done = results["students"].get(method, {})
        per_seed, seconds = dict(done.get("per_seed", {})), dict(done.get("seconds_per_seed", {}))
        for seed in cfg["seeds"]:
            if str(seed) in per_seed:
                continue
            t0 = start_timer(ctx)
            stage = student_stage(cfg, ds, models, t_vars, method, seed, data, ssa_threshold,
                                  evaluate)
            state, _ = train_stage(stage, ctx)
            per_seed[str(seed)] = evaluate(state)["clean_acc"]
            seconds[str(seed)] = elapsed(t0, ctx)
            m, s = metrics.mean_std(list(per_seed.values()))
            d_cfg = method_config(method, cfg, ikd_steps(cfg, len(ds.y_train)), ssa_threshold)
            results["students"][method] = {
                "clean_acc": m, "clean_acc_std": s, "per_seed": per_seed,
                "seconds": round(float(np.mean(list(seconds.values()))), 1),
                "seconds_per_seed": seconds,
                "config": {k: v for k, v in dataclasses.asdict(d_cfg).items()
                           if k not in ("attack", "ssa_config")}}
            atomic_write(path, json.dumps(results, indent=2) + "\n")


def train_and_evaluate(tree: ml_collections.ConfigDict, workdir: str | Path, *,
                       mesh: Any = None) -> dict[str, Any]:
    """Runs (or resumes) the config tree's distillation in `workdir`: the teacher, then every
    method x seed's student; writes results.json / results.md and returns the results."""
    workdir, mesh = Path(workdir), mesh or make_mesh()
    cfg = resolve(tree, mesh.devices.size)
    check_workdir(workdir, cfg, RUN_KEYS, upgrade=upgrade_run)
    ds = load_dataset(cfg["dataset"], cfg["data_dir"])
    check_batch_fits(cfg["batch_size"], len(ds.y_train))
    models = build_models(cfg, ds)
    lock_workdir(workdir)  # a second run on this workdir is refused
    atomic_write(workdir / "config.json", json.dumps({"run": cfg}, indent=2) + "\n")
    ctx = StageContext(mesh=mesh, seed=cfg["seeds"][0], workdir=workdir,
                       progress=cfg["progress"], eval_every=cfg["eval_every"],
                       log=MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard"))
    repl = parallel.replicated(mesh)
    t_evaluator = make_evaluator(models[0].apply, mesh=mesh, batch_size=_eval_batch(mesh))
    x_test, y_test = jax.device_put(ds.x_test, repl), jax.device_put(ds.y_test, repl)
    evaluate = lambda v: {"clean_acc": float(t_evaluator(jax.device_put(v, repl), x_test,
                                                         y_test)["accuracy"])}
    path = workdir / "results.json"
    results = read_json(path, "the results", RESULTS_FIX) if path.is_file() else {}
    t_vars, results = train_teacher(cfg, ds, models[0], ctx, results, evaluate, path)
    train_students(cfg, ds, models, jax.device_put(t_vars, repl), ctx, results, path)
    atomic_write(workdir / "results.md", results_table(results))
    return results


def main(argv: list[str]) -> None:
    del argv
    mesh = make_mesh()
    tree = config_from_flags(get_config, SHORTHANDS)
    workdir = Path(FLAGS.workdir or f"runs/distill_{tree.dataset.replace('/', '_')}"
                   f"_{tree.preset}".replace(":", "_"))
    results = train_and_evaluate(tree, workdir, mesh=mesh)
    print()
    print(results_table(results))
    print(f"results: {workdir / 'results.json'}  table: {workdir / 'results.md'}")


def _eval_batch(mesh: Any) -> int:
    n = mesh.devices.size
    return max(n, 512 // n * n)


if __name__ == "__main__":
    define_flags()
    run(main)
