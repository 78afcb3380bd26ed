"""Top-1 accuracy overall and by frequency group (paper appendix A.1, Kang et al. 2020).

Group rule "paper": Many (> 100 training images), Medium (20-100), Few (< 20). Where a data set is
too small for those thresholds (digits-lt: one class above 100), rule "terciles": the classes
ranked by training count (ties by class index) are cut into three near-equal parts, the largest
part first. Rule "auto" takes "paper" when each of its groups holds at least MIN_GROUP_CLASSES
classes (ImageNet-LT, Places-LT and iNaturalist have 70 or more), else "terciles".

Every accuracy is class-balanced: the mean over classes of per-class accuracy (classes without a
test image are skipped). On a balanced test set "all" is plain top-1; "top1" is reported too.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import runtime

GROUPS = ("many", "medium", "few")
GROUP_RULES = ("auto", "paper", "terciles")
MIN_GROUP_CLASSES = 5  # a group average over fewer classes says little


def paper_groups(class_counts) -> list[str]:
    return ["many" if n > 100 else "few" if n < 20 else "medium" for n in np.asarray(class_counts).tolist()]


def tercile_groups(class_counts) -> list[str]:
    counts = np.asarray(class_counts)
    ranked = np.argsort(-counts, kind="stable")
    groups = [""] * len(counts)
    for name, part in zip(GROUPS, np.array_split(ranked, 3)):
        for c in part:
            groups[c] = name
    return groups


def frequency_groups(class_counts, rule: str = "auto") -> tuple[list[str], str]:
    """The group of each class and the rule used ("paper" or "terciles")."""
    if rule not in GROUP_RULES:
        raise ValueError(f"group rule must be one of {GROUP_RULES}, got {rule!r}")
    if rule in ("auto", "paper"):
        groups = paper_groups(class_counts)
        if rule == "paper" or all(groups.count(g) >= MIN_GROUP_CLASSES for g in GROUPS):
            return groups, "paper"
    return tercile_groups(class_counts), "terciles"


def describe_rule(rule: str) -> str:
    if rule == "paper":
        return "paper thresholds: Many > 100 training images, Medium 20-100, Few < 20"
    return (
        "terciles of the classes ranked by training count (the 100/20 thresholds leave a group with fewer than "
        f"{MIN_GROUP_CLASSES} classes on this data set)"
    )


@torch.no_grad()
def per_class_hits(
    predict: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, labels: torch.Tensor, num_classes: int,
    batch_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) per class over this rank's features, summed over ranks."""
    correct = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    total = torch.zeros_like(correct)
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size]
        hit = predict(features[start : start + batch_size]).argmax(dim=1) == y
        correct.index_add_(0, y, hit.double())
        total.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    runtime.all_reduce_sum(correct)
    runtime.all_reduce_sum(total)
    return correct.cpu(), total.cpu()


def group_accuracy(correct: torch.Tensor, total: torch.Tensor, groups: list[str]) -> dict:
    """all / many / medium / few (class-balanced, None for an empty group) and top1, in [0, 1]."""
    seen = total > 0
    per_class = torch.where(seen, correct / total.clamp(min=1), torch.nan)
    result = {"all": balanced_accuracy(correct, total), "top1": float(correct.sum() / total.sum()) if total.sum() else None}
    for name in GROUPS:
        member = torch.tensor([g == name for g in groups]) & seen
        result[name] = _mean(per_class, member)
    return result


def balanced_accuracy(correct: torch.Tensor, total: torch.Tensor) -> float | None:
    """Mean over classes with test images of per-class accuracy."""
    seen = total > 0
    return _mean(correct / total.clamp(min=1), seen)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def per_class_accuracy(correct: torch.Tensor, total: torch.Tensor) -> list[float | None]:
    return [float(c / t) if t else None for c, t in zip(correct.tolist(), total.tolist())]
