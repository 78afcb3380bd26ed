"""The classifier-level methods compared in paper Table 1/2/5, over one set of frozen features.

Every method starts from the stage-1 model (backbone and classifier frozen) and only changes how
features become class scores; the features are extracted once and shared.

Hand-crafted (no training): Joint (the stage-1 classifier), NCM, tau-normalisation, post-hoc logit
adjustment. Learnable: every other method is a head trained by one loop (`train_head`) with the
loss of one fused op, ``disalign_cross_entropy`` (through ``DisAlignLoss``): a method is a head,
a sampler (instance- or class-balanced) and a re-weighting exponent rho (0 = unweighted):

==================  =======================================  ==========  =====================
method              head (what is learned)                   sampling    loss weights
==================  =======================================  ==========  =====================
cRT                 classifier re-initialised and retrained  class       none
LWS                 per-class scale of the frozen logits     class       none
GRW only            classifier re-initialised and retrained  instance    generalized re-weight
magnitude only      DisAlign, margin fixed at 0              instance    generalized re-weight
margin only         DisAlign, magnitude fixed at 1           instance    generalized re-weight
input-agnostic      DisAlign without confidence (s = 1)      instance    generalized re-weight
DisAlign            magnitude, margin and confidence         instance    generalized re-weight
==================  =======================================  ==========  =====================

"GRW only" is the paper's Table 11 row "calibration x, G-RW v" (Table 5 row GR without MT/MG): with
neither magnitude nor margin there is no calibration left to learn, so the re-weighted loss
retrains the classifier itself; it is cRT with the generalized re-weight in place of class-balanced
sampling. LWS is the input-agnostic DisAlign head with margin fixed at 0 and class-balanced sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disalign_ops.nn import CosineLinear, DisAlignLinear, DisAlignLoss

from ..core import runtime
from ..core.loop import Recipe, Stage2Objective, fit
from ..core.methods import DISALIGN, GRW_ONLY, JOINT, FittedMethod, Method, registry, uncalibrated_head
from ..core.sampler import ShardedBatchSampler
from .metrics import balanced_accuracy, per_class_hits

TAU_GRID = tuple(np.round(np.linspace(0.0, 2.0, 21), 2).tolist())


@dataclass
class FrozenFeatures:
    """Backbone features, extracted once after stage 1."""

    train: torch.Tensor  # every rank holds all of it: the head samplers draw global batches from it
    train_labels: torch.Tensor
    val: torch.Tensor | None  # val and test: this rank's shard; metrics are summed over ranks
    val_labels: torch.Tensor | None
    test: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class StageTwo:
    """What every method may use."""

    classifier: nn.Module  # the frozen stage-1 classifier; methods work on copies
    new_classifier: Callable[[], nn.Module]  # a freshly initialised classifier of the same kind
    features: FrozenFeatures
    class_counts: torch.Tensor
    num_classes: int
    rho: float
    recipe: Recipe  # stage 2: SGD, momentum 0.9, cosine decay restarted from the lr (appendix A.2)
    batch_size: int
    seed: int
    logit_adjust_tau: float
    backend: str | None
    logger: object = None
    paper_recipe: bool = False  # the authors' head variants (DisAlignLinear.paper_recipe)


def train_head(head: nn.Module, ctx: StageTwo, balance: str, rho: float, desc: str) -> None:
    """Stage 2 on the frozen train features: the shared loop (core.loop.fit) over the head's trainable parameters."""
    features, labels = ctx.features.train, ctx.features.train_labels
    loss_fn = DisAlignLoss(ctx.class_counts, rho, reduction="sum", backend=ctx.backend)
    objective = Stage2Objective(head, loss_fn).to(features.device)
    sampler = ShardedBatchSampler(labels, ctx.batch_size, balance, ctx.seed, runtime.rank(), runtime.world_size())

    def load(batches):
        for batch in batches:
            index = torch.as_tensor(batch, device=features.device)
            yield features[index], labels[index]

    fit(objective, head.parameters(), ctx.recipe, sampler, load, ctx.logger, desc)


def learnable(key: str, title: str, build_head: Callable[[StageTwo], nn.Module], balance: str, reweight: bool) -> Method:
    """A method trained by `train_head`: its head, its sampling and whether the loss uses the generalized re-weight."""

    def fit(ctx: StageTwo) -> FittedMethod:
        head = build_head(ctx).to(ctx.features.train.device)
        rho = ctx.rho if reweight else 0.0
        train_head(head, ctx, balance, rho, desc=f"seed {ctx.seed} stage 2: {title}")
        return FittedMethod(predict=head, head=head, info={"sampling": balance, "rho": rho})

    return Method(key, title, "learnable", fit)


