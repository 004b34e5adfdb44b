"""experiments.report's BENCHMARKS.md blocks (experiments/report_bench.py) on a benchmark
sitting's raw JSON written by the test, as experiments/studies/bench_cpu.sh lays it out."""

import json

import pytest

from experiments import report, report_bench
from experiments.cli import InputError
from tests.conftest import ROOT


def _bench(path, rows, width=16):
    path.write_text(json.dumps({"device": "cpu", "platform": "cpu", "devices": 1, "jax": "0.10.2",
                                "width": width, "rows": rows}))


def _steps(scale, compile_s=2.0):
    return [{"row": "train_step", "compile_s": compile_s, "ms_per_call": 1e3 * 128 / (100 * scale),
             "img_per_s": 100.0 * scale},
            {"row": "sam_step", "compile_s": 2 * compile_s, "ms_per_call": 1e3 * 128 / (50 * scale),
             "img_per_s": 50.0 * scale},
            {"row": "eval_step", "compile_s": 0.5, "ms_per_call": 1e3 * 128 / (400 * scale),
             "img_per_s": 400.0 * scale}]


def fake_sitting(folder):
    """Two rounds at width 16, one at 64 (JAX 1.5x before, PyTorch 1.25x before), the epoch
    and detection rows, the stages before / after and env.json."""
    folder.mkdir(parents=True)
    for width, rounds, base in ((16, 2, 1.0), (64, 1, 0.1)):
        for r in range(1, rounds + 1):
            jitter = 1 + 0.1 * (r - 1)
            _bench(folder / f"w{width}_r{r}_jax.json", _steps(1.5 * base * jitter), width)
            _bench(folder / f"w{width}_r{r}_jax_before.json",
                   _steps(base * jitter, compile_s=3.0), width)
            (folder / f"w{width}_r{r}_torch.json").write_text(json.dumps(
                {"torch": "2.13.0+cpu", "threads": 2, "width": width,
                 "rows": [{k: v for k, v in x.items() if k != "compile_s"}
                          for x in _steps(1.25 * base * jitter)]}))
    for name, per in (("jax", 10_000.0), ("jax_before", 16_000.0)):
        _bench(folder / f"ftsam_epoch_w16_{name}.json", [
            {"row": "ftsam_epoch", "compile_s": 20.0, "ms_per_call": per,
             "img_per_s": 2560 / per * 1e3, "steps_per_epoch": 10, "mode": "python loop",
             "est_seconds_for_epochs": round(20 + per / 1e3 * 99, 1), "epochs": 100,
             "examples": 2500, "batch_size": 256}])
    _bench(folder / "detect.json", [
        {"row": "detect_train_step", "compile_s": 7.0, "ms_per_call": 160.0, "img_per_s": 200.0,
         "image_size": 128, "batch_size": 32}])
    for variant, scale in (("before", 1.5), ("after", 1.0)):
        (folder / "stages" / variant).mkdir(parents=True)
        lines = []
        for stage, secs in (("backdoored", (14.0, 12.0, 14.0)), ("ftsam", (5.0, 1.2, 2.2))):
            for epoch, s in enumerate(secs, 1):
                rec = {"stage": stage, "epoch": epoch, "seconds": s * scale}
                if epoch == 3:
                    rec["clean_acc"] = 0.5
                lines.append(json.dumps(rec))
        (folder / "stages" / variant / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "env.json").write_text(json.dumps({
        "date": "2026-12-06T23:00:00+00:00", "wall_s": 900, "commit": "abcdef0123", "dirty": False,
        "machine": {"cpu_model": "AMD EPYC", "nproc": 2, "hypervisor": "KVM", "mem_gib": 23.5,
                    "load_end": "1.00 1.00 1.00"},
        "versions": {"python": "3.11.7", "jax": "0.10.2", "jaxlib": "0.10.2", "numpy": "2.4.6",
                     "torch": "2.13.0+cpu", "jax_devices": ["cpu:0"]},
        "commands": [{"output": "w16_r1_jax.json", "load_before": "0.10 0.20 0.30",
                      "command": "python -m experiments.bench"}]}))


