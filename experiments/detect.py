r"""IKD for object detection: a teacher FCOS, then students distilled with each method.

    python -m experiments.detect --dataset=scenes:fashion_mnist --data_dir=../shared/data \
        --methods=student,fgd,fgd_ssa,fgd_afa,fgd_ikd,fgd_noise --seeds=0,1,2 --preset=cpu \
        --workdir=runs/detect

Every setting is a field of `experiments/configs/detect.py` (`--config=...:cpu
--config.FIELD=VALUE`; the flags are shorthands of fields of the same name). `main` parses;
`train_and_evaluate(config, workdir)` runs (tests call it in process).

Stages (each resumable; rerun the same command to continue): the scenes (cached in
`WORKDIR/data`), the teacher (`ftsam_jax.models.fcos.FCOS`, wider/deeper; its final variables
in `models/teacher`), its adversarial training set made once with MI-DI-FGSM against its
classification loss (eps `afa_eps`/255, default 8; step 2/255; `afa_steps` steps, default 5;
momentum 1, DI p 0.5 / 0.9; cached), then one student per method and seed:
- `student`: the detection loss alone.
- `fgd`: + FGD on P3-P5 (official RetinaNet weights, see `ftsam_jax.detection.fgd`).
- `fgd_ssa`: + the official sample-specific augmentation in the IKD phase.
- `fgd_afa`: + the adversarial feature term (alpha_adv sum of squares / N) in the IKD phase.
- `fgd_ikd`: fgd + SSA + AFA: IKD.
- `fgd_noise`: like fgd_afa with uniform +-`noise_eps` noise instead of the adversarial images
  (the control: "adversarial" or "any perturbation").
- `mgd`, `mgd_ssa`, `mgd_afa`, `mgd_ikd`: the same with MGD as the base distiller
  (`ftsam_jax.detection.mgd`: alpha `mgd_alpha` 2e-5, mask ratio `mgd_lambda` 0.65, the
  official RetinaNet config's); the IKD terms are the same code whichever base runs.
The IKD phase is the first `ikd_fraction` of the epochs (2/3: the official 16 of 24); the plain
base distiller after. Optimizer: AdamW (lr `lr`, weight decay `weight_decay`, cosine per epoch
after an optional linear warm-up), the same for teacher and students (not the paper's SGD 2x
schedule for ImageNet-pretrained R50s: our detectors train from scratch on small data). With
`paired_streams`, every method's student of a seed starts from the same init and sees the same
batch order (the pairing of the pre-stated IKD test); otherwise each method draws its own.

Writes results.json ({"dataset", "config", "teacher": {"ap", "ap50", "ap75", "ap_s", "ap_m",
"ap_l", "ar100", "ap_adv", "seconds"}, "students": {method: {same keys as means, "std",
"per_seed", "seconds"}}}, fractions in [0, 1]; "ap_adv": {`adv_key(eps, steps)`: the teacher's
AP on its adversarial evaluation images at that attack strength}, one entry per strength a run
of this workdir used: a workdir that starts from another's teacher row keeps its entries and
adds its own; an older results.json's single number was eps 8/255, 5 steps), results.md (with
paired differences against fgd, and of the mgd_* methods against mgd, with 95% intervals),
metrics.jsonl (with the teacher's / students' evaluation AP every
`teacher_eval_every` / `student_eval_every` epochs: `val_ap`, `val_ap50`, `val_ap_s`),
tensorboard/, detections.png, models/ (the teacher's final variables, and each method's first
seed: a workdir with results.json and models/ needs no checkpoint). COCO metrics via
pycocotools: for scenes with their size buckets (small < 16^2 <= medium < 48^2 px at 128 px),
for `coco:DIR` (`ftsam_jax.data.coco`: letterboxed to the input, evaluated in original pixels)
with COCO's, and detections/<model>.json (teacher, first seed of each method) in COCO's result
format with the folder's image and category ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

from experiments.cli import (
    InputError,
    check_batch_fits,
    comma_list,
    config_from_flags,
    distinct_ints,
    make_mesh,
    run,
)
from experiments.configs.detect import LEGACY_VALUES, get_config
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
from ftsam_jax.checkpoint import load_variables, save_variables
from ftsam_jax.data.coco import load_coco
from ftsam_jax.data.scenes import (
    DetectionData,
    SceneConfig,
    check_scene_sources,
    extra_training_scenes,
    scenes_fashion_mnist,
)
from ftsam_jax.detection.distill import (
    DetectDistillConfig,
    adversarial_set,
    create_detect_distill_state,
    make_detect_distill_step,
)
from ftsam_jax.detection.evaluate import KEYS, DetectionEvaluator, coco_results
from ftsam_jax.detection.fgd import FGDConfig
from ftsam_jax.detection.mgd import MGDConfig
from ftsam_jax.detection.plot import plot_detections
from ftsam_jax.detection.step import detect_train_step, detection_loss_fn, random_hflip
from ftsam_jax.distill.adversarial import AttackConfig
from ftsam_jax.distill.augment import SSAConfig
from ftsam_jax.distill.step import StudentTeacherState, bind_teacher
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.schedules import make_schedule
from ftsam_jax.training.epoch import steps_per_epoch
from ftsam_jax.training.stage import Stage, StageContext, stage_rng, train_stage
from ftsam_jax.training.step import create_train_state

FLAGS = flags.FLAGS
METHODS = ("student", "fgd", "fgd_ssa", "fgd_afa", "fgd_ikd", "fgd_noise", "mgd", "mgd_ssa",
           "mgd_afa", "mgd_ikd")
# A method's name: its base distiller, then a suffix saying which IKD terms it adds (SSA, AFA's
# input).
SUFFIXES = {"": (False, None), "_ssa": (True, None), "_afa": (False, "adv"),
            "_ikd": (True, "adv"), "_noise": (False, "noise")}
# Flags that are shorthands of the config fields of the same name.
SHORTHANDS = ("dataset", "data_dir", "methods", "seeds", "num_train", "num_val", "epochs",
              "teacher_epochs", "batch_size", "lr", "alpha_adv", "afa_eps", "afa_steps",
              "progress")
# Settings whose change makes a workdir's checkpoints and results meaningless (fields added
# later are compared with `LEGACY_VALUES` where an older config.json lacks them).
RUN_KEYS = ("dataset", "data_dir", "image_size", "num_train", "num_val", "teacher_epochs",
            "batch_size", "lr", "teacher_width", "teacher_blocks", "fpn_channels", "seed0",
            "epochs", "student_width", "student_blocks", "alpha_adv", *LEGACY_VALUES)
# Fields that only shape curves and output, never the numbers.
OUTPUT_KEYS = ("teacher_eval_every", "student_eval_every")


def define_flags() -> None:
    """The command line of `python -m experiments.detect` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests)."""
    flags.DEFINE_string("dataset", None, "scenes:fashion_mnist, or coco:DIR (a folder with "
                        "COCO-format train.json and val.json, images relative to it).")
    flags.DEFINE_string("data_dir", None, "Folder holding fashion-mnist/ and cifar10-subset/ "
                        "(the scenes' objects and backgrounds).")
    flags.DEFINE_list("methods", None, f"Student methods, of {list(METHODS)}.")
    flags.DEFINE_list("seeds", None, "Student seeds (the teacher and the scenes use the first).")
    flags.DEFINE_enum("preset", "cpu", ["paper", "cpu", "smoke"],
                      "paper: accelerator scale; cpu: 2 CPU cores; smoke: 64/32 scenes at 64 "
                      "px, seconds (experiments/configs/detect.py).")
    flags.DEFINE_integer("num_train", None, "Training scenes.")
    flags.DEFINE_integer("num_val", None, "Evaluation scenes.")
    flags.DEFINE_integer("epochs", None, "Student epochs.")
    flags.DEFINE_integer("teacher_epochs", None, "Teacher epochs.")
    flags.DEFINE_integer("batch_size", None, "Batch size (teacher and students).")
    flags.DEFINE_float("lr", None, "AdamW learning rate (cosine per epoch).")
    flags.DEFINE_float("alpha_adv", None, "AFA weight (on a sum over C*H*W per image and "
                       "level).")
    flags.DEFINE_float("afa_eps", None, "AFA's attack radius in grey levels (/255; 8).")
    flags.DEFINE_integer("afa_steps", None, "AFA's attack iterations (5).")
    flags.DEFINE_string("workdir", None, "Output folder (default runs/detect_<preset>).")
    flags.DEFINE_bool("progress", None, "Progress bars.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/detect.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)


# ----------------------------------------------------------------------------------------------
# Settings


def _check_numbers(tree: ml_collections.ConfigDict, num_devices: int) -> None:
    if min(tree.num_train, tree.num_val, tree.epochs, tree.teacher_epochs) < 1:
        raise InputError("--num_train, --num_val, --epochs and --teacher_epochs must be >= 1")
    if tree.lr <= 0 or tree.alpha_adv < 0:
        raise InputError("--lr must be > 0 and --alpha_adv >= 0")
    if tree.batch_size < 1 or tree.batch_size % num_devices:
        raise InputError(f"--batch_size {tree.batch_size} is not divisible by the number of "
                         f"devices ({num_devices})")
    if tree.dataset.startswith("scenes:"):
        check_batch_fits(tree.batch_size, tree.num_train, "scenes")
    checks = [
        (tree.fgd_scale > 0, "--config.fgd_scale must be > 0"),
        (tree.eval_split in ("val", "heldout"), "--config.eval_split must be val or heldout, "
         f"got {tree.eval_split!r}"),
        (0 <= tree.warmup_epochs < min(tree.epochs, tree.teacher_epochs),
         "--config.warmup_epochs must be >= 0 and below --epochs and --teacher_epochs, got "
         f"{tree.warmup_epochs}"),
        (tree.teacher_extra_scenes >= 0, "--config.teacher_extra_scenes must be >= 0"),
        (tree.teacher_eval_every >= 0 and tree.student_eval_every >= 0,
         "--config.teacher_eval_every and --config.student_eval_every must be >= 0 (0: only "
         "the final evaluation)"),
        (0 <= tree.ikd_fraction <= 1, "--config.ikd_fraction must lie in [0, 1]"),
        (tree.ssa_small_area > 0 and tree.noise_eps >= 0 and tree.weight_decay >= 0,
         "--config.ssa_small_area must be > 0, noise_eps and weight_decay >= 0"),
        (math.isfinite(tree.afa_eps) and 0 < tree.afa_eps <= 255,
         f"--afa_eps must be a number of grey levels in (0, 255], got {tree.afa_eps}"),
        (tree.afa_steps >= 1, f"--afa_steps must be >= 1, got {tree.afa_steps}"),
        (math.isfinite(tree.mgd_alpha) and tree.mgd_alpha >= 0,
         f"--config.mgd_alpha must be >= 0, got {tree.mgd_alpha}"),
        (0 <= tree.mgd_lambda < 1,
         f"--config.mgd_lambda (MGD's masked share) must lie in [0, 1), got {tree.mgd_lambda}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if not tree.dataset.startswith("scenes:"):
        for key, off in (("eval_split", "val"), ("teacher_extra_scenes", 0)):
            if tree[key] != off:
                raise InputError(f"--config.{key}={tree[key]} needs scenes: data")


def resolve(tree: ml_collections.ConfigDict, num_devices: int) -> dict[str, Any]:
    """The config tree -> the run's settings (a plain dict, as config.json stores it);
    InputError for anything invalid."""
    if tree.dataset != "scenes:fashion_mnist" and not tree.dataset.startswith("coco:"):
        raise InputError(f"--dataset {tree.dataset!r} is not supported "
                         "(scenes:fashion_mnist or coco:DIR)")
    methods = comma_list(tree.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise InputError(f"--methods must list distinct methods of {list(METHODS)}, got "
                         f"{methods}")
    seeds = distinct_ints(tree.seeds, "seeds")
    _check_numbers(tree, num_devices)
    cfg = {k: v for k, v in tree.to_dict().items() if k not in ("methods", "seeds", "progress")}
    cfg.update(data_dir=str(tree.data_dir), methods=methods, seeds=seeds, seed0=seeds[0])
    return json.loads(json.dumps(cfg))  # tuples as lists, as config.json stores them


def method_parts(method: str) -> tuple[str | None, bool, str | None]:
    """(base distiller's name or None, SSA in the IKD phase, AFA's input: "adv", "noise" or
    None) of a method name, e.g. "mgd_ikd" -> ("mgd", True, "adv")."""
    if method == "student":
        return None, False, None
    base, _, suffix = method.partition("_")
    return (base, *SUFFIXES["_" + suffix if suffix else ""])


def method_config(method: str, cfg: dict[str, Any]) -> DetectDistillConfig:
    """A method's distillation settings: its base distiller (FGD with `fgd_scale` multiplying
    its four loss weights, or MGD with `mgd_alpha` / `mgd_lambda`) and AFA's weight."""
    name, _, source = method_parts(method)
    base: FGDConfig | MGDConfig | None = None
    if name == "fgd":
        fgd, scale = FGDConfig(), cfg["fgd_scale"]
        base = dataclasses.replace(fgd, alpha=fgd.alpha * scale, beta=fgd.beta * scale,
                                   gamma=fgd.gamma * scale, lam=fgd.lam * scale)
    elif name == "mgd":
        base = MGDConfig(alpha=cfg["mgd_alpha"], ratio=cfg["mgd_lambda"])
    return DetectDistillConfig(base=base, alpha_adv=cfg["alpha_adv"] if source else 0.0)


