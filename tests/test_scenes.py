"""scenes-lt: long-tail profile, determinism, label consistency, ADE20K and COCO/LVIS round trips."""

import json

import numpy as np
import pytest
from PIL import Image

from disalign_train import scenes
from disalign_train.core.errors import UserError
from disalign_train.detection import data as coco
from disalign_train.detection.metrics import LVIS_LETTER, lvis_group
from disalign_train.segmentation import data as ade


@pytest.fixture(scope="module")
def scenes_lt():
    return scenes.make_scenes_lt(seed=0, num_train=300, num_test=60, image_size=48)


def test_training_things_are_long_tailed_and_test_covers_every_category(scenes_lt):
    train, test = scenes_lt
    image_counts = train.thing_image_counts()
    k = len(image_counts)
    assert image_counts[: k // 4].mean() > 10 * max(image_counts[-k // 4 :].mean(), 1)
    assert image_counts.min() <= 10  # some categories only in a handful of images (LVIS "rare")
    assert test.thing_instance_counts().min() >= 3  # the balanced test set evaluates every tail category
    pixels = train.seg_pixel_counts()
    assert pixels[: train.num_stuff].sum() > pixels[train.num_stuff :].sum()  # stuff is the large majority


def test_generation_is_deterministic_per_seed_and_train_test_are_disjoint():
    first, second = scenes.generate_scenes(4, seed=5, image_size=32), scenes.generate_scenes(4, seed=5, image_size=32)
    for a, b in zip(first.scenes, second.scenes):
        for field in ("image", "semantic", "boxes", "labels", "masks"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    train, test = scenes.make_scenes_lt(seed=5, num_train=4, num_test=4, image_size=32)
    assert not any(np.array_equal(a.image, b.image) for a in train.scenes for b in test.scenes)
    other = scenes.generate_scenes(4, seed=6, image_size=32)
    assert not np.array_equal(first.scenes[0].image, other.scenes[0].image)


def test_masks_boxes_labels_and_semantic_map_agree(scenes_lt):
    train, _ = scenes_lt
    for scene in train.scenes[:50]:
        height, width = scene.semantic.shape
        assert scene.image.shape == (height, width, 3) and scene.image.dtype == np.uint8
        assert scene.masks.shape == (len(scene.labels), height, width)
        assert scene.masks.sum(0).max() <= 1  # visible masks do not overlap
        for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
            rows, cols = np.nonzero(mask)
            np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            on_mask = scene.semantic[mask]
            assert set(np.unique(on_mask)) <= {train.num_stuff + label, scenes.IGNORE_INDEX}
        stuff = ~scene.masks.any(0)
        assert scene.semantic[stuff].max() < train.num_stuff  # ignore only on object borders


def test_rare_twin_shares_the_shape_of_its_frequent_prototype():
    categories = scenes.thing_categories(8)
    assert categories[-1].shape == categories[0].shape and categories[-1].texture != categories[0].texture
    assert categories[4].shape == categories[3].shape
    with pytest.raises(ValueError, match="num_things"):
        scenes.thing_categories(7)


def _assert_same_semantics(a, b):
    assert a.seg_class_names == b.seg_class_names
    assert len(a.scenes) == len(b.scenes)
    for x, y in zip(a.scenes, b.scenes):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.semantic, y.semantic)


def test_ade20k_export_round_trips(tmp_path):
    scene_set = scenes.generate_scenes(5, seed=1, image_size=32)
    ade.export_ade20k(scene_set, tmp_path, "validation")
    stored = np.asarray(Image.open(tmp_path / "annotations" / "validation" / "scene_000000.png"))
    semantic = scene_set.scenes[0].semantic
    np.testing.assert_array_equal(stored == 0, semantic == scenes.IGNORE_INDEX)  # 0 = other/ignore
    loaded = ade.load_ade20k(tmp_path, "validation")
    _assert_same_semantics(scene_set, loaded)
    assert loaded.thing_class_names == scene_set.thing_class_names
    resized = ade.load_ade20k(tmp_path, "validation", image_size=16)
    assert resized.scenes[0].image.shape == (16, 16, 3) and resized.scenes[0].semantic.shape == (16, 16)


def test_ade20k_loader_reads_the_benchmark_objectinfo150_format(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    (tmp_path / "objectInfo150.csv").write_text(
        "Idx,Ratio,Train,Val,Name\n2,0.1,10,2,building;edifice\n1,0.15,20,3,wall\n"
    )
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / "training" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2, 2, 1, 0]] * 4, np.uint8)).save(tmp_path / "annotations" / "training" / "a.png")
    loaded = ade.load_ade20k(tmp_path)
    assert loaded.seg_class_names == ["wall", "building"]
    np.testing.assert_array_equal(loaded.scenes[0].semantic[0], [255, 0, 1, 1, 0, 255])


