"""The detection figure: test scenes with the most rare-category instances, ground truth and the
detections of two methods (core.plots style). The tables are core.summary's."""

from __future__ import annotations

from pathlib import Path

from matplotlib.patches import Rectangle

from ..core.plots import figure, save

GROUP_COLOURS = {"rare": "#d62728", "common": "#ff7f0e", "frequent": "#2ca02c"}


def draw_detections(path: Path, test, group_of: list[str], detections: dict, count: int, threshold: float) -> None:
    """Rows: test scenes with the most rare-category instances; columns: ground truth, then each method of
    ``detections`` ({title: [(image index, boxes, scores, labels)]}) with score >= threshold."""
    rare_instances = [sum(group_of[label] == "rare" for label in labels.tolist()) for labels in test.labels]
    chosen = sorted(range(len(test)), key=lambda i: (-rare_instances[i], i))[:count]
    panels = [("ground truth", None), *detections.items()]
    by_image = {name: {d[0]: d for d in dets} for name, dets in panels if dets is not None}
    fig = figure(3.2 * len(panels), 3.2 * len(chosen))
    axes = fig.subplots(len(chosen), len(panels), squeeze=False)
    for row, i in enumerate(chosen):
        for col, (title, dets) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(test.images[i].permute(1, 2, 0).numpy())
            ax.set_axis_off()
            if dets is None:
                boxes, labels, scores = test.boxes[i], test.labels[i], [None] * len(test.labels[i])
            else:
                _, boxes, all_scores, labels = by_image[title][i]
                keep = all_scores >= threshold
                boxes, labels, scores = boxes[keep], labels[keep], all_scores[keep].tolist()
            for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores):
                colour = GROUP_COLOURS[group_of[label]]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
                text = test.class_names[label] + ("" if score is None else f" {score:.2f}")
                ax.text(x0 - 0.5, y0 - 1, text, color="white", fontsize=5.5, va="bottom",
                        bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, lw=0))
            if row == 0:
                ax.set_title(title)
    fig.suptitle(f"boxes: rare red, common orange, frequent green; detections with score >= {threshold}", fontsize=9)
    save(fig, path, dpi=110)
