"""Multi-object detection scenes of real objects: Fashion-MNIST pasted on CIFAR-10 backgrounds.

`scenes:fashion_mnist` (issue 11): each scene is a CIFAR-10 photograph upsampled to the canvas
with 1-8 Fashion-MNIST objects pasted on it. An object's grey intensity is its alpha mask (the
official images are bright objects on black), its non-zero pixels give the tight box; it is
resized so that its longer side is log-uniform in [min_side, max_side] (aspect kept), tinted
with a random colour and placed where its box overlaps every earlier box with IoU below
`max_iou`. A share `small_only` of the scenes holds small objects only (longer side below
`small_side`, so every box is in the AP_S bucket), which exercises SSA's small-object rule.
Training scenes draw objects from the train files and backgrounds from CIFAR's training batches,
evaluation scenes from the t10k files and CIFAR's test batch: no object or background is seen
in both. Generation is deterministic in `seed` (a numpy Generator, nothing else random) and
cached on disk keyed by every setting.

Boxes are (x1, y1, x2, y2) in pixels of the canvas, padded to `max_objects` per scene with a
validity mask, so a batch has one static shape for jit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ftsam_jax.data.datasets import (
    FASHION_MNIST_CLASSES,
    DataError,
    fashion_mnist_split,
    read_idx,
)

__all__ = ["FASHION_MNIST_CLASSES", "DetectionData", "SceneConfig", "box_iou",
           "check_scene_sources", "extra_training_scenes",
           "load_fashion_mnist", "make_scenes", "read_idx", "resize_bilinear",
           "scenes_fashion_mnist"]

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Settings of the generated scenes (all of them key the on-disk cache)."""

    num_train: int = 4000
    num_val: int = 1000
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 8
    min_side: float = 8.0
    max_side: float = 96.0
    small_only: float = 0.3
    small_side: float = 16.0
    max_iou: float = 0.3
    seed: int = 0

    def check(self) -> None:
        """ValueError for settings that cannot make scenes."""
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError("scene counts must be >= 1")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not 1 <= self.min_side < self.small_side <= self.max_side <= self.image_size:
            raise ValueError("need 1 <= min_side < small_side <= max_side <= image_size")
        if not 0.0 <= self.small_only <= 1.0 or not 0.0 < self.max_iou <= 1.0:
            raise ValueError("small_only must lie in [0, 1] and max_iou in (0, 1]")