def attack_config(cfg: dict[str, Any]) -> AttackConfig:
    """AFA's MI-DI-FGSM: eps `afa_eps`/255, `afa_steps` steps, the official step 2/255."""
    return AttackConfig(eps=cfg["afa_eps"] / 255.0, steps=cfg["afa_steps"])


def adv_key(eps: float, steps: int) -> str:
    """The key of the teacher's `ap_adv` at an attack strength, e.g. "eps=8/255,steps=5"."""
    return f"eps={eps:g}/255,steps={steps}"


def upgrade_results(results: dict[str, Any]) -> dict[str, Any]:
    """An older results.json in today's form: the teacher's single `ap_adv` number (every such
    run attacked with eps 8/255, 5 steps) becomes {adv_key(8, 5): number}. A teacher row
    without "students" (removed by hand to train them again) gets an empty one."""
    teacher = results.get("teacher")
    if teacher is not None:
        results.setdefault("students", {})
    if isinstance(teacher, dict) and isinstance(teacher.get("ap_adv"), int | float):
        teacher["ap_adv"] = {adv_key(LEGACY_VALUES["afa_eps"], LEGACY_VALUES["afa_steps"]):
                             teacher["ap_adv"]}
    return results


def optimizer(lr: float, steps_per_epoch_: int, epochs: int, warmup_epochs: float = 0.0,
              weight_decay: float = 1e-4) -> optax.GradientTransformation:
    """AdamW, cosine per epoch; with `warmup_epochs` > 0 the lr first rises linearly from 0
    over that many epochs (counted in steps), then follows the cosine of the whole run."""
    schedule = make_schedule("cosine_epoch", lr, steps_per_epoch_, epochs)
    warm = int(round(warmup_epochs * steps_per_epoch_))
    if warm:
        cosine = schedule
        schedule = lambda count: cosine(count) * jnp.minimum(1.0, (count + 1) / warm)
    return optax.adamw(schedule, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------
# Data and files


def load_data(cfg: dict[str, Any], workdir: Path
              ) -> tuple[DetectionData, DetectionData, DetectionData | None]:
    """(train, val, the teacher's extra scenes or None); checks the sources, then makes the
    workdir (a refused run leaves none)."""
    if cfg["dataset"].startswith("coco:"):
        train, val = load_coco(cfg["dataset"].removeprefix("coco:"), cfg["image_size"])
        check_batch_fits(cfg["batch_size"], len(train))
        lock_workdir(workdir, "data", "models", "detections")  # one run a workdir
        return train, val, None
    root = Path(cfg["data_dir"])
    objects, backgrounds = root / "fashion-mnist", root / "cifar10-subset"
    check_scene_sources(objects, backgrounds)
    lock_workdir(workdir, "data", "models")
    scene_cfg = SceneConfig(num_train=cfg["num_train"], num_val=cfg["num_val"],
                            image_size=cfg["image_size"], seed=cfg["seed0"],
                            max_side=min(96.0, cfg["image_size"] * 0.75))
    train, val = scenes_fashion_mnist(objects, backgrounds, scene_cfg,
                                      cache_dir=workdir / "data",
                                      heldout=cfg["eval_split"] == "heldout")
    extra = None
    if cfg["teacher_extra_scenes"]:
        extra = extra_training_scenes(objects, backgrounds, scene_cfg,
                                      cfg["teacher_extra_scenes"], cache_dir=workdir / "data")
    return train, val, extra


def device_data(mesh: Any, *splits: DetectionData) -> dict[str, jax.Array]:
    """The splits' scenes on the devices once, as a stage's data ("label" is the example's
    index: the boxes ride along as per-example arrays)."""
    n = sum(len(s) for s in splits)
    arrays = {"image": np.concatenate([s.images for s in splits]),
              "label": np.arange(n, dtype=np.int32),
              **{k: np.concatenate([getattr(s, k) for s in splits])
                 for k in ("boxes", "labels", "mask")}}
    return jax.device_put(arrays, parallel.replicated(mesh))


def _cached(path: Path, make: Any) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    arr = make()
    if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
    return arr


def write_detections(workdir: Path, name: str, data: DetectionData,
                     dets: list[tuple[np.ndarray, ...]]) -> None:
    """`detections/<name>.json`: a model's evaluation detections in COCO's result format with
    the folder's own image and category ids (coco: data sets only)."""
    if data.image_ids is None or data.category_ids is None:
        return
    atomic_write(workdir / "detections" / f"{name}.json",
                 json.dumps(coco_results(dets, data.image_ids, data.category_ids)) + "\n")


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Every metric's mean over seeds, and {"std": {metric: sample std}}."""
    stats = {k: metrics.mean_std([p[k] for p in per_seed]) for k in KEYS}
    return {**{k: m for k, (m, _) in stats.items()}, "std": {k: s for k, (_, s) in stats.items()}}


def _pct(v: float) -> str:
    return "-" if v < 0 else f"{100 * v:.1f}"


def paired_lines(results: dict[str, Any], base: str = "fgd", prefix: str = "") -> list[str]:
    """Each method's (of those named `prefix`...) AP and AP_S minus `base`'s, paired by seed:
    mean ± std and the 95% interval over the seeds both ran; "not resolved" where the interval
    spans 0. Nothing where `base` or such methods are absent."""
    names = [n for n in results["students"] if n != base and n.startswith(prefix)]
    if base not in results["students"] or not names:
        return []
    paired = results["config"].get("paired_streams", False)
    lines = ["", f"Differences against {base} paired by seed ("
             + ("same init and batch order for every method of a seed" if paired else
                "each method draws its own init and order from the seed")
             + "), AP and AP_S points: mean ± std [95% interval]:", ""]
    ref = {p["seed"]: p for p in results["students"][base]["per_seed"]}
    for name in names:
        r = results["students"][name]
        pairs = [(p, ref[p["seed"]]) for p in r["per_seed"] if p["seed"] in ref]
        if not pairs:
            continue
        parts = []
        for key in ("ap", "ap_s"):
            d = metrics.paired_difference([100 * a[key] for a, _ in pairs],
                                          [100 * b[key] for _, b in pairs])
            text = f"{key.upper()} {d['mean']:+.2f}"
            if d["n"] > 1:
                text += (f" ± {d['std']:.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"
                         + ("" if d["resolved"] else " not resolved"))
            parts.append(text)
        lines.append(f"- {name}: " + ", ".join(parts) + f" ({len(pairs)} seeds)")
    return lines


def seeds_phrase(students: dict[str, Any]) -> str:
    """"seeds [0, 1]" when every student ran the same seeds; otherwise each group of methods
    with its seeds, so a row over 3 seeds is not read as one over 10."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, r in students.items():
        groups.setdefault(tuple(sorted(p["seed"] for p in r["per_seed"])), []).append(name)
    if len(groups) <= 1:
        return f"seeds {list(next(iter(groups), ()))}"
    return "their seeds (" + "; ".join(f"{', '.join(names)}: {list(seeds)}"
                                       for seeds, names in groups.items()) + ")"


def teacher_adv_line(results: dict[str, Any]) -> str:
    """The teacher's AP on its adversarial evaluation images at this run's attack strength
    (named unless it is the default 8/255, 5 steps), then at any other strengths recorded."""
    c, t = results["config"], results["teacher"]
    eps = c.get("afa_eps", LEGACY_VALUES["afa_eps"])
    steps = c.get("afa_steps", LEGACY_VALUES["afa_steps"])
    ap_adv = t["ap_adv"] if isinstance(t["ap_adv"], dict) else {adv_key(eps, steps): t["ap_adv"]}
    own = adv_key(eps, steps)
    legacy = (eps, steps) == (LEGACY_VALUES["afa_eps"], LEGACY_VALUES["afa_steps"])
    line = ("Teacher AP on its adversarial evaluation images"
            + ("" if legacy else f" (MI-DI-FGSM, eps {eps:g}/255, {steps} steps)")
            + f": {_pct(ap_adv[own])} (clean {_pct(t['ap'])}).")
    others = sorted((k for k in ap_adv if k != own),
                    key=lambda k: (float(k.split("=")[1].split("/")[0]), k))
    if others:
        line += (" At other strengths (other runs from this teacher): "
                 + ", ".join(f"{k} {_pct(ap_adv[k])}" for k in others) + ".")
    return line


def results_table(results: dict[str, Any]) -> str:
    c = results["config"]
    buckets = ("COCO's size buckets (original pixels)" if results["dataset"].startswith("coco:")
               else "size buckets small < 16² <= medium < 48² px")
    seeds = seeds_phrase(results["students"])
    split = ("held-out scenes of training objects (for tuning)"
             if c.get("eval_split") == "heldout" else "evaluation")
    extra = f"; FGD weights x{c['fgd_scale']}" if c.get("fgd_scale", 1.0) != 1.0 else ""
    lines = [f"# IKD for detection on {results['dataset']} (preset {c['preset']}{extra})", "",
             f"{c['train_images']} training / {c['val_images']} {split} images at "
             f"{c['image_size']} px; COCO metrics (%), {buckets}; students: mean ± std over "
             f"{seeds}.", "",
             "| model | AP | AP50 | AP75 | AP_S | AP_M | AP_L | AR100 | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t = results["teacher"]
    lines.append("| teacher | " + " | ".join(_pct(t[k]) for k in KEYS)
                 + f" | {t['seconds']:.0f} |")
    for name, r in results["students"].items():
        n = len(r["per_seed"])
        cell = lambda k, r=r, n=n: _pct(r[k]) + (f" ± {100 * r['std'][k]:.1f}"
                                                 if n > 1 and r[k] >= 0 else "")
        lines.append(f"| {name} | " + " | ".join(cell(k) for k in KEYS)
                     + f" | {r['seconds']:.0f} |")
    lines += ["", teacher_adv_line(results), *paired_lines(results),
              *paired_lines(results, "mgd", "mgd_")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    """What the stages of one run share."""

    cfg: dict[str, Any]
    workdir: Path
    ctx: StageContext
    train: DetectionData
    val: DetectionData
    data: dict[str, jax.Array]
    teacher: FCOS
    student: FCOS
    results: dict[str, Any]

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train), self.cfg["batch_size"], drop_last=True)

    def evaluator(self, model: FCOS) -> DetectionEvaluator:
        """One evaluator (one compiled decoding) per model for the whole run."""
        cache = self.__dict__.setdefault("_evaluators", {})
        if id(model) not in cache:
            cache[id(model)] = DetectionEvaluator(model, self.val, self.ctx.mesh,
                                                  self.cfg["batch_size"])
        return cache[id(model)]

    def save_results(self) -> None:
        atomic_write(self.workdir / "results.json", json.dumps(self.results, indent=2) + "\n")


def _curve(evaluate: DetectionEvaluator, params: Any) -> Any:
    """`state -> {"val_ap", "val_ap50", "val_ap_s"}` for a stage's learning curve (metrics.jsonl,
    TensorBoard), `params(state)` picking the detector's params."""
    return lambda state: {f"val_{k}": v for k, v in evaluate(params(state)).items()
                          if k in ("ap", "ap50", "ap_s")}


