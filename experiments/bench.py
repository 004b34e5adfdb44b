r"""Benchmark of the compiled steps: steady-state images/s and compile seconds.

    python -m experiments.bench --model=preactresnet18 --width=16 --batch_size=128
    python -m experiments.bench --model=preactresnet18 --dtype=bfloat16 --json
    python -m experiments.bench --config=experiments/configs/bench.py:cpu --config.steps=3

Settings: one config tree (`experiments/configs/bench.py`, presets paper / cpu / smoke, the
argument of `--config`); every flag below is a shorthand for its field.

Rows: `train_step` (SGD), `sam_step` (FT-SAM's chain: ASAM rho=2 + weight decay + momentum),
`eval_step`, `detect_train_step` / `detect_distill_step` (the FCOS teacher's step; the IKD
student's step with FGD + AFA + SSA; not in the default rows), and `ftsam_epoch`: one whole
compiled epoch of FT-SAM fine-tuning on
`--ftsam_examples` on-device images with augmentation (the real loop of the defense), from which
the time of `--ftsam_epochs` epochs is extrapolated. Each row: warm-up calls, then `--steps` timed
calls ended by `block_until_ready`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

import ftsam_jax
from experiments.cli import (
    DTYPES,
    InputError,
    comma_list,
    compute_dtype,
    config_from_flags,
    make_mesh,
    run,
)
from experiments.configs.bench import PRESETS, get_config
from ftsam_jax import parallel, xla
from ftsam_jax.detection.distill import (
    DetectDistillConfig,
    create_detect_distill_state,
    make_detect_distill_step,
)
from ftsam_jax.detection.step import detect_train_step, detection_loss_fn
from ftsam_jax.distill.augment import SSAConfig
from ftsam_jax.distill.step import StudentTeacherState, bind_teacher
from ftsam_jax.models import MODELS, create_model
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.training.epoch import make_epoch_fn, standard_preprocess, steps_per_epoch
from ftsam_jax.training.recipe import FitConfig, make_optimizer
from ftsam_jax.training.step import classification_loss, create_train_state


def define_flags() -> None:
    """The command line of `python -m experiments.bench` (defined only when it runs as
    the program, so that modules can be imported side by side, e.g. by tests). Every flag but
    `--preset`/`--config` is a shorthand for the config field of its name (unset: the preset's
    value, `experiments/configs/bench.py`)."""
    flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Preset of experiments/configs/bench.py.")
    config_flags.DEFINE_config_file(
        "config", None, "A config file of the whole run, e.g. experiments/configs/bench.py:cpu "
        "(instead of --preset); override any field with --config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_enum("model", None, sorted(MODELS), "Model to time.")
    flags.DEFINE_integer("width", None, "Model width (paper preset: the model's standard width).")
    flags.DEFINE_integer("batch_size", None, "Global batch size (divisible by the device count).")
    flags.DEFINE_enum("dtype", None, list(DTYPES), "Compute dtype.")
    flags.DEFINE_integer("steps", None, "Timed calls per row.")
    flags.DEFINE_integer("warmup", None, "Untimed calls after compilation.")
    flags.DEFINE_integer("image_size", None, "Square image side.")
    flags.DEFINE_integer("num_classes", None, "Classes.")
    flags.DEFINE_list("rows", None, f"Rows to run, of {list(ROWS)}.")
    flags.DEFINE_integer("ftsam_examples", None, "Benign images for the ftsam_epoch row.")
    flags.DEFINE_integer("ftsam_batch_size", None, "Batch size of the ftsam_epoch row.")
    flags.DEFINE_integer("ftsam_epochs", None, "Epochs to extrapolate the ftsam_epoch row to.")
    flags.DEFINE_integer("detect_batch_size", None, "Batch of the detection rows.")
    flags.DEFINE_integer("detect_image_size", None, "Image side of the detection rows.")
    flags.DEFINE_bool("json", None, "Print one JSON object instead of a table.")


SHORTHANDS = ("model", "width", "batch_size", "dtype", "steps", "warmup", "image_size",
              "num_classes", "rows", "ftsam_examples", "ftsam_batch_size", "ftsam_epochs",
              "detect_batch_size", "detect_image_size", "json")

ROWS = ("train_step", "sam_step", "eval_step", "ftsam_epoch", "detect_train_step",
        "detect_distill_step")


def _time(fn, args_fn, steps: int, warmup: int) -> tuple[float, float]:
    """(compile+first call seconds, mean seconds per steady-state call)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args_fn()))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args_fn()))
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = fn(*args_fn())
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t0) / steps


