"""A picture of detections: ground truth and each model's boxes on the first scenes of a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_detections"]


def plot_detections(path: Path, data: Any, rows: dict[str, list], *, count: int = 8,
                    min_score: float = 0.3) -> None:
    """Writes a PNG: one row for the ground truth of `data` (`DetectionData`), then one row per
    model of `rows` ({name: per-image (boxes, scores, classes)} in the data's input pixels), its
    boxes of score >= `min_score`, on the first `count` images; colours by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(count, len(data))
    names = ["ground truth", *rows]
    fig, axes = plt.subplots(len(names), k, figsize=(1.6 * k, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for i in range(k):
            ax = axes[r, i]
            ax.imshow(data.images[i])
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "ground truth":
                boxes, classes = data.boxes[i][data.mask[i]], data.labels[i][data.mask[i]]
            else:
                b, s, c = rows[name][i]
                boxes, classes = b[s >= min_score], c[s >= min_score]
            for box, cls in zip(boxes, classes, strict=True):
                ax.add_patch(plt.Rectangle(box[:2], box[2] - box[0], box[3] - box[1],
                                           fill=False, lw=0.8,
                                           color=plt.cm.tab10(int(cls) % 10)))
            if i == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
