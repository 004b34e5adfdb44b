"""experiments.detect end to end on the smoke preset (real scenes), resume, bad input."""

import json

import pytest

from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.slow  # subprocess runs of the entry points

DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir():
    if not (DATA / "fashion-mnist").is_dir() or not (DATA / "cifar10-subset").is_dir():
        pytest.skip("../shared/data is not present")
    return DATA


# The smoke run, its resume and a committed run going on: in process in
# tests/test_train_and_evaluate.py (nothing there needs a process of its own).


# The bad-input rows of this entry point are in tests/test_bad_input.py (one process).


def test_missing_data_folder_is_one_line(tmp_path):
    proc = run_module("experiments.detect", "--preset=smoke", f"--data_dir={tmp_path / 'no'}",
                      f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "results.json").exists()


def test_coco_folder_end_to_end(tmp_path):
    """A COCO folder (real PNG files, images of three sizes, non-contiguous category ids 3 and
    11) through the student and FGD with IKD (which needs `data/` for its adversarial set)."""
    from PIL import Image

    from tests.test_detector import toy_scenes

    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    cat_ids = (3, 11)
    cats = [{"id": c, "name": f"kind{c}"} for c in cat_ids]
    sizes = [(48, 64), (64, 40), (56, 56)]
    val_ids = set()
    for split, n, seed in (("train", 16, 0), ("val", 8, 1)):
        d = toy_scenes(n, seed=seed, size=64)
        images, anns = [], []
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            image_id = 1000 * (split == "val") + 7 * i + 1
            name = f"images/{split}{i}.png"
            Image.fromarray(d.images[i][:h, :w]).save(folder / name)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for b, c in zip(d.boxes[i][d.mask[i]], d.labels[i][d.mask[i]], strict=True):
                x1, y1, x2, y2 = (float(v) for v in b)
                x2, y2 = min(x2, float(w)), min(y2, float(h))
                if x2 - x1 >= 2 and y2 - y1 >= 2:
                    anns.append({"id": len(anns) + 1, "image_id": image_id,
                                 "category_id": cat_ids[int(c) % 2],
                                 "bbox": [x1, y1, x2 - x1, y2 - y1]})
            if split == "val":
                val_ids.add(image_id)
        (folder / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    work = tmp_path / "w"
    run_module("experiments.detect", f"--dataset=coco:{folder}", "--preset=smoke",
               "--methods=student,fgd_ikd", "--seeds=0", "--batch_size=8",
               f"--workdir={work}")
    res = json.loads((work / "results.json").read_text())
    assert res["config"]["train_images"] == 16 and res["config"]["val_images"] == 8
    assert "COCO's size buckets" in (work / "results.md").read_text()
    assert set(res["students"]) == {"student", "fgd_ikd"}
    keys = {"ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100"}
    for r in [res["teacher"], *res["students"].values()]:
        assert keys <= set(r) and all(-1 <= r[k] <= 1 for k in keys)
    assert (work / "data" / "adversarial.npy").is_file()
    for name in ("teacher", "student", "fgd_ikd"):
        dets = json.loads((work / "detections" / f"{name}.json").read_text())
        assert dets, name
        assert {d["category_id"] for d in dets} <= set(cat_ids)
        assert {d["image_id"] for d in dets} <= val_ids
        for d in dets:
            x, y, w, h = d["bbox"]
            assert w >= 0 and h >= 0 and 0 <= d["score"] <= 1
