"""scenes:fashion_mnist: real objects on real backgrounds, boxes, determinism, cache, bad files."""

import gzip

import numpy as np
import pytest

from ftsam_jax.data import DataError
from ftsam_jax.data.scenes import (
    SceneConfig,
    box_iou,
    load_fashion_mnist,
    make_scenes,
    read_idx,
    resize_bilinear,
    scenes_fashion_mnist,
)
from tests.conftest import ROOT

FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"
SMALL = SceneConfig(num_train=120, num_val=40, seed=3)


@pytest.fixture(scope="module")
def scenes(cifar_dir):
    if not FASHION.is_dir():
        pytest.skip("../shared/data/fashion-mnist is not present")
    return scenes_fashion_mnist(FASHION, cifar_dir, SMALL)


def test_official_files_read():
    if not FASHION.is_dir():
        pytest.skip("../shared/data/fashion-mnist is not present")
    x, y = load_fashion_mnist(FASHION, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10


def test_boxes_labels_and_layout(scenes):
    train, val = scenes
    assert train.images.shape == (120, 128, 128, 3) and val.images.shape == (40, 128, 128, 3)
    for d in (train, val):
        counts = d.mask.sum(1)
        assert counts.min() >= 1 and counts.max() <= 8
        b = d.boxes[d.mask]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 128).all()
        assert (b[:, 2:] - b[:, :2] >= 1).all()
        assert ((d.labels[d.mask] >= 0) & (d.labels[d.mask] < 10)).all()
        assert (d.boxes[~d.mask] == 0).all() and (d.labels[~d.mask] == 0).all()
        for i in range(len(d)):
            bi = d.boxes[i][d.mask[i]]
            iou = box_iou(bi, bi) - np.eye(len(bi))
            assert iou.max(initial=0) < SMALL.max_iou
            sides = (bi[:, 2:] - bi[:, :2]).max(1)
            assert sides.max() <= SMALL.max_side + 1 and sides.min() >= 1
    # about 30% of the scenes hold small objects only (every box below 16 px)
    small = [(train.boxes[i][train.mask[i], 2:] - train.boxes[i][train.mask[i], :2]).max() < 16
             for i in range(len(train))]
    assert 0.15 < np.mean(small) < 0.5


def test_objects_are_visible_in_their_boxes(scenes):
    train, _ = scenes
    # the pasted object changes the pixels of its box: their spread exceeds a flat patch's
    i, j = np.argwhere(train.mask & ((train.boxes[..., 2] - train.boxes[..., 0]) > 30))[0]
    x1, y1, x2, y2 = train.boxes[i, j].astype(int)
    assert train.images[i, y1:y2, x1:x2].std() > 10


def test_same_seed_same_bytes_and_cache(cifar_dir, tmp_path, scenes):
    if not FASHION.is_dir():
        pytest.skip("../shared/data/fashion-mnist is not present")
    cfg = SceneConfig(num_train=20, num_val=10, seed=5)
    a_tr, a_val = scenes_fashion_mnist(FASHION, cifar_dir, cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("scenes-*.npz"))) == 1
    b_tr, b_val = scenes_fashion_mnist(FASHION, cifar_dir, cfg, cache_dir=tmp_path)  # cached
    c_tr, _ = scenes_fashion_mnist(FASHION, cifar_dir, cfg)  # generated again
    for x, y in ((a_tr, b_tr), (a_val, b_val), (a_tr, c_tr)):
        assert x.images.tobytes() == y.images.tobytes() and x.boxes.tobytes() == y.boxes.tobytes()
        np.testing.assert_array_equal(x.labels, y.labels)
    other, _ = scenes_fashion_mnist(FASHION, cifar_dir, SceneConfig(num_train=20, num_val=10,
                                                                    seed=6))
    assert other.images.tobytes() != a_tr.images.tobytes()


def test_heldout_split_is_new_scenes_of_the_training_distribution(cifar_dir, tmp_path):
    if not FASHION.is_dir():
        pytest.skip("../shared/data/fashion-mnist is not present")
    cfg = SceneConfig(num_train=20, num_val=10, seed=5)
    tr, val = scenes_fashion_mnist(FASHION, cifar_dir, cfg, cache_dir=tmp_path)
    h_tr, held = scenes_fashion_mnist(FASHION, cifar_dir, cfg, cache_dir=tmp_path, heldout=True)
    assert len(list(tmp_path.glob("scenes-*.npz"))) == 2  # its own cache file
    assert h_tr.images.tobytes() == tr.images.tobytes()  # the same training scenes
    assert len(held) == 10 and held.images.tobytes() != val.images.tobytes()
    assert not any(np.array_equal(h, t) for h in held.images for t in tr.images)
    again = scenes_fashion_mnist(FASHION, cifar_dir, cfg, heldout=True)[1]
    assert again.images.tobytes() == held.images.tobytes()


def test_scenes_draw_only_from_the_given_pools():
    rng = np.random.default_rng(0)
    objects = np.zeros((4, 28, 28), np.uint8)
    objects[:, 8:20, 10:18] = 200
    labels = np.array([7, 7, 7, 7], np.int32)
    bgs = np.full((2, 32, 32, 3), 10, np.uint8)
    d = make_scenes(objects, labels, bgs, 30, SceneConfig(), rng)
    assert set(d.labels[d.mask].tolist()) == {7}
    # the tight crop of a 12x8 object keeps its aspect ratio (1.5) after resizing
    wh = d.boxes[d.mask][:, 2:] - d.boxes[d.mask][:, :2]
    big = wh.max(1) >= 40
    np.testing.assert_allclose((wh[big, 1] / wh[big, 0]), 1.5, rtol=0.1)


def test_resize_bilinear_keeps_constants_and_box_iou():
    np.testing.assert_allclose(resize_bilinear(np.full((5, 7), 3.0), 11, 4), 3.0, rtol=1e-6)
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0.0]])


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"not gzip", "not a readable gzip"),
    (gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8, mtime=0), "not an IDX file"),
    (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abc", mtime=0), "data bytes"),
], ids=["missing", "not-gzip", "not-idx", "short"])
def test_malformed_idx_is_a_data_error(tmp_path, content, message):
    path = tmp_path / "x.gz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(path)