def _time_detection(name: str, cfg: Any, mesh: Any, dtype: Any) -> tuple[float, float, int]:
    """The detector's train step (the `cpu` preset's teacher FCOS) or the IKD distillation step
    (its student, FGD on P3-P5 + AFA + in-step SSA), AdamW, random images and boxes."""
    db, size = cfg.detect_batch_size, cfg.detect_image_size
    parallel.check_batch_size(db, mesh, "--detect_batch_size")
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, size * 0.6, (db, 4, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, size * 0.4, (db, 4, 2))], -1)
    host = {"image": rng.random((db, size, size, 3)).astype(np.float32),
            "adv": rng.random((db, size, size, 3)).astype(np.float32),
            "boxes": boxes.astype(np.float32), "labels": rng.integers(0, 10, (db, 4)),
            "mask": rng.random((db, 4)) < 0.8}
    batch = jax.device_put(host, parallel.data_sharding(mesh))
    teacher = FCOS(10, width=16, blocks=(2, 2, 2, 2), fpn_channels=32, dtype=dtype)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    t_state = create_train_state(teacher, tx, jax.random.key(0), (size, size, 3))
    if name == "detect_train_step":
        fn = xla.jit(partial(detect_train_step, tx=tx,
                             loss_fn=detection_loss_fn(teacher.apply, 10, size)),
                     donate_argnums=0)
        holder = {"state": parallel.replicate(t_state, mesh)}
    else:
        student = FCOS(10, width=8, fpn_channels=32, dtype=dtype)
        distill_cfg = DetectDistillConfig()  # FGD + AFA at their defaults
        state = StudentTeacherState(create_detect_distill_state(
            student, tx, jax.random.key(1), size, distill_cfg), t_state.params)
        fn = xla.jit(bind_teacher(make_detect_distill_step(
            student, teacher, tx, distill_cfg, 10, size, ssa=SSAConfig(small_area=16.0**2))),
            donate_argnums=0)
        holder = {"state": parallel.replicate(state, mesh)}

    def call():
        holder["state"], m = fn(holder["state"], batch, jax.random.key(0))
        return m

    first, per = _time(call, tuple, cfg.steps, cfg.warmup)
    return first, per, db


def resolve(cfg: Any) -> list[str]:
    """Checks the config tree; returns its rows. An InputError names the first bad field."""
    rows = comma_list(cfg.rows)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or not rows:
        raise InputError(f"unknown --rows {unknown or rows}; choose from {list(ROWS)}")
    if cfg.model not in MODELS:
        raise InputError(f"unknown --model {cfg.model!r}; choose one of {sorted(MODELS)}")
    compute_dtype(cfg.dtype)
    if cfg.steps < 1 or cfg.warmup < 0:
        raise InputError("--steps must be >= 1 and --warmup >= 0")
    for name in ("batch_size", "image_size", "num_classes", "ftsam_examples", "ftsam_batch_size",
                 "ftsam_epochs", "detect_batch_size", "detect_image_size"):
        if cfg[name] < 1:
            raise InputError(f"--{name} must be >= 1, got {cfg[name]}")
    if cfg.num_classes < 2:
        raise InputError(f"--num_classes must be >= 2, got {cfg.num_classes}")
    if cfg.width is not None and cfg.width < 1:
        raise InputError(f"--width must be >= 1, got {cfg.width}")
    return rows


@dataclasses.dataclass
class Bench:
    """What every classification row of a sitting shares: the model, its loss, the optimisers
    (SGD and FT-SAM's ASAM over it), one batch on the devices."""

    cfg: Any
    mesh: Any
    model: Any
    loss_fn: Any
    sgd: Any
    ftsam_tx: Any
    batch: dict[str, jax.Array]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.cfg.image_size, self.cfg.image_size, 3)

    def ftsam_state(self) -> Any:
        return xla.jit(lambda: create_train_state(self.model, self.ftsam_tx, jax.random.key(0),
                                                  self.shape))()


