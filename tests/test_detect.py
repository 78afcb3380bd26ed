"""Detection trainer: RoIAlign, NMS, box coding, COCO AP by LVIS group, stage 2, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch

from disalign_train import cli, detect, detection_eval, scenes
from disalign_train.detection_model import Detector, DetectorConfig, postprocess, sample_training_rois
from disalign_train.detection_ops import BoxCoder, batched_nms, box_iou, dense_anchors, nms, roi_align


# ---------------------------------------------------------------- RoIAlign


def _linear_map(height, width, a=2.0, b=3.0, c=1.0):
    """Feature map whose cell (i, j) holds a*j + b*i + c (cell centres at integer coordinates)."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    return (a * cols + b * rows + c)[None, None]


def test_roi_align_of_a_linear_map_is_the_value_at_each_bin_centre():
    features = _linear_map(8, 8)
    # Image box (2, 4)-(10, 12) at spatial scale 0.5 covers feature coordinates 0.5..4.5 (x), 1.5..5.5 (y)
    # after the half-cell shift; 2 x 2 bins of 2 cells have centres x in {1.5, 3.5}, y in {2.5, 4.5}.
    pooled = roi_align(features, torch.tensor([[0, 2.0, 4.0, 10.0, 12.0]], dtype=torch.float64), 2, 0.5)
    expected = torch.tensor([[2 * x + 3 * y + 1 for x in (1.5, 3.5)] for y in (2.5, 4.5)], dtype=torch.float64)
    torch.testing.assert_close(pooled[0, 0], expected)


def test_roi_align_reads_each_rois_own_image_and_keeps_roi_order():
    features = torch.cat([torch.full((1, 2, 6, 6), 3.0), _linear_map(6, 6).float().expand(1, 2, 6, 6)])
    rois = torch.tensor([[1, 0.0, 0.0, 4.0, 4.0], [0, 1.0, 1.0, 5.0, 3.0], [1, 2.0, 1.0, 4.0, 5.0]])
    pooled = roi_align(features, rois, 3, 1.0)
    torch.testing.assert_close(pooled[1], torch.full((2, 3, 3), 3.0))  # constant image -> constant bins
    for row in (0, 2):  # each matches the RoI pooled on its own
        torch.testing.assert_close(pooled[row], roi_align(features, rois[row : row + 1], 3, 1.0)[0])


def test_roi_align_gradient_spreads_each_bins_unit_weight():
    """Bilinear weights sum to one, so the gradient of sum(output) sums to the number of output values."""
    features = torch.randn(2, 3, 10, 10, requires_grad=True)
    rois = torch.tensor([[0, 3.0, 3.0, 15.0, 11.0], [1, 0.0, 4.0, 9.0, 20.0], [0, 8.0, 8.0, 12.0, 12.0]])
    pooled = roi_align(features, rois, 4, 0.5)
    pooled.sum().backward()
    assert features.grad.sum().item() == pytest.approx(pooled.numel(), rel=1e-5)


# ---------------------------------------------------------------- NMS, boxes


def _greedy_nms(boxes, scores, threshold):
    """The textbook loop: visit boxes by score, keep one unless it overlaps a kept box too much."""
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= threshold for j in kept):
            kept.append(i)
    return kept


def test_nms_toy_case_and_per_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]  # box 1 overlaps box 0 (IoU 0.68), box 3 is box 0
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    classes = torch.tensor([0, 0, 0, 1])
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]  # other classes never suppress
    assert batched_nms(boxes, scores, classes, 0.5, max_keep=2).tolist() == [0, 2]


def test_nms_matches_the_textbook_loop_on_random_boxes():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 2, generator=generator) * 40
    boxes = torch.cat([corners, corners + 4 + torch.rand(60, 2, generator=generator) * 12], dim=1)
    scores = torch.rand(60, generator=generator)
    for threshold in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, threshold).tolist() == _greedy_nms(boxes, scores, threshold)


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
    ground_truth = detection_eval.load_ground_truth(tmp_path / "gt.json")
    assert detection_eval.per_category_ap(ground_truth, perfect) == pytest.approx({1: 1.0, 2: 1.0, 3: 1.0})
    shifted = [dict(d) for d in perfect]
    x, y, w, h = shifted[1]["bbox"]
    shifted[1]["bbox"] = [x + 2, y, w, h]  # IoU 80/112 = 0.71: a hit at thresholds 0.50 ... 0.70 only
    category_ap = detection_eval.per_category_ap(ground_truth, shifted)
    assert category_ap[1] == pytest.approx(1.0) and category_ap[3] == pytest.approx(1.0)
    assert category_ap[2] == pytest.approx(5 / 10)  # 5 of the 10 IoU thresholds count it
    assert detection_eval.per_category_ap(ground_truth, []) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_lvis_groups_and_grouped_means():
    assert [detection_eval.frequency_group(n) for n in (1, 10, 11, 100, 101, 5000)] == ["r", "r", "c", "c", "f", "f"]
    data = detect.DetectionSet(_scene_set([[0, 0, 2], [2], []]))
    assert data.image_counts.tolist() == [1, 0, 2]  # the grouping statistic: images containing the category
    assert data.instance_counts.tolist() == [2, 0, 2]  # the re-weighting statistic
    summary = detection_eval.grouped_ap({1: 0.2, 2: 0.4, 3: 0.9}, {1: "r", 2: "r", 3: "f"})
    assert summary["AP"] == pytest.approx(0.5) and summary["APr"] == pytest.approx(0.3) and summary["APf"] == pytest.approx(0.9)
    assert np.isnan(summary["APc"])  # no common category: not a made-up number


