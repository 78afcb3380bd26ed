"""Segmentation metrics of the paper's Table 6: mIoU and mAcc overall and per head/body/tail group.

Groups come from each class's share of the labelled training pixels: head > 1%, body 0.1%-1%,
tail < 0.1% (paper sec. 4.2). A data set with too few classes to fill all three groups that way
falls back to terciles of the pixel share (most frequent third = head; core.groups); the rule used
is reported. Flat names (core.summary): ``miou``, ``macc``, ``head_miou`` ... ``tail_macc``.
"""

from __future__ import annotations

import numpy as np

from ..core.groups import GroupRule
from ..core.summary import flat_metrics

GROUPS = ("head", "body", "tail")
PAPER_THRESHOLDS = (0.01, 0.001)
METRICS = ["miou", "macc", *(f"{g}_{m}" for m in ("miou", "macc") for g in GROUPS)]
TAIL_METRIC = "tail_miou"


def confusion_matrix(target: np.ndarray, prediction: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    target, prediction = np.asarray(target).ravel(), np.asarray(prediction).ravel()
    if target.shape != prediction.shape:
        raise ValueError(f"target and prediction must have the same size, got {target.size} and {prediction.size}")
    valid = target != ignore_index
    target, prediction = target[valid].astype(np.int64), prediction[valid].astype(np.int64)
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target values must be in [0, {num_classes}) or {ignore_index}, got {target.min()}..{target.max()}")
    return np.bincount(target * num_classes + prediction, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, accuracy) per class; NaN for a class absent from both ground truth and prediction (IoU)
    or from the ground truth (accuracy), so it drops out of the means as in mmsegmentation."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    ground_truth, predicted = confusion.sum(1), confusion.sum(0)
    union = ground_truth + predicted - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        accuracy = np.where(ground_truth > 0, true_positive / ground_truth, np.nan)
    return iou, accuracy


def paper_groups(pixel_counts) -> list[str]:
    """Head > 1%, body 0.1%-1%, tail < 0.1% of the labelled training pixels."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    share = counts / max(counts.sum(), 1.0)
    head_above, tail_below = PAPER_THRESHOLDS
    return ["head" if v > head_above else "tail" if v < tail_below else "body" for v in share.tolist()]


RULE = GroupRule(GROUPS, paper_groups, "head > 1%, body 0.1%-1%, tail < 0.1% of labelled training pixels",
                 "labelled training pixels")


def _nanmean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def segmentation_metrics(confusion: np.ndarray, groups: dict[str, list[int]]) -> tuple[dict, dict]:
    """(``miou``, ``macc``, ``<group>_miou``, ``<group>_macc`` in [0, 1] (None where no class of a group
    was evaluated), per-class IoU and accuracy)."""
    iou, accuracy = per_class_scores(confusion)
    grouped = {}
    for name in GROUPS:
        index = np.asarray(groups[name], dtype=np.int64)
        grouped[name] = {"miou": _nanmean(iou[index]), "macc": _nanmean(accuracy[index])}
    metrics = flat_metrics({"miou": _nanmean(iou), "macc": _nanmean(accuracy)}, grouped)
    per_class = {"iou": [None if np.isnan(v) else float(v) for v in iou],
                 "acc": [None if np.isnan(v) else float(v) for v in accuracy]}
    return metrics, per_class
