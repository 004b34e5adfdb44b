"""experiments.table's comparison with the paper: the transcribed Table 1 and its layout."""

from pathlib import Path

import pytest

from experiments.paper import TABLE1
from experiments.table_render import paper_cells, paper_markdown

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ftsam-paper.md"
COLUMNS = ["none", "ft", "fp", "nad", "ac", "nc", "anp", "abl", "ibau", "ftsam"]
ROWS = {"badnets": "BadNets-A2O", "badnets_a2a": "BadNets-A2A", "blended": "Blended",
        "input_aware": "Input-aware", "lf": "LF", "sig": "SIG", "wanet": "WaNet"}


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference not beside the repo")
def test_transcription_matches_the_reference_notes():
    section = REFERENCE.read_text().split("### Table 1")[1].split("###")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(COLUMNS) + 1:
            rows[cells[0]] = cells[1:]
    for attack, name in ROWS.items():
        for column, values in TABLE1[attack].items():
            published = tuple(float(v) for v in rows[name][COLUMNS.index(column)].split("/"))
            assert values == published, (attack, column)


def test_paper_cells_and_markdown():
    assert paper_cells("npz:/x.npz", ["badnets"], ["ft"]) == {}
    paper = paper_cells("cifar10", ["badnets", "blended"], ["ftsam", "clp"])
    assert paper["badnets"] == {"none": [91.82, 93.79], "ftsam": [92.21, 1.63, 96.08]}
    text = paper_markdown(paper, ["badnets", "blended"], ["ftsam", "clp"])
    lines = text.splitlines()
    assert lines[-3] == "| badnets | 91.82 / 93.79 | 92.21 / 1.63 / 96.08 | n/a |"
    # Average: mean C-Acc / ASR over the two attacks, DER from those means (the paper's way):
    # (max(0, 95.75 - 3.27) - max(0, 92.63 - 92.325) + 100) / 2 = 96.09 (92.325 prints as 92.32)
    assert lines[-1] == "| Average | 92.63 / 95.75 | 92.32 / 3.27 / 96.09 | n/a |"