def train_teacher(run: Run, extra: DetectionData | None) -> Any:
    """The teacher's params: trained (or resumed), or read from `models/teacher` when a
    finished run's results hold its row (a committed run keeps no checkpoints)."""
    cfg, size = run.cfg, run.cfg["image_size"]
    path = run.workdir / "models" / "teacher"
    if "teacher" in run.results and path.is_dir():
        shapes = jax.eval_shape(run.teacher.init, jax.random.key(0),
                                jnp.zeros((1, size, size, 3), jnp.float32))
        return load_variables(path, {"params": shapes["params"]})["params"]
    data = run.data if extra is None else device_data(run.ctx.mesh, run.train, extra)
    spe = steps_per_epoch(len(data["label"]), cfg["batch_size"], drop_last=True)
    tx = optimizer(cfg["lr"], spe, cfg["teacher_epochs"], cfg["warmup_epochs"],
                   cfg["weight_decay"])
    state = create_train_state(run.teacher, tx, stage_rng(cfg["seed0"], "teacher/init"),
                               (size, size, 3))
    step = partial(detect_train_step, tx=tx, loss_fn=detection_loss_fn(
        run.teacher.apply, len(run.train.class_names), size))
    every = cfg["teacher_eval_every"]
    ctx = dataclasses.replace(run.ctx, eval_every=every or cfg["teacher_epochs"])
    state, _ = train_stage(Stage(
        "teacher", state, cfg["teacher_epochs"], step=step, data=data,
        batch_size=cfg["batch_size"],
        **({"preprocess": random_hflip} if cfg["teacher_flip"] else {}),
        evaluate=_curve(run.evaluator(run.teacher), lambda s: s.params) if every else None), ctx)
    run.ctx.restored_seconds = ctx.restored_seconds
    if jax.process_index() == 0:
        save_variables(path, {"params": state.params})
    return state.params


