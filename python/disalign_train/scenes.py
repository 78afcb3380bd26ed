"""`scenes-lt`: procedural long-tail scenes for segmentation and detection, and their file formats.

Every image is a few large "stuff" regions (sky, grass, water, road, sand, snow: horizontal bands
with wavy borders) with object instances ("things") painted over them. A thing category is a
(shape, colour, texture) combination. Categories come in look-alike pairs: each of the
``num_things // 2`` frequent "prototype" categories has a rare twin with the same shape, a colour
a little off and a different texture, and the twin of the most frequent prototype is the rarest
category. A network trained on the imbalanced set therefore labels the rare twins as their frequent
prototypes, which is the long-tail bias that DisAlign corrects.

Thing categories are drawn with probability ``p_k ∝ imbalance^(-k / (K - 1))`` (category 0 is
``imbalance`` times more frequent than category K-1), stuff classes with fixed long-tail weights.
Per-instance colour jitter, pixel noise and random sizes keep the problem learnable but not trivial.
Everything is deterministic per seed (image i of a set uses ``numpy.random.default_rng([seed, i])``).

Formats, so that a user's real data goes through the same loaders as the embedded scenes:

- ADE20K layout (``ADEChallengeData2016``): ``images/<split>/*.png|jpg``, ``annotations/<split>/*.png``
  label maps with 0 = "other" (ignored) and class c stored as c + 1 (the benchmark's
  ``reduce_zero_label`` convention), and ``objectInfo.csv`` (Idx, Ratio, Train, Val, Name as in
  ADE20K's ``objectInfo150.csv``, which the loader also accepts).
- COCO/LVIS instances JSON: ``images``, ``annotations`` (bbox xywh, category_id, area, iscrowd 0,
  RLE ``segmentation``), ``categories`` (1-based ids, LVIS ``frequency`` r/c/f and ``image_count``
  from training image counts) plus an extra ``stuff_categories`` list of names. COCO annotations
  hold instances only, so the semantic map of a loaded set labels thing pixels and marks all
  other pixels 255 (ignore).
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255

# (name, RGB, texture, relative frequency): large regions; "snow" is the rare stuff class.
STUFF_CLASSES = [
    ("sky", (135, 190, 235), "gradient", 1.0),
    ("grass", (70, 150, 60), "speckle", 0.8),
    ("road", (105, 105, 110), "solid", 0.5),
    ("water", (40, 80, 165), "waves", 0.35),
    ("sand", (210, 190, 140), "speckle", 0.2),
    ("snow", (235, 240, 245), "solid", 0.06),
]
# Prototype thing families: (shape, colour name, RGB, texture). The twin of each family keeps the
# shape, shifts the colour by TWIN_COLOUR_SHIFT and uses TWIN_TEXTURE[texture].
THING_FAMILIES = [
    ("circle", "red", (215, 45, 40), "solid"),
    ("square", "yellow", (230, 210, 50), "hstripes"),
    ("triangle", "magenta", (200, 55, 195), "solid"),
    ("ring", "orange", (240, 135, 30), "solid"),
    ("diamond", "cyan", (45, 200, 210), "checker"),
    ("cross", "black", (35, 35, 40), "solid"),
    ("bar", "white", (245, 245, 240), "vstripes"),
    ("ellipse", "brown", (135, 80, 35), "solid"),
    ("circle", "blue", (30, 60, 220), "checker"),
    ("square", "pink", (240, 150, 170), "solid"),
]
TWIN_TEXTURE = {"solid": "dots", "hstripes": "checker", "checker": "hstripes", "vstripes": "dots", "dots": "solid"}
TWIN_COLOUR_SHIFT = np.array([-25, 20, 15])


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8 segmentation class, IGNORE_INDEX where unlabeled
    boxes: np.ndarray  # (M, 4) float32 x0, y0, x1, y1 (pixels, x1/y1 exclusive)
    labels: np.ndarray  # (M,) int64 thing category in [0, num_thing_classes)
    masks: np.ndarray  # (M, H, W) bool visible instance masks


@dataclass
class SceneSet:
    scenes: list[Scene]
    seg_class_names: list[str]  # stuff classes first, then one per thing category
    thing_class_names: list[str]  # thing k is segmentation class num_stuff + k
    meta: dict = field(default_factory=dict)  # how the set was made (generator settings), informational

    @property
    def num_stuff(self) -> int:
        return len(self.seg_class_names) - len(self.thing_class_names)

    def __len__(self) -> int:
        return len(self.scenes)

    def seg_pixel_counts(self) -> np.ndarray:
        """Labelled pixels per segmentation class (ignore excluded)."""
        counts = np.zeros(len(self.seg_class_names), dtype=np.int64)
        for scene in self.scenes:
            valid = scene.semantic[scene.semantic != IGNORE_INDEX]
            counts += np.bincount(valid, minlength=len(counts))[: len(counts)]
        return counts

    def thing_image_counts(self) -> np.ndarray:
        """Images containing each thing category (LVIS's frequency statistic)."""
        counts = np.zeros(len(self.thing_class_names), dtype=np.int64)
        for scene in self.scenes:
            counts[np.unique(scene.labels)] += 1
        return counts

    def thing_instance_counts(self) -> np.ndarray:
        counts = np.zeros(len(self.thing_class_names), dtype=np.int64)
        for scene in self.scenes:
            counts += np.bincount(scene.labels, minlength=len(counts))
        return counts


@dataclass(frozen=True)
class ThingCategory:
    name: str
    shape: str
    rgb: tuple[int, int, int]
    texture: str


def thing_categories(num_things: int) -> list[ThingCategory]:
    """Categories in frequency order: prototypes first, then twins in reverse (rarest = twin of 0)."""
    num_families = num_things // 2
    if num_things < 2 or num_things % 2 or num_families > len(THING_FAMILIES):
        raise ValueError(f"num_things must be an even number in [2, {2 * len(THING_FAMILIES)}], got {num_things}")
    prototypes, twins = [], []
    for shape, colour, rgb, texture in THING_FAMILIES[:num_families]:
        prototypes.append(ThingCategory(f"{colour}-{texture}-{shape}", shape, rgb, texture))
        twin_rgb = tuple(int(v) for v in np.clip(np.array(rgb) + TWIN_COLOUR_SHIFT, 0, 255))
        twin_texture = TWIN_TEXTURE[texture]
        twins.append(ThingCategory(f"pale{colour}-{twin_texture}-{shape}", shape, twin_rgb, twin_texture))
    return prototypes + twins[::-1]


def long_tail_probabilities(num_classes: int, imbalance: float) -> np.ndarray:
    """``p_k ∝ imbalance^(-k/(K-1))``: exponential profile, first/last ratio = imbalance."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    exponents = np.arange(num_classes) / max(num_classes - 1, 1)
    weights = float(imbalance) ** -exponents
    return weights / weights.sum()


def _texture(name: str, yy: np.ndarray, xx: np.ndarray, period: int, rng: np.random.Generator) -> np.ndarray:
    """Brightness multiplier in [0.6, 1.15] with the texture's pattern."""
    if name == "solid":
        return np.ones_like(yy, dtype=np.float32)
    if name == "hstripes":
        return np.where((yy // period) % 2 == 0, 1.0, 0.62).astype(np.float32)
    if name == "vstripes":
        return np.where((xx // period) % 2 == 0, 1.0, 0.62).astype(np.float32)
    if name == "checker":
        return np.where(((yy // period) + (xx // period)) % 2 == 0, 1.0, 0.62).astype(np.float32)
    if name == "dots":
        on = ((yy % period) < period // 2) & ((xx % period) < period // 2)
        return np.where(on, 0.6, 1.0).astype(np.float32)
    if name == "gradient":
        return (1.1 - 0.3 * yy / max(float(yy.max()), 1.0)).astype(np.float32)
    if name == "speckle":
        return rng.uniform(0.8, 1.15, size=yy.shape).astype(np.float32)
    if name == "waves":
        return (0.9 + 0.15 * np.sin(yy * 1.3 + 2.0 * np.sin(xx * 0.3))).astype(np.float32)
    raise ValueError(f"unknown texture {name!r}")


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Mask of a shape centred at (0, 0) in pixel offsets (dy, dx)."""
    ay, ax = np.abs(dy), np.abs(dx)
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return np.maximum(ay, ax) <= radius * 0.85
    if shape == "triangle":  # apex up
        return (dy <= radius * 0.8) & (ax <= (dy + radius) * 0.6)
    if shape == "ring":
        r2 = dy**2 + dx**2
        return (r2 <= radius**2) & (r2 >= (0.55 * radius) ** 2)
    if shape == "diamond":
        return ay + ax <= radius
    if shape == "cross":
        arm = radius * 0.35
        return (np.maximum(ay, ax) <= radius) & ((ay <= arm) | (ax <= arm))
    if shape == "bar":
        return (ax <= radius) & (ay <= radius * 0.4)
    if shape == "ellipse":
        return (dx / radius) ** 2 + (dy / (0.6 * radius)) ** 2 <= 1
    raise ValueError(f"unknown shape {shape!r}")


def _inner_contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (1 pixel wide)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _paint_stuff(rng, size, yy, xx, stuff_probs, scale):
    """Two or three horizontal bands of distinct stuff classes with wavy borders."""
    num_bands = int(rng.integers(2, 4))
    classes = rng.choice(len(STUFF_CLASSES), size=num_bands, replace=False, p=stuff_probs)
    cuts = np.sort(rng.uniform(0.25, 0.8, size=num_bands - 1)) * size
    semantic = np.zeros((size, size), dtype=np.uint8)
    image = np.zeros((size, size, 3), dtype=np.float32)
    band = np.zeros((size, size), dtype=np.int64)
    for cut in cuts:
        amplitude, frequency, phase = rng.uniform(1, 4) * scale, rng.uniform(0.05, 0.2) / scale, rng.uniform(0, 6.3)
        band += yy >= cut + amplitude * np.sin(frequency * xx + phase)
    for index, stuff in enumerate(classes):
        region = band == index
        _, rgb, texture, _ = STUFF_CLASSES[stuff]
        colour = np.array(rgb, dtype=np.float32) + rng.normal(0, 8, size=3)
        pattern = _texture(texture, yy, xx, max(2, round(3 * scale)), rng)
        image[region] = colour * pattern[region, None]
        semantic[region] = stuff
    return image, semantic


def _generate_scene(rng, size, categories, thing_probs, stuff_probs, objects_per_image, noise_std, ignore_border):
    scale = size / 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image, semantic = _paint_stuff(rng, size, yy, xx, stuff_probs, scale)
    num_stuff = len(STUFF_CLASSES)
    occupied = np.zeros((size, size), dtype=bool)
    owner = np.full((size, size), -1, dtype=np.int64)
    labels = []
    for _ in range(int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))):
        label = int(rng.choice(len(categories), p=thing_probs))
        category = categories[label]
        radius = rng.uniform(5, 11) * scale
        for _attempt in range(8):  # prefer a free spot; accept overlap (occlusion) after that
            cy, cx = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(category.shape, yy - cy, xx - cx, radius)
            if not (mask & occupied).any():
                break
        colour = np.array(category.rgb, dtype=np.float32) + rng.normal(0, 10, size=3)
        pattern = _texture(category.texture, yy - cy, xx - cx, max(2, round(3 * scale)), rng)
        image[mask] = colour * pattern[mask, None]
        occupied |= mask
        owner[mask] = len(labels)
        labels.append(label)
    masks = np.stack([owner == i for i in range(len(labels))]) if labels else np.zeros((0, size, size), bool)
    keep = masks.reshape(len(labels), -1).sum(1) >= 4  # fully occluded instances are dropped
    masks, labels = masks[keep], np.asarray(labels, dtype=np.int64)[keep]
    boxes = np.zeros((len(labels), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.nonzero(mask)
        boxes[i] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        semantic[mask] = num_stuff + labels[i]
        if ignore_border:
            semantic[_inner_contour(mask)] = IGNORE_INDEX
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, noise_std, size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(image, semantic, boxes, labels, masks)


def generate_scenes(
    num_images: int,
    seed: int,
    image_size: int = 64,
    num_things: int = 16,
    imbalance: float = 200.0,
    objects_per_image: tuple[int, int] = (2, 4),
    noise_std: float = 12.0,
    ignore_border: bool = True,
) -> SceneSet:
    """``num_images`` scenes, deterministic per ``seed``; thing category k has probability ∝ imbalance^(-k/(K-1))."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24, got {image_size}")
    if not 1 <= objects_per_image[0] <= objects_per_image[1]:
        raise ValueError(f"objects_per_image must be (low, high) with 1 <= low <= high, got {objects_per_image}")
    categories = thing_categories(num_things)
    thing_probs = long_tail_probabilities(num_things, imbalance)
    stuff_weights = np.array([w for *_, w in STUFF_CLASSES])
    stuff_probs = stuff_weights / stuff_weights.sum()
    scenes = [
        _generate_scene(
            np.random.default_rng([seed, i]), image_size, categories, thing_probs, stuff_probs,
            objects_per_image, noise_std, ignore_border,
        )
        for i in range(num_images)
    ]
    thing_names = [c.name for c in categories]
    meta = dict(generator="scenes-lt", seed=seed, image_size=image_size, num_things=num_things, imbalance=imbalance)
    return SceneSet(scenes, [name for name, *_ in STUFF_CLASSES] + thing_names, thing_names, meta)


def make_scenes_lt(
    seed: int = 0,
    num_train: int = 600,
    num_test: int = 200,
    image_size: int = 64,
    num_things: int = 16,
    imbalance: float = 200.0,
    test_imbalance: float = 1.0,
) -> tuple[SceneSet, SceneSet]:
    """(train, test): train long-tailed; test drawn with ``test_imbalance`` (1 = balanced things, so every
    tail category is evaluated on about ``num_test * 3 / num_things`` instances). Seeds 2*seed and
    2*seed + 1 keep the two sets disjoint."""
    common = dict(image_size=image_size, num_things=num_things)
    train = generate_scenes(num_train, 2 * seed, imbalance=imbalance, **common)
    test = generate_scenes(num_test, 2 * seed + 1, imbalance=test_imbalance, **common)
    return train, test


# ---------------------------------------------------------------- ADE20K-style folders

ADE_CLASS_FILES = ("objectInfo.csv", "objectInfo150.csv")


def export_ade20k(scene_set: SceneSet, root, split: str = "training") -> Path:
    """Writes ``root/images/<split>/<i>.png``, ``root/annotations/<split>/<i>.png`` (class + 1, 0 = ignore)
    and ``root/objectInfo.csv`` (class names with this split's pixel ratio). Returns root."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    if len(scene_set.seg_class_names) > 254:
        raise ValueError(f"ADE20K label maps hold at most 254 classes, got {len(scene_set.seg_class_names)}")
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
    raise FileNotFoundError(f"no class names file in {root} (expected one of {', '.join(ADE_CLASS_FILES)})")


def load_ade20k(root, split: str = "training", image_size: int | None = None) -> SceneSet:
    """Reads an ADE20K-style folder (images/<split>/*.jpg|png, annotations/<split>/*.png, class file).

    Stored label 0 becomes 255 (ignore) and c + 1 becomes c. With ``image_size`` every image is
    resized to image_size x image_size (bilinear; labels nearest). Boxes, labels and masks are empty.
    """
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise FileNotFoundError(f"ADE20K-style data needs {image_dir} and {label_dir}")
    seg_names = _read_ade_class_names(root)
    thing_file = root / "thing_classes.txt"
    thing_names = thing_file.read_text().splitlines() if thing_file.exists() else []
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not image_paths:
        raise FileNotFoundError(f"no .png/.jpg images in {image_dir}")
    scenes = []
    for image_path in image_paths:
        label_path = label_dir / f"{image_path.stem}.png"
        if not label_path.exists():
            raise FileNotFoundError(f"image {image_path.name} has no label map {label_path}")
        image, label = Image.open(image_path).convert("RGB"), Image.open(label_path)
        if image_size is not None:
            image = image.resize((image_size, image_size), Image.BILINEAR)
            label = label.resize((image_size, image_size), Image.NEAREST)
        stored = np.asarray(label, dtype=np.int64)
        if stored.ndim != 2:
            raise ValueError(f"label map {label_path} must be single-channel, got shape {stored.shape}")
        if stored.max() > len(seg_names):
            raise ValueError(f"label map {label_path} has class value {stored.max()} > {len(seg_names)} classes")
        semantic = np.where(stored == 0, IGNORE_INDEX, stored - 1).astype(np.uint8)
        height, width = semantic.shape
        scenes.append(Scene(np.asarray(image, dtype=np.uint8), semantic, np.zeros((0, 4), np.float32),
                            np.zeros(0, np.int64), np.zeros((0, height, width), bool)))
    return SceneSet(scenes, seg_names, thing_names, dict(source=str(root), split=split))


# ---------------------------------------------------------------- COCO/LVIS-style JSON


def lvis_frequency(image_count: int) -> str:
    """LVIS groups: rare (1-10 training images), common (11-100), frequent (> 100)."""
    return "r" if image_count <= 10 else "c" if image_count <= 100 else "f"


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
        dict(id=k + 1, name=name, image_count=int(image_counts[k]), frequency=lvis_frequency(int(image_counts[k])))
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


def load_coco(json_path, image_dir, image_size: int | None = None) -> SceneSet:
    """Reads a COCO/LVIS instances JSON (RLE or polygon masks; boxes from ``bbox`` when masks are absent).

    Categories are sorted by id and mapped to contiguous labels 0..K-1. The semantic map holds
    ``num_stuff + label`` on instance pixels (later annotations on top) and 255 elsewhere, since
    instance files carry no stuff labels; ``stuff_categories`` (if present) only names the stuff
    classes. With ``image_size`` images, masks and boxes are resized to image_size x image_size.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    data = json.loads(json_path.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path} is not a COCO instances file: missing {key!r}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    thing_names = [c["name"] for c in categories]
    stuff_names = list(data.get("stuff_categories", []))
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        if ann["category_id"] not in label_of:
            raise ValueError(f"annotation {ann.get('id')} has unknown category_id {ann['category_id']}")
        by_image.setdefault(ann["image_id"], []).append(ann)
    scenes = []
    for info in sorted(data["images"], key=lambda im: im["id"]):
        image = Image.open(image_dir / info["file_name"]).convert("RGB")
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
