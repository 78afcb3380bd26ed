"""The metrics schema of every task and the summaries over seeds.

``metrics.json`` (top level of --out)::

    {"task": "classify" | "segment" | "detect",
     "groups": {group: [class names]}, "group_rule": "paper" | "terciles", "group_rule_text": ...,
     "seeds": [...],
     "methods": {name: {"title": ..., metric: mean in [0, 1], ..., "std": {metric: std},
                        "per_seed": [{"seed": s, metric: value, ...}]}}}

Metrics are flat names: the overall metric (``acc``, ``miou``, ``ap``) and each group's as
``<group>_<metric>`` (``few_acc``, ``tail_miou``, ``rare_ap``). The tail metric of a task is its
last group's main metric. Each seed's folder holds the same schema for that seed alone, plus
per-class values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import runtime


def flat_metrics(overall: dict[str, float | None], grouped: dict[str, dict[str, float | None]]) -> dict:
    """``{"miou": .., "macc": ..}`` and ``{"tail": {"miou": ..}}`` -> ``{"miou", "macc", "tail_miou", ...}``."""
    flat = dict(overall)
    for group, values in grouped.items():
        for name, value in values.items():
            flat[f"{group}_{name}"] = value
    return flat


def _clean(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def summarize(per_seed: dict[int, dict[str, dict]], metric_names: list[str], titles: dict[str, str]) -> dict:
    """{method: {metric: mean, "std": {...}, "per_seed": [...], "title"}} from {seed: {method: flat metrics}}.

    A value missing (None) in some seeds is averaged over the others; std is the sample standard
    deviation (0 for one seed)."""
    methods = {}
    for method in next(iter(per_seed.values())):
        entry, std = {"title": titles.get(method, method)}, {}
        for name in metric_names:
            values = [v for v in (_clean(m[method].get(name)) for m in per_seed.values()) if v is not None]
            entry[name] = float(np.mean(values)) if values else None
            std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
        entry["std"] = std
        entry["per_seed"] = [{"seed": s, **{n: _clean(m[method].get(n)) for n in metric_names}} for s, m in per_seed.items()]
        methods[method] = entry
    return methods


def metrics_payload(task: str, groups: dict[str, list[int]], names: list[str], rule: str, rule_text: str,
                    seeds: list[int], methods: dict, **extra) -> dict:
    """The metrics.json schema above; ``names``: the class names the groups list."""
    return {
        "task": task,
        "groups": {g: [names[c] for c in members] for g, members in groups.items()},
        "group_rule": rule,
        "group_rule_text": rule_text,
        "seeds": list(seeds),
        "methods": methods,
        **extra,
    }


def _cell(value, std=None, baseline=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    if std is not None:
        text += f" ± {100 * std:.1f}"
    if baseline is not None:
        text += f" ({100 * (value - baseline):+.1f})"
    return text


def markdown_table(methods: dict, columns: list[tuple[str, str]], baseline: str | None, extra: dict | None = None) -> str:
    """Mean ± std (percent) per method and column ``(metric, header)``, delta to ``baseline`` in brackets.
    ``extra``: more leading columns ``{header: {method: text}}`` (e.g. the paper's align type)."""
    extra = extra or {}
    headers = ["Method", *extra, *(h for _, h in columns)]
    lines = ["| " + " | ".join(headers) + " |", "| --- | " + "--- | " * len(extra) + "---: | " * len(columns)]
    lines[1] = lines[1].rstrip()
    base = methods.get(baseline) if baseline else None
    for name, entry in methods.items():
        cells = [entry["title"], *(extra[h].get(name, "") for h in extra)]
        for metric, _ in columns:
            reference = base[metric] if base is not None and name != baseline and base[metric] is not None else None
            cells.append(_cell(entry[metric], entry["std"][metric] if len(entry["per_seed"]) > 1 else None, reference))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tail_comparison(methods: dict, overall: str, tail: str, baseline: str, method: str = "disalign") -> tuple[str, bool]:
    """Per seed, ``method`` vs ``baseline`` on the overall and the tail metric; and whether it beats the
    baseline on the tail metric for every seed."""
    if baseline not in methods or method not in methods:
        return "", False
    a, b = methods[baseline], methods[method]
    lines = [f"| Seed | {baseline} {overall} | {method} {overall} | {baseline} {tail} | {method} {tail} "
             f"| {method} better on {tail} |", "| ---: | ---: | ---: | ---: | ---: | :---: |"]
    every = True
    for x, y in zip(a["per_seed"], b["per_seed"]):
        wins = x[tail] is not None and y[tail] is not None and y[tail] > x[tail]
        every &= wins
        lines.append(f"| {x['seed']} | {_cell(x[overall])} | {_cell(y[overall])} | {_cell(x[tail])} | {_cell(y[tail])} "
                     f"| {'yes' if wins else 'no'} |")
    return "\n".join(lines) + "\n", every


def write_report(out: Path, title: str, intro: str, table: str, comparison: tuple[str, bool] | None, notes: str = "") -> str:
    """OUT/results.md: the table, the per-seed tail comparison, notes. Returns the text."""
    text = f"# {title}\n\n{intro}\n\n{table}"
    if comparison and comparison[0]:
        rows, every = comparison
        text += f"\nPer seed:\n\n{rows}\nDisAlign beats the stage-1 baseline on the tail metric for every seed: {'yes' if every else 'no'}\n"
    if notes:
        text += f"\n{notes}\n"
    if runtime.is_main():
        (out / "results.md").write_text(text)
    return text