def evaluate_teacher(run: Run, t_params: Any, t0: float) -> None:
    """The teacher's row of results.json (clean metrics, AP on adversarial evaluation images
    at this run's attack strength), once; a teacher row without this strength's `ap_adv`
    (one taken over from a run at another eps) gets it added. results.json's "config" is
    always this run's settings."""
    key = adv_key(run.cfg["afa_eps"], run.cfg["afa_steps"])
    evaluate = run.evaluator(run.teacher)

    def ap_adv() -> float:
        val_adv = adversarial_set(run.teacher, t_params, run.val, jax.random.fold_in(
            stage_rng(run.cfg["seed0"], "adversarial"), 1), run.ctx.mesh,
            run.cfg["batch_size"], attack_config(run.cfg))
        return evaluate(t_params, val_adv)["ap"]

    if "teacher" in run.results:  # finished earlier: the config is this run's
        run.results["config"] = {**run.cfg, "train_images": len(run.train),
                                 "val_images": len(run.val)}
        if key not in run.results["teacher"]["ap_adv"]:
            run.results["teacher"]["ap_adv"][key] = ap_adv()
            run.save_results()
        return
    t_metrics, dets = evaluate.evaluate(t_params)
    write_detections(run.workdir, "teacher", run.val, dets)
    run.results = {"dataset": run.cfg["dataset"],
                   "config": {**run.cfg, "train_images": len(run.train),
                              "val_images": len(run.val)},
                   "teacher": {**t_metrics, "ap_adv": {key: ap_adv()},
                               "seconds": elapsed(t0, run.ctx)}, "students": {}}
    run.save_results()


