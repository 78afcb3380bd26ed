"""Frequency groups of classes (head to tail), one rule set for every task.

A task gives its group names (most frequent first) and the paper's rule for its data kind, a
function of the training counts returning each class's group. ``rule="auto"`` takes the paper's
rule where every group holds at least ``min_classes`` classes, else terciles: the classes ranked
by training count (ties by class index) cut into three near-equal parts, the largest first. So no
group is ever empty (no ``nan`` in a table) unless there are fewer than three classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .args import GROUP_RULES
from .errors import UserError


@dataclass(frozen=True)
class GroupRule:
    names: tuple[str, str, str]  # head, middle, tail
    paper: Callable[[np.ndarray], list[str]]  # counts -> group name per class
    paper_text: str
    count_text: str  # what the counts are ("training images", "labelled training pixels", ...)
    min_classes: int = 1  # auto: fewest classes per group for the paper's rule

    def describe(self, rule: str) -> str:
        if rule == "paper":
            return f"paper: {self.paper_text}"
        short = "empty" if self.min_classes == 1 else f"with fewer than {self.min_classes} classes"
        return f"terciles of the classes ranked by {self.count_text} (the paper's thresholds leave a group {short} on this data set)"


def tercile_groups(counts: Sequence, names: Sequence[str]) -> list[str]:
    counts = np.asarray(counts)
    ranked = np.argsort(-counts, kind="stable")
    groups = [""] * len(counts)
    for name, part in zip(names, np.array_split(ranked, 3)):
        for c in part:
            groups[c] = name
    return groups


def frequency_groups(counts, rule: GroupRule, choice: str = "auto") -> tuple[dict[str, list[int]], str]:
    """({group: class indices}, the rule used: "paper" or "terciles")."""
    if choice not in GROUP_RULES:
        raise UserError(f"--group-rule must be one of {GROUP_RULES}, got {choice!r}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError(f"class counts must be a non-empty 1-D array of counts >= 0, got shape {counts.shape}")
    used = "terciles"
    if choice in ("auto", "paper"):
        labels = rule.paper(counts)
        if choice == "paper" or all(labels.count(g) >= rule.min_classes for g in rule.names):
            used = "paper"
    if used == "terciles":
        if counts.size < 3:
            raise UserError(f"frequency groups need at least 3 classes, got {counts.size}")
        labels = tercile_groups(counts, rule.names)
    return {name: [c for c, g in enumerate(labels) if g == name] for name in rule.names}, used
