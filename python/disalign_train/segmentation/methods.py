"""The segmentation methods (paper Table 6), in the registry shape of every task (core.methods).

All start from the same stage-1 network (per seed):

- ``joint``: stage 1 only, plain cross entropy with ignore index 255, instance-balanced.
- ``grw_only``: the re-weight-only ablation. Backbone frozen, no calibration function: the 1x1
  classifier itself (initialised from stage 1) is retrained with the generalized re-weighted loss,
  i.e. cRT with generalized re-weighting instead of class-balanced sampling, through the same fused
  op with alpha = beta = 0 and no confidence.
- ``disalign``: backbone and 1x1 classifier frozen; ``DisAlignConv2d.from_conv`` adds magnitude,
  margin and a per-pixel confidence, trained with the generalized re-weighted loss (rho from the
  training pixel frequencies) through ``disalign_cross_entropy`` on the (B, C, H, W) logits in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from disalign_ops.nn import DisAlignConv2d, DisAlignLoss

from ..core import runtime
from ..core.loop import Recipe, Stage2Objective, fit
from ..core.methods import DISALIGN, GRW_ONLY, JOINT, FittedMethod, Method, registry, uncalibrated_head
from ..core.sampler import ShardedBatchSampler
from ..scenes import IGNORE_INDEX
from .model import Features, Predictor, SmallFCN


@dataclass
class StageTwo:
    model: SmallFCN  # frozen stage-1 network
    images: torch.Tensor
    labels: torch.Tensor
    pixel_counts: np.ndarray
    rho: float
    recipe: Recipe  # magnitude / margin learning rate; the others scale it (param_groups)
    confidence_lr: float
    grw_lr: float
    batch_size: int
    seed: int
    device: torch.device
    backend: str | None
    logger: object
    paper_recipe: bool = False  # the authors' head (DisAlignConv2d.paper_recipe) and mmseg's loss normalisation


def flip_batches(images: torch.Tensor, labels: torch.Tensor, seed: int, device):
    """``load`` for core.loop.fit: each batch of the sampler, half of its images flipped horizontally."""
    generator = torch.Generator().manual_seed(seed * 7919 + runtime.rank())

    def load(batches):
        for batch in batches:
            x, y = images[batch].clone(), labels[batch].clone()
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            yield x.to(device), y.to(device)

    return load


def sampler_for(images: torch.Tensor, batch_size: int, seed: int) -> ShardedBatchSampler:
    """Instance-balanced image batches (per-pixel classes have no image-level class to balance)."""
    return ShardedBatchSampler(torch.zeros(len(images), dtype=torch.long), batch_size, "instance", seed,
                               runtime.rank(), runtime.world_size())


def learnable(key: str, title: str, build: Callable[[StageTwo], nn.Module],
              groups: Callable[[nn.Module, StageTwo], list[dict]]) -> Method:
    def fit_method(ctx: StageTwo) -> FittedMethod:
        head = build(ctx).to(ctx.device)
        # generalized_reweight needs positive counts: a class without training pixels counts as one pixel.
        loss_fn = DisAlignLoss(np.maximum(ctx.pixel_counts, 1), ctx.rho, ignore_index=IGNORE_INDEX, reduction="sum",
                               backend=ctx.backend)
        # mmseg averages over all pixels, ignored ones included (avg_non_ignore=False); ours over the target weights.
        normalize = "elements" if ctx.paper_recipe else "weights"
        objective = Stage2Objective(head, loss_fn, frozen=Features(ctx.model), normalize=normalize).to(ctx.device)
        sampler = sampler_for(ctx.images, ctx.batch_size, ctx.seed + 1000)
        fit(objective, groups(head, ctx), ctx.recipe, sampler, flip_batches(ctx.images, ctx.labels, ctx.seed + 1000, ctx.device),
            ctx.logger, f"seed {ctx.seed} stage 2: {title}")
        head.eval()
        return FittedMethod(predict=Predictor(ctx.model, head).eval(), head=head, info={"rho": ctx.rho})

    return Method(key, title, "learnable", fit_method)


def disalign_head(ctx: StageTwo) -> nn.Module:
    make = DisAlignConv2d.paper_recipe if ctx.paper_recipe else DisAlignConv2d.from_conv
    return make(ctx.model.classifier, input_aware=True, backend=ctx.backend)


def calibration_groups(head: nn.Module, ctx: StageTwo) -> list[dict]:
    """Magnitude and margin are in logit units and need far larger steps than the confidence layer's
    (one shared rate either barely moves them or saturates the confidence)."""
    groups = [{"params": [head.magnitude, head.margin], "lr": ctx.recipe.lr}]
    if head.confidence is not None:
        groups.append({"params": list(head.confidence.parameters()), "lr": ctx.confidence_lr})
    return groups


def retrained_classifier(ctx: StageTwo) -> nn.Module:
    return uncalibrated_head(copy.deepcopy(ctx.model.classifier))


def classifier_groups(head: nn.Module, ctx: StageTwo) -> list[dict]:
    return [{"params": list(head.classifier.parameters()), "lr": ctx.grw_lr}]


def fit_joint(ctx: StageTwo) -> FittedMethod:
    return FittedMethod(predict=ctx.model)


METHODS = registry(
    Method(*JOINT, "-", fit_joint),
    learnable(*GRW_ONLY, retrained_classifier, classifier_groups),
    learnable(*DISALIGN, disalign_head, calibration_groups),
)