def perturbed_sets(run: Run, t_params: Any) -> dict[str, np.ndarray]:
    """The AFA inputs of the methods that need them: the adversarial training images (made
    once per attack strength, cached in data/: `adversarial.npy` at the default eps 8/255 and
    5 steps, `adversarial_eps<E>_steps<K>.npy` otherwise) and the control's uniform noise."""
    cfg, out = run.cfg, {}
    sources = {method_parts(m)[2] for m in cfg["methods"]}
    if "adv" in sources:
        eps, steps = cfg["afa_eps"], cfg["afa_steps"]
        name = ("adversarial.npy" if (eps, steps) == (LEGACY_VALUES["afa_eps"],
                                                      LEGACY_VALUES["afa_steps"])
                else f"adversarial_eps{eps:g}_steps{steps}.npy")
        out["adv"] = _cached(run.workdir / "data" / name, lambda: adversarial_set(
            run.teacher, t_params, run.train, stage_rng(cfg["seed0"], "adversarial"),
            run.ctx.mesh, cfg["batch_size"], attack_config(cfg)))
    if "noise" in sources:
        rng = np.random.default_rng(cfg["seed0"])
        eps = cfg["noise_eps"]
        out["noise"] = np.clip(np.rint(run.train.images + rng.uniform(
            -eps, eps, run.train.images.shape)), 0, 255).astype(np.uint8)
    return out