def test_detections_are_mapped_back_to_original_pixels_and_category_ids():
    data = detect.DetectionSet(_scene_set([[], []], num_classes=2), image_ids=[7, 9], original_sizes=[(64, 32), (32, 96)])
    detections = [(1, torch.tensor([[2.0, 4.0, 10.0, 6.0]]), torch.tensor([0.5]), torch.tensor([1]))]
    (result,) = detect.coco_results(detections, data, category_ids=[11, 12])
    assert result["image_id"] == 9 and result["category_id"] == 12 and result["score"] == 0.5
    assert result["bbox"] == pytest.approx([2.0, 12.0, 8.0, 6.0])  # x scaled by 32/32, y by 96/32; xywh


# ---------------------------------------------------------------- stage 2 and the trainer


def _tiny_args(tmp_path, *extra):
    return cli.build_parser().parse_args([
        "detect", "--out", str(tmp_path / "run"), "--num-train", "24", "--num-test", "6", "--seeds", "0",
        "--epochs", "1", "--batch-size", "8", "--stage2-steps", "4", "--stage2-passes", "1",
        "--stage2-batch-size", "64", "--figure-images", "2", "--device", "cpu", *extra,
    ])


def test_stage2_trains_only_the_calibration_and_leaves_the_detector_frozen(tmp_path):
    args = _tiny_args(tmp_path)
    out, logger = detect.runtime.prepare_output(args.out, "test_detect")
    train, _, _ = detect.load_data(args, out, logger)
    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=len(train.class_names)))
    model.eval()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    classifiers = detect.train_stage2(model, train, args, 0, torch.device("cpu"), logger)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, frozen[key], rtol=0, atol=0, msg=f"stage 2 changed {key}")
    assert detect.stage2_parameters(classifiers) == {
        "reweight_only": ["weight", "bias"],
        "disalign": ["magnitude", "margin", "confidence.weight", "confidence.bias"],
    }
    head = classifiers["disalign"]
    assert not torch.equal(head.magnitude.detach(), torch.ones_like(head.magnitude))  # it did train
    alpha, beta = head.calibration_params()
    assert alpha[-1].item() == 0 and beta[-1].item() == 0  # background column untouched
    assert classifiers["baseline"] is model.cls_score


def test_tiny_run_writes_metrics_table_figure_checkpoints_and_reads_its_data_back(tmp_path):
    args = _tiny_args(tmp_path)
    assert args.run(args) == 0
    out = tmp_path / "run"
    for method in detect.METHODS:
        metrics = json.loads((out / method / "metrics.json").read_text())
        for key in ("AP", "APr", "APc", "APf"):
            assert np.isnan(metrics[key]) or 0 <= metrics[key] <= 1
        assert json.loads((out / "seed_0" / method / "metrics.json").read_text())["AP"] == metrics["per_seed"][0]["AP"]
    assert "| DisAlign |" in (out / "results.md").read_text()
    assert (out / "detections.png").stat().st_size > 0
    checkpoint = torch.load(out / "seed_0" / "stage1.pt")
    Detector(DetectorConfig(**checkpoint["config"])).load_state_dict(checkpoint["model"])
    assert {p.name for p in (out / "seed_0").glob("*.pt")} == {"stage1.pt", "stage2_reweight_only.pt", "stage2_disalign.pt"}

    again = _tiny_args(tmp_path, "--data", str(out / "data"), "--out", str(tmp_path / "again"), "--figure-images", "0")
    assert again.run(again) == 0
    assert json.loads((tmp_path / "again" / "baseline" / "metrics.json").read_text())["AP"] == pytest.approx(
        json.loads((out / "baseline" / "metrics.json").read_text())["AP"]
    )
