"""Segmentation: metrics on hand-computed cases, frequency groups, stage 2 trains only calibration, tiny run."""

import copy
import json
import logging
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from disalign_ops import reference
from disalign_ops.nn import DisAlignConv2d, DisAlignLoss
from disalign_train import cli
from disalign_train.core.groups import frequency_groups
from disalign_train.core.loop import Recipe, Stage2Objective, fit
from disalign_train.core.summary import markdown_table, summarize
from disalign_train.segmentation import methods as seg_methods
from disalign_train.segmentation.methods import METHODS, calibration_groups, flip_batches, sampler_for
from disalign_train.segmentation.metrics import RULE, confusion_matrix, per_class_scores, segmentation_metrics
from disalign_train.segmentation.model import Features, SmallFCN

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
    metrics, per_class = segmentation_metrics(confusion, groups)
    assert metrics["miou"] == pytest.approx((8 / 11 + 3 / 10 + 0) / 3)
    assert metrics["macc"] == pytest.approx((8 / 10 + 3 / 4 + 0) / 3)
    assert metrics["head_miou"] == pytest.approx(8 / 11) and metrics["body_macc"] == pytest.approx(3 / 4)
    assert metrics["tail_miou"] == 0.0 and metrics["tail_macc"] == 0.0
    assert per_class["iou"][3] is None


def test_groups_follow_the_paper_thresholds_and_fall_back_to_terciles():
    # shares: 50%, 45%, 4.4%, 0.5%, 0.05%, 0.05%
    counts = [10000, 9000, 880, 100, 10, 10]
    groups, rule = frequency_groups(counts, RULE)
    assert rule == "paper"
    assert groups == {"head": [0, 1, 2], "body": [3], "tail": [4, 5]}
    # no class under 0.1%: terciles by share, most frequent first
    groups, rule = frequency_groups([5, 40, 30, 10, 20, 15], RULE)
    assert rule == "terciles"
    assert groups == {"head": [1, 2], "body": [4, 5], "tail": [0, 3]}


def test_summary_and_table_report_mean_std_and_delta_to_baseline():
    def run(miou, tail):
        return {"miou": miou, "tail_miou": tail}

    per_seed = {0: {"joint": run(0.4, 0.1), "disalign": run(0.5, 0.2)}, 1: {"joint": run(0.6, 0.3), "disalign": run(0.7, 0.4)}}
    methods = summarize(per_seed, ["miou", "tail_miou"], {"joint": "Joint", "disalign": "DisAlign"})
    assert methods["joint"]["miou"] == pytest.approx(0.5)
    assert methods["joint"]["std"]["tail_miou"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert methods["disalign"]["per_seed"] == [{"seed": 0, "miou": 0.5, "tail_miou": 0.2}, {"seed": 1, "miou": 0.7, "tail_miou": 0.4}]
    table = markdown_table(methods, [("miou", "mIoU"), ("tail_miou", "tail")], "joint")
    assert "| Joint | 50.0 ± 14.1 | 20.0 ± 14.1 |" in table
    assert "| DisAlign | 60.0 ± 14.1 (+10.0) | 30.0 ± 14.1 (+10.0) |" in table


# ---------------------------------------------------------------- stage 2


def _batch(num_classes=5, size=16):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, size, size, generator=generator) * 2 - 1
    labels = torch.randint(0, num_classes, (4, size, size), generator=generator)
    labels[:, 0, :] = 255
    return images, labels


def _context(model, images, labels, **kwargs):
    return seg_methods.StageTwo(
        model=model, images=images, labels=labels, pixel_counts=np.array([100, 50, 10, 5, 1]), rho=0.3,
        recipe=Recipe("adamw", "onecycle", 1.0, 1e-4, 3), confidence_lr=0.05, grw_lr=0.05, batch_size=2, seed=0,
        device=torch.device("cpu"), backend=None, logger=logging.getLogger(__name__), **kwargs)


def test_disalign_stage_trains_only_magnitude_margin_and_confidence():
    torch.manual_seed(0)
    model = SmallFCN(num_classes=5, width=8).eval().requires_grad_(False)
    frozen = copy.deepcopy(model.state_dict())
    images, labels = _batch()
    ctx = _context(model, images, labels)
    head = DisAlignConv2d.from_conv(model.classifier, input_aware=True)
    calibration = {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}
    assert set(calibration) == {"magnitude", "margin", "confidence.weight", "confidence.bias"}
    groups = calibration_groups(head, ctx)
    assert {id(p) for group in groups for p in group["params"]} == {id(p) for p in head.parameters() if p.requires_grad}
    loss_fn = DisAlignLoss([100, 50, 10, 5, 1], 0.3, ignore_index=255, reduction="sum")
    fit(Stage2Objective(head, loss_fn, frozen=Features(model)), groups, ctx.recipe, sampler_for(images, 2, 0),
        flip_batches(images, labels, 0, torch.device("cpu")), ctx.logger, "test")
    for name, value in model.state_dict().items():  # backbone, BatchNorm statistics and classifier untouched
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)
    for name, param in head.named_parameters():
        if name in calibration:
            assert not torch.equal(param, calibration[name]), name