@pytest.fixture
def results(tmp_path, monkeypatch):
    results = tmp_path / "results"
    folder = "bench_cpu_test"
    fake_sitting(results / folder)
    for name in ("env", "vs_torch", "compile", "ftsam_epoch", "detect", "stages"):
        monkeypatch.setitem(report.BLOCKS, f"bench_cpu_{name}",
                            getattr(report_bench, f"bench_cpu_{name}")(folder))
    return results


def test_cpu_sitting_tables(results):
    vs = report.BLOCKS["bench_cpu_vs_torch"](results)
    assert "| 16 | train_step | 150.0 / 165.0 | 125.0 / 137.5 | 100.0 / 110.0 | 1.20 / 1.20 | " \
           "0.80 / 0.80 | 1.50 / 1.50 |" in vs
    assert "| 64 | sam_step | 7.5 | 6.2 | 5.0 | 1.20 | 0.80 | 1.50 |" in vs
    assert "(round 1 / round 2)" in vs
    comp = report.BLOCKS["bench_cpu_compile"](results)
    assert "| 16 | train_step | 2.00 / 2.00 | 3.00 / 3.00 | 1.50 |" in comp
    epoch = report.BLOCKS["bench_cpu_ftsam_epoch"](results)
    assert "| JAX | 20.00 | 10.00 | 256.0 | 1,010 s (16.8 min) |" in epoch
    assert "| JAX before | 20.00 | 16.00 | 160.0 | 1,604 s (26.7 min) |" in epoch
    # width 64 sam_step: 50 * 0.15 img/s = 17.07 s per call of 128; 2,000 calls.
    prose = " ".join(epoch.split())  # the paragraphs are wrapped
    assert "(17.07 s per call of batch 128, mean over the rounds)" in prose
    assert "2,000 calls ~ 9.5 hours (an estimate from the step row, not a run)" in prose
    detect = report.BLOCKS["bench_cpu_detect"](results)
    assert "| detect_train_step | 7.00 | 160.0 | 200.0 | 128, 32 |" in detect
    stages = report.BLOCKS["bench_cpu_stages"](results)
    assert "| backdoored, before | 21.0 | 18.0 | 21.0 | 60.0 s |" in stages
    assert "| ftsam, now | 5.0 | 1.2 | 2.2 | 8.4 s |" in stages
    assert "before / now: backdoored 1.50x, ftsam 1.50x." in " ".join(stages.split())
    env = " ".join(report.BLOCKS["bench_cpu_env"](results).split())
    assert "at commit abcdef0, 900 s in all: AMD EPYC, 2 cores (KVM), 23.5 GiB" in env
    assert "PyTorch 2.13.0+cpu (2 threads)" in env and "0.10 0.20 0.30 at the start" in env


def test_benchmarks_document_check_and_write(results, tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\n<!-- report:bench_cpu_vs_torch -->\nold\n"
                   "<!-- /report:bench_cpu_vs_torch -->\n\nText 1.0\n"
                   "<!-- report:bench_cpu_stages -->\n<!-- /report:bench_cpu_stages -->\n")
    assert report.check(doc, results)
    doc.write_text(report.render(doc.read_text(), results))
    assert report.check(doc, results) == []
    assert "| 16 | eval_step | 600.0 / 660.0 |" in doc.read_text()
    assert "\n\nText 1.0\n<!-- report:bench_cpu_stages -->\n| stage |" in doc.read_text()
    (results / "bench_cpu_test" / "w16_r2_torch.json").unlink()  # a round incomplete
    with pytest.raises(InputError, match="width 16 round 2 lacks \\['torch'\\]"):
        report.check(doc, results)
    (results / "bench_cpu_test" / "detect.json").write_text("{trunc")
    with pytest.raises(InputError, match="detect.json is not JSON"):
        report.BLOCKS["bench_cpu_detect"](results)


def test_both_documents_are_checked_and_the_prepared_section_names_known_blocks():
    assert report.DOCUMENTS == ("REPRODUCTION.md", "BENCHMARKS.md")
    assert "<!-- report:bench_gpu_vs_torch -->" in (ROOT / "BENCHMARKS.md").read_text()
    section = ROOT / "experiments" / "studies" / "bench_cpu_section.md"
    if section.is_file():  # until the CPU sitting is committed and the section inserted
        found = {m.group("name") for m in report.MARKER.finditer(section.read_text())}
        assert found and found <= set(report.BLOCKS)
