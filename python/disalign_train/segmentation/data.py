"""Segmentation data: ADE20K-style folders (read and written), the embedded scenes-lt exported into
one (``OUT/data/scenes-lt``, rebuilt when the size flags change), and the tensors training uses.

Every image and label map is read (and checked) when the data is loaded, before stage 1.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .. import scenes
from ..core.errors import UserError
from ..scenes import IGNORE_INDEX, Scene, SceneSet

ADE_CLASS_FILES = ("objectInfo.csv", "objectInfo150.csv")


def export_ade20k(scene_set: SceneSet, root, split: str = "training") -> Path:
    """Writes ``root/images/<split>/<i>.png``, ``root/annotations/<split>/<i>.png`` (class + 1, 0 = ignore)
    and ``root/objectInfo.csv`` (class names with this split's pixel ratio). Returns root."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    if len(scene_set.seg_class_names) > 254:
        raise UserError(f"ADE20K label maps hold at most 254 classes, got {len(scene_set.seg_class_names)}")
    for i, scene in enumerate(scene_set.scenes):
        stem = f"scene_{i:06d}"
        Image.fromarray(scene.image).save(image_dir / f"{stem}.png")
        stored = np.where(scene.semantic == IGNORE_INDEX, 0, scene.semantic.astype(np.int64) + 1).astype(np.uint8)
        Image.fromarray(stored).save(label_dir / f"{stem}.png")
    counts = scene_set.seg_pixel_counts()
    ratios = counts / max(counts.sum(), 1)
    with open(root / ADE_CLASS_FILES[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for c, name in enumerate(scene_set.seg_class_names):
            writer.writerow([c + 1, f"{ratios[c]:.6f}", 0, 0, name])
    if scene_set.thing_class_names:
        (root / "thing_classes.txt").write_text("".join(f"{n}\n" for n in scene_set.thing_class_names))
    return root


def _read_ade_class_names(root: Path) -> list[str]:
    for name in ADE_CLASS_FILES:
        path = root / name
        if path.exists():
            lines = path.read_text().splitlines()
            delimiter = "\t" if "\t" in lines[0] else ","
            rows = sorted(csv.DictReader(lines, delimiter=delimiter), key=lambda r: int(r["Idx"]))
            return [row["Name"].split(";")[0].strip() for row in rows]
    raise UserError(f"--data {root}: no class names file (expected one of {', '.join(ADE_CLASS_FILES)})")


def load_ade20k(root, split: str = "training", image_size: int | None = None) -> SceneSet:
    """Reads an ADE20K-style folder (images/<split>/*.jpg|png, annotations/<split>/*.png, class file).

    Stored label 0 becomes 255 (ignore) and c + 1 becomes c. With ``image_size`` every image is
    resized to image_size x image_size (bilinear; labels nearest). Boxes, labels and masks are empty.
    """
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise UserError(f"--data {root}: an ADE20K-style folder needs {image_dir} and {label_dir} "
                        "(other split names: --train-split / --test-split)")
    seg_names = _read_ade_class_names(root)
    thing_file = root / "thing_classes.txt"
    thing_names = thing_file.read_text().splitlines() if thing_file.exists() else []
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not image_paths:
        raise UserError(f"--data {root}: no .png/.jpg images in {image_dir}")
    scenes = []
    for image_path in image_paths:
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.exists():
            raise UserError(f"image {image_path} has no label map {label_path}")
        image, label = _open(image_path).convert("RGB"), _open(label_path)
        if image_size is not None:
            image = image.resize((image_size, image_size), Image.BILINEAR)
            label = label.resize((image_size, image_size), Image.NEAREST)
        stored = np.asarray(label, dtype=np.int64)
        if stored.ndim != 2:
            raise UserError(f"label map {label_path} must be single-channel, got shape {stored.shape}")
        if stored.max() > len(seg_names):
            raise UserError(f"label map {label_path} has class value {stored.max()} > {len(seg_names)} classes")
        semantic = np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8)
        height, width = semantic.shape
        scenes.append(Scene(np.asarray(image, dtype=np.uint8), semantic, np.zeros((0, 4), np.float32),
                            np.zeros(0, np.int64), np.zeros((0, height, width), bool)))
    return SceneSet(scenes, seg_names, thing_names, dict(source=str(root), split=split))


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path} cannot be decoded: {error}") from error


def load_data(args, logger) -> tuple[SceneSet, SceneSet]:
    """(train, test): --data read as an ADE20K-style folder, or scenes-lt generated into OUT/data."""
    if args.data is None:
        made_from = dict(generator="scenes-lt", data_seed=args.data_seed, num_train=args.num_train,
                         num_test=args.num_test, image_size=args.image_size,
                         splits=[args.train_split, args.test_split])

        def build(root):
            train, test = scenes.make_scenes_lt(args.data_seed, args.num_train, args.num_test, args.image_size)
            export_ade20k(train, root, args.train_split)
            export_ade20k(test, root, args.test_split)
            logger.info("generated scenes-lt (seed %d): %d train / %d test images -> %s",
                        args.data_seed, len(train), len(test), root)

        root = scenes.prepared(Path(args.out) / "data" / "scenes-lt", made_from, build, logger)
    else:
        root = Path(args.data)
        if not root.is_dir():
            raise UserError(f"--data {root} is not a folder (expected an ADE20K-style root)")
    image_size = None if args.data is None else args.image_size
    train = load_ade20k(root, args.train_split, image_size)
    test = load_ade20k(root, args.test_split, image_size)
    if train.seg_class_names != test.seg_class_names:
        raise UserError(f"--data {root}: the splits name different classes")
    sizes = {s.image.shape for s in train.scenes + test.scenes}
    if len(sizes) > 1:
        raise UserError(f"--data {root}: images of different sizes {sorted(sizes)[:3]}...; pass --image-size to resize them")
    return train, test


def to_tensors(scene_set: SceneSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) float32 in [-1, 1] and labels (N, H, W) int64."""
    images = np.stack([s.image for s in scene_set.scenes]).transpose(0, 3, 1, 2)
    labels = np.stack([s.semantic for s in scene_set.scenes]).astype(np.int64)
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0), torch.from_numpy(labels)
