"""The segmentation figure: test scenes with the most tail pixels, ground truth and predictions
(core.plots style). The tables are core.summary's."""

from __future__ import annotations

import numpy as np
import torch

from ..core.plots import figure, save
from ..scenes import IGNORE_INDEX


@torch.no_grad()
def predict(predictor, images: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([predictor(images[i : i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (tab20 + hsv), grey for ignore."""
    import matplotlib

    colours = [matplotlib.colormaps["tab20"](i % 20)[:3] for i in range(min(num_classes, 20))]
    colours += [matplotlib.colormaps["hsv"](i / max(num_classes - 20, 1))[:3] for i in range(num_classes - 20)]
    table = np.full((256, 3), 128, dtype=np.uint8)
    table[:num_classes] = (np.array(colours) * 255).astype(np.uint8)
    return table


def save_predictions_figure(path, test_set, test_images, predictors, class_names, tail_classes, device, count, title):
    """Rows: test scenes with the most tail pixels; columns: image, ground truth, baseline, DisAlign."""
    from matplotlib.patches import Rectangle

    tail = np.asarray(sorted(tail_classes), dtype=np.int64)
    tail_pixels = np.array([np.isin(s.semantic, tail).sum() for s in test_set.scenes])
    chosen = np.argsort(-tail_pixels, kind="stable")[:count]
    colours = palette(len(class_names))
    shown_methods = tuple(m for m in ("joint", "disalign") if m in predictors)
    predictions = {name: predict(predictors[name], test_images[chosen], device).numpy() for name in shown_methods}
    columns = ["image", "ground truth", *shown_methods]
    fig = figure(2.2 * len(columns), 2.2 * len(chosen), layout=None)
    axes = fig.subplots(len(chosen), len(columns), squeeze=False)
    for row, index in enumerate(chosen):
        panels = [test_set.scenes[index].image, colours[test_set.scenes[index].semantic]]
        panels += [colours[predictions[name][row]] for name in shown_methods]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=9)
    shown = [test_set.scenes[i].semantic.ravel() for i in chosen] + [p.ravel() for p in predictions.values()]
    present = [int(c) for c in np.unique(np.concatenate(shown)) if c != IGNORE_INDEX]
    handles = [Rectangle((0, 0), 1, 1, color=colours[c] / 255) for c in present]
    labels = [class_names[c] + (" (tail)" if c in tail else "") for c in present]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(present) // 3), 1, 1))
    save(fig, path, dpi=110)
