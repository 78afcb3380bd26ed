"""Top-1 accuracy overall and by frequency group (paper appendix A.1, Kang et al. 2020).

Groups (core.groups): paper rule Many (> 100 training images), Medium (20-100), Few (< 20); "auto"
takes it when each group holds at least MIN_GROUP_CLASSES classes (ImageNet-LT, Places-LT and
iNaturalist have 70 or more), else terciles (digits-lt: one class above 100).

Every accuracy is class-balanced: the mean over classes of per-class accuracy (classes without a
test image are skipped). On a balanced test set ``acc`` is plain top-1; ``top1`` is reported too.
Flat names (core.summary): ``acc``, ``top1``, ``many_acc``, ``medium_acc``, ``few_acc``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..core import runtime
from ..core.groups import GroupRule

GROUPS = ("many", "medium", "few")
MIN_GROUP_CLASSES = 5  # a group average over fewer classes says little
METRICS = ["acc", "top1", *(f"{g}_acc" for g in GROUPS)]
TAIL_METRIC = "few_acc"


def paper_groups(class_counts) -> list[str]:
    return ["many" if n > 100 else "few" if n < 20 else "medium" for n in np.asarray(class_counts).tolist()]


RULE = GroupRule(GROUPS, paper_groups, "Many > 100 training images, Medium 20-100, Few < 20", "training images",
                 MIN_GROUP_CLASSES)


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


def group_accuracy(correct: torch.Tensor, total: torch.Tensor, groups: dict[str, list[int]]) -> dict:
    """``acc``, ``top1`` and ``<group>_acc`` (class-balanced, None for a group without test images), in [0, 1]."""
    seen = total > 0
    per_class = torch.where(seen, correct / total.clamp(min=1), torch.nan)
    result = {"acc": balanced_accuracy(correct, total), "top1": float(correct.sum() / total.sum()) if total.sum() else None}
    for name, members in groups.items():
        member = torch.zeros(len(total), dtype=torch.bool)
        member[members] = True
        result[f"{name}_acc"] = _mean(per_class, member & seen)
    return result


def balanced_accuracy(correct: torch.Tensor, total: torch.Tensor) -> float | None:
    """Mean over classes with test images of per-class accuracy."""
    seen = total > 0
    return _mean(correct / total.clamp(min=1), seen)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def per_class_accuracy(correct: torch.Tensor, total: torch.Tensor) -> list[float | None]:
    return [float(c / t) if t else None for c, t in zip(correct.tolist(), total.tolist())]
