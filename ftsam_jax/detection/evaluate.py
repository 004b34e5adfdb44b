"""COCO detection metrics with the official COCO API (pycocotools' COCOeval), and the evaluator
of a detector's params on a split (`DetectionEvaluator`: device top-k, host NMS).

AP@[.5:.95], AP50, AP75, AP_S, AP_M, AP_L and AR@100 as COCOeval computes them. The size buckets
are COCO's (small < 32^2 <= medium < 96^2 px of box area) unless `area_ranges` says otherwise:
`SCENE_AREAS` (small < 16^2 <= medium < 48^2) for the 128 px `scenes:` canvas, the same share of
the image side as COCO's buckets at ~640 px.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["COCO_AREAS", "KEYS", "SCENE_AREAS", "DetectionEvaluator", "coco_metrics",
           "coco_results"]

COCO_AREAS = (32.0**2, 96.0**2)
SCENE_AREAS = (16.0**2, 48.0**2)
KEYS = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100")


def coco_results(detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """Per-image detections (boxes (n, 4) x1y1x2y2 in the source's pixels, scores, classes) in
    COCO's result format: `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` with the
    source's image and category ids (what `COCO.loadRes` and leaderboards read)."""
    out = []
    for image_id, (boxes, scores, classes) in zip(image_ids, detections, strict=True):
        for b, s, c in zip(np.asarray(boxes, float), np.asarray(scores, float),
                           np.asarray(classes), strict=True):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(c)]),
                        "bbox": [round(float(v), 2) for v in (b[0], b[1], b[2] - b[0],
                                                               b[3] - b[1])],
                        "score": round(float(s), 5)})
    return out


def coco_metrics(gt_boxes: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray],
                 detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 num_classes: int, *, area_ranges: tuple[float, float] = COCO_AREAS
                 ) -> dict[str, float]:
    """Metrics (fractions in [0, 1]; -1 where COCOeval has nothing to average, e.g. no small
    objects) of per-image detections (boxes (n, 4) x1y1x2y2, scores (n,), classes (n,))
    against per-image ground truth (boxes (m, 4) x1y1x2y2, labels (m,))."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        images.append({"id": i})
        for b, c in zip(np.asarray(boxes, float), np.asarray(labels), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c),
                                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    for i, (boxes, scores, classes) in enumerate(detections):
        for b, s, c in zip(np.asarray(boxes, float), np.asarray(scores, float),
                           np.asarray(classes), strict=True):
            results.append({"image_id": i, "category_id": int(c), "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    if not annotations:
        raise ValueError("no ground-truth boxes to evaluate against")
    with contextlib.redirect_stdout(io.StringIO()):  # COCO's API prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k} for k in range(num_classes)]}
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {"images": images, "annotations": [], "categories":
                          gt.dataset["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        small, medium = area_ranges
        ev.params.areaRng = [[0, 1e10], [0, small], [small, medium], [medium, 1e10]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats  # AP, AP50, AP75, AP_S, AP_M, AP_L, AR1, AR10, AR100, AR_S, AR_M, AR_L
    return {k: float(v) for k, v in zip(KEYS, (*stats[:6], stats[8]), strict=True)}


Detections = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class DetectionEvaluator:
    """COCO metrics of a detector's params on a split (`DetectionData`): the model's top-k
    decoding compiled once over the mesh, NMS on the host, metrics in the data's own pixels
    (`coco:` data: original images and COCO's size buckets; scenes: the canvas and
    `SCENE_AREAS`)."""

    def __init__(self, model: Any, data: Any, mesh: Any, batch_size: int) -> None:
        from ftsam_jax import parallel, xla
        from ftsam_jax.detection.decode import decode_topk

        self.data, self.mesh, self.batch_size = data, mesh, batch_size
        self._replicated = parallel.replicated(mesh)
        self._sharded = parallel.data_sharding(mesh)
        size = data.images.shape[1]
        self._decode = xla.jit(lambda p, x: decode_topk(model.apply({"params": p}, x), size))

    def detections(self, params: Any, images: np.ndarray) -> Detections:
        """Per-image (boxes x1y1x2y2 in input pixels, scores, classes) after NMS."""
        from ftsam_jax.detection.decode import nms

        dets, n, bs = [], len(images), self.batch_size
        params = jax.device_put(params, self._replicated)
        for start in range(0, n, bs):
            x = images[start:start + bs]
            if len(x) < bs:
                x = np.concatenate([x, np.zeros((bs - len(x), *x.shape[1:]), x.dtype)])
            boxes, scores, classes = jax.device_get(
                self._decode(params, jax.device_put(x, self._sharded)))
            dets += [nms(b, s, c) for b, s, c in zip(boxes, scores, classes, strict=True)]
        return dets[:n]

    def __call__(self, params: Any, images: np.ndarray | None = None) -> dict[str, float]:
        """The metrics of `params` on the split (or on `images` in its place, e.g. adversarial
        versions, against the split's boxes)."""
        return self.evaluate(params, images)[0]

    def evaluate(self, params: Any, images: np.ndarray | None = None
                 ) -> tuple[dict[str, float], Detections]:
        """The metrics and the per-image detections, both in the data's own pixels."""
        d = self.data
        dets = self.detections(params, d.images if images is None else images)
        s = np.ones(len(d), np.float32) if d.scale is None else d.scale
        dets = [(b / s[i], sc, c) for i, (b, sc, c) in enumerate(dets)]
        return coco_metrics([d.boxes[i][d.mask[i]] / s[i] for i in range(len(d))],
                            [d.labels[i][d.mask[i]] for i in range(len(d))], dets,
                            len(d.class_names),
                            area_ranges=SCENE_AREAS if d.scale is None else COCO_AREAS), dets
