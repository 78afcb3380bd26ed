"""The figures' one style: `matplotlib.figure.Figure` drawn directly (no pyplot state, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def figure(width: float, height: float, **kwargs) -> Figure:
    kwargs.setdefault("layout", "constrained")
    return Figure(figsize=(width, height), **kwargs)


def save(fig: Figure, path: str | Path, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)


def plot_group_metrics(path: Path, methods: dict, metric: str, groups: list[str], label: str, title: str) -> None:
    """Bars of ``metric`` overall and per group (``<group>_<metric>``) for every method, std over seeds as error bars."""
    columns = [metric] + [f"{g}_{metric}" for g in groups]
    names = ["all", *groups]
    fig = figure(max(6.0, 1.2 * len(columns) * max(1, len(methods)) / 3), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for k, (key, entry) in enumerate(methods.items()):
        values = np.array([np.nan if entry[c] is None else 100 * entry[c] for c in columns])
        errors = np.array([0.0 if entry["std"][c] is None else 100 * entry["std"][c] for c in columns])
        ax.bar(np.arange(len(columns)) + (k - (len(methods) - 1) / 2) * width, values, width, yerr=errors,
               label=entry["title"], capsize=2)
    ax.set_xticks(range(len(columns)), names)
    ax.set_ylabel(f"{label} (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    save(fig, path)