def make_bench(cfg: Any, mesh: Any) -> Bench:
    dtype = compute_dtype(cfg.dtype)
    model = create_model(cfg.model, cfg.num_classes, width=cfg.width, dtype=dtype,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    # The pipeline's optimizer (SGD 0.9 / 5e-4, FT-SAM: ASAM rho 2 in front) at a constant lr.
    recipe = FitConfig(epochs=1, batch_size=cfg.batch_size, lr=0.01, schedule="constant")
    sgd = make_optimizer(recipe, cfg.batch_size)
    ftsam_tx = make_optimizer(dataclasses.replace(recipe, sam=True, rho=2.0, adaptive=True),
                              cfg.batch_size)
    rng, b, side = np.random.default_rng(0), cfg.batch_size, cfg.image_size
    batch = jax.device_put(
        {"image": jnp.asarray(rng.random((b, side, side, 3)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, cfg.num_classes, b), jnp.int32)},
        parallel.data_sharding(mesh))
    return Bench(cfg, mesh, model, classification_loss(model.apply, label_smoothing=0.1), sgd,
                 ftsam_tx, batch)


def _row(name: str, first: float, per_call: float, images: int, **extra: Any) -> dict:
    return {"row": name, "compile_s": round(first, 3), "ms_per_call": round(per_call * 1e3, 3),
            "img_per_s": round(images / per_call, 1), **extra}


def time_step(bench: Bench, name: str) -> dict[str, Any]:
    """`train_step` (SGD) or `sam_step` (FT-SAM's ASAM): one compiled, donated step."""
    cfg = bench.cfg
    if name == "train_step":
        tx, step = bench.sgd, ftsam_jax.train_step
        state = create_train_state(bench.model, tx, jax.random.key(0), bench.shape)
    else:
        tx, step, state = bench.ftsam_tx, ftsam_jax.sam_step, bench.ftsam_state()
    fn = xla.jit(partial(step, tx=tx, loss_fn=bench.loss_fn), donate_argnums=0)
    holder = {"state": parallel.replicate(state, bench.mesh)}

    def call():
        holder["state"], m = fn(holder["state"], bench.batch, jax.random.key(0))
        return m

    first, per = _time(call, tuple, cfg.steps, cfg.warmup)
    return _row(name, first, per, cfg.batch_size)


def time_eval(bench: Bench) -> dict[str, Any]:
    variables = parallel.replicate(bench.ftsam_state().variables, bench.mesh)
    fn = xla.jit(partial(ftsam_jax.eval_step, apply_fn=bench.model.apply))
    first, per = _time(fn, lambda: (variables, bench.batch), bench.cfg.steps, bench.cfg.warmup)
    return _row("eval_step", first, per, bench.cfg.batch_size)


def time_ftsam_epoch(bench: Bench) -> dict[str, Any]:
    """One FT-SAM epoch (the stage driver's epoch function) over `ftsam_examples` images,
    extrapolated to `ftsam_epochs`."""
    cfg, mesh = bench.cfg, bench.mesh
    n, fb = cfg.ftsam_examples, cfg.ftsam_batch_size
    rng, repl = np.random.default_rng(0), parallel.replicated(mesh)
    images = jax.device_put(rng.integers(0, 256, (n, *bench.shape), dtype=np.uint8), repl)
    labels = jax.device_put(rng.integers(0, cfg.num_classes, n).astype(np.int32), repl)
    epoch = make_epoch_fn(partial(ftsam_jax.sam_step, tx=bench.ftsam_tx, loss_fn=bench.loss_fn),
                          mesh=mesh, num_examples=n, batch_size=fb,
                          preprocess=standard_preprocess(), drop_last=False)
    holder = {"state": parallel.replicate(bench.ftsam_state(), mesh)}

    def call():
        holder["state"], m = epoch(holder["state"], images, labels, jax.random.key(0))
        return m

    first, per = _time(call, tuple, max(1, cfg.steps // 5), min(1, cfg.warmup))
    spe = steps_per_epoch(n, fb, drop_last=False)
    return _row("ftsam_epoch", first, per, spe * fb, steps_per_epoch=spe,
                mode="scan" if jax.default_backend() != "cpu" else "python loop",
                est_seconds_for_epochs=round(first + per * (cfg.ftsam_epochs - 1), 1),
                epochs=cfg.ftsam_epochs, examples=n, batch_size=fb)


def run_bench(cfg: Any, mesh: Any = None) -> dict[str, Any]:
    """Times the config's rows; returns {"device", "platform", "devices", "jax", "preset",
    "model", "width", "dtype", "batch_size", "rows": [{"row", "compile_s", "ms_per_call",
    "img_per_s", ...}]} (what `--json` prints)."""
    rows = resolve(cfg)
    mesh = mesh or make_mesh()
    try:
        parallel.check_batch_size(cfg.batch_size, mesh)
        parallel.check_batch_size(cfg.ftsam_batch_size, mesh, "--ftsam_batch_size")
    except ValueError as e:
        raise InputError(e) from None
    bench = make_bench(cfg, mesh)
    results = []
    for name in rows:
        if name in ("train_step", "sam_step"):
            results.append(time_step(bench, name))
        elif name == "eval_step":
            results.append(time_eval(bench))
        elif name.startswith("detect_"):
            first, per, db = _time_detection(name, cfg, mesh, compute_dtype(cfg.dtype))
            results.append(_row(name, first, per, db, image_size=cfg.detect_image_size,
                                batch_size=db))
        else:
            results.append(time_ftsam_epoch(bench))
    return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "devices": jax.device_count(), "jax": jax.__version__, "preset": cfg.preset,
            "model": cfg.model, "width": bench.model.width, "dtype": cfg.dtype,
            "batch_size": cfg.batch_size, "rows": results}


def print_table(info: dict[str, Any]) -> None:
    print(f"{info['device']} x{info['devices']} ({info['platform']}, jax {info['jax']}) "
          f"{info['model']} width {info['width']} {info['dtype']} batch {info['batch_size']}")
    print(f"{'row':<20} {'compile s':>10} {'ms/call':>10} {'img/s':>10}  notes")
    for r in info["rows"]:
        note = ""
        if r["row"] == "ftsam_epoch":
            note = (f"{r['steps_per_epoch']} SAM steps/epoch, batch {r['batch_size']}; "
                    f"{r['epochs']} epochs ~ {r['est_seconds_for_epochs']} s")
        print(f"{r['row']:<20} {r['compile_s']:>10.2f} {r['ms_per_call']:>10.1f} "
              f"{r['img_per_s']:>10.1f}  {note}")


def main(argv: list[str]) -> None:
    del argv
    cfg = config_from_flags(get_config, SHORTHANDS)
    info = run_bench(cfg)
    if cfg.json:
        print(json.dumps(info))
    else:
        print_table(info)


if __name__ == "__main__":
    define_flags()
    run(main)
