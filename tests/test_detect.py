"""Detection trainer: its use of torchvision.ops, box coding, COCO AP by LVIS group, data errors, stage 2,
and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch

from disalign_train import cli, scenes
from disalign_train.core.errors import UserError
from disalign_train.core.groups import frequency_groups
from disalign_train.detection import data as det_data
from disalign_train.detection import metrics as det_metrics
from disalign_train.detection import train as detect
from disalign_train.detection.methods import METHODS
from disalign_train.detection.model import (
    BoxCoder,
    Detector,
    DetectorConfig,
    box_iou,
    dense_anchors,
    postprocess,
    sample_training_rois,
)


def test_roi_features_pool_bin_centres_in_the_half_pixel_convention():
    """The detector pools with torchvision's roi_align(aligned=True): feature cell (i, j) is centred on image
    point ((j + 0.5) * stride, (i + 0.5) * stride), so a linear map pools to its value at each bin centre."""
    from torchvision.ops import roi_align

    rows, cols = torch.meshgrid(torch.arange(8, dtype=torch.float64), torch.arange(8, dtype=torch.float64), indexing="ij")
    features = (2 * cols + 3 * rows + 1)[None, None]
    pooled = roi_align(features, torch.tensor([[0, 2.0, 4.0, 10.0, 12.0]], dtype=torch.float64), 2, 0.5, 1, aligned=True)
    expected = torch.tensor([[2 * x + 3 * y + 1 for x in (1.5, 3.5)] for y in (2.5, 4.5)], dtype=torch.float64)
    torch.testing.assert_close(pooled[0, 0], expected)


def test_box_coder_round_trip_and_identity():
    generator = torch.Generator().manual_seed(1)
    proposals = torch.cat([torch.rand(50, 2, generator=generator) * 50, torch.zeros(50, 2)], dim=1)
    proposals[:, 2:] = proposals[:, :2] + 2 + torch.rand(50, 2, generator=generator) * 30
    targets = proposals + torch.randn(50, 4, generator=generator)
    targets[:, 2:] = torch.maximum(targets[:, 2:], targets[:, :2] + 1)
    coder = BoxCoder()
    torch.testing.assert_close(coder.decode(coder.encode(proposals, targets), proposals), targets, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(coder.encode(proposals, proposals), torch.zeros(50, 4))
    class_specific = coder.decode(torch.zeros(50, 12), proposals)  # 3 classes: every slot decodes alike
    torch.testing.assert_close(class_specific, proposals.repeat(1, 3))


def test_box_iou_known_values():
    a = torch.tensor([[0, 0, 10, 10.0]])
    b = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [2, 2, 4, 4.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1.0, 50 / 150, 0.0, 0.04]]))


def test_dense_anchors_cover_the_image_with_each_size_and_ratio():
    anchors = dense_anchors(32, 32, 8, (8, 16), (0.5, 1.0, 2.0))
    assert anchors.min() >= 0 and anchors.max() <= 32
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    assert torch.isclose(widths * heights, torch.tensor(256.0)).any() and torch.isclose(heights / widths, torch.tensor(2.0)).any()
    assert len(torch.unique(anchors, dim=0)) == len(anchors)


# ---------------------------------------------------------------- training RoIs and post-processing


def test_training_rois_are_labelled_by_iou_and_regress_onto_their_box():
    config = DetectorConfig(num_classes=3, image_size=32, rois_per_image=32)
    gt_boxes = torch.tensor([[2.0, 2.0, 14.0, 12.0], [16.0, 18.0, 30.0, 30.0]])
    gt_labels = torch.tensor([2, 0])
    anchors = dense_anchors(32, 32, 4, (8, 14), (0.5, 1.0, 2.0))
    rois, labels, targets = sample_training_rois(config, gt_boxes, gt_labels, anchors, torch.Generator().manual_seed(0))
    assert len(rois) == config.rois_per_image
    best_iou, best = box_iou(rois, gt_boxes).max(dim=1)
    foreground = labels < 3
    assert 0 < foreground.sum() <= config.rois_per_image * config.foreground_fraction
    assert (best_iou[foreground] >= 0.5).all() and (best_iou[~foreground] < 0.5).all()
    assert (labels[foreground] == gt_labels[best[foreground]]).all()
    decoded = BoxCoder().decode(targets[foreground], rois[foreground])
    torch.testing.assert_close(decoded, gt_boxes[best[foreground]], atol=1e-3, rtol=1e-4)


def test_postprocess_keeps_confident_boxes_per_class_after_nms():
    config = DetectorConfig(num_classes=2, image_size=32, score_threshold=0.05)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.0]])
    class_boxes = boxes.repeat(1, 2)  # the same box for both classes
    probabilities = torch.tensor([[0.9, 0.02, 0.08], [0.7, 0.2, 0.1], [0.01, 0.01, 0.98]])
    kept_boxes, scores, labels = postprocess(config, probabilities, class_boxes)
    # class 0: RoI 0 suppresses RoI 1; class 1: only RoI 1 clears the threshold; RoI 2 is background.
    assert labels.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.2])
    torch.testing.assert_close(kept_boxes, boxes[[0, 1]])


# ---------------------------------------------------------------- COCO AP and LVIS groups


def _scene_set(labels_per_image, num_classes=3, size=32):
    """Blank scenes holding the given instance labels (one box each)."""
    scene_list = []
    for labels in labels_per_image:
        count = len(labels)
        scene_list.append(scenes.Scene(
            np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8),
            np.tile(np.array([[1, 1, 9, 9]], np.float32), (count, 1)), np.array(labels, np.int64),
            np.zeros((count, size, size), bool),
        ))
    names = [f"c{k}" for k in range(num_classes)]
    return scenes.SceneSet(scene_list, ["stuff"] + names, names)


def _write_ground_truth(path):
    images = [dict(id=i, file_name=f"{i}.png", width=40, height=40) for i in (1, 2)]
    boxes = [(1, 1, [2, 2, 10, 10]), (1, 2, [20, 20, 12, 8]), (2, 1, [5, 5, 8, 12]), (2, 3, [25, 3, 10, 10])]
    annotations = [
        dict(id=k + 1, image_id=img, category_id=cat, bbox=bbox, area=bbox[2] * bbox[3], iscrowd=0)
        for k, (img, cat, bbox) in enumerate(boxes)
    ]
    categories = [dict(id=c, name=f"cat{c}") for c in (1, 2, 3)]
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return [dict(image_id=img, category_id=cat, bbox=bbox, score=0.9) for img, cat, bbox in boxes]


def test_coco_ap_is_one_for_perfect_detections_and_drops_for_a_shifted_box(tmp_path):
    perfect = _write_ground_truth(tmp_path / "gt.json")
    ground_truth = det_metrics.load_ground_truth(tmp_path / "gt.json")
    assert det_metrics.per_category_ap(ground_truth, perfect) == pytest.approx({1: 1.0, 2: 1.0, 3: 1.0})
    shifted = [dict(d) for d in perfect]
    x, y, w, h = shifted[1]["bbox"]
    shifted[1]["bbox"] = [x + 2, y, w, h]  # IoU 80/112 = 0.71: a hit at thresholds 0.50 ... 0.70 only
    category_ap = det_metrics.per_category_ap(ground_truth, shifted)
    assert category_ap[1] == pytest.approx(1.0) and category_ap[3] == pytest.approx(1.0)
    assert category_ap[2] == pytest.approx(5 / 10)  # 5 of the 10 IoU thresholds count it
    assert det_metrics.per_category_ap(ground_truth, []) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_lvis_groups_and_grouped_means():
    groups = [det_metrics.lvis_group(n) for n in (1, 10, 11, 100, 101, 5000)]
    assert groups == ["rare", "rare", "common", "common", "frequent", "frequent"]
    data = det_data.DetectionSet(_scene_set([[0, 0, 2], [2], []]))
    assert data.image_counts.tolist() == [1, 0, 2]  # the grouping statistic: images containing the category
    assert data.instance_counts.tolist() == [2, 0, 2]  # the re-weighting statistic
    summary = det_metrics.grouped_ap({1: 0.2, 2: 0.4, 3: 0.9}, {1: "rare", 2: "rare", 3: "frequent"})
    assert summary["ap"] == pytest.approx(0.5) and summary["rare_ap"] == pytest.approx(0.3)
    assert summary["frequent_ap"] == pytest.approx(0.9)
    assert summary["common_ap"] is None  # no common category: not a made-up number
    # LVIS thresholds where they fill every group; terciles where they do not (a small set: all rare)
    groups, rule = frequency_groups([500, 200, 50, 20, 5, 1], det_metrics.RULE)
    assert rule == "paper" and groups == {"frequent": [0, 1], "common": [2, 3], "rare": [4, 5]}
    groups, rule = frequency_groups([9, 8, 7, 6, 3, 1], det_metrics.RULE)
    assert rule == "terciles" and groups == {"frequent": [0, 1], "common": [2, 3], "rare": [4, 5]}


def test_detections_are_mapped_back_to_original_pixels_and_category_ids():
    data = det_data.DetectionSet(_scene_set([[], []], num_classes=2), image_ids=[7, 9], original_sizes=[(64, 32), (32, 96)])
    detections = [(1, torch.tensor([[2.0, 4.0, 10.0, 6.0]]), torch.tensor([0.5]), torch.tensor([1]))]
    (result,) = detect.coco_results(detections, data, category_ids=[11, 12])
    assert result["image_id"] == 9 and result["category_id"] == 12 and result["score"] == 0.5
    assert result["bbox"] == pytest.approx([2.0, 12.0, 8.0, 6.0])  # x scaled by 32/32, y by 96/32; xywh


# ---------------------------------------------------------------- data errors


def test_coco_errors_name_the_file_and_the_flag(tmp_path):
    _write_ground_truth(tmp_path / "gt.json")
    with pytest.raises(UserError, match=r"--test-json .*gt.json: image 1 file .*1.png does not exist"):
        det_data.load_coco(tmp_path / "gt.json", tmp_path, flag="--test-json")
    broken = json.loads((tmp_path / "gt.json").read_text())
    del broken["annotations"][2]["bbox"]
    (tmp_path / "nobox.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match=r"nobox.json: annotation 3 has no 'bbox'"):
        det_data.load_coco(tmp_path / "nobox.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match=r"--train-json .*bad.json is not valid JSON"):
        det_data.load_coco(tmp_path / "bad.json", tmp_path)


def test_a_missing_simple_layout_file_suggests_the_split_flags(tmp_path, capsys):
    root = tmp_path / "lvis"
    root.mkdir()
    for name in ("train.json", "val.json"):
        (root / name).write_text("{}")
    (root / "train").mkdir()
    code = cli.main(["detect", "--data", str(root), "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(message) == 1
    assert "missing test.json" in message[0] and "--test-split val" in message[0] and "--train-json" in message[0]
    assert cli.main(["detect", "--train-json", str(root / "train.json"), "--out", str(tmp_path / "out")]) == 2
    assert "also pass --train-images, --test-json, --test-images" in capsys.readouterr().err


# ---------------------------------------------------------------- stage 2 and the trainer


def _tiny_argv(tmp_path, *extra):
    return ["detect", "--out", str(tmp_path / "run"), "--num-train", "24", "--num-test", "6", "--seeds", "0",
            "--epochs", "1", "--batch-size", "8", "--stage2-epochs", "1", "--max-steps", "4", "--stage2-passes", "1",
            "--stage2-batch-size", "64", "--figure-images", "2", "--device", "cpu", *extra]


def test_stage2_trains_only_the_calibration_and_leaves_the_detector_frozen(tmp_path):
    args = cli.build_parser("detect").parse_args(_tiny_argv(tmp_path))
    out, logger = detect.runtime.prepare_output(args.out, "test_detect")
    train, _, _ = det_data.load_data(args, out, logger)
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=len(train.class_names))).eval().requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    features, labels = detect.training_roi_features(model, train, args, 0, torch.device("cpu"))
    context = detect.StageTwo(cls_score=model.cls_score, features=features, labels=labels,
                              instance_counts=train.instance_counts, rho=0.8,
                              recipe=detect.Recipe("adam", "cosine", 0.05, 0.0, 2), batch_size=64, seed=0, backend=None,
                              logger=logger)
    fitted = {key: method.fit(context) for key, method in METHODS.items()}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, frozen[key], rtol=0, atol=0, msg=f"stage 2 changed {key}")
    trainable = {k: [n for n, p in f.head.named_parameters() if p.requires_grad] for k, f in fitted.items() if f.head}
    assert trainable == {
        "grw_only": ["classifier.weight", "classifier.bias"],
        "disalign": ["magnitude", "margin", "confidence.weight", "confidence.bias"],
    }
    head = fitted["disalign"].head
    assert not torch.equal(head.magnitude.detach(), torch.ones_like(head.magnitude))  # it did train
    alpha, beta = head.calibration_params()
    assert alpha[-1].item() == 0 and beta[-1].item() == 0  # background column untouched
    assert fitted["joint"].predict is model.cls_score


def test_tiny_run_writes_metrics_table_figure_checkpoints_and_reads_its_data_back(tmp_path):
    assert cli.main(_tiny_argv(tmp_path)) == 0
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "detect" and set(metrics["groups"]) == {"frequent", "common", "rare"}
    single = json.loads((out / "seed_0" / "metrics.json").read_text())
    for method in METHODS:
        row = metrics["methods"][method]
        for key in ("ap", "rare_ap", "common_ap", "frequent_ap"):
            assert row[key] is None or 0 <= row[key] <= 1
        assert single["methods"][method]["ap"] == row["per_seed"][0]["ap"]
    assert "| DisAlign |" in (out / "results.md").read_text()
    assert (out / "detections.png").stat().st_size > 0
    checkpoint = torch.load(out / "seed_0" / "stage1.pt")
    Detector(DetectorConfig(**checkpoint["config"])).load_state_dict(checkpoint["state_dict"])
    assert {p.name for p in (out / "seed_0").glob("*.pt")} == {"stage1.pt", "stage2_grw_only.pt", "stage2_disalign.pt"}

    again = _tiny_argv(tmp_path, "--data", str(out / "data"), "--out", str(tmp_path / "again"), "--figure-images", "0")
    assert cli.main(again) == 0
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "again"))
    assert second["methods"]["joint"]["ap"] == pytest.approx(first["methods"]["joint"]["ap"])
    # the split flags read the same files as --data
    split = ["--train-json", str(out / "data" / "train.json"), "--train-images", str(out / "data" / "train"),
             "--test-json", str(out / "data" / "test.json"), "--test-images", str(out / "data" / "test")]
    assert cli.main(_tiny_argv(tmp_path, *split, "--out", str(tmp_path / "split"), "--figure-images", "0",
                               "--methods", "joint")) == 0
    third = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert third["methods"]["joint"]["ap"] == pytest.approx(first["methods"]["joint"]["ap"])
