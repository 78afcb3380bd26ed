"""Segmentation: metrics on hand-computed cases, frequency groups, stage 2 trains only calibration, tiny run."""

import copy
import json
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from disalign_ops import reference
from disalign_ops.nn import DisAlignConv2d, DisAlignLoss
from disalign_train import cli, segment
from disalign_train.segmentation_metrics import (
    confusion_matrix,
    frequency_groups,
    per_class_scores,
    segmentation_metrics,
    summarize_runs,
    table6_markdown,
)

# ---------------------------------------------------------------- metrics


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    target = np.array([[0, 0, 1], [2, 255, 1]])
    prediction = np.array([[0, 1, 1], [1, 0, 2]])
    expected = np.array([[1, 1, 0], [0, 1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(confusion_matrix(target, prediction, 3), expected)
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(np.array([3]), np.array([0]), 3)


def test_miou_and_macc_of_a_small_confusion_matrix_by_hand():
    # rows = truth, cols = prediction
    confusion = np.array([[8, 2, 0, 0], [1, 3, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0]])
    iou, accuracy = per_class_scores(confusion)
    # class 0: TP 8, FN 2, FP 1 -> 8/11; class 1: TP 3, FN 1, FP 6 -> 3/10; class 2: TP 0 -> 0;
    # class 3: never in truth nor prediction -> NaN (left out of the means)
    np.testing.assert_allclose(iou[:3], [8 / 11, 3 / 10, 0.0])
    assert np.isnan(iou[3]) and np.isnan(accuracy[3])
    np.testing.assert_allclose(accuracy[:3], [8 / 10, 3 / 4, 0.0])
    groups = {"head": [0], "body": [1], "tail": [2, 3]}
    metrics = segmentation_metrics(confusion, groups)
    assert metrics["miou"] == pytest.approx((8 / 11 + 3 / 10 + 0) / 3)
    assert metrics["macc"] == pytest.approx((8 / 10 + 3 / 4 + 0) / 3)
    assert metrics["head"]["miou"] == pytest.approx(8 / 11) and metrics["body"]["macc"] == pytest.approx(3 / 4)
    assert metrics["tail"] == {"miou": 0.0, "macc": 0.0, "num_classes": 2}
    assert metrics["per_class"]["iou"][3] is None


def test_groups_follow_the_paper_thresholds_and_fall_back_to_terciles():
    # shares: 50%, 45%, 4.4%, 0.5%, 0.05%, 0.05%
    counts = [10000, 9000, 880, 100, 10, 10]
    groups, rule = frequency_groups(counts)
    assert rule == "paper"
    assert groups == {"head": [0, 1, 2], "body": [3], "tail": [4, 5]}
    # no class under 0.1%: terciles by share, most frequent first
    groups, rule = frequency_groups([5, 40, 30, 10, 20, 15])
    assert rule == "terciles"
    assert groups == {"head": [1, 2], "body": [4, 5], "tail": [0, 3]}


def test_summary_and_table6_report_mean_std_and_delta_to_baseline():
    def run(miou, tail):
        group = {"miou": tail, "macc": tail, "num_classes": 1}
        return {"miou": miou, "macc": miou, "head": group, "body": group, "tail": group}

    summaries = {"baseline": summarize_runs([run(0.4, 0.1), run(0.6, 0.3)]),
                 "disalign": summarize_runs([run(0.5, 0.2), run(0.7, 0.4)])}
    assert summaries["baseline"]["miou"] == pytest.approx(0.5)
    assert summaries["baseline"]["std"]["tail"]["miou"] == pytest.approx(0.1)
    table = table6_markdown(summaries)
    assert "| baseline | 50.0 ± 10.0 |" in table
    assert "| disalign | 60.0 ± 10.0 (+10.0) |" in table


# ---------------------------------------------------------------- stage 2


def _batch(num_classes=5, size=16):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, size, size, generator=generator) * 2 - 1
    labels = torch.randint(0, num_classes, (4, size, size), generator=generator)
    labels[:, 0, :] = 255
    return images, labels


def test_disalign_stage_trains_only_magnitude_margin_and_confidence():
    torch.manual_seed(0)
    model = segment.SmallFCN(num_classes=5, width=8).eval()
    frozen = copy.deepcopy(model.state_dict())
    head = DisAlignConv2d.from_conv(model.classifier, input_aware=True)
    step = segment.Stage2Step(model, head, DisAlignLoss([100, 50, 10, 5, 1], 0.3, ignore_index=255))
    calibration = {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}
    assert set(calibration) == {"magnitude", "margin", "confidence.weight", "confidence.bias"}
    images, labels = _batch()
    groups = segment.stage2_param_groups(head, SimpleNamespace(stage2_lr=1.0, confidence_lr=0.05))
    trainable = {id(p) for p in step.parameters() if p.requires_grad}
    assert {id(p) for group in groups for p in group["params"]} == trainable == {id(p) for p in head.parameters()
                                                                                if p.requires_grad}
    segment.train_stage(step, groups, images, labels, epochs=3, batch_size=2, seed=0, device=torch.device("cpu"),
                        max_steps=None, desc="test")
    for name, value in model.state_dict().items():  # backbone, BatchNorm statistics and classifier untouched
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)
    for name, param in head.named_parameters():
        if name in calibration:
            assert not torch.equal(param, calibration[name]), name


def test_stage2_loss_is_the_reweighted_cross_entropy_of_the_calibrated_pixel_logits():
    torch.manual_seed(0)
    model = segment.SmallFCN(num_classes=5, width=8).eval()
    head = DisAlignConv2d.from_conv(model.classifier, input_aware=True)
    with torch.no_grad():
        head.magnitude.uniform_(0.5, 1.5)
        head.margin.uniform_(-1, 1)
    counts = [100, 50, 10, 5, 1]
    step = segment.Stage2Step(model, head, DisAlignLoss(counts, 0.3, ignore_index=255))
    images, labels = _batch()
    features = model.features(images)
    inputs = head.calibration_inputs(features)
    assert inputs.logits.shape == (4, 5, 16, 16) and inputs.confidence.shape == (4, 16, 16)
    weight = torch.tensor(np.array(counts, np.float64) ** -0.3)
    weight = weight * 5 / weight.sum()
    expected = reference.cross_entropy(inputs.logits.double(), labels, inputs.alpha.double(), inputs.beta.double(),
                                       inputs.confidence.double(), weight, ignore_index=255)
    torch.testing.assert_close(step(images, labels).double(), expected, rtol=1e-5, atol=1e-6)


def test_reweight_only_ablation_retrains_a_copy_of_the_classifier_and_nothing_else():
    torch.manual_seed(0)
    model = segment.SmallFCN(num_classes=5, width=8).eval()
    frozen = copy.deepcopy(model.state_dict())
    head = segment.ReweightedClassifier(copy.deepcopy(model.classifier))
    step = segment.Stage2Step(model, head, DisAlignLoss([100, 50, 10, 5, 1], 0.3, ignore_index=255))
    images, labels = _batch()
    groups = [{"params": list(head.classifier.parameters()), "lr": 0.05}]
    segment.train_stage(step, groups, images, labels, epochs=2, batch_size=2, seed=0, device=torch.device("cpu"),
                        max_steps=None, desc="test")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(head.classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------- end to end


TINY = ["--num-train", "12", "--num-test", "6", "--image-size", "32", "--width", "8", "--batch-size", "4",
        "--seeds", "0", "--stage1-epochs", "1", "--stage2-epochs", "1", "--max-steps", "2", "--num-visualize", "2"]


def test_tiny_run_writes_metrics_table_figure_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["segment", "--out", str(out), *TINY]) == 0
    for method in segment.METHODS:
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert metrics["per_seed"][0]["seed"] == 0
        for key in ("miou", "macc"):
            assert 0 <= metrics[key] <= 1
        for group in ("head", "body", "tail"):
            assert set(metrics[group]) == {"miou", "macc"}
        single = json.loads((out / "seed_0" / method / "metrics.json").read_text())
        assert single["miou"] == pytest.approx(metrics["miou"])
        assert single["group_rule"] in ("paper", "terciles")
    for checkpoint in ("stage1.pt", "stage2_disalign.pt", "stage2_grw.pt"):
        assert (out / "seed_0" / checkpoint).stat().st_size > 0
    head_state = torch.load(out / "seed_0" / "stage2_disalign.pt")["state_dict"]
    assert {"magnitude", "margin", "confidence.weight"} <= set(head_state)
    assert "| disalign |" in (out / "results.md").read_text()
    assert (out / "predictions.png").stat().st_size > 0
    # the generated data went through the ADE20K-style files
    assert (out / "data" / "scenes-lt" / "annotations" / "validation").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    cli.main(argv)


def test_two_processes_evaluate_the_whole_test_set_like_one(tmp_path):
    """gloo, 2 CPU processes: shared data files, each rank scores half the test set, confusion summed."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), ["segment", "--out", str(tmp_path / "ddp"), *TINY]), nprocs=2, join=True)
    assert cli.main(["segment", "--out", str(tmp_path / "single"), *TINY]) == 0
    for method in segment.METHODS:
        ddp, single = (json.loads((tmp_path / run / "seed_0" / method / "metrics.json").read_text())
                       for run in ("ddp", "single"))
        assert ddp["pixels_evaluated"] == single["pixels_evaluated"] > 0
        assert ddp["miou"] == pytest.approx(single["miou"], abs=0.05)
