"""The detection methods (paper Table 8), in the registry shape of every task (core.methods).

All share backbone, box head and box regression of the stage-1 detector; they differ in the
(K+1)-way classifier only, trained in stage 2 on cached RoI features of the training images:

- ``joint``: the stage-1 ``cls_score``.
- ``grw_only`` (ablation): the generalized re-weighted loss, no calibration at all: ``cls_score``
  alone re-trained from its stage-1 weights (cRT-style), so the gain of DisAlign's magnitude /
  margin / confidence over re-weighting alone shows.
- ``disalign``: ``DisAlignROIHead`` over the frozen ``cls_score``: magnitude and margin on the K
  foreground logits (background untouched) and an input-aware confidence, with ``DisAlignLoss``
  (generalized re-weight over foreground instance counts, background weight 1; paper sec. 4.3 and
  appendix C.2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from disalign_ops.nn import DisAlignLoss, DisAlignROIHead

from ..core import runtime
from ..core.loop import Recipe, Stage2Objective, fit
from ..core.methods import DISALIGN, GRW_ONLY, JOINT, FittedMethod, Method, registry, uncalibrated_head
from ..core.sampler import ShardedBatchSampler


@dataclass
class StageTwo:
    cls_score: nn.Linear  # the frozen stage-1 classifier
    features: torch.Tensor  # cached RoI features of the training images (every rank holds all of them)
    labels: torch.Tensor
    instance_counts: np.ndarray  # foreground training instances per category
    rho: float
    recipe: Recipe
    batch_size: int
    seed: int
    backend: str | None
    logger: object
    paper_recipe: bool = False  # the authors' head variants (DisAlignROIHead.paper_recipe)


def foreground_loss(ctx: StageTwo, rho: float) -> DisAlignLoss:
    """Generalized re-weight over the foreground instance counts, background weight 1 (a category
    without training instances counts as 1: re-weighting needs positive counts)."""
    counts = np.maximum(np.asarray(ctx.instance_counts), 1)
    return DisAlignLoss(counts.tolist(), rho=rho, background_index=-1, reduction="sum", backend=ctx.backend)


def learnable(key: str, title: str, build: Callable[[StageTwo], nn.Module]) -> Method:
    def fit_method(ctx: StageTwo) -> FittedMethod:
        torch.manual_seed(ctx.seed)  # the head starts the same on every rank, whatever ran before
        head = build(ctx).to(ctx.features.device)
        objective = Stage2Objective(head, foreground_loss(ctx, ctx.rho)).to(ctx.features.device)
        sampler = ShardedBatchSampler(ctx.labels.cpu(), ctx.batch_size, "instance", ctx.seed, runtime.rank(),
                                      runtime.world_size())

        def load(batches):
            for batch in batches:
                index = torch.as_tensor(batch, device=ctx.features.device)
                yield ctx.features[index], ctx.labels[index]

        fit(objective, head.parameters(), ctx.recipe, sampler, load, ctx.logger, f"seed {ctx.seed} stage 2: {title}")
        head.eval()
        return FittedMethod(predict=head, head=head, info={"rho": ctx.rho})

    return Method(key, title, "learnable", fit_method)


def disalign_head(ctx: StageTwo) -> nn.Module:
    make = DisAlignROIHead.paper_recipe if ctx.paper_recipe else DisAlignROIHead
    return make(ctx.cls_score, background_index=-1, backend=ctx.backend)


def retrained_classifier(ctx: StageTwo) -> nn.Module:
    return uncalibrated_head(copy.deepcopy(ctx.cls_score))


METHODS = registry(
    Method(*JOINT, "-", lambda ctx: FittedMethod(predict=ctx.cls_score)),
    learnable(*GRW_ONLY, retrained_classifier),
    learnable(*DISALIGN, disalign_head),
)