def student_stage(run: Run, method: str, seed: int, t_params: Any,
                  pert: dict[str, np.ndarray]) -> Stage:
    """The stage of one method's student for one seed."""
    cfg, size, k = run.cfg, run.cfg["image_size"], len(run.train.class_names)
    spe, dcfg = run.steps_per_epoch, method_config(method, run.cfg)
    _, with_ssa, source = method_parts(method)
    tx = optimizer(cfg["lr"], spe, cfg["epochs"], cfg["warmup_epochs"], cfg["weight_decay"])
    ssa = SSAConfig(small_area=cfg["ssa_small_area"])
    teacher = None if method == "student" else run.teacher
    steps = run.__dict__.setdefault("_student_steps", {})  # one per method: its seeds share
    if method not in steps:                                 # the compiled programs
        steps[method] = bind_teacher(make_detect_distill_step(
            run.student, teacher, tx, dcfg, k, size,
            ikd_steps=int(round(cfg["ikd_fraction"] * cfg["epochs"])) * spe,
            ssa=ssa if with_ssa else None))
    step = steps[method]
    data = dict(run.data)
    if dcfg.alpha_adv > 0:
        data["adv"] = jax.device_put(pert[source], parallel.replicated(run.ctx.mesh))
    stream = "student" if cfg["paired_streams"] else f"student/{method}"
    init_rng, run_rng = jax.random.split(stage_rng(seed, stream))
    state = StudentTeacherState(
        create_detect_distill_state(run.student, tx, init_rng, size, dcfg, teacher=teacher),
        t_params)
    every = cfg["student_eval_every"]
    curve = (_curve(run.evaluator(run.student), lambda s: s.student.params["student"])
             if every else None)
    return Stage(f"student_{method}_s{seed}", state, cfg["epochs"], step=step, data=data,
                 batch_size=cfg["batch_size"], rng=run_rng, evaluate=curve)