def calibrated(input_aware: bool = True, magnitude: bool = True, margin: bool = True) -> Callable[[StageTwo], nn.Module]:
    """A DisAlign head over a copy of the frozen classifier; ``magnitude``/``margin`` False keeps it at 1/0."""

    def build(ctx: StageTwo) -> nn.Module:
        make = DisAlignLinear.paper_recipe if ctx.paper_recipe else DisAlignLinear.from_linear
        head = make(copy.deepcopy(ctx.classifier), input_aware=input_aware, backend=ctx.backend)
        head.magnitude.requires_grad_(magnitude)
        head.margin.requires_grad_(margin)
        return head

    return build


def retrained_classifier(ctx: StageTwo) -> nn.Module:
    return uncalibrated_head(ctx.new_classifier())


def fit_joint(ctx: StageTwo) -> FittedMethod:
    return FittedMethod(predict=ctx.classifier)


def fit_ncm(ctx: StageTwo) -> FittedMethod:
    """Nearest class mean: cosine similarity to the mean of the L2-normalised train features of each class."""
    features = F.normalize(ctx.features.train, dim=1)
    sums = torch.zeros(ctx.num_classes, features.shape[1], device=features.device, dtype=features.dtype)
    means = F.normalize(sums.index_add_(0, ctx.features.train_labels, features), dim=1)
    return FittedMethod(predict=lambda x: F.normalize(x, dim=1) @ means.T)


def tau_normalised(classifier: nn.Module, tau: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scores with class weights w_j / |w_j|^tau (bias dropped, as Kang et al.). A cosine head keeps its
    normalised, scaled features; tau = 1 is then the cosine head itself."""
    weight = classifier.weight.detach()
    scaled = weight / weight.norm(dim=1, keepdim=True).pow(tau)
    if isinstance(classifier, CosineLinear):
        scale = classifier.scale.detach()
        return lambda x: scale * F.normalize(x, dim=1) @ scaled.T
    return lambda x: x @ scaled.T


def fit_tau_norm(ctx: StageTwo) -> FittedMethod:
    """tau chosen on the validation split (class-balanced accuracy, smallest tau on ties); 1.0 without one."""
    if ctx.features.val is None:
        return FittedMethod(predict=tau_normalised(ctx.classifier, 1.0), info={"tau": 1.0, "tau_selected_on": "fixed"})
    scores = []
    for tau in TAU_GRID:
        correct, total = per_class_hits(
            tau_normalised(ctx.classifier, tau), ctx.features.val, ctx.features.val_labels, ctx.num_classes
        )
        scores.append(balanced_accuracy(correct, total))
    tau = TAU_GRID[int(np.argmax(scores))]
    return FittedMethod(predict=tau_normalised(ctx.classifier, tau), info={"tau": tau, "tau_selected_on": "val"})


def fit_logit_adjust(ctx: StageTwo) -> FittedMethod:
    """Post-hoc logit adjustment (Menon et al.): z - tau * log(prior), prior = training class frequencies."""
    prior = ctx.class_counts.double() / ctx.class_counts.sum()
    shift = (ctx.logit_adjust_tau * prior.log()).float().to(ctx.features.train.device)
    return FittedMethod(predict=lambda x: ctx.classifier(x) - shift, info={"tau": ctx.logit_adjust_tau})


METHODS = registry(
    Method(*JOINT, "-", fit_joint),
    Method("ncm", "NCM", "hand-crafted", fit_ncm),
    Method("tau_norm", "tau-normalisation", "hand-crafted", fit_tau_norm),
    Method("logit_adjust", "Logit adjustment (post-hoc)", "hand-crafted", fit_logit_adjust),
    learnable("crt", "cRT", retrained_classifier, "class", reweight=False),
    learnable("lws", "LWS", calibrated(input_aware=False, margin=False), "class", reweight=False),
    learnable(*GRW_ONLY, retrained_classifier, "instance", reweight=True),
    learnable("magnitude_only", "DisAlign ablation: magnitude only", calibrated(margin=False), "instance", reweight=True),
    learnable("margin_only", "DisAlign ablation: margin only", calibrated(magnitude=False), "instance", reweight=True),
    learnable("input_agnostic", "DisAlign ablation: input-agnostic", calibrated(input_aware=False), "instance", reweight=True),
    learnable(*DISALIGN, calibrated(), "instance", reweight=True),
)
