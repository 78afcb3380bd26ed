"""The methods registry shape every task uses: a method is a key, a title, its align type (paper
Table 1) and a ``fit(context) -> FittedMethod``; a task's ``METHODS`` maps keys to them in
report order, the stage-1 baseline ("joint") first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class FittedMethod:
    predict: Callable  # features -> class scores
    head: nn.Module | None = None  # the trained head, saved in the stage-2 checkpoint
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    align: str  # "-", "hand-crafted" or "learnable"
    fit: Callable[..., FittedMethod]


def registry(*methods: Method) -> dict[str, Method]:
    return {m.key: m for m in methods}


# The ablation vocabulary shared by the tasks (same key, same meaning).
JOINT = ("joint", "Joint (stage-1 baseline)")
GRW_ONLY = ("grw_only", "DisAlign ablation: GRW only (classifier retrained)")
DISALIGN = ("disalign", "DisAlign")


def uncalibrated_head(classifier: nn.Module) -> nn.Module:
    """A plain classifier as a trainable stage-2 head (alpha = beta = 0, no confidence: the weighted
    cross entropy through the same op; the classifier itself gets the gradient)."""
    from disalign_ops.nn import ClassifierHead

    return ClassifierHead(classifier)
