"""metrics.jsonl and the TensorBoard event files written beside it (also across a resume)."""

import struct

from tensorboardX.proto import event_pb2

from experiments.workdir import MetricsLog


def read_scalars(folder):
    """(tag, step, value) of every scalar in the event files under `folder`."""
    out = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return sorted(out)


def test_scalars_per_stage_and_no_duplicates_after_resume(tmp_path):
    rec = lambda e: {"stage": "ft", "epoch": e, "loss": 1.0 / e, "seconds": 0.5, "note": "x"}
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log("ft", [rec(1)])
    log("ft", [rec(1), rec(2)])
    log.close()
    # a resumed process: restores the history and continues with epoch 3
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log("ft", [rec(1), rec(2), rec(3)])
    log("backdoored", [{"stage": "backdoored", "epoch": 1, "accuracy": 0.25}])
    log.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    ft = read_scalars(tmp_path / "tb" / "ft")
    assert [(t, s) for t, s, _ in ft if t == "loss"] == [("loss", 1), ("loss", 2), ("loss", 3)]
    assert {t for t, _, _ in ft} == {"loss", "seconds"}  # strings are not scalars
    assert read_scalars(tmp_path / "tb" / "backdoored") == [("accuracy", 1, 0.25)]
