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
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.errors import UserError


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
        raise UserError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
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
        raise UserError(f"need test_per_class >= 1 and val_per_class >= 0, got {test_per_class}, {val_per_class}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)) for c in range(num_classes)]
    held_out = test_per_class + val_per_class
    smallest = min(len(p) for p in per_class)
    if smallest - held_out < 1:
        raise UserError(
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
    return [(image, label) for image, label, _ in _read_lines(Path(path))]


def _read_lines(path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` per entry."""
    if not path.is_file():
        raise UserError(f"split file {path} does not exist")
    entries = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{path}:{line_number}: expected 'relative/path.jpg label' (label >= 0), got {line!r}")
        entries.append((parts[0], int(parts[1]), line_number))
    if not entries:
        raise UserError(f"{path}: the split file lists no images")
    return entries


def check_images(split_file: Path, root: Path, entries: list[tuple[str, int, int]]) -> None:
    """Every listed image exists and decodes (Pillow's verify: header and structure, no full decode),
    before any training: the error names the split file, its line and the image."""
    for image, _, line in entries:
        path = root / image
        if not path.is_file():
            raise UserError(f"{split_file}:{line}: image {path} does not exist (paths are relative to --image-root {root})")
        try:
            with Image.open(path) as opened:
                opened.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{split_file}:{line}: image {path} cannot be decoded: {error}") from error


def find_split_file(data_dir: Path, kind: str) -> Path | None:
    """The one ``*<kind>*.txt`` in data_dir (e.g. ImageNet_LT_train.txt), or None."""
    matches = sorted(data_dir.glob(f"*{kind}*.txt"))
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise UserError(f"--data {data_dir}: several {kind} lists ({names}); pick one with --{kind}-list")
    return matches[0] if matches else None


def build_split_file_data(
    data_dir: str | Path,
    image_root: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    image_size: int = 64,
) -> LongTailData:
    """Split files as in ImageNet-LT; without a test list the val list is the test set (iNaturalist).
    Every file and label is checked here, before training (``check_images``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data must be a folder holding the split files, got {str(data_dir)!r}")
    root = Path(image_root) if image_root is not None else data_dir
    lists = {
        kind: Path(given) if given is not None else find_split_file(data_dir, kind)
        for kind, given in (("train", train_list), ("val", val_list), ("test", test_list))
    }
    if lists["train"] is None:
        raise UserError(f"--data {data_dir}: no *train*.txt split file; name one with --train-list")
    if lists["test"] is None:
        if lists["val"] is None:
            raise UserError(f"--data {data_dir}: no *test*.txt or *val*.txt split file to evaluate on")
        lists["test"], lists["val"] = lists["val"], None
    lined = {kind: _read_lines(path) for kind, path in lists.items() if path is not None}
    num_classes = 1 + max(label for image, label, _ in lined["train"])
    for kind, split in lined.items():
        for image, label, line in split:
            if label >= num_classes:
                raise UserError(f"{lists[kind]}:{line}: label {label} of {image} is not a training class (0..{num_classes - 1})")
    counts = torch.bincount(torch.tensor([label for _, label, _ in lined["train"]]), minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise UserError(f"{lists['train']}: classes {missing[:10]} have no training image (labels must be 0..C-1)")
    for kind, split in lined.items():
        check_images(lists[kind], root, split)
    entries = {kind: [(image, label) for image, label, _ in split] for kind, split in lined.items()}
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
