"""The FCOS detector: shapes and named FPN features, NMS, COCO metrics of known cases, a SAM
step, 8 devices == 1 device, and learnability (overfits a batch of real scenes)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftsam_jax
from ftsam_jax import parallel
from ftsam_jax.data.scenes import SceneConfig, make_scenes
from ftsam_jax.detection import level_points
from ftsam_jax.detection.decode import decode_topk, nms
from ftsam_jax.detection.evaluate import SCENE_AREAS, coco_metrics
from ftsam_jax.detection.step import detect_train_step, detection_loss_fn
from ftsam_jax.models.fcos import FCOS
from ftsam_jax.training.step import create_train_state
from tests.conftest import OPTIMIZED


def toy_scenes(n, seed=0, size=64):
    """Scenes of 4 blocky object kinds (a different shape each) on flat backgrounds."""
    objects = np.zeros((4, 28, 28), np.uint8)
    objects[0, 4:24, 10:18] = 255  # tall bar
    objects[1, 10:18, 4:24] = 255  # wide bar
    objects[2, 6:22, 6:22] = 255  # square
    objects[3][np.add.outer(np.arange(28), np.arange(28)) < 28] = 255  # triangle
    bgs = np.random.default_rng(seed).integers(0, 60, (4, 8, 8, 3)).astype(np.uint8)
    cfg = SceneConfig(image_size=size, max_objects=3, min_side=12, small_side=16, max_side=40,
                      small_only=0.0)
    return make_scenes(objects, np.arange(4, dtype=np.int32), bgs, n, cfg,
                       np.random.default_rng(seed))


def test_outputs_and_named_features():
    model = FCOS(num_classes=5, width=8, fpn_channels=16)
    x = jnp.zeros((2, 64, 64, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    out, state = jax.jit(partial(model.apply, mutable=["intermediates"]))(v, x)
    p = len(level_points(64)[0])
    assert out["cls"].shape == (2, p, 5) and out["ltrb"].shape == (2, p, 4)
    assert out["ctr"].shape == (2, p) and (np.asarray(out["ltrb"]) >= 0).all()
    feats = state["intermediates"]
    assert [feats[f"p{k}"][0].shape for k in (3, 4, 5)] == [(2, 8, 8, 16), (2, 4, 4, 16),
                                                             (2, 2, 2, 16)]
    # the 0.01 prior: every class probability starts near 0.01
    assert abs(float(jax.nn.sigmoid(out["cls"]).mean()) - 0.01) < 0.005


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 1, 0])
    b, s, c = nms(boxes, scores, classes, iou=0.5)
    np.testing.assert_array_equal(s, [0.9, 0.7, 0.6])  # the 2nd box (class 0) is suppressed
    np.testing.assert_array_equal(c, [0, 1, 0])
    assert len(nms(boxes, scores, classes, score_threshold=0.75)[0]) == 1


def test_coco_metrics_of_known_cases():
    gt_boxes = [np.array([[10, 10, 50, 50], [60, 60, 70, 70]], float)]
    gt_labels = [np.array([0, 1])]
    perfect = [(gt_boxes[0], np.array([0.9, 0.8]), gt_labels[0])]
    m = coco_metrics(gt_boxes, gt_labels, perfect, 2, area_ranges=SCENE_AREAS)
    assert m["ap"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)
    assert m["ap_s"] == pytest.approx(1.0) and m["ap_l"] == -1.0  # 10x10 small, 40x40 medium
    # a box of IoU 0.64 with the large object: counts at IoU 0.5-0.6, not from 0.65 on
    shifted = [(np.array([[10, 10, 50, 50 + 40 / 0.64 - 40]], float), np.array([0.9]),
                np.array([0]))]
    m = coco_metrics(gt_boxes[:1], [np.array([0, 1])], shifted, 2, area_ranges=SCENE_AREAS)
    assert m["ap50"] == pytest.approx(0.5) and m["ap75"] == pytest.approx(0.0)
    # the wrong class finds nothing
    wrong = [(gt_boxes[0], np.array([0.9, 0.8]), np.array([1, 0]))]
    assert coco_metrics(gt_boxes, gt_labels, wrong, 2)["ap"] == pytest.approx(0.0)


def _setup(tx, data, width=8):
    model = FCOS(num_classes=4, width=width, fpn_channels=16)
    loss_fn = detection_loss_fn(model.apply, 4, data.images.shape[1])
    state = create_train_state(model, tx, jax.random.key(0), data.images.shape[1:])
    batch = {"image": jnp.asarray(data.images), "boxes": jnp.asarray(data.boxes),
             "labels": jnp.asarray(data.labels), "mask": jnp.asarray(data.mask)}
    return model, loss_fn, state, batch


def test_sam_step_and_eight_devices_equal_one():
    data = toy_scenes(8)
    tx = ftsam_jax.sam(optax.sgd(0.01, momentum=0.9), 0.05)
    model, loss_fn, state, batch = _setup(tx, data)
    step = jax.jit(partial(detect_train_step, tx=tx, loss_fn=loss_fn))
    one, m1 = step(state, batch, jax.random.key(0))
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    sharded = jax.device_put(batch, parallel.data_sharding(mesh))
    eight, m8 = step(parallel.replicate(state, mesh), sharded, jax.random.key(0))
    assert np.isfinite(float(m1["loss"])) and float(m1["loss"]) == pytest.approx(
        float(m8["loss"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 one.params, eight.params)


@pytest.mark.slow
def test_overfits_one_batch():
    data = toy_scenes(8)
    tx = optax.adam(3e-3)
    model, loss_fn, state, batch = _setup(tx, data, width=16)
    step = jax.jit(partial(detect_train_step, tx=tx, loss_fn=loss_fn), compiler_options=OPTIMIZED)
    first = None
    for _ in range(300):
        state, m = step(state, batch, jax.random.key(0))
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.3 * first
    out = jax.jit(model.apply)({"params": state.params}, batch["image"])
    boxes, scores, classes = jax.device_get(decode_topk(out, 64))
    dets = [nms(b, s, c) for b, s, c in zip(boxes, scores, classes, strict=True)]
    gt_b = [data.boxes[i][data.mask[i]] for i in range(len(data))]
    gt_l = [data.labels[i][data.mask[i]] for i in range(len(data))]
    metrics = coco_metrics(gt_b, gt_l, dets, 4, area_ranges=SCENE_AREAS)
    assert metrics["ap50"] > 0.8, metrics