@dataclasses.dataclass(frozen=True)
class DetectionData:
    """Images and padded ground truth of a detection split (host numpy arrays)."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    boxes: np.ndarray  # float32 (N, M, 4): x1, y1, x2, y2 in pixels
    labels: np.ndarray  # int32 (N, M), 0 where not valid
    mask: np.ndarray  # bool (N, M)
    class_names: tuple[str, ...]
    scale: np.ndarray | None = None  # float32 (N,): input pixels per original pixel (coco:)
    image_ids: np.ndarray | None = None  # int64 (N,): the source's image ids (coco:)
    category_ids: tuple[int, ...] | None = None  # the source's id of each class (coco:)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_fashion_mnist(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int32 (N,)) of the official `train` or `test` files."""
    return fashion_mnist_split(data_dir, split)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D bilinear resampling with half-pixel centres."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in), np.float32)
    np.add.at(w, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(w, (np.arange(n_out), hi), pos - lo)
    return w


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 bilinear resize of an (H, W) or (H, W, C) array."""
    wy, wx = _interp_matrix(height, image.shape[0]), _interp_matrix(width, image.shape[1])
    img = image.astype(np.float32)
    if img.ndim == 2:
        return wy @ img @ wx.T
    return np.einsum("ah,hwc,bw->abc", wy, img, wx, optimize=True)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (N, 4) against b (M, 4), (x1, y1, x2, y2): (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _tight(obj: np.ndarray) -> np.ndarray:
    """The object's tight crop (its non-zero pixels); the whole image if it is all zero."""
    ys, xs = np.nonzero(obj)
    if ys.size == 0:
        return obj
    return obj[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def make_scenes(objects: np.ndarray, object_labels: np.ndarray, backgrounds: np.ndarray,
                count: int, config: SceneConfig, rng: np.random.Generator) -> DetectionData:
    """`count` scenes from these objects (grey uint8 (K, h, w)) and backgrounds (uint8 NHWC)."""
    size, m = config.image_size, config.max_objects
    images = np.zeros((count, size, size, 3), np.uint8)
    boxes = np.zeros((count, m, 4), np.float32)
    labels = np.zeros((count, m), np.int32)
    mask = np.zeros((count, m), bool)
    bg_w = (_interp_matrix(size, backgrounds.shape[1]), _interp_matrix(size, backgrounds.shape[2]))
    for i in range(count):
        bg = backgrounds[rng.integers(len(backgrounds))].astype(np.float32)
        canvas = np.einsum("ah,hwc,bw->abc", bg_w[0], bg, bg_w[1], optimize=True)
        small = rng.random() < config.small_only
        hi_side = config.small_side if small else config.max_side
        placed: list[np.ndarray] = []
        for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
            k = int(rng.integers(len(objects)))
            crop = _tight(objects[k])
            side = math.exp(rng.uniform(math.log(config.min_side), math.log(hi_side)))
            scale = side / max(crop.shape)
            h = max(1, min(size, round(crop.shape[0] * scale)))
            w = max(1, min(size, round(crop.shape[1] * scale)))
            if small and max(h, w) >= config.small_side:  # rounding must not leave the bucket
                h, w = min(h, int(config.small_side) - 1), min(w, int(config.small_side) - 1)
            box = None
            for _ in range(50):
                x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                cand = np.array([[x0, y0, x0 + w, y0 + h]], np.float32)
                if not placed or box_iou(cand, np.concatenate(placed)).max() < config.max_iou:
                    box = cand
                    break
            if box is None:
                continue
            alpha = np.clip(resize_bilinear(crop, h, w) / 255.0, 0.0, 1.0)[..., None]
            tint = rng.uniform(0.35, 1.0, 3).astype(np.float32) * 255.0
            region = canvas[y0:y0 + h, x0:x0 + w]
            canvas[y0:y0 + h, x0:x0 + w] = region * (1 - alpha) + alpha * tint
            j = len(placed)
            placed.append(box)
            boxes[i, j], labels[i, j], mask[i, j] = box[0], object_labels[k], True
        images[i] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return DetectionData(images, boxes, labels, mask, FASHION_MNIST_CLASSES)


def check_scene_sources(fashion_dir: str | Path, cifar_dir: str | Path) -> None:
    """DataError unless the scenes' sources are there: the four official Fashion-MNIST files
    and an official CIFAR-10 python folder (checked before anything is written)."""
    from ftsam_jax.data.datasets import find_cifar_folder

    fashion_dir = Path(fashion_dir)
    if not fashion_dir.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {fashion_dir}")
    missing = [n for pair in _FILES.values() for n in pair if not (fashion_dir / n).is_file()]
    if missing:
        raise DataError(f"{fashion_dir}: Fashion-MNIST files not found: {missing}")
    if not Path(cifar_dir).is_dir() or find_cifar_folder("cifar10", cifar_dir) is None:
        raise DataError(f"CIFAR-10 python folder (the scenes' backgrounds) not found in "
                        f"{cifar_dir}")


def _cache_key(config: SceneConfig, objects_dir: Path, backgrounds_dir: Path) -> str:
    files = sorted(p for d in (objects_dir, backgrounds_dir) for p in d.rglob("*") if p.is_file())
    stamp = [(p.name, p.stat().st_size) for p in files]
    text = json.dumps({"config": dataclasses.asdict(config), "files": stamp, "version": 1})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def extra_training_scenes(fashion_dir: str | Path, cifar_dir: str | Path, config: SceneConfig,
                          count: int, cache_dir: str | Path | None = None) -> DetectionData:
    """`count` more scenes of the training distribution (Fashion-MNIST training objects on CIFAR
    training backgrounds) from their own random stream (seed [config.seed, 2]): new
    compositions for a teacher trained on more scenes than its students, leaving the training
    and evaluation splits of `scenes_fashion_mnist` as they are. Cached like them."""
    from ftsam_jax.data.datasets import load_dataset

    fashion_dir, cifar_dir = Path(fashion_dir), Path(cifar_dir)
    check_scene_sources(fashion_dir, cifar_dir)
    path = None
    if cache_dir is not None:
        key = _cache_key(dataclasses.replace(config, num_train=count), fashion_dir, cifar_dir)
        path = Path(cache_dir) / f"scenes-{key}-extra.npz"
        if path.is_file():
            with np.load(path) as z:
                return DetectionData(*(z[k] for k in ("images", "boxes", "labels", "mask")),
                                     FASHION_MNIST_CLASSES)
    x_tr, y_tr = load_fashion_mnist(fashion_dir, "train")
    cifar = load_dataset("cifar10", str(cifar_dir), download=False)
    extra = make_scenes(x_tr, y_tr, cifar.x_train, count, config,
                        np.random.default_rng([config.seed, 2]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{k: getattr(extra, k) for k in ("images", "boxes", "labels", "mask")})
        tmp.replace(path)
    return extra


def scenes_fashion_mnist(fashion_dir: str | Path, cifar_dir: str | Path,
                         config: SceneConfig = SceneConfig(),
                         cache_dir: str | Path | None = None, heldout: bool = False
                         ) -> tuple[DetectionData, DetectionData]:
    """(train, val) scenes: train objects on CIFAR training images, t10k objects on test ones.

    `heldout=True`: the second split is instead `num_val` more scenes of TRAIN objects on
    training backgrounds (their own random stream): a held-out split of the training
    distribution for choosing hyper-parameters without looking at the val set (its scenes are
    new; a Fashion-MNIST training item may recur in another composition).
    With `cache_dir`, the arrays are stored there as `scenes-<key>.npz` (the key hashes every
    setting and the source files' names and sizes) and read back by the next call.
    """
    from ftsam_jax.data.datasets import load_dataset

    try:
        config.check()
    except ValueError as e:
        raise DataError(f"scenes: {e}") from None
    fashion_dir, cifar_dir = Path(fashion_dir), Path(cifar_dir)
    check_scene_sources(fashion_dir, cifar_dir)
    path = None
    if cache_dir is not None:
        key = _cache_key(config, fashion_dir, cifar_dir)
        path = Path(cache_dir) / f"scenes-{key}{'-heldout' if heldout else ''}.npz"
        if path.is_file():
            with np.load(path) as z:
                return tuple(DetectionData(*(z[f"{s}_{k}"] for k in ("images", "boxes",
                                                                       "labels", "mask")),
                                           FASHION_MNIST_CLASSES) for s in ("train", "val"))
    x_tr, y_tr = load_fashion_mnist(fashion_dir, "train")
    x_te, y_te = load_fashion_mnist(fashion_dir, "test")
    cifar = load_dataset("cifar10", str(cifar_dir), download=False)
    rng = np.random.default_rng(config.seed)
    train = make_scenes(x_tr, y_tr, cifar.x_train, config.num_train, config, rng)
    if heldout:
        val = make_scenes(x_tr, y_tr, cifar.x_train, config.num_val, config,
                          np.random.default_rng([config.seed, 1]))
    else:
        val = make_scenes(x_te, y_te, cifar.x_test, config.num_val, config, rng)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f"{s}_{k}": getattr(d, k) for s, d in (("train", train), ("val", val))
                         for k in ("images", "boxes", "labels", "mask")})
        tmp.replace(path)
    return train, val
