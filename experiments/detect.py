r"""IKD for object detection: a teacher FCOS, then students distilled with each method.

    python -m experiments.detect --dataset=scenes:fashion_mnist --data_dir=../shared/data \
        --methods=student,fgd,fgd_ssa,fgd_afa,fgd_ikd,fgd_noise --seeds=0,1,2 --preset=cpu \
        --workdir=runs/detect

Stages (each resumable; rerun the same command to continue): the scenes (cached in
`WORKDIR/data`), the teacher (`ftsam_jax.models.fcos.FCOS`, wider/deeper), its adversarial
training set made once with MI-DI-FGSM against its classification loss (eps 8/255, step 2/255,
5 steps, momentum 1, DI p 0.5 / 0.9; cached), then one student per method and seed:
- `student`: the detection loss alone.
- `fgd`: + FGD on P3-P5 (official RetinaNet weights, see `ftsam_jax.detection.fgd`).
- `fgd_ssa`: + the official sample-specific augmentation in the IKD phase.
- `fgd_afa`: + the adversarial feature term (alpha_adv sum of squares / N) in the IKD phase.
- `fgd_ikd`: fgd + SSA + AFA: IKD.
- `fgd_noise`: like fgd_afa with uniform +-eps noise instead of the adversarial images (the
  control: "adversarial" or "any perturbation").
The IKD phase is the first 2/3 of the epochs (the official 16 of 24); plain FGD after.
Optimizer: AdamW (lr `--lr`, weight decay 1e-4, cosine per epoch), the same for teacher and
students (not the paper's SGD 2x schedule for ImageNet-pretrained R50s: our detectors train
from scratch on small data).

Writes results.json ({"dataset", "config", "teacher": {"ap", "ap50", "ap75", "ap_s", "ap_m",
"ap_l", "ar100", "ap_adv", "seconds"}, "students": {method: {same keys as means, "std",
"per_seed", "seconds"}}}, fractions in [0, 1]), results.md, metrics.jsonl (with the
teacher's / students' evaluation AP every `teacher_eval_every` / `student_eval_every` epochs:
`val_ap`, `val_ap50`, `val_ap_s`), tensorboard/, detections.png, models/teacher (the teacher's
final variables: a workdir with results.json and models/teacher needs no teacher checkpoint).
COCO metrics via pycocotools: for scenes with their size buckets (small < 16^2 <= medium < 48^2
px at 128 px), for `coco:DIR` (`ftsam_jax.data.coco`: letterboxed to the input, evaluated in
original pixels) with COCO's, and detections/<model>.json (teacher, first seed of each method)
in COCO's result format with the folder's image and category ids.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache, partial
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
from experiments.configs.detect import PRESETS, get_config
from experiments.workdir import (
    MetricsLog,
    atomic_write,
    check_workdir,
    elapsed,
    lock_workdir,
    start_timer,
)
from ftsam_jax import metrics, parallel, xla
from ftsam_jax.checkpoint import load_variables, save_variables
from ftsam_jax.data.coco import load_coco
from ftsam_jax.data.scenes import (
    DetectionData,
    SceneConfig,
    check_scene_sources,
    extra_training_scenes,
    scenes_fashion_mnist,
)
from ftsam_jax.detection.decode import decode_topk, nms
from ftsam_jax.detection.distill import (
    DetectDistillConfig,
    create_detect_distill_state,
    detection_objective,
    make_detect_distill_step,
)
from ftsam_jax.detection.evaluate import (
    COCO_AREAS,
    KEYS,
    SCENE_AREAS,
    coco_metrics,
    coco_results,
)
from ftsam_jax.detection.fgd import FGDConfig
from ftsam_jax.detection.step import detect_train_step, detection_loss_fn, random_hflip
from ftsam_jax.distill.adversarial import precompute_adversarial
from ftsam_jax.distill.augment import SSAConfig
from ftsam_jax.distill.step import StudentTeacherState, bind_teacher
from ftsam_jax.loop import steps_per_epoch
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.runner import Stage, StageContext, stage_rng, train_stage
from ftsam_jax.schedules import make_schedule
from ftsam_jax.train import create_train_state

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line of `python -m experiments.detect` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests)."""
    flags.DEFINE_string("dataset", "scenes:fashion_mnist", "scenes:fashion_mnist, or coco:DIR (a "
                        "folder with COCO-format train.json and val.json, images relative to it).")
    flags.DEFINE_string("data_dir", "../shared/data", "Folder holding fashion-mnist/ and "
                        "cifar10-subset/ (the scenes' objects and backgrounds).")
    flags.DEFINE_list("methods", ["student", "fgd", "fgd_ssa", "fgd_afa", "fgd_ikd", "fgd_noise"],
                      "Student methods.")
    flags.DEFINE_list("seeds", ["0"], "Student seeds (the teacher and the scenes use the first).")
    flags.DEFINE_enum("preset", "cpu", ["paper", "cpu", "smoke"],
                      "paper: 4,000/1,000 scenes, 24 epochs, accelerator scale; cpu: 4,000/1,000 "
                      "scenes, teacher 24 / students 12 epochs, small nets (about 1.5 h on 2 "
                      "cores for 6 methods x 3 seeds); smoke: 64/32 scenes at 64 px, seconds.")
    flags.DEFINE_integer("num_train", None, "Training scenes.")
    flags.DEFINE_integer("num_val", None, "Evaluation scenes.")
    flags.DEFINE_integer("epochs", None, "Student epochs.")
    flags.DEFINE_integer("teacher_epochs", None, "Teacher epochs.")
    flags.DEFINE_integer("batch_size", None, "Batch size (teacher and students).")
    flags.DEFINE_float("lr", None, "AdamW learning rate (cosine per epoch).")
    flags.DEFINE_float("alpha_adv", 1e-5, "AFA weight (on a sum over C*H*W per image and level).")
    flags.DEFINE_string("workdir", None, "Output folder (default runs/detect_<preset>).")
    flags.DEFINE_bool("progress", True, "Progress bars.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/detect.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)

METHODS = ("student", "fgd", "fgd_ssa", "fgd_afa", "fgd_ikd", "fgd_noise")
SHORTHANDS = ("dataset", "data_dir", "methods", "seeds", "num_train", "num_val", "epochs",
              "teacher_epochs", "batch_size", "lr", "alpha_adv", "progress")
RUN_KEYS = ("dataset", "data_dir", "image_size", "num_train", "num_val", "teacher_epochs",
            "batch_size", "lr", "teacher_width", "teacher_blocks", "fpn_channels", "seed0",
            "epochs", "student_width", "student_blocks", "alpha_adv", "fgd_scale", "eval_split",
            "warmup_epochs", "teacher_extra_scenes", "teacher_flip")


def resolve(tree: ml_collections.ConfigDict, num_devices: int) -> dict[str, Any]:
    """The config tree -> the run's settings (a plain dict); InputError for anything invalid."""
    if tree.dataset != "scenes:fashion_mnist" and not tree.dataset.startswith("coco:"):
        raise InputError(f"--dataset {tree.dataset!r} is not supported "
                         "(scenes:fashion_mnist or coco:DIR)")
    cfg = {k: tree[k] for k in PRESETS["cpu"]}
    methods = comma_list(tree.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise InputError(f"--methods must list distinct methods of {list(METHODS)}, got "
                         f"{methods}")
    seeds = distinct_ints(tree.seeds, "seeds")
    if min(cfg["num_train"], cfg["num_val"], cfg["epochs"], cfg["teacher_epochs"]) < 1:
        raise InputError("--num_train, --num_val, --epochs and --teacher_epochs must be >= 1")
    if cfg["lr"] <= 0 or tree.alpha_adv < 0:
        raise InputError("--lr must be > 0 and --alpha_adv >= 0")
    if cfg["batch_size"] < 1 or cfg["batch_size"] % num_devices:
        raise InputError(f"--batch_size {cfg['batch_size']} is not divisible by the number of "
                         f"devices ({num_devices})")
    if tree.dataset.startswith("scenes:"):
        check_batch_fits(cfg["batch_size"], cfg["num_train"], "scenes")
    if tree.fgd_scale <= 0:
        raise InputError("--config.fgd_scale must be > 0")
    if tree.eval_split not in ("val", "heldout"):
        raise InputError(f"--config.eval_split must be val or heldout, got {tree.eval_split!r}")
    if tree.eval_split == "heldout" and not tree.dataset.startswith("scenes:"):
        raise InputError("--config.eval_split=heldout needs scenes: data")
    if not 0 <= tree.warmup_epochs < min(cfg["epochs"], cfg["teacher_epochs"]):
        raise InputError("--config.warmup_epochs must be >= 0 and below --epochs and "
                         f"--teacher_epochs, got {tree.warmup_epochs}")
    if tree.teacher_extra_scenes < 0:
        raise InputError("--config.teacher_extra_scenes must be >= 0")
    if tree.teacher_extra_scenes and not tree.dataset.startswith("scenes:"):
        raise InputError("--config.teacher_extra_scenes needs scenes: data")
    if tree.teacher_eval_every < 0 or tree.student_eval_every < 0:
        raise InputError("--config.teacher_eval_every and --config.student_eval_every must be "
                         ">= 0 (0: only the final evaluation)")
    cfg = {**cfg, "dataset": tree.dataset, "data_dir": str(tree.data_dir), "methods": methods,
           "seeds": seeds, "seed0": seeds[0], "alpha_adv": tree.alpha_adv,
           "preset": tree.preset}
    # Recorded only when not the default, so workdirs from before these fields still resume.
    if tree.fgd_scale != 1.0:
        cfg["fgd_scale"] = tree.fgd_scale
    if tree.eval_split != "val":
        cfg["eval_split"] = tree.eval_split
    for key in ("warmup_epochs", "teacher_extra_scenes", "teacher_flip"):
        if tree[key]:
            cfg[key] = tree[key]
    cfg["teacher_eval_every"] = tree.teacher_eval_every  # curves only: no resume guard
    cfg["student_eval_every"] = tree.student_eval_every
    return json.loads(json.dumps(cfg))  # tuples as lists, as config.json stores them


def method_config(method: str, alpha_adv: float, fgd_scale: float = 1.0
                  ) -> DetectDistillConfig:
    """A method's distillation settings; `fgd_scale` multiplies FGD's four loss weights."""
    base = FGDConfig()
    fgd = dataclasses.replace(base, alpha=base.alpha * fgd_scale, beta=base.beta * fgd_scale,
                              gamma=base.gamma * fgd_scale, lam=base.lam * fgd_scale)
    return DetectDistillConfig(fgd=None if method == "student" else fgd,
                               alpha_adv=alpha_adv if method in ("fgd_afa", "fgd_ikd",
                                                                 "fgd_noise") else 0.0)


def optimizer(lr: float, steps_per_epoch_: int, epochs: int, warmup_epochs: float = 0.0
              ) -> optax.GradientTransformation:
    """AdamW, cosine per epoch; with `warmup_epochs` > 0 the lr first rises linearly from 0
    over that many epochs (counted in steps), then follows the cosine of the whole run."""
    schedule = make_schedule("cosine_epoch", lr, steps_per_epoch_, epochs)
    warm = int(round(warmup_epochs * steps_per_epoch_))
    if warm:
        cosine = schedule
        schedule = lambda count: cosine(count) * jnp.minimum(1.0, (count + 1) / warm)
    return optax.adamw(schedule, weight_decay=1e-4)


class Evaluator:
    """COCO metrics of a detector's params on a split (device top-k, host NMS)."""

    def __init__(self, model: FCOS, data: DetectionData, mesh: Any, batch_size: int) -> None:
        self.data, self.mesh, self.bs = data, mesh, batch_size
        size = data.images.shape[1]
        self.fn = xla.jit(lambda p, x: decode_topk(model.apply({"params": p}, x), size))

    def detections(self, params: Any, images: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        dets, n = [], len(images)
        params = jax.device_put(params, parallel.replicated(self.mesh))
        for start in range(0, n, self.bs):
            x = images[start:start + self.bs]
            pad = self.bs - len(x)
            if pad:
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            x = jax.device_put(x, parallel.data_sharding(self.mesh))
            boxes, scores, classes = jax.device_get(self.fn(params, x))
            dets += [nms(b, s, c) for b, s, c in zip(boxes, scores, classes, strict=True)]
        return dets[:n]

    def __call__(self, params: Any, images: np.ndarray | None = None) -> dict[str, float]:
        """COCO metrics in the data's own pixels (coco: original images, COCO's size buckets;
        scenes: the canvas, the scenes' buckets)."""
        return self.evaluate(params, images)[0]

    def evaluate(self, params: Any, images: np.ndarray | None = None
                 ) -> tuple[dict[str, float], list[tuple[np.ndarray, ...]]]:
        """The metrics and the per-image detections (in the data's own pixels)."""
        d = self.data
        dets = self.detections(params, d.images if images is None else images)
        s = np.ones(len(d), np.float32) if d.scale is None else d.scale
        dets = [(b / s[i], sc, c) for i, (b, sc, c) in enumerate(dets)]
        return coco_metrics([d.boxes[i][d.mask[i]] / s[i] for i in range(len(d))],
                            [d.labels[i][d.mask[i]] for i in range(len(d))], dets,
                            len(d.class_names),
                            area_ranges=SCENE_AREAS if d.scale is None else COCO_AREAS), dets


def write_detections(workdir: Path, name: str, data: DetectionData,
                     dets: list[tuple[np.ndarray, ...]]) -> None:
    """`detections/<name>.json`: a model's evaluation detections in COCO's result format with
    the folder's own image and category ids (coco: data sets only)."""
    if data.image_ids is None or data.category_ids is None:
        return
    atomic_write(workdir / "detections" / f"{name}.json",
                 json.dumps(coco_results(dets, data.image_ids, data.category_ids)) + "\n")


@cache
def _teacher_objective(num_classes: int, image_size: int) -> Any:
    """One objective per (classes, size), so both adversarial sets share one compiled attack."""
    return detection_objective(num_classes, image_size)


def adversarial_set(teacher: FCOS, params: Any, data: DetectionData, rng: jax.Array,
                    mesh: Any, batch_size: int) -> np.ndarray:
    """uint8 MI-DI-FGSM images against the teacher's classification loss (example i uses key
    fold_in(rng, i): independent of the batch size and the device count)."""
    gt = {"boxes": data.boxes, "labels": data.labels, "mask": data.mask}
    return precompute_adversarial(
        teacher.apply, {"params": params}, data.images, gt, rng, mesh=mesh,
        batch_size=batch_size, objective=_teacher_objective(len(data.class_names),
                                                            data.images.shape[1]))


def _no_preprocess(batch: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    del rng
    return batch


def _curve(evaluate: Evaluator, params: Any) -> Any:
    """`state -> {"val_ap", "val_ap50", "val_ap_s"}` for a stage's learning curve (metrics.jsonl,
    TensorBoard), `params(state)` picking the detector's params."""
    return lambda state: {f"val_{k}": v for k, v in evaluate(params(state)).items()
                          if k in ("ap", "ap50", "ap_s")}


def _cached(path: Path, make: Any) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    arr = make()
    if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
    return arr


def seed_summary(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Every metric's mean over seeds, and {"std": {metric: sample std}}."""
    stats = {k: metrics.mean_std([p[k] for p in per_seed]) for k in KEYS}
    return {**{k: m for k, (m, _) in stats.items()}, "std": {k: s for k, (_, s) in stats.items()}}


def results_table(results: dict[str, Any]) -> str:
    c = results["config"]
    pct = lambda v: "-" if v < 0 else f"{100 * v:.1f}"
    buckets = ("COCO's size buckets (original pixels)" if results["dataset"].startswith("coco:")
               else "size buckets small < 16² <= medium < 48² px")
    seeds = sorted({p["seed"] for r in results["students"].values() for p in r["per_seed"]})
    split = ("held-out scenes of training objects (for tuning)"
             if c.get("eval_split") == "heldout" else "evaluation")
    extra = f"; FGD weights x{c['fgd_scale']}" if "fgd_scale" in c else ""
    lines = [f"# IKD for detection on {results['dataset']} (preset {c['preset']}{extra})", "",
             f"{c['train_images']} training / {c['val_images']} {split} images at "
             f"{c['image_size']} px; COCO metrics (%), {buckets}; students: mean ± std over "
             f"seeds {seeds}.", "",
             "| model | AP | AP50 | AP75 | AP_S | AP_M | AP_L | AR100 | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    t = results["teacher"]
    lines.append("| teacher | " + " | ".join(pct(t[k]) for k in KEYS)
                 + f" | {t['seconds']:.0f} |")
    for name, r in results["students"].items():
        n = len(r["per_seed"])
        cell = lambda k, r=r, n=n: pct(r[k]) + (f" ± {100 * r['std'][k]:.1f}"
                                                if n > 1 and r[k] >= 0 else "")
        lines.append(f"| {name} | " + " | ".join(cell(k) for k in KEYS)
                     + f" | {r['seconds']:.0f} |")
    lines += ["", f"Teacher AP on its adversarial evaluation images: {pct(t['ap_adv'])} "
              f"(clean {pct(t['ap'])})."]
    base = results["students"].get("fgd")
    if base is not None and len(results["students"]) > 1:
        lines += ["", "Differences against fgd paired by seed (each method draws its own init "
                  "and order from the seed), AP and AP_S points, mean ± std over the seeds:", ""]
        ref = {p["seed"]: p for p in base["per_seed"]}
        for name, r in results["students"].items():
            pairs = [(p, ref[p["seed"]]) for p in r["per_seed"] if p["seed"] in ref]
            if name == "fgd" or not pairs:
                continue
            parts = []
            for key in ("ap", "ap_s"):
                d = [100 * (a[key] - b[key]) for a, b in pairs]
                m, sd = metrics.mean_std(d)
                parts.append(f"{key.upper()} {m:+.2f}" + (f" ± {sd:.2f}" if len(d) > 1 else ""))
            lines.append(f"- {name}: " + ", ".join(parts) + f" ({len(pairs)} seeds)")
    return "\n".join(lines) + "\n"


def plot_detections(path: Path, data: DetectionData, rows: dict[str, list]) -> None:
    """Ground truth and each model's boxes (score >= 0.3) on the first 8 evaluation scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(8, len(data))
    names = ["ground truth", *rows]
    fig, axes = plt.subplots(len(names), k, figsize=(1.6 * k, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for i in range(k):
            ax = axes[r, i]
            ax.imshow(data.images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "ground truth":
                boxes, classes = data.boxes[i][data.mask[i]], data.labels[i][data.mask[i]]
            else:
                b, s, c = rows[name][i]
                boxes, classes = b[s >= 0.3], c[s >= 0.3]
            for box, cls in zip(boxes, classes, strict=True):
                ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1],
                                           fill=False, lw=0.8,
                                           color=plt.cm.tab10(int(cls) % 10)))
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    mesh = make_mesh()
    tree = config_from_flags(get_config, SHORTHANDS)
    cfg = resolve(tree, mesh.devices.size)
    workdir = Path(FLAGS.workdir or f"runs/detect_{cfg['preset']}")
    check_workdir(workdir, cfg, RUN_KEYS)
    extra = None
    if cfg["dataset"].startswith("coco:"):
        train, val = load_coco(cfg["dataset"].removeprefix("coco:"), cfg["image_size"])
        check_batch_fits(cfg["batch_size"], len(train))
        lock_workdir(workdir, "data", "models", "detections")  # one run a workdir
    else:
        root = Path(cfg["data_dir"])
        check_scene_sources(root / "fashion-mnist", root / "cifar10-subset")
        lock_workdir(workdir, "data", "models")
        scene_cfg = SceneConfig(num_train=cfg["num_train"], num_val=cfg["num_val"],
                                image_size=cfg["image_size"], seed=cfg["seed0"],
                                max_side=min(96.0, cfg["image_size"] * 0.75))
        train, val = scenes_fashion_mnist(root / "fashion-mnist", root / "cifar10-subset",
                                          scene_cfg, cache_dir=workdir / "data",
                                          heldout=cfg.get("eval_split") == "heldout")
        if cfg.get("teacher_extra_scenes"):
            extra = extra_training_scenes(root / "fashion-mnist", root / "cifar10-subset",
                                          scene_cfg, cfg["teacher_extra_scenes"],
                                          cache_dir=workdir / "data")
    atomic_write(workdir / "config.json", json.dumps({"run": cfg}, indent=2) + "\n")
    log = MetricsLog(workdir / "metrics.jsonl", workdir / "tensorboard")
    ctx = StageContext(mesh=mesh, seed=cfg["seed0"], workdir=workdir, progress=tree.progress,
                       log=log, eval_every=max(1, cfg["epochs"]))
    size, k = cfg["image_size"], len(train.class_names)
    mk = lambda width, blocks: FCOS(num_classes=k, width=width, blocks=tuple(blocks),
                                    fpn_channels=cfg["fpn_channels"])
    teacher = mk(cfg["teacher_width"], cfg["teacher_blocks"])
    student = mk(cfg["student_width"], cfg["student_blocks"])
    repl = parallel.replicated(mesh)
    bs = cfg["batch_size"]
    spe = steps_per_epoch(len(train), bs, drop_last=True)
    # On the devices once, shared by every stage ("label" is the example's index: the boxes
    # ride along as per-example arrays).
    data = jax.device_put({"image": train.images, "label": np.arange(len(train), dtype=np.int32),
                           "boxes": train.boxes, "labels": train.labels, "mask": train.mask},
                          repl)
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    # The teacher: trained once; its final variables (`models/teacher`) are what later runs and
    # a committed results folder (no checkpoints) read.
    warmup = cfg.get("warmup_epochs", 0.0)
    t_eval = Evaluator(teacher, val, mesh, bs)
    s_eval = Evaluator(student, val, mesh, bs)
    t0 = start_timer(ctx)
    t_path = workdir / "models" / "teacher"
    if "teacher" in results and t_path.is_dir():
        shapes = jax.eval_shape(teacher.init, jax.random.key(0),
                                jnp.zeros((1, size, size, 3), jnp.float32))
        t_params = load_variables(t_path, {"params": shapes["params"]})["params"]
    else:
        t_data, t_spe = data, spe
        if extra is not None:  # the teacher's own, larger training set
            t_data = jax.device_put({
                "image": np.concatenate([train.images, extra.images]),
                "label": np.arange(len(train) + len(extra), dtype=np.int32),
                **{key: np.concatenate([getattr(train, key), getattr(extra, key)])
                   for key in ("boxes", "labels", "mask")}}, repl)
            t_spe = steps_per_epoch(len(train) + len(extra), bs, drop_last=True)
        t_tx = optimizer(cfg["lr"], t_spe, cfg["teacher_epochs"], warmup)
        t_state = create_train_state(teacher, t_tx, stage_rng(cfg["seed0"], "teacher/init"),
                                     (size, size, 3))
        t_step = partial(detect_train_step, tx=t_tx,
                         loss_fn=detection_loss_fn(teacher.apply, k, size))
        every = cfg["teacher_eval_every"]
        t_ctx = dataclasses.replace(ctx, eval_every=every or cfg["teacher_epochs"])
        t_state, _ = train_stage(Stage(
            "teacher", t_state, cfg["teacher_epochs"], step=t_step, data=t_data, batch_size=bs,
            preprocess=random_hflip if cfg.get("teacher_flip") else _no_preprocess,
            evaluate=_curve(t_eval, lambda s: s.params) if every else None), t_ctx)
        del t_data
        ctx.restored_seconds = t_ctx.restored_seconds
        t_params = t_state.params
        if jax.process_index() == 0:
            save_variables(t_path, {"params": t_params})
    adv_rng = stage_rng(cfg["seed0"], "adversarial")
    if "teacher" not in results:
        val_adv = adversarial_set(teacher, t_params, val, jax.random.fold_in(adv_rng, 1), mesh,
                                  bs)
        t_metrics, t_dets = t_eval.evaluate(t_params)
        write_detections(workdir, "teacher", val, t_dets)
        results = {"dataset": cfg["dataset"],
                   "config": {**cfg, "train_images": len(train), "val_images": len(val)},
                   "teacher": {**t_metrics, "ap_adv": t_eval(t_params, val_adv)["ap"],
                               "seconds": elapsed(t0, ctx)}, "students": {}}
        atomic_write(results_path, json.dumps(results, indent=2) + "\n")

    # The adversarial (and the control's noise) training images, once.
    methods = cfg["methods"]
    pert: dict[str, Any] = {}
    if any(m in methods for m in ("fgd_afa", "fgd_ikd")):
        pert["adv"] = _cached(workdir / "data" / "adversarial.npy", lambda: adversarial_set(
            teacher, t_params, train, adv_rng, mesh, bs))
    if "fgd_noise" in methods:
        noise_rng = np.random.default_rng(cfg["seed0"])
        pert["noise"] = np.clip(np.rint(train.images + noise_rng.uniform(
            -8, 8, train.images.shape)), 0, 255).astype(np.uint8)

    # The students.
    ikd_steps = int(round(2 / 3 * cfg["epochs"])) * spe
    ssa = SSAConfig(small_area=16.0**2)
    first_seed_dets: dict[str, list] = {"teacher": t_eval.detections(t_params, val.images[:8])}
    s_shapes = jax.eval_shape(student.init, jax.random.key(0),
                              jnp.zeros((1, size, size, 3), jnp.float32))
    s_every = cfg["student_eval_every"]
    ctx.eval_every = s_every or cfg["epochs"]
    s_curve = _curve(s_eval, lambda s: s.student.params["student"]) if s_every else None
    for method in methods:
        done = results["students"].get(method, {})
        per_seed, seconds = list(done.get("per_seed", [])), list(done.get("seconds_per_seed", []))
        dcfg = method_config(method, cfg["alpha_adv"], cfg.get("fgd_scale", 1.0))
        tx = optimizer(cfg["lr"], spe, cfg["epochs"], warmup)
        step = bind_teacher(make_detect_distill_step(
            student, None if method == "student" else teacher, tx, dcfg, k, size,
            ikd_steps=ikd_steps, ssa=ssa if method in ("fgd_ssa", "fgd_ikd") else None))
        source = "noise" if method == "fgd_noise" else "adv"
        m_data = dict(data)
        if dcfg.alpha_adv > 0:
            m_data["adv"] = jax.device_put(pert[source], repl)
        for seed in cfg["seeds"]:
            init_rng, run_rng = jax.random.split(stage_rng(seed, f"student/{method}"))
            state = StudentTeacherState(
                create_detect_distill_state(student, tx, init_rng, size, dcfg), t_params)
            stage = Stage(f"student_{method}_s{seed}", state, cfg["epochs"], step=step,
                          data=m_data, batch_size=bs, rng=run_rng, evaluate=s_curve)
            saved = workdir / "models" / f"student_{method}"  # the first seed's, for the plot
            if any(p["seed"] == seed for p in per_seed):
                if seed == cfg["seeds"][0] and saved.is_dir():
                    params = load_variables(saved, {"params": s_shapes["params"]})["params"]
                    first_seed_dets[method] = s_eval.detections(params, val.images[:8])
                elif seed == cfg["seeds"][0] and ctx.checkpoint_dir(stage.name).is_dir():
                    state, _ = train_stage(stage, ctx)  # older workdirs: its last checkpoint
                    first_seed_dets[method] = s_eval.detections(
                        state.student.params["student"], val.images[:8])
                continue
            t0 = start_timer(ctx)
            state, _ = train_stage(stage, ctx)
            params = state.student.params["student"]
            if seed == cfg["seeds"][0] and jax.process_index() == 0:
                save_variables(saved, {"params": params})
            s_metrics, s_dets = s_eval.evaluate(params)
            per_seed.append({"seed": seed, **s_metrics})
            if seed == cfg["seeds"][0]:
                write_detections(workdir, method, val, s_dets)
            seconds.append(elapsed(t0, ctx))
            if seed == cfg["seeds"][0]:
                first_seed_dets[method] = s_eval.detections(params, val.images[:8])
            results["students"][method] = {
                **seed_summary(per_seed), "per_seed": per_seed,
                "seconds": round(float(np.mean(seconds)), 1), "seconds_per_seed": seconds,
                "config": json.loads(json.dumps(dataclasses.asdict(dcfg)))}
            atomic_write(results_path, json.dumps(results, indent=2) + "\n")
    md = results_table(results)
    atomic_write(workdir / "results.md", md)
    if jax.process_index() == 0:
        plot_detections(workdir / "detections.png", val, first_seed_dets)
    print()
    print(md)
    print(f"results: {results_path}  table: {workdir / 'results.md'}")


if __name__ == "__main__":
    define_flags()
    run(main)
