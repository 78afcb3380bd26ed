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

Formats, so that a user's real data goes through the same loaders as the embedded scenes (the
readers and writers live with their task: segmentation.data, detection.data):

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

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------- the prepared copy in OUT/data


def prepared(root: Path, made_from: dict, build, logger) -> Path:
    """``root`` holding the data ``build(root)`` writes for the settings ``made_from``.

    The settings are recorded in ``root/made_from.json``; a folder made from other settings (or
    without the record) is stale: it is deleted and rebuilt, and the log says what changed.
    Main rank only builds; the others wait."""
    from .core import runtime

    record = root / "made_from.json"
    if runtime.is_main():
        found = json.loads(record.read_text()) if record.is_file() else None
        if found != made_from:
            if root.exists():
                changed = {k: (None if found is None else found.get(k), v) for k, v in made_from.items()
                           if found is None or found.get(k) != v}
                logger.info("%s is stale (made from other settings: %s): rebuilding it", root, changed)
                shutil.rmtree(root)
            build(root)
            record.write_text(json.dumps(made_from, sort_keys=True) + "\n")
        else:
            logger.info("reusing %s (made from %s)", root, made_from)
    runtime.barrier()
    return root