def test_stage2_loss_is_the_reweighted_cross_entropy_of_the_calibrated_pixel_logits():
    torch.manual_seed(0)
    model = SmallFCN(num_classes=5, width=8).eval()
    head = DisAlignConv2d.from_conv(model.classifier, input_aware=True)
    with torch.no_grad():
        head.magnitude.uniform_(0.5, 1.5)
        head.margin.uniform_(-1, 1)
    counts = [100, 50, 10, 5, 1]
    step = Stage2Objective(head, DisAlignLoss(counts, 0.3, ignore_index=255, reduction="sum"), frozen=Features(model))
    images, labels = _batch()
    features = model.features(images)
    inputs = head.calibration_inputs(features)
    assert inputs.logits.shape == (4, 5, 16, 16) and inputs.confidence.shape == (4, 16, 16)
    weight = torch.tensor(np.array(counts, np.float64) ** -0.3)
    weight = weight * 5 / weight.sum()
    expected = reference.cross_entropy(inputs.logits.double(), labels, inputs.alpha.double(), inputs.beta.double(),
                                       inputs.confidence.double(), weight, ignore_index=255)
    torch.testing.assert_close(step(images, labels).double(), expected, rtol=1e-5, atol=1e-6)
    # mmseg's normalisation (--paper-recipe): the weighted sum over every pixel, ignored ones included
    elements = Stage2Objective(head, DisAlignLoss(counts, 0.3, ignore_index=255, reduction="sum"), frozen=Features(model),
                               normalize="elements")
    valid = labels != 255
    total = (weight[torch.where(valid, labels, 0)] * valid).sum()
    torch.testing.assert_close(elements(images, labels).double(), expected * total / labels.numel(), rtol=1e-5, atol=1e-6)


def test_reweight_only_ablation_retrains_a_copy_of_the_classifier_and_nothing_else():
    torch.manual_seed(0)
    model = SmallFCN(num_classes=5, width=8).eval().requires_grad_(False)
    frozen = copy.deepcopy(model.state_dict())
    images, labels = _batch()
    fitted = METHODS["grw_only"].fit(_context(model, images, labels))
    head = fitted.head
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(head.classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------- end to end


TINY = ["--num-train", "12", "--num-test", "6", "--image-size", "32", "--width", "8", "--batch-size", "4",
        "--seeds", "0", "--epochs", "1", "--stage2-epochs", "1", "--max-steps", "2", "--num-visualize", "2"]


def test_tiny_run_writes_metrics_table_figure_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["segment", "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segment" and metrics["seeds"] == [0] and metrics["group_rule"] in ("paper", "terciles")
    assert set(metrics["groups"]) == {"head", "body", "tail"}
    single = json.loads((out / "seed_0" / "metrics.json").read_text())
    for method in METHODS:
        row = metrics["methods"][method]
        assert row["per_seed"][0]["seed"] == 0
        for key in ("miou", "macc", "head_miou", "tail_miou", "tail_macc"):
            assert row[key] is None or 0 <= row[key] <= 1
        assert single["methods"][method]["miou"] == pytest.approx(row["miou"])
        assert len(single["per_class"][method]["iou"]) == len(single["class_names"])
    for checkpoint in ("stage1.pt", "stage2_disalign.pt", "stage2_grw_only.pt"):
        assert (out / "seed_0" / checkpoint).stat().st_size > 0
    head_state = torch.load(out / "seed_0" / "stage2_disalign.pt")["state_dict"]
    assert {"magnitude", "margin", "confidence.weight"} <= set(head_state)
    assert "| DisAlign |" in (out / "results.md").read_text()
    assert (out / "predictions.png").stat().st_size > 0
    # the generated data went through the ADE20K-style files, with a record of what made them
    assert (out / "data" / "scenes-lt" / "annotations" / "validation").is_dir()
    assert json.loads((out / "data" / "scenes-lt" / "made_from.json").read_text())["num_train"] == 12
    assert "seed 0 stage 1 epoch 1/1: loss" in (out / "train.log").read_text()


def test_a_stale_prepared_data_set_is_rebuilt(tmp_path):
    out = str(tmp_path / "run")
    quick = [*TINY, "--methods", "joint", "--num-visualize", "0"]
    assert cli.main(["segment", "--out", out, *quick]) == 0
    assert cli.main(["segment", "--out", out, *quick, "--num-train", "8"]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "is stale" in log and "'num_train': (12, 8)" in log
    assert len(list((tmp_path / "run" / "data" / "scenes-lt" / "images" / "training").iterdir())) == 8
    assert cli.main(["segment", "--out", out, *quick, "--num-train", "8"]) == 0
    assert "reusing" in (tmp_path / "run" / "train.log").read_text()


def test_bad_data_is_one_line_before_training(tmp_path, capsys):
    root = tmp_path / "ade"
    assert cli.main(["segment", "--out", str(tmp_path / "gen"), *TINY, "--methods", "joint", "--num-visualize", "0"]) == 0
    import shutil

    shutil.copytree(tmp_path / "gen" / "data" / "scenes-lt", root)
    (root / "images" / "validation" / "scene_000003.png").write_bytes(b"broken")
    assert cli.main(["segment", "--out", str(tmp_path / "bad"), "--data", str(root), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scene_000003.png cannot be decoded" in err[0]
    assert not (tmp_path / "bad" / "seed_0").exists()  # nothing trained


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
    ddp, single = (json.loads((tmp_path / run / "seed_0" / "metrics.json").read_text()) for run in ("ddp", "single"))
    for method in METHODS:
        assert ddp["methods"][method]["miou"] == pytest.approx(single["methods"][method]["miou"], abs=0.05)
        # every pixel of the test set was scored: the per-class accuracies are defined for the same classes
        assert [v is None for v in ddp["per_class"][method]["acc"]] == [v is None for v in single["per_class"][method]["acc"]]
