"""Optimizers and learning-rate schedules of the recipes, by name (each task's recipe picks them)."""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "warmup-cosine", "onecycle")


def param_groups(parameters, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: biases, the cosine scale, and the magnitude
    (init 1) and margin of a calibration are offsets that decay would pull away from their meaning.
    ``parameters``: an iterable of tensors, or of groups ``{"params": [...], "lr": ...}``."""
    parameters = list(parameters)
    if parameters and isinstance(parameters[0], dict):
        groups = []
        for group in parameters:
            for g in param_groups(group["params"], weight_decay):
                groups.append({**group, **g})
        return [g for g in groups if g["params"]]
    trainable = [p for p in parameters if p.requires_grad]
    return [g for g in (
        {"params": [p for p in trainable if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
    ) if g["params"]]


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0.9, appendix A.2), ``adam`` or ``adamw`` over the trainable ``parameters``."""
    groups = param_groups(parameters, weight_decay)
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_schedule(name: str, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedules over ``total_steps``: ``cosine`` decay to 0; ``warmup-cosine`` (linear warm-up
    over a tenth, at most 50 steps, then cosine); ``onecycle`` (10% warm-up to each group's lr, cosine down)."""
    total_steps = max(1, total_steps)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    if name == "warmup-cosine":
        warmup = max(1, min(50, total_steps // 10))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        )
    if name == "onecycle":
        max_lr = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=0.1)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
