"""Detection data: COCO/LVIS instances JSON (read and written), the embedded scenes-lt exported as
one (``OUT/data``, rebuilt when the flags it was made from change), and the tensors training uses.

``--data DIR`` is the simple layout (``train.json`` + ``train/``, ``<test-split>.json`` +
``<test-split>/``); a COCO or LVIS download is pointed at with ``--train-json``, ``--train-images``,
``--test-json``, ``--test-images``. Every annotation is checked and every image read before stage 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .. import scenes as scene_lib
from ..core.errors import UserError
from ..scenes import IGNORE_INDEX, Scene, SceneSet
from .metrics import LVIS_LETTER, load_ground_truth, lvis_group
from .model import DetectorConfig, sample_training_rois

def export_coco(scene_set: SceneSet, json_path, image_dir, frequency_from: SceneSet | None = None) -> Path:
    """Writes the images as PNG into ``image_dir`` and a COCO/LVIS instances JSON to ``json_path``.

    Category ``frequency`` / ``image_count`` come from ``frequency_from`` (the training set, as LVIS
    does for its validation file) or from ``scene_set`` itself.
    """
    from pycocotools import mask as mask_utils

    json_path, image_dir = Path(json_path), Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    image_counts = (frequency_from or scene_set).thing_image_counts()
    images, annotations = [], []
    for i, scene in enumerate(scene_set.scenes):
        file_name = f"scene_{i:06d}.png"
        Image.fromarray(scene.image).save(image_dir / file_name)
        height, width = scene.semantic.shape
        images.append(dict(id=i + 1, file_name=file_name, width=width, height=height))
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=int(label) + 1,
                bbox=[x0, y0, x1 - x0, y1 - y0], area=float(mask.sum()), iscrowd=0, segmentation=rle,
            ))
    categories = [
        dict(id=k + 1, name=name, image_count=int(image_counts[k]), frequency=LVIS_LETTER[lvis_group(int(image_counts[k]))])
        for k, name in enumerate(scene_set.thing_class_names)
    ]
    stuff_names = scene_set.seg_class_names[: scene_set.num_stuff]
    payload = dict(images=images, annotations=annotations, categories=categories, stuff_categories=stuff_names)
    json_path.write_text(json.dumps(payload))
    return json_path


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools' decode predates numpy 2's __array__(copy=...) protocol
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def read_json(path: Path, flag: str) -> dict:
    """A COCO/LVIS instances file, or a UserError naming ``flag``, the file and what is wrong."""
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path} is not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise UserError(f"{flag} {path} is not a COCO instances file: missing {key!r}")
    return data


def _check_annotation(ann: dict, json_path: Path, flag: str, label_of: dict, image_ids: set) -> None:
    where = f"{flag} {json_path}: annotation {ann.get('id', '?')}"
    for key in ("image_id", "category_id", "bbox"):
        if key not in ann:
            raise UserError(f"{where} has no {key!r}")
    if ann["category_id"] not in label_of:
        raise UserError(f"{where} has unknown category_id {ann['category_id']}")
    if ann["image_id"] not in image_ids:
        raise UserError(f"{where} refers to image_id {ann['image_id']}, which is not in 'images'")
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box) and box[2] >= 0 and box[3] >= 0):
        raise UserError(f"{where} has bbox {box!r}; expected [x, y, width, height] with width, height >= 0")


def load_coco(json_path, image_dir, image_size: int | None = None, flag: str = "--train-json") -> SceneSet:
    """Reads a COCO/LVIS instances JSON (RLE or polygon masks; boxes from ``bbox`` when masks are absent).

    Categories are sorted by id and mapped to contiguous labels 0..K-1. The semantic map holds
    ``num_stuff + label`` on instance pixels (later annotations on top) and 255 elsewhere, since
    instance files carry no stuff labels; ``stuff_categories`` (if present) only names the stuff
    classes. With ``image_size`` images, masks and boxes are resized to image_size x image_size.
    Every annotation is checked and every image read here, before training.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    data = read_json(json_path, flag)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    thing_names = [c["name"] for c in categories]
    stuff_names = list(data.get("stuff_categories", []))
    image_ids = {im.get("id") for im in data["images"]}
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        _check_annotation(ann, json_path, flag, label_of, image_ids)
        by_image.setdefault(ann["image_id"], []).append(ann)
    scenes = []
    for info in sorted(data["images"], key=lambda im: im["id"]):
        image_path = image_dir / info.get("file_name", "")
        if not image_path.is_file():
            images_flag = flag.replace("json", "images")
            raise UserError(f"{flag} {json_path}: image {info['id']} file {image_path} does not exist ({images_flag} {image_dir})")
        try:
            image = Image.open(image_path).convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{flag} {json_path}: image {info['id']} file {image_path} cannot be decoded: {error}") from error
        width, height = image.size
        anns = [a for a in by_image.get(info["id"], []) if not a.get("iscrowd", 0)]
        masks = np.zeros((len(anns), height, width), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for i, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[i] = (x, y, x + w, y + h)
            if ann.get("segmentation"):
                masks[i] = _decode_segmentation(ann["segmentation"], height, width)
            else:
                masks[i, int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
        if image_size is not None:
            image = image.resize((image_size, image_size), Image.BILINEAR)
            boxes *= np.array([image_size / width, image_size / height] * 2, dtype=np.float32)
            masks = np.stack([np.asarray(Image.fromarray(m).resize((image_size, image_size), Image.NEAREST)) for m in masks]) \
                if len(anns) else np.zeros((0, image_size, image_size), bool)
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        semantic = np.full(masks.shape[1:], IGNORE_INDEX, dtype=np.uint8)
        for mask, label in zip(masks, labels):
            semantic[mask] = len(stuff_names) + label
        scenes.append(Scene(np.asarray(image, dtype=np.uint8), semantic, boxes, labels, masks))
    return SceneSet(scenes, stuff_names + thing_names, thing_names, dict(source=str(json_path)))


class DetectionSet:
    """A SceneSet as tensors: uint8 images (N, 3, S, S), per-image boxes and labels in the S x S frame,
    and each image's COCO id and scale back to its original size (for the detections)."""

    def __init__(self, scene_set: SceneSet, image_ids=None, original_sizes=None):
        images = np.stack([s.image for s in scene_set.scenes])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.boxes = [torch.from_numpy(s.boxes).float() for s in scene_set.scenes]
        self.labels = [torch.from_numpy(s.labels).long() for s in scene_set.scenes]
        self.class_names = list(scene_set.thing_class_names)
        size = self.images.shape[-1]
        self.image_ids = list(image_ids) if image_ids is not None else list(range(1, len(self) + 1))
        sizes = torch.tensor(original_sizes, dtype=torch.float32) if original_sizes is not None else None
        self.scales = sizes / size if sizes is not None else torch.ones(len(self), 2)  # (width, height) factors
        self.instance_counts = scene_set.thing_instance_counts()
        self.image_counts = scene_set.thing_image_counts()

    def __len__(self) -> int:
        return self.images.shape[0]


SPLIT_FLAGS = ("--train-json", "--train-images", "--test-json", "--test-images")


def data_paths(args, out: Path, logger) -> dict[str, Path]:
    """The four paths: from the split flags, from ``--data DIR``'s simple layout, or the generated scenes-lt."""
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in SPLIT_FLAGS}
    if any(given.values()):
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            raise UserError(f"the split flags go together: also pass {', '.join(missing)}")
        return {flag: Path(value) for flag, value in given.items()}
    if args.data is not None:
        root = Path(args.data)
        paths = {"--train-json": root / "train.json", "--train-images": root / "train",
                 "--test-json": root / f"{args.test_split}.json", "--test-images": root / args.test_split}
        for flag, path in paths.items():
            if not path.exists():
                others = sorted(p.name for p in root.glob("*.json")) if root.is_dir() else []
                hint = f"; JSON files there: {', '.join(others)}" if others else ""
                if any(name.startswith("val") for name in others):
                    hint += " (an evaluation split named val: --test-split val)"
                raise UserError(
                    f"--data {root}: missing {path.name} (the simple layout is train.json + train/ and "
                    f"{args.test_split}.json + {args.test_split}/{hint}). For a COCO/LVIS layout pass "
                    "--train-json annotations/instances_train2017.json --train-images train2017 "
                    "--test-json annotations/instances_val2017.json --test-images val2017"
                )
        return paths
    made_from = dict(generator="scenes-lt", data_seed=args.data_seed, num_train=args.num_train, num_test=args.num_test,
                     image_size=args.image_size)

    def build(root):
        train_set, test_set = scene_lib.make_scenes_lt(seed=args.data_seed, num_train=args.num_train,
                                                       num_test=args.num_test, image_size=args.image_size)
        export_coco(train_set, root / "train.json", root / "train")
        export_coco(test_set, root / "test.json", root / "test", frequency_from=train_set)
        logger.info("generated scenes-lt (seed %d): %d train / %d test images -> %s", args.data_seed, len(train_set),
                    len(test_set), root)

    root = scene_lib.prepared(out / "data", made_from, build, logger)
    return {"--train-json": root / "train.json", "--train-images": root / "train",
            "--test-json": root / "test.json", "--test-images": root / "test"}


def load_data(args, out: Path, logger):
    """(train DetectionSet, test DetectionSet, ground-truth COCO of the test set)."""
    paths = data_paths(args, out, logger)
    for flag in ("--train-images", "--test-images"):
        if not paths[flag].is_dir():
            raise UserError(f"{flag} {paths[flag]} is not a folder")
    train_set = load_coco(paths["--train-json"], paths["--train-images"], args.image_size, "--train-json")
    test_set = load_coco(paths["--test-json"], paths["--test-images"], args.image_size, "--test-json")
    if train_set.thing_class_names != test_set.thing_class_names:
        raise UserError(f"{paths['--train-json']} and {paths['--test-json']} have different categories")
    if not len(train_set):
        raise UserError(f"{paths['--train-json']} lists no images")
    ground_truth = load_ground_truth(paths["--test-json"])
    image_ids = sorted(ground_truth.getImgIds())  # load_coco orders images by id too
    sizes = [(ground_truth.imgs[i]["width"], ground_truth.imgs[i]["height"]) for i in image_ids]
    logger.info(f"data {paths['--train-json']}: {len(train_set)} train / {len(test_set)} test images, "
                f"{len(train_set.thing_class_names)} categories, train images per category {train_set.thing_image_counts().tolist()}")
    return DetectionSet(train_set), DetectionSet(test_set, image_ids, sizes), ground_truth


def flip_horizontally(images: torch.Tensor, boxes: list[torch.Tensor]):
    width = images.shape[-1]
    flipped = [torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1) for b in boxes]
    return images.flip(-1), flipped


def training_batch(config: DetectorConfig, data: DetectionSet, indices, anchors, device):
    """Images (half of them flipped) and sampled RoIs (R, 5), labels and regression targets of a batch."""
    images = data.images[indices]
    boxes = [data.boxes[i] for i in indices]
    flip = torch.rand(len(indices)) < 0.5
    flipped_images, flipped_boxes = flip_horizontally(images, boxes)
    images = torch.where(flip[:, None, None, None], flipped_images, images)
    boxes = [fb if f else b for f, b, fb in zip(flip.tolist(), boxes, flipped_boxes)]
    rois, labels, targets = [], [], []
    for k, i in enumerate(indices):
        r, y, t = sample_training_rois(config, boxes[k].to(device), data.labels[i].to(device), anchors)
        rois.append(F.pad(r, (1, 0), value=float(k)))
        labels.append(y)
        targets.append(t)
    return images.to(device), torch.cat(rois), torch.cat(labels), torch.cat(targets)
