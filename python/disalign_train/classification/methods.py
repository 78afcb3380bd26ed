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
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from disalign_ops.nn import CalibrationInputs, CosineLinear, DisAlignLinear, DisAlignLoss

from .. import runtime
from .data import ShardedBatchSampler
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
class HeadTraining:
    """Stage-2 schedule (appendix A.2: SGD, momentum 0.9, cosine decay restarted from ``lr``)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


@dataclass
class StageTwo:
    """What every method may use."""

    classifier: nn.Module  # the frozen stage-1 classifier; methods work on copies
    new_classifier: Callable[[], nn.Module]  # a freshly initialised classifier of the same kind
    features: FrozenFeatures
    class_counts: torch.Tensor
    num_classes: int
    rho: float
    training: HeadTraining
    logit_adjust_tau: float
    backend: str | None


@dataclass
class FittedMethod:
    predict: Callable[[torch.Tensor], torch.Tensor]  # features -> class scores
    head: nn.Module | None = None  # the trained head, saved in the stage-2 checkpoint
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    align: str  # paper Table 1: "-", "hand-crafted" or "learnable"
    fit: Callable[[StageTwo], FittedMethod]


class ClassifierHead(nn.Module):
    """A plain classifier as a stage-2 head: the op with alpha = beta = 0 and no confidence is plain
    (weighted) cross entropy, and the logits themselves get the gradient."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("zeros", torch.zeros(classifier.out_features))

    def calibration_inputs(self, x: torch.Tensor) -> CalibrationInputs:
        return CalibrationInputs(self.classifier(x), self.zeros, self.zeros, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class HeadObjective(nn.Module):
    """The loss as a module's forward, so that DistributedDataParallel sees every step of the head.

    The weighted mean is taken over the global batch: each rank sums its share (reduction "sum")
    and divides by the batch's total target weight over all ranks, times the number of ranks
    (DDP averages the gradients), so N processes compute the gradient one process computes.
    """

    def __init__(self, head: nn.Module, class_counts: torch.Tensor, rho: float, backend: str | None):
        super().__init__()
        self.head = head
        self.loss_fn = DisAlignLoss(class_counts, rho, reduction="sum", backend=backend)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total_weight = runtime.all_reduce_sum(self.loss_fn.weight[target].sum().detach())
        return self.loss_fn(self.head.calibration_inputs(x), target) * (runtime.world_size() / total_weight)


def sgd(parameters, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum 0.9 (appendix A.2) over the trainable parameters. Weight decay applies to
    weight matrices and kernels only: biases, the cosine scale, and the magnitude (init 1) and margin
    of the calibration are offsets that decay would pull away from their meaning."""
    trainable = [p for p in parameters if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def train_head(head: nn.Module, ctx: StageTwo, balance: str, rho: float, desc: str) -> None:
    """The one stage-2 loop: SGD on the head's trainable parameters over the frozen train features."""
    features, labels = ctx.features.train, ctx.features.train_labels
    objective = HeadObjective(head, ctx.class_counts, rho, ctx.backend).to(features.device)
    if runtime.world_size() > 1:
        device_ids = [features.device] if features.device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    optimizer = sgd(head.parameters(), ctx.training.lr, ctx.training.weight_decay)
    sampler = ShardedBatchSampler(
        labels, ctx.training.batch_size, balance, ctx.training.seed, runtime.rank(), runtime.world_size()
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, ctx.training.epochs * len(sampler)))
    head.train()
    for epoch in runtime.progress(range(ctx.training.epochs), desc=desc):
        sampler.set_epoch(epoch)
        finite = torch.ones((), dtype=torch.bool, device=features.device)
        for batch in sampler:
            index = torch.as_tensor(batch, device=features.device)
            loss = objective(features[index], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            finite &= torch.isfinite(loss)
        if not bool(finite):  # checked once per epoch: no device sync per step
            raise RuntimeError(
                f"{desc}: the stage-2 loss became non-finite in epoch {epoch + 1} with lr {ctx.training.lr}; "
                "lower --stage2-lr"
            )
    head.eval()


def learnable(key: str, title: str, build_head: Callable[[StageTwo], nn.Module], balance: str, reweight: bool) -> Method:
    """A method trained by `train_head`: its head, its sampling and whether the loss uses the generalized re-weight."""

    def fit(ctx: StageTwo) -> FittedMethod:
        head = build_head(ctx).to(ctx.features.train.device)
        rho = ctx.rho if reweight else 0.0
        train_head(head, ctx, balance, rho, desc=f"stage 2: {title}")
        return FittedMethod(predict=head, head=head, info={"sampling": balance, "rho": rho})

    return Method(key, title, "learnable", fit)


def calibrated(input_aware: bool = True, magnitude: bool = True, margin: bool = True) -> Callable[[StageTwo], nn.Module]:
    """A DisAlign head over a copy of the frozen classifier; ``magnitude``/``margin`` False keeps it at 1/0."""

    def build(ctx: StageTwo) -> nn.Module:
        head = DisAlignLinear.from_linear(copy.deepcopy(ctx.classifier), input_aware=input_aware, backend=ctx.backend)
        head.magnitude.requires_grad_(magnitude)
        head.margin.requires_grad_(margin)
        return head

    return build


def retrained_classifier(ctx: StageTwo) -> nn.Module:
    return ClassifierHead(ctx.new_classifier())


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


METHODS = {
    m.key: m
    for m in (
        Method("joint", "Joint (baseline)", "-", fit_joint),
        Method("ncm", "NCM", "hand-crafted", fit_ncm),
        Method("tau_norm", "tau-normalisation", "hand-crafted", fit_tau_norm),
        Method("logit_adjust", "Logit adjustment (post-hoc)", "hand-crafted", fit_logit_adjust),
        learnable("crt", "cRT", retrained_classifier, "class", reweight=False),
        learnable("lws", "LWS", calibrated(input_aware=False, margin=False), "class", reweight=False),
        learnable("grw_only", "DisAlign ablation: GRW only", retrained_classifier, "instance", reweight=True),
        learnable("magnitude_only", "DisAlign ablation: magnitude only", calibrated(margin=False), "instance", reweight=True),
        learnable("margin_only", "DisAlign ablation: margin only", calibrated(magnitude=False), "instance", reweight=True),
        learnable("input_agnostic", "DisAlign ablation: input-agnostic", calibrated(input_aware=False), "instance", reweight=True),
        learnable("disalign", "DisAlign", calibrated(), "instance", reweight=True),
    )
}
