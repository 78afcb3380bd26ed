"""Segmentation metrics of the paper's Table 6: mIoU and mAcc overall and per head/body/tail group.

Groups come from each class's share of the labelled training pixels: head > 1%, body 0.1%-1%,
tail < 0.1% (paper sec. 4.2). A data set with too few classes to fill all three groups that way
falls back to terciles of the pixel share (most frequent third = head); the rule used is reported.
"""

from __future__ import annotations

import numpy as np

GROUPS = ("head", "body", "tail")
PAPER_THRESHOLDS = (0.01, 0.001)


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


def frequency_groups(pixel_counts, thresholds=PAPER_THRESHOLDS) -> tuple[dict[str, list[int]], str]:
    """Class indices per group from training pixel counts, and the rule used ("paper" or "terciles")."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
        raise ValueError(f"pixel_counts must be a non-empty 1-D array of counts >= 0, got shape {counts.shape}")
    share = counts / max(counts.sum(), 1.0)
    head_above, tail_below = thresholds
    groups = {
        "head": np.flatnonzero(share > head_above).tolist(),
        "body": np.flatnonzero((share >= tail_below) & (share <= head_above)).tolist(),
        "tail": np.flatnonzero(share < tail_below).tolist(),
    }
    if all(groups.values()):
        return groups, "paper"
    if counts.size < 3:
        raise ValueError(f"frequency groups need at least 3 classes, got {counts.size}")
    order = np.argsort(-share, kind="stable")
    return {name: sorted(part.tolist()) for name, part in zip(GROUPS, np.array_split(order, 3))}, "terciles"


def describe_rule(rule: str) -> str:
    if rule == "paper":
        return "paper: head > 1%, body 0.1%-1%, tail < 0.1% of labelled training pixels"
    return "terciles of the labelled training pixel share (too few classes for the paper's 1% / 0.1% split)"


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def segmentation_metrics(confusion: np.ndarray, groups: dict[str, list[int]]) -> dict:
    """``miou``, ``macc`` and per group ``{"miou", "macc", "num_classes"}``, values in [0, 1]."""
    iou, accuracy = per_class_scores(confusion)
    metrics = {"miou": _nanmean(iou), "macc": _nanmean(accuracy)}
    for name in GROUPS:
        index = np.asarray(groups[name], dtype=np.int64)
        metrics[name] = {"miou": _nanmean(iou[index]), "macc": _nanmean(accuracy[index]), "num_classes": int(index.size)}
    metrics["per_class"] = {"iou": [None if np.isnan(v) else float(v) for v in iou],
                            "acc": [None if np.isnan(v) else float(v) for v in accuracy]}
    return metrics


def table6_markdown(summaries: dict[str, dict], baseline: str = "baseline") -> str:
    """Markdown table shaped like the paper's Table 6 (percent, mean ± std over seeds, delta to the baseline)
    from {method: summarize_runs(...)}."""
    columns = [("miou", None), ("head", "miou"), ("body", "miou"), ("tail", "miou"),
               ("macc", None), ("head", "macc"), ("body", "macc"), ("tail", "macc")]
    lines = [
        "| Method | mIoU Average | mIoU Head | mIoU Body | mIoU Tail | mAcc Average | mAcc Head | mAcc Body | mAcc Tail |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, summary in summaries.items():
        cells = []
        for key, sub in columns:
            mean, std = _stat(summary, key, sub)
            cell = f"{100 * mean:.1f} ± {100 * std:.1f}"
            if method != baseline and baseline in summaries:
                delta = 100 * (mean - _stat(summaries[baseline], key, sub)[0])
                cell += f" ({delta:+.1f})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _stat(summary: dict, key: str, sub: str | None) -> tuple[float, float]:
    mean = summary[key] if sub is None else summary[key][sub]
    std = summary["std"][key] if sub is None else summary["std"][key][sub]
    return mean, std


def summarize_runs(runs: list[dict]) -> dict:
    """The metrics schema (miou, macc, head/body/tail miou/macc) averaged over seeds, plus their "std"."""
    def collect(key, sub=None):
        return np.array([run[key] if sub is None else run[key][sub] for run in runs], dtype=np.float64)

    mean, std = {}, {}
    for key in ("miou", "macc"):
        mean[key], std[key] = float(np.nanmean(collect(key))), float(np.nanstd(collect(key)))
    for name in GROUPS:
        mean[name], std[name] = {}, {}
        for sub in ("miou", "macc"):
            mean[name][sub], std[name][sub] = float(np.nanmean(collect(name, sub))), float(np.nanstd(collect(name, sub)))
    return {**mean, "std": std, "num_seeds": len(runs)}
