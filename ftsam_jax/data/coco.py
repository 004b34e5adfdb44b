"""`coco:DIR`: any COCO-format detection data set, letterboxed to a square model input.

DIR holds `train.json` and `val.json` in COCO's "instances" format (`images` with `id`,
`file_name` relative to DIR, `width`, `height`; `annotations` with `image_id`, `category_id`,
`bbox` = [x, y, w, h] in pixels, optional `iscrowd`; `categories` with `id` and `name`).
Images of any size and mode (grey, RGB, RGBA, palette) are read with Pillow, converted to RGB,
resized so that the longer side is `image_size` (aspect kept, bilinear) and padded at the
bottom/right: boxes scale by the same factor, `DetectionData.scale` keeps it, so detections map
back to original pixels for evaluation (divide by it). Category ids of any value map to
contiguous classes in the order of `categories`. Crowd annotations are skipped. Anything
malformed (a missing folder or file, bad JSON, a box outside its image or with w/h <= 0, an
unreadable image, no categories) is a `DataError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ftsam_jax.data.datasets import DataError
from ftsam_jax.data.scenes import DetectionData

__all__ = ["load_coco_split", "load_coco"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{path}: expected lists 'images', 'annotations' and 'categories'")
    return data


def _letterbox(path: Path, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            canvas = np.zeros((size, size, 3), np.uint8)
            canvas[:nh, :nw] = np.asarray(im)
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable image {path} ({e})") from None
    return canvas, scale, (w, h)


def load_coco_split(folder: str | Path, split: str, image_size: int,
                    max_objects: int | None = None,
                    categories: list[dict[str, Any]] | None = None) -> DetectionData:
    """One split (`train` or `val`) as letterboxed arrays; `categories` fixes the class order
    (default: this split's)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"COCO folder not found: {folder}")
    path = folder / f"{split}.json"
    data = _read_json(path)
    cats = categories if categories is not None else data["categories"]
    if not cats:
        raise DataError(f"{path}: no categories")
    try:
        class_of = {int(c["id"]): k for k, c in enumerate(cats)}
        names = tuple(str(c.get("name", c["id"])) for c in cats)
        images = {int(im["id"]): im for im in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed categories or images ({e})") from None
    if not images:
        raise DataError(f"{path}: no images")
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        try:
            image_id, box, cat = int(ann["image_id"]), [float(v) for v in ann["bbox"]], \
                int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed annotation {ann!r} ({e})") from None
        if ann.get("iscrowd", 0):
            continue
        if image_id not in images:
            raise DataError(f"{path}: annotation for unknown image id {image_id}")
        if cat not in class_of:
            raise DataError(f"{path}: annotation with unknown category id {cat}")
        im = images[image_id]
        x, y, w, h = box
        if len(box) != 4 or w <= 0 or h <= 0 or x < 0 or y < 0 or \
                x + w > float(im.get("width", np.inf)) + 1e-6 or \
                y + h > float(im.get("height", np.inf)) + 1e-6:
            raise DataError(f"{path}: box {box} of image {image_id} is empty or outside the "
                            f"image ({im.get('width')}x{im.get('height')})")
        per_image[image_id].append((box, class_of[cat]))
    m = max_objects or max([1, *(len(v) for v in per_image.values())])
    ids = sorted(images)
    out_img = np.zeros((len(ids), image_size, image_size, 3), np.uint8)
    boxes = np.zeros((len(ids), m, 4), np.float32)
    labels = np.zeros((len(ids), m), np.int32)
    mask = np.zeros((len(ids), m), bool)
    scales = np.zeros((len(ids),), np.float32)
    for n, image_id in enumerate(ids):
        file_name = images[image_id].get("file_name")
        if not file_name:
            raise DataError(f"{path}: image {image_id} has no file_name")
        if not (folder / file_name).is_file():
            raise DataError(f"{path}: image file {folder / file_name} of image {image_id} not "
                            "found")
        out_img[n], scales[n], (w, h) = _letterbox(folder / file_name, image_size)
        for j, (box, cls) in enumerate(per_image[image_id][:m]):
            x, y, bw, bh = box
            if x + bw > w + 1e-6 or y + bh > h + 1e-6:
                raise DataError(f"{path}: box {box} lies outside {file_name} ({w}x{h})")
            boxes[n, j] = np.array([x, y, x + bw, y + bh]) * scales[n]
            labels[n, j], mask[n, j] = cls, True
    return DetectionData(out_img, boxes, labels, mask, names, scale=scales,
                         image_ids=np.asarray(ids, np.int64),
                         category_ids=tuple(class_of))


def load_coco(folder: str | Path, image_size: int) -> tuple[DetectionData, DetectionData]:
    """(train, val) of `coco:DIR`, with the training split's category order for both."""
    folder = Path(folder)
    train = load_coco_split(folder, "train", image_size)
    cats = _read_json(folder / "train.json")["categories"]
    val = load_coco_split(folder, "val", image_size, categories=cats)
    for split, data in (("train", train), ("val", val)):
        if not data.mask.any():
            raise DataError(f"{folder / (split + '.json')}: no (non-crowd) boxes to "
                            f"{'train on' if split == 'train' else 'evaluate against'}")
    return train, val