def test_ade20k_loader_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(UserError, match="images"):
        ade.load_ade20k(tmp_path)
    ade.export_ade20k(scenes.generate_scenes(2, seed=0, image_size=32), tmp_path)
    (tmp_path / "annotations" / "training" / "scene_000001.png").unlink()
    with pytest.raises(UserError, match="scene_000001"):
        ade.load_ade20k(tmp_path)


def test_coco_export_round_trips_instances_and_sets_lvis_frequency(tmp_path):
    train = scenes.generate_scenes(30, seed=2, image_size=32)
    test = scenes.generate_scenes(4, seed=3, image_size=32)
    path = coco.export_coco(test, tmp_path / "val.json", tmp_path / "images", frequency_from=train)
    data = json.loads(path.read_text())
    counts = train.thing_image_counts()
    for k, category in enumerate(data["categories"]):
        assert category["id"] == k + 1 and category["image_count"] == counts[k]
        assert category["frequency"] == LVIS_LETTER[lvis_group(int(counts[k]))]
    first = data["annotations"][0]
    mask = test.scenes[first["image_id"] - 1].masks[0]
    assert first["iscrowd"] == 0 and first["area"] == mask.sum()
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose([x, y, x + w, y + h], test.scenes[first["image_id"] - 1].boxes[0])
    loaded = coco.load_coco(path, tmp_path / "images")
    assert loaded.thing_class_names == test.thing_class_names
    assert loaded.seg_class_names == test.seg_class_names
    for original, back in zip(test.scenes, loaded.scenes):
        np.testing.assert_array_equal(original.image, back.image)
        np.testing.assert_array_equal(original.masks, back.masks)
        np.testing.assert_array_equal(original.boxes, back.boxes)
        np.testing.assert_array_equal(original.labels, back.labels)
        # Instances only: thing pixels keep their class, everything else is unknown (ignore).
        things = original.masks.any(0)
        np.testing.assert_array_equal(back.semantic[~things], scenes.IGNORE_INDEX)
        assert (back.semantic[things] >= test.num_stuff).all()


def test_coco_loader_reads_polygons_and_maps_category_ids_to_contiguous_labels(tmp_path):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 10, "height": 10}],
        "categories": [{"id": 42, "name": "late"}, {"id": 3, "name": "early"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 42, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0,
                         "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    loaded = coco.load_coco(tmp_path / "a.json", tmp_path)
    assert loaded.thing_class_names == ["early", "late"]
    scene = loaded.scenes[0]
    np.testing.assert_array_equal(scene.labels, [1])
    np.testing.assert_array_equal(scene.boxes, [[2, 2, 6, 6]])
    assert scene.masks[0, 3:6, 3:6].all() and not scene.masks[0, 7:, :].any()
    data["annotations"][0]["category_id"] = 5
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="category_id 5"):
        coco.load_coco(tmp_path / "a.json", tmp_path)


@pytest.mark.parametrize("count, group", [(1, "r"), (10, "r"), (11, "c"), (100, "c"), (101, "f")])
def test_lvis_frequency_groups(count, group):
    assert LVIS_LETTER[lvis_group(count)] == group
