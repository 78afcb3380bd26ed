"""The training loops: `fit` runs every stage of every task; `Stage2Objective` is every stage-2 loss.

Stage 1 passes its own objective (a module whose forward returns the loss of a batch); stage 2
passes a `Stage2Objective` over a head. Under torchrun the objective is wrapped in
DistributedDataParallel, so all trainers share one way of doing DDP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import runtime
from .optim import make_optimizer, make_schedule
from .sampler import ShardedBatchSampler


@dataclass
class Recipe:
    """How one stage trains: optimizer and schedule by name (core.optim), epochs, an optional step cap."""

    optimizer: str
    schedule: str
    lr: float
    weight_decay: float
    epochs: int
    max_steps: int | None = None


class Stage2Objective(nn.Module):
    """The stage-2 loss of a head over frozen features, as a module's forward (DDP sees every step).

    ``frozen`` (optional) turns a batch into features without gradients, in inference mode (its
    BatchNorm keeps the stage-1 statistics). The loss runs with reduction "sum" and is divided by
    the global batch's normaliser: the total target weight over all ranks (``normalize="weights"``,
    the weighted mean) or the number of targets, ignored ones included (``"elements"``, mmseg's
    ``avg_non_ignore=False``); times the number of ranks because DDP averages gradients. N processes
    therefore compute the gradient one process computes.
    """

    def __init__(self, head: nn.Module, loss_fn: nn.Module, frozen: nn.Module | None = None, normalize: str = "weights"):
        super().__init__()
        if normalize not in ("weights", "elements"):
            raise ValueError(f"normalize must be 'weights' or 'elements', got {normalize!r}")
        if getattr(loss_fn, "reduction", "sum") != "sum":
            raise ValueError("Stage2Objective normalises the batch itself: give it a loss with reduction='sum'")
        self.head, self.loss_fn, self.frozen, self.normalize = head, loss_fn, frozen, normalize
        if frozen is not None:
            frozen.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        return self

    def normaliser(self, target: torch.Tensor) -> torch.Tensor:
        if self.normalize == "elements":
            local = torch.tensor(float(target.numel()), device=target.device, dtype=torch.float64)
        else:
            valid = target != self.loss_fn.ignore_index
            weight = self.loss_fn.weight[torch.where(valid, target, 0)]
            local = (weight * valid).sum().double()
        return runtime.all_reduce_sum(local.detach()).float()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            with torch.no_grad():
                x = self.frozen(x)
        total = self.normaliser(target).clamp(min=1e-12)
        return self.loss_fn(self.head.calibration_inputs(x), target) * (runtime.world_size() / total)


def fit(
    objective: nn.Module,
    parameters,
    recipe: Recipe,
    sampler: ShardedBatchSampler,
    load: Callable[[ShardedBatchSampler], Iterable[tuple]],
    logger: logging.Logger,
    desc: str,
) -> float:
    """The one training loop: ``recipe.epochs`` epochs of ``sampler``'s batches (``load(sampler)`` yields
    the objective's arguments of each of this rank's batches, on its device: a map over the index
    lists, or a DataLoader with ``batch_sampler=sampler``), optimizer and per-step schedule of
    ``recipe`` over ``parameters`` (tensors or lr groups), at most ``recipe.max_steps`` steps.

    Logs one line per epoch (mean loss over ranks, seconds) whether or not the output is a terminal,
    and stops with a message naming the stage and its learning rate if the loss stops being finite.
    Returns the last epoch's mean loss.
    """
    steps_per_epoch = len(sampler)
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    optimizer = make_optimizer(recipe.optimizer, parameters, recipe.lr, recipe.weight_decay)
    schedule = make_schedule(recipe.schedule, optimizer, total_steps)
    module = objective
    if runtime.world_size() > 1:
        device = next(objective.parameters()).device
        module = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    objective.train()
    done, mean_loss = 0, float("nan")
    bar = runtime.progress(total=total_steps, desc=desc)
    for epoch in range(recipe.epochs):
        if done >= total_steps:
            break
        started = time.time()
        sampler.set_epoch(epoch)
        total = None  # summed loss and steps: one sync per epoch, not per step
        for arguments in load(sampler):
            loss = module(*arguments)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step = torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=loss.device)])
            total = step if total is None else total + step
            done += 1
            bar.update()
            if done >= total_steps:
                break
        if total is None:
            break
        total = runtime.all_reduce_sum(total)
        mean_loss = float(total[0] / total[1])
        if mean_loss != mean_loss or mean_loss in (float("inf"), float("-inf")):
            raise RuntimeError(f"{desc}: the loss became non-finite in epoch {epoch + 1} with lr {recipe.lr:g}; lower it")
        logger.info("%s epoch %d/%d: loss %.4f, %d steps, %.1fs", desc, epoch + 1, recipe.epochs, mean_loss,
                    int(total[1]) // runtime.world_size(), time.time() - started)
    bar.close()
    if runtime.world_size() > 1:  # DDP syncs parameters; each rank's BatchNorm statistics are its own: average them
        for buffer in objective.buffers():
            if buffer.is_floating_point():
                buffer.copy_(runtime.all_reduce_sum(buffer.clone()) / runtime.world_size())
    objective.eval()
    return mean_loss
