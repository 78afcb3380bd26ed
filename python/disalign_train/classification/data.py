"""Long-tailed classification data and the samplers of the two stages.

Two sources, one result (`LongTailData`):

- ``digits-lt``: scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download). A
  balanced test set and a balanced validation set are held out per class first; the training set is
  then drawn from what is left with an exponential profile ``n_c = n_max * ratio^(-c / (C - 1))``
  (class 0 is the head, class 9 the tail, as in CIFAR-LT), all from one fixed seed.
- split files in the ImageNet-LT / Places-LT / iNaturalist format: one ``relative/path.jpg label``
  per line, paths relative to an image root; train, optional val, and test lists; images are read
  with Pillow when a batch asks for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .. import runtime


@dataclass
class Split:
    dataset: Dataset  # items are (float image tensor (C, H, W) in [0, 1], int label)
    labels: torch.Tensor  # int64 (N,), the labels of the items in order
    ids: list  # where each item comes from: its index in load_digits, or its path in the split file


@dataclass
class LongTailData:
    name: str
    description: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: Split
    val: Split | None
    test: Split
    natural_images: bool  # horizontal flips are a valid augmentation (not for digits)


class TensorImages(Dataset):
    """Images already in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


class ImageList(Dataset):
    """Images of a split file, read with Pillow and resized to a square when a batch needs them."""

    def __init__(self, root: Path, entries: list[tuple[str, int]], image_size: int):
        self.root = root
        self.paths = [path for path, _ in entries]
        self.labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.root / self.paths[index]) as image:
            image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1).float().div_(255), int(self.labels[index])


def exponential_profile(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Images per class ``n_max * ratio^(-c / (C - 1))``, at least one: class 0 has n_max, the last n_max/ratio."""
    if not (isinstance(imbalance_ratio, (int, float)) and math.isfinite(imbalance_ratio) and imbalance_ratio >= 1):
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"need n_max >= 1 and num_classes >= 1, got n_max={n_max}, num_classes={num_classes}")
    steps = max(num_classes - 1, 1)
    return [max(1, int(n_max * imbalance_ratio ** (-c / steps))) for c in range(num_classes)]


def build_digits_lt(
    imbalance_ratio: float = 50.0, test_per_class: int = 50, val_per_class: int = 10, seed: int = 0
) -> LongTailData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.from_numpy(digits.target).long()
    num_classes = int(labels.max()) + 1
    if test_per_class < 1 or val_per_class < 0:
        raise ValueError(f"need test_per_class >= 1 and val_per_class >= 0, got {test_per_class}, {val_per_class}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)) for c in range(num_classes)]
    held_out = test_per_class + val_per_class
    smallest = min(len(p) for p in per_class)
    if smallest - held_out < 1:
        raise ValueError(
            f"test_per_class + val_per_class = {held_out} leaves no training images (the smallest digit class has {smallest})"
        )
    counts = exponential_profile(smallest - held_out, num_classes, imbalance_ratio)
    test = np.concatenate([p[:test_per_class] for p in per_class])
    val = np.concatenate([p[test_per_class:held_out] for p in per_class])
    train = np.concatenate([p[held_out : held_out + n] for p, n in zip(per_class, counts)])

    def split(indices: np.ndarray) -> Split:
        index = torch.from_numpy(indices)
        return Split(TensorImages(images[index], labels[index]), labels[index], indices.tolist())

    return LongTailData(
        name="digits-lt",
        description=(
            f"digits-lt: sklearn digits, exponential profile, imbalance ratio {imbalance_ratio:g}, data seed {seed}; "
            f"{len(train)} train ({counts[0]}..{counts[-1]} per class), {test_per_class}/class balanced test, "
            f"{val_per_class}/class balanced val, all disjoint"
        ),
        num_classes=num_classes,
        image_shape=(1, 8, 8),
        train=split(train),
        val=split(val) if val_per_class else None,
        test=split(test),
        natural_images=False,
    )


def read_split_file(path: str | Path) -> list[tuple[str, int]]:
    """Entries ``(relative path, label)`` of an ImageNet-LT-style list (``relative/path.jpg label`` per line)."""
    entries = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{line_number}: expected 'relative/path.jpg label' (label >= 0), got {line!r}")
        entries.append((parts[0], int(parts[1])))
    if not entries:
        raise ValueError(f"{path}: the split file lists no images")
    return entries


def find_split_file(data_dir: Path, kind: str) -> Path | None:
    """The one ``*<kind>*.txt`` in data_dir (e.g. ImageNet_LT_train.txt), or None."""
    matches = sorted(data_dir.glob(f"*{kind}*.txt"))
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise ValueError(f"--data {data_dir}: several {kind} lists ({names}); pick one with --{kind}-list")
    return matches[0] if matches else None


def build_split_file_data(
    data_dir: str | Path,
    image_root: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    image_size: int = 64,
) -> LongTailData:
    """Split files as in ImageNet-LT; without a test list the val list is the test set (iNaturalist)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data must be a folder holding the split files, got {str(data_dir)!r}")
    root = Path(image_root) if image_root is not None else data_dir
    lists = {
        kind: Path(given) if given is not None else find_split_file(data_dir, kind)
        for kind, given in (("train", train_list), ("val", val_list), ("test", test_list))
    }
    if lists["train"] is None:
        raise ValueError(f"--data {data_dir}: no *train*.txt split file; name one with --train-list")
    if lists["test"] is None:
        if lists["val"] is None:
            raise ValueError(f"--data {data_dir}: no *test*.txt or *val*.txt split file to evaluate on")
        lists["test"], lists["val"] = lists["val"], None
    entries = {kind: read_split_file(path) for kind, path in lists.items() if path is not None}
    num_classes = 1 + max(label for split in entries.values() for _, label in split)
    counts = torch.bincount(torch.tensor([label for _, label in entries["train"]]), minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise ValueError(f"{lists['train']}: classes {missing[:10]} have no training image (labels must be 0..C-1)")
    splits = {kind: ImageList(root, split, image_size) for kind, split in entries.items()}
    used = ", ".join(f"{kind}={path.name}" for kind, path in lists.items() if path is not None)
    return LongTailData(
        name=data_dir.name,
        description=f"{data_dir}: split files {used}; {len(entries['train'])} train images, {num_classes} classes, "
        f"{int(counts.max())}..{int(counts.min())} per class, images resized to {image_size}x{image_size}",
        num_classes=num_classes,
        image_shape=(3, image_size, image_size),
        train=Split(splits["train"], splits["train"].labels, splits["train"].paths),
        val=Split(splits["val"], splits["val"].labels, splits["val"].paths) if "val" in splits else None,
        test=Split(splits["test"], splits["test"].labels, splits["test"].paths),
        natural_images=True,
    )


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