def train_students(run: Run, t_params: Any, plots: dict[str, list]) -> None:
    """Every method x seed not in results.json yet; each finished seed is written at once."""
    cfg = run.cfg
    pert = perturbed_sets(run, t_params)
    s_eval = run.evaluator(run.student)
    run.ctx.eval_every = cfg["student_eval_every"] or cfg["epochs"]
    size = cfg["image_size"]
    shapes = jax.eval_shape(run.student.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3), jnp.float32))
    for method in cfg["methods"]:
        done = run.results["students"].get(method, {})
        per_seed, seconds = list(done.get("per_seed", [])), list(done.get("seconds_per_seed", []))
        saved = run.workdir / "models" / f"student_{method}"  # the first seed's, for the plot
        for seed in cfg["seeds"]:
            first = seed == cfg["seeds"][0]
            if any(p["seed"] == seed for p in per_seed):
                if first and saved.is_dir():
                    params = load_variables(saved, {"params": shapes["params"]})["params"]
                    plots[method] = s_eval.detections(params, run.val.images[:8])
                elif first and run.ctx.checkpoint_dir(f"student_{method}_s{seed}").is_dir():
                    state, _ = train_stage(student_stage(run, method, seed, t_params, pert),
                                           run.ctx)  # older workdirs: its last checkpoint
                    plots[method] = s_eval.detections(state.student.params["student"],
                                                      run.val.images[:8])
                continue
            t0 = start_timer(run.ctx)
            state, _ = train_stage(student_stage(run, method, seed, t_params, pert), run.ctx)
            params = state.student.params["student"]
            s_metrics, dets = s_eval.evaluate(params)
            per_seed.append({"seed": seed, **s_metrics})
            seconds.append(elapsed(t0, run.ctx))
            if first:
                plots[method] = s_eval.detections(params, run.val.images[:8])
                write_detections(run.workdir, method, run.val, dets)
                if jax.process_index() == 0:
                    save_variables(saved, {"params": params})
            run.results["students"][method] = {
                **seed_summary(per_seed), "per_seed": per_seed,
                "seconds": round(float(np.mean(seconds)), 1), "seconds_per_seed": seconds,
                "config": method_config(method, cfg).record()}
            run.save_results()


