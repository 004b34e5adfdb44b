"""coco:DIR: letterboxing, box scaling, category mapping, any image mode, bad data."""

import json

import numpy as np
import pytest
from PIL import Image

from ftsam_jax.data import DataError
from ftsam_jax.data.coco import load_coco, load_coco_split


def write_coco(folder, images, annotations, categories, split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))


@pytest.fixture
def coco_dir(tmp_path):
    folder = tmp_path / "coco"
    (folder / "img").mkdir(parents=True)
    Image.new("L", (80, 40), 200).save(folder / "img" / "a.png")  # grey, wide
    Image.new("RGBA", (30, 60), (10, 20, 30, 255)).save(folder / "img" / "b.png")  # tall
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "img" / "c.jpg")
    images = [{"id": 11, "file_name": "img/a.png", "width": 80, "height": 40},
              {"id": 7, "file_name": "img/b.png", "width": 30, "height": 60}]
    anns = [{"id": 1, "image_id": 11, "category_id": 30, "bbox": [40, 10, 20, 20]},
            {"id": 2, "image_id": 11, "category_id": 5, "bbox": [0, 0, 80, 40]},
            {"id": 3, "image_id": 7, "category_id": 30, "bbox": [5, 5, 10, 50]},
            {"id": 4, "image_id": 7, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 1}]
    cats = [{"id": 30, "name": "cat"}, {"id": 5, "name": "dog"}]
    write_coco(folder, images, anns, cats)
    write_coco(folder, [{"id": 1, "file_name": "img/c.jpg", "width": 64, "height": 64}],
               [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [8, 8, 16, 32]}],
               list(reversed(cats)), split="val")
    return folder


def test_letterbox_boxes_and_categories(coco_dir):
    train, val = load_coco(coco_dir, 64)
    assert train.class_names == ("cat", "dog") and val.class_names == ("cat", "dog")
    assert train.images.shape == (2, 64, 64, 3) and train.boxes.shape == (2, 2, 4)
    # images sorted by id: b (id 7, 30x60 -> scale 64/60) then a (id 11, 80x40 -> 0.8)
    np.testing.assert_allclose(train.scale, [64 / 60, 0.8], rtol=1e-6)
    np.testing.assert_allclose(train.boxes[1, 0], np.array([40, 10, 60, 30]) * 0.8, rtol=1e-6)
    np.testing.assert_array_equal(train.labels[1, :2], [0, 1])  # ids 30, 5 -> classes 0, 1
    assert train.mask.tolist() == [[True, False], [True, True]]  # the crowd box is skipped
    # letterbox: content at the top-left, zero padding below the 64x32 grey image
    assert train.images[1, :32].mean() > 150 and train.images[1, 33:].max() == 0
    # val keeps the training split's category order (its own json lists them reversed)
    assert val.labels[0, 0] == 1 and val.boxes[0, 0].tolist() == [8, 8, 24, 40]


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "train.json").unlink(), "file not found"),
    (lambda d: (d / "train.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "train.json").write_text(json.dumps({"images": []})), "expected lists"),
    (lambda d: _patch(d, lambda j: j.update(categories=[])), "no categories"),
    (lambda d: _patch(d, lambda j: j["annotations"][0].update(bbox=[70, 10, 20, 20])),
     "outside"),
    (lambda d: _patch(d, lambda j: j["annotations"][0].update(bbox=[1, 1, 0, 5])), "empty"),
    (lambda d: _patch(d, lambda j: j["annotations"][0].update(category_id=99)),
     "unknown category"),
    (lambda d: (d / "img" / "a.png").write_bytes(b"not a png"), "unreadable image"),
])
def test_bad_data_is_a_data_error(coco_dir, edit, message):
    edit(coco_dir)
    with pytest.raises(DataError, match=message):
        load_coco_split(coco_dir, "train", 64)


def _patch(folder, change):
    data = json.loads((folder / "train.json").read_text())
    change(data)
    (folder / "train.json").write_text(json.dumps(data))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_coco(tmp_path / "nowhere", 64)
