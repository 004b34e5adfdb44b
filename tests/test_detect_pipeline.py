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


def test_smoke_run_results_and_rerun(data_dir, tmp_path):
    args = [f"--data_dir={data_dir}", "--preset=smoke", "--methods=student,fgd_ikd",
            "--seeds=0", f"--workdir={tmp_path / 'w'}"]
    out = run_module("experiments.detect", *args).stdout
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    keys = {"ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar100"}
    assert keys <= set(res["teacher"]) and "ap_adv" in res["teacher"]
    assert set(res["students"]) == {"student", "fgd_ikd"}
    for r in res["students"].values():
        assert keys <= set(r) and set(r["std"]) == keys and len(r["per_seed"]) == 1
        assert all(-1 <= r[k] <= 1 for k in keys)
    assert res["students"]["fgd_ikd"]["config"]["alpha_adv"] > 0
    assert "| fgd_ikd |" in out and (tmp_path / "w" / "detections.png").stat().st_size > 0
    assert (tmp_path / "w" / "data" / "adversarial.npy").is_file()
    stages = {json.loads(line)["stage"] for line in
              (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher", "student_student_s0", "student_fgd_ikd_s0"}
    # Rerun: every stage is finished; the same numbers, nothing trained again.
    run_module("experiments.detect", *args)
    again = json.loads((tmp_path / "w" / "results.json").read_text())
    assert again["students"] == res["students"] and again["teacher"] == res["teacher"]


@pytest.mark.parametrize("flag, message", [
    ("--methods=student,magic", "--methods must list"),
    ("--seeds=0,0", "distinct"),
    ("--dataset=voc:/nowhere", "not supported"),
    ("--dataset=coco:/nowhere", "COCO folder not found"),
    ("--batch_size=12", "not divisible"),
    ("--batch_size=1024", "larger than the training set"),
    ("--config.num_val=0", "must be >= 1"),
])
def test_bad_input_is_one_line(tmp_path, flag, message):
    chosen = (["--config=experiments/configs/detect.py:smoke"] if flag.startswith("--config.")
              else ["--preset=smoke"])
    proc = run_module("experiments.detect", *chosen, flag,
                      f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_missing_data_folder_is_one_line(tmp_path):
    proc = run_module("experiments.detect", "--preset=smoke", f"--data_dir={tmp_path / 'no'}",
                      f"--workdir={tmp_path / 'w'}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "results.json").exists()


def test_coco_folder_end_to_end(tmp_path):
    from PIL import Image

    from tests.test_detector import toy_scenes

    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    cats = [{"id": 10 + k, "name": f"kind{k}"} for k in range(4)]
    for split, n, seed in (("train", 16, 0), ("val", 8, 1)):
        d = toy_scenes(n, seed=seed, size=64)
        images, anns = [], []
        for i in range(n):
            name = f"images/{split}{i}.png"
            Image.fromarray(d.images[i][:, :48]).save(folder / name)  # 48x64, non-square
            images.append({"id": i, "file_name": name, "width": 48, "height": 64})
            for b, c in zip(d.boxes[i][d.mask[i]], d.labels[i][d.mask[i]], strict=True):
                x1, y1, x2, y2 = (float(v) for v in b)
                x2 = min(x2, 48.0)
                if x2 - x1 >= 2:
                    anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 10 + int(c),
                                 "bbox": [x1, y1, x2 - x1, y2 - y1]})
        (folder / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
    run_module("experiments.detect", f"--dataset=coco:{folder}", "--preset=smoke",
               "--methods=student", "--seeds=0", "--batch_size=8", f"--workdir={tmp_path / 'w'}")
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["config"]["train_images"] == 16 and res["config"]["val_images"] == 8
    assert "COCO's size buckets" in (tmp_path / "w" / "results.md").read_text()
    assert set(res["students"]) == {"student"}