def train_and_evaluate(tree: ml_collections.ConfigDict, workdir: str | Path, *,
                       mesh: Any = None) -> dict[str, Any]:
    """Runs (or resumes) the config tree's run in `workdir`: data, teacher, adversarial set,
    students; writes results.json / results.md / detections.png and returns the results."""
    workdir, mesh = Path(workdir), mesh or make_mesh()
    cfg = resolve(tree, mesh.devices.size)
    check_workdir(workdir, cfg, RUN_KEYS, legacy=LEGACY_VALUES)
    train, val, extra = load_data(cfg, workdir)
    atomic_write(workdir / "config.json", json.dumps({"run": cfg}, indent=2) + "\n")
    ctx = StageContext(mesh=mesh, seed=cfg["seed0"], workdir=workdir, progress=tree.progress,
                       log=MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard"))
    k, path = len(train.class_names), workdir / "results.json"
    mk = lambda width, blocks: FCOS(num_classes=k, width=width, blocks=tuple(blocks),
                                    fpn_channels=cfg["fpn_channels"])
    run = Run(cfg, workdir, ctx, train, val, device_data(mesh, train),
              mk(cfg["teacher_width"], cfg["teacher_blocks"]),
              mk(cfg["student_width"], cfg["student_blocks"]),
              upgrade_results(read_json(path, "the results", RESULTS_FIX))
              if path.is_file() else {})
    t0 = start_timer(ctx)
    t_params = train_teacher(run, extra)
    evaluate_teacher(run, t_params, t0)
    plots = {"teacher": run.evaluator(run.teacher).detections(t_params, val.images[:8])}
    train_students(run, t_params, plots)
    atomic_write(workdir / "results.md", results_table(run.results))
    if jax.process_index() == 0:
        plot_detections(workdir / "detections.png", val, plots)
    return run.results


def main(argv: list[str]) -> None:
    del argv
    mesh = make_mesh()
    tree = config_from_flags(get_config, SHORTHANDS)
    workdir = Path(FLAGS.workdir or f"runs/detect_{tree.preset}")
    results = train_and_evaluate(tree, workdir, mesh=mesh)
    print()
    print(results_table(results))
    print(f"results: {workdir / 'results.json'}  table: {workdir / 'results.md'}")


if __name__ == "__main__":
    define_flags()
    run(main)
