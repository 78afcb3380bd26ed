"""Markdown tables (paper Table 1 layout) and the paper's classification figures (Fig. 1, 3, 6).

Figures are drawn on `matplotlib.figure.Figure` directly: no pyplot state, no display needed.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from disalign_ops import generalized_reweight

from .metrics import GROUPS

COLUMNS = ("all",) + GROUPS


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_table(metrics: dict, methods) -> str:
    """One row per method: All, Many, Medium, Few in percent."""
    lines = ["| Method | Align type | All | Many | Medium | Few |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for method in methods:
        row = metrics[method.key]
        lines.append(f"| {method.title} | {method.align} | " + " | ".join(_percent(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def seeds_table(per_seed: dict[int, dict], methods) -> str:
    """Mean +- standard deviation over seeds, one row per method."""
    lines = ["| Method | All | Many | Medium | Few |", "| --- | ---: | ---: | ---: | ---: |"]
    for method in methods:
        cells = []
        for column in COLUMNS:
            values = [m[method.key][column] for m in per_seed.values() if m[method.key][column] is not None]
            if not values:
                cells.append("-")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}")
        lines.append(f"| {method.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_comparison(per_seed: dict[int, dict], baseline: str = "joint", method: str = "disalign") -> tuple[str, bool]:
    """Per seed, DisAlign vs Joint on the class-balanced average and on Few; and whether it wins on both, every seed."""
    lines = [
        "| Seed | Joint all | DisAlign all | Joint few | DisAlign few | DisAlign better on all and few |",
        "| ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    every_seed = True
    for seed, m in per_seed.items():
        a, b = m[baseline], m[method]
        wins = b["all"] > a["all"] and b["few"] > a["few"]
        every_seed &= wins
        cells = [_percent(a["all"]), _percent(b["all"]), _percent(a["few"]), _percent(b["few"]), "yes" if wins else "no"]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines), every_seed


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
    fig = Figure(figsize=(7, 4), layout="constrained")
    _, ax = _counts_axis(fig, class_counts, order)
    for label, per_class in accuracies.items():
        values = np.array([np.nan if v is None else v for v in per_class], dtype=float)[order]
        ax.plot(range(len(order)), values, marker="o", markersize=3, label=label)
    ax.set_ylabel("per-class top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.suptitle("Per-class accuracy (bars: training images per class)")
    fig.savefig(path, dpi=120)


def plot_reweight_curves(path: Path, class_counts, rhos=(0.0, 0.5, 1.0, 1.2, 1.5, 2.0)) -> None:
    """Fig. 3: class frequency and the generalized re-weight w_c for several rho."""
    order = _by_size(class_counts)
    counts = np.asarray(class_counts, dtype=float)
    fig = Figure(figsize=(7, 4), layout="constrained")
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
    fig.savefig(path, dpi=120)


def plot_calibration(path: Path, class_counts, magnitude, margin) -> None:
    """Fig. 6: learned magnitude and margin of the DisAlign head against class size."""
    order = _by_size(class_counts)
    fig = Figure(figsize=(7, 4), layout="constrained")
    _, ax = _counts_axis(fig, class_counts, order)
    ax.plot(range(len(order)), np.asarray(magnitude)[order], marker="o", markersize=3, label="magnitude (init 1)")
    ax.plot(range(len(order)), np.asarray(margin)[order], marker="s", markersize=3, label="margin (init 0)")
    ax.axhline(0.0, color="0.5", linewidth=0.5)
    ax.set_ylabel("learned value")
    ax.legend(loc="upper left")
    fig.suptitle("DisAlign calibration by class size")
    fig.savefig(path, dpi=120)
