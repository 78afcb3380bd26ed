"""The paper's classification figures (Fig. 1, 3, 6), in the trainers' one figure style (core.plots).
The tables are core.summary's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from disalign_ops import generalized_reweight

from ..core.plots import figure, save


def _by_size(class_counts) -> np.ndarray:
    return np.argsort(-np.asarray(class_counts), kind="stable")


def _counts_axis(fig: Figure, class_counts, order, ylabel: str = "training images"):
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(order)), np.asarray(class_counts)[order], color="0.85", label="training images")
    _label_classes(ax, order)
    ax.set_ylabel(ylabel)
    return ax, ax.twinx()


def _label_classes(ax, order) -> None:
    ax.set_xlabel("classes sorted by training count" + (" (tick: class index)" if len(order) <= 30 else ""))
    if len(order) <= 30:
        ax.set_xticks(range(len(order)), [str(c) for c in order])


def plot_per_class_accuracy(path: Path, class_counts, accuracies: dict[str, list]) -> None:
    """Fig. 1: per-class test accuracy of each given method, classes sorted by size."""
    order = _by_size(class_counts)
    fig = figure(7, 4)
    _, ax = _counts_axis(fig, class_counts, order)
    for label, per_class in accuracies.items():
        values = np.array([np.nan if v is None else v for v in per_class], dtype=float)[order]
        ax.plot(range(len(order)), values, marker="o", markersize=3, label=label)
    ax.set_ylabel("per-class top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.suptitle("Per-class accuracy (bars: training images per class)")
    save(fig, path)


def plot_reweight_curves(path: Path, class_counts, rhos=(0.0, 0.5, 1.0, 1.2, 1.5, 2.0)) -> None:
    """Fig. 3: class frequency and the generalized re-weight w_c for several rho."""
    order = _by_size(class_counts)
    counts = np.asarray(class_counts, dtype=float)
    fig = figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(order)), (counts / counts.sum())[order], color="0.8")
    _label_classes(ax, order)
    ax.set_ylabel("class frequency r_c (bars)")
    curves = ax.twinx()
    for rho in rhos:
        weights = generalized_reweight(counts.tolist(), rho).numpy()[order]
        curves.plot(range(len(order)), weights, label=f"rho = {rho:g}")
    curves.set_yscale("log")
    curves.set_ylabel("re-weight coefficient w_c (mean 1)")
    curves.legend(loc="upper left")
    fig.suptitle("Generalized re-weighting (eq. 11)")
    save(fig, path)


def plot_calibration(path: Path, class_counts, magnitude, margin) -> None:
    """Fig. 6: learned magnitude and margin of the DisAlign head against class size."""
    order = _by_size(class_counts)
    fig = figure(7, 4)
    _, ax = _counts_axis(fig, class_counts, order)
    ax.plot(range(len(order)), np.asarray(magnitude)[order], marker="o", markersize=3, label="magnitude (init 1)")
    ax.plot(range(len(order)), np.asarray(margin)[order], marker="s", markersize=3, label="margin (init 0)")
    ax.axhline(0.0, color="0.5", linewidth=0.5)
    ax.set_ylabel("learned value")
    ax.legend(loc="upper left")
    fig.suptitle("DisAlign calibration by class size")
    save(fig, path)
