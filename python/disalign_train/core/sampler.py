"""The one batch sampler of every stage and task, and the per-rank shards of evaluation."""

from __future__ import annotations

import torch

from . import runtime


def shard(num_items: int) -> torch.Tensor:
    """This rank's share of items 0..num_items-1 (every world_size-th one), for extraction and evaluation."""
    return torch.arange(runtime.rank(), num_items, runtime.world_size())


def reduced_class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Training images per class: each rank counts its shard, the counts are summed over ranks."""
    counts = torch.bincount(labels[shard(len(labels))], minlength=num_classes).double()
    return runtime.all_reduce_sum(counts).long()


class ShardedBatchSampler:
    """The batches of one epoch; each rank takes its slice (rank::world_size) of every global batch.

    ``balance="instance"``: every training image once per epoch, in random order.
    ``balance="class"``: as many draws as images, each a uniformly random class, then a uniformly random
    image of it (class-aware sampling, as cRT and LWS use).
    The order depends only on (seed, epoch), so N processes together see exactly the batches one
    process sees: ``batch_size`` is global, independent of the number of processes. A last batch
    smaller than the number of processes is dropped so that every rank gets a share of each batch.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, balance: str, seed: int, rank: int = 0, world_size: int = 1):
        if balance not in ("instance", "class"):
            raise ValueError(f"balance must be 'instance' or 'class', got {balance!r}")
        if batch_size < world_size:
            raise ValueError(f"batch_size ({batch_size}) must be at least the number of processes ({world_size})")
        if len(labels) < world_size:
            raise ValueError(f"{len(labels)} training items cannot be shared by {world_size} processes")
        self.labels = labels.cpu()
        self.batch_size = batch_size
        self.balance = balance
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.by_class = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels)
        self.class_sizes = counts[counts > 0]
        self.class_starts = torch.cumsum(counts, 0)[counts > 0] - self.class_sizes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        num_items = len(self.labels)
        if self.balance == "instance":
            return torch.randperm(num_items, generator=generator)
        draws = torch.randint(len(self.class_sizes), (num_items,), generator=generator)
        offsets = (torch.rand(num_items, generator=generator, dtype=torch.float64) * self.class_sizes[draws]).long()
        return self.by_class[self.class_starts[draws] + offsets]

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full + (rest >= self.world_size)

    def __iter__(self):
        order = self.epoch_order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size][self.rank :: self.world_size].tolist()
