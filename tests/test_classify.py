"""`disalign-train classify`: data, samplers, metrics, every method on tiny runs, split files, DDP."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from sklearn.datasets import load_digits

from disalign_train.classification import train as classify
from disalign_train.classification.data import build_digits_lt, build_split_file_data, exponential_profile, read_split_file
from disalign_train.classification.methods import METHODS, calibrated
from disalign_train.classification.metrics import RULE, group_accuracy
from disalign_train.core.errors import UserError
from disalign_train.core.groups import frequency_groups, tercile_groups
from disalign_train.core.sampler import ShardedBatchSampler

TINY = ["--epochs", "3", "--lr", "0.2", "--stage2-epochs", "2", "--batch-size", "64"]


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    classify.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def metrics_of(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


GROUPED = ("acc", "many_acc", "medium_acc", "few_acc")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """One tiny stage 1 on digits-lt, reused by the per-method runs."""
    out = tmp_path_factory.mktemp("stage1")
    assert classify.run(parse("--out", out, "--methods", "joint", *TINY)) == 0
    return out


# --- data ---------------------------------------------------------------------------------------


def test_exponential_profile_matches_formula():
    counts = exponential_profile(114, 10, 50.0)
    assert counts == [max(1, int(114 * 50.0 ** (-c / 9))) for c in range(10)]
    assert counts[0] == 114 and counts[-1] == 2
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert exponential_profile(7, 3, 1.0) == [7, 7, 7]
    with pytest.raises(ValueError, match="imbalance_ratio"):
        exponential_profile(10, 3, 0.5)


def test_digits_lt_is_long_tailed_disjoint_balanced_and_deterministic():
    data = build_digits_lt(imbalance_ratio=20, test_per_class=40, val_per_class=5, seed=3)
    train, val, test = (set(s.ids) for s in (data.train, data.val, data.test))
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train) == len(data.train.ids)
    smallest = min(np.bincount(load_digits().target))
    expected = exponential_profile(smallest - 45, 10, 20)
    assert torch.bincount(data.train.labels).tolist() == expected
    assert torch.bincount(data.test.labels).tolist() == [40] * 10
    assert torch.bincount(data.val.labels).tolist() == [5] * 10
    image, label = data.train.dataset[0]
    assert image.shape == (1, 8, 8) and 0 <= image.min() and image.max() <= 1 and label == data.train.labels[0]

    again = build_digits_lt(imbalance_ratio=20, test_per_class=40, val_per_class=5, seed=3)
    assert again.train.ids == data.train.ids and again.test.ids == data.test.ids
    assert build_digits_lt(imbalance_ratio=20, test_per_class=40, val_per_class=5, seed=4).train.ids != data.train.ids
    assert build_digits_lt(val_per_class=0).val is None
    with pytest.raises(ValueError, match="no training images"):
        build_digits_lt(test_per_class=170, val_per_class=10)


def test_instance_sampler_visits_every_item_once_and_ranks_share_the_global_batches():
    labels = torch.tensor([0] * 30 + [1] * 7 + [2] * 3)
    single = ShardedBatchSampler(labels, batch_size=8, balance="instance", seed=5)
    batches = list(single)
    assert sorted(i for b in batches for i in b) == list(range(40))
    shards = [list(ShardedBatchSampler(labels, 8, "instance", seed=5, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(batches)
    for whole, part0, part1 in zip(batches, *shards):
        assert sorted(part0 + part1) == sorted(whole) and abs(len(part0) - len(part1)) <= 1
    single.set_epoch(1)
    assert list(single) != batches  # a new order each epoch
    single.set_epoch(0)
    assert list(single) == batches  # determined by (seed, epoch)


def test_class_sampler_draws_classes_uniformly():
    labels = torch.tensor([0] * 500 + [1] * 50 + [2] * 5)
    sampler = ShardedBatchSampler(labels, batch_size=555, balance="class", seed=0)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [i for batch in sampler for i in batch]
    drawn = torch.tensor(drawn)
    share = torch.bincount(labels[drawn], minlength=3).double() / len(drawn)
    torch.testing.assert_close(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)
    assert set(drawn[labels[drawn] == 2].tolist()) == {550, 551, 552, 553, 554}


def test_bad_arguments_name_their_flag(tmp_path):
    with pytest.raises(UserError, match="--stage2-views must be >= 1, got 0"):
        classify.run(parse("--out", tmp_path, "--stage2-views", 0))
    with pytest.raises(UserError, match="--seeds must be distinct"):
        classify.run(parse("--out", tmp_path, "--seeds", 1, 1))
    with pytest.raises(UserError, match="--threads must be >= 1"):
        classify.run(parse("--out", tmp_path, "--threads", 0))
    assert not (tmp_path / "train.log").exists()  # refused before any work


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="balance"):
        ShardedBatchSampler(torch.zeros(4, dtype=torch.long), 2, "square-root", 0)
    with pytest.raises(ValueError, match="batch_size"):
        ShardedBatchSampler(torch.zeros(4, dtype=torch.long), 1, "instance", 0, rank=0, world_size=2)


# --- metrics ------------------------------------------------------------------------------------


def test_group_rules():
    counts = [500] * 5 + [100, 60, 40, 30, 20] + [19, 10, 5, 2, 1]
    groups, rule = frequency_groups(counts, RULE)
    assert rule == "paper"
    assert groups == {"many": [0, 1, 2, 3, 4], "medium": [5, 6, 7, 8, 9], "few": [10, 11, 12, 13, 14]}
    # one class above 100 (as digits-lt): auto falls back to terciles of the ranked counts
    small = [114, 74, 48, 31, 20, 13, 8, 5, 3, 2]
    groups, rule = frequency_groups(small, RULE)
    assert rule == "terciles" and groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert frequency_groups(small, RULE, "paper") == ({"many": [0], "medium": [1, 2, 3, 4], "few": [5, 6, 7, 8, 9]}, "paper")
    # terciles follow the counts, not the class order; ties by class index
    names = RULE.names
    assert tercile_groups([1, 9, 5, 5, 7, 3], names) == ["few", "many", "medium", "medium", "many", "few"]
    assert tercile_groups([5, 5, 5], names) == ["many", "medium", "few"]
    with pytest.raises(UserError, match="--group-rule"):
        frequency_groups(small, RULE, "quartiles")


def test_group_accuracy_hand_computed():
    # class 0 (many): 3/4 right; class 1 (medium): 1/2; class 2 (few): 0/1; class 3 (few): 2/2
    correct = torch.tensor([3.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    total = torch.tensor([4.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    result = group_accuracy(correct, total, {"many": [0], "medium": [1], "few": [2, 3]})
    assert result["many_acc"] == pytest.approx(0.75)
    assert result["medium_acc"] == pytest.approx(0.5)
    assert result["few_acc"] == pytest.approx(0.5)  # mean of 0 and 1
    assert result["acc"] == pytest.approx((0.75 + 0.5 + 0 + 1) / 4)
    assert result["top1"] == pytest.approx(6 / 9)
    # an empty group is None; a class without test images is left out
    result = group_accuracy(correct, torch.tensor([4.0, 2.0, 0.0, 2.0], dtype=torch.float64),
                            {"many": [0, 1, 3], "medium": [], "few": [2]})
    assert result["medium_acc"] is None and result["few_acc"] is None
    assert result["acc"] == pytest.approx((0.75 + 0.5 + 1) / 3)


# --- methods and outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_on_a_tiny_run(stage1_run, tmp_path, method):
    out = tmp_path / method
    classify.run(parse("--out", out, "--stage1-checkpoint", stage1_run / "seed_0" / "stage1.pt", "--methods", method, *TINY))
    metrics = metrics_of(out)
    assert metrics["task"] == "classify" and metrics["seeds"] == [0]
    row = metrics["methods"][method]
    for column in (*GROUPED, "top1"):
        assert 0.0 <= row[column] <= 1.0 and row["std"][column] == 0.0
    assert row["per_seed"] == [{"seed": 0, **{c: row[c] for c in (*GROUPED, "top1")}}]
    details = metrics_of(out / "seed_0")["method_details"][method]
    assert row["acc"] == pytest.approx(np.mean(details["per_class"]))
    assert metrics["class_counts"] == torch.bincount(build_digits_lt().train.labels).tolist()
    assert details["test_counts"] == [50] * 10
    assert metrics["group_rule"] == "terciles" and sorted(sum(metrics["groups"].values(), [])) == sorted(map(str, range(10)))


def test_full_run_writes_every_output(stage1_run):
    for name in ("metrics.json", "results.md", "seed_0/stage1.pt", "seed_0/metrics.json", "train.log",
                 "reweight_curves.png", "per_class_accuracy.png", "group_metrics.png"):
        assert (stage1_run / name).stat().st_size > 0, name
    table = (stage1_run / "results.md").read_text()
    assert "| Joint (stage-1 baseline) | - |" in table and "terciles" in table
    log = (stage1_run / "train.log").read_text()
    assert "seed 0 stage 1 epoch 3/3: loss" in log  # a progress line every epoch, though not a terminal


def test_seeds_summary_and_cosine_head(stage1_run, tmp_path):
    classify.run(parse("--out", tmp_path, "--classifier", "cosine", "--seeds", 0, 1, "--methods", "joint", "tau_norm", "disalign", *TINY))
    for seed in (0, 1):
        metrics = metrics_of(tmp_path / f"seed_{seed}")
        assert metrics["rho"] == 1.5 and metrics["model"]["classifier"] == "cosine"
        assert metrics["method_details"]["tau_norm"]["tau_selected_on"] == "val"
        assert (tmp_path / f"seed_{seed}" / "stage2_disalign.pt").stat().st_size > 0
    assert (tmp_path / "calibration.png").stat().st_size > 0
    top = metrics_of(tmp_path)
    for method in ("joint", "disalign"):
        row = top["methods"][method]
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        assert row["few_acc"] == pytest.approx(np.mean([r["few_acc"] for r in row["per_seed"]]))
        assert row["std"]["few_acc"] == pytest.approx(np.std([r["few_acc"] for r in row["per_seed"]], ddof=1))
    summary = (tmp_path / "results.md").read_text()
    assert "Per seed:" in summary and "| 1 |" in summary


def test_stage2_trains_only_the_calibration(stage1_run):
    args = parse("--out", stage1_run, "--stage1-checkpoint", stage1_run / "seed_0" / "stage1.pt", *TINY)
    data = classify.load_data(args)
    logger = logging.getLogger(__name__)
    model, config = classify.stage1_model(args, data, 0, stage1_run, torch.device("cpu"), logger)
    before = copy.deepcopy(model.state_dict())
    counts = torch.bincount(data.train.labels)
    context = classify.stage_two(args, data, model, config, counts, 0, torch.device("cpu"), logger)
    torch.manual_seed(0)
    initial = calibrated()(context)
    torch.manual_seed(0)
    head = METHODS["disalign"].fit(context).head

    for name, value in model.state_dict().items():  # backbone and classifier
        assert torch.equal(value, before[name]), name
    for name, value in head.classifier.state_dict().items():
        assert torch.equal(value, before[f"classifier.{name}"]), name
    assert not torch.equal(head.magnitude, initial.magnitude)
    assert not torch.equal(head.margin, initial.margin)
    assert not torch.equal(head.confidence.weight, initial.confidence.weight)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable == {"magnitude", "margin", "confidence.weight", "confidence.bias"}


# --- split files --------------------------------------------------------------------------------


def write_image_folder(root, per_class=(6, 3, 2), test_per_class=2, with_test=True):
    """A tiny ImageNet-LT-style folder: PNGs whose colour depends on the class, and split files."""
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": [], "test": []}
    for label, count in enumerate(per_class):
        (root / f"class{label}").mkdir(parents=True)
        for kind, n in (("train", count), ("val", 1), ("test", test_per_class)):
            for i in range(n):
                pixels = rng.integers(0, 40, (10, 12, 3), dtype=np.uint8)
                pixels[..., label] += 200
                rel = f"class{label}/{kind}_{i}.png"
                Image.fromarray(pixels).save(root / rel)
                lines[kind].append(f"{rel} {label}")
    for kind, entries in lines.items():
        if kind != "test" or with_test:
            (root / f"Tiny_LT_{kind}.txt").write_text("\n".join(entries) + "\n")
    return root


def test_split_file_loader(tmp_path):
    root = write_image_folder(tmp_path / "tiny")
    data = build_split_file_data(root, image_size=8)
    assert data.num_classes == 3 and data.image_shape == (3, 8, 8)
    assert torch.bincount(data.train.labels).tolist() == [6, 3, 2]
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2] and data.val is not None
    image, label = data.train.dataset[len(data.train.labels) - 1]
    assert image.shape == (3, 8, 8) and 0 <= image.min() and image.max() <= 1 and label == 2
    assert image[2].mean() > image[0].mean()  # the class colour survives loading and resizing
    assert not set(data.train.ids) & set(data.test.ids)


def test_split_files_without_test_list_evaluate_on_val(tmp_path):
    data = build_split_file_data(write_image_folder(tmp_path / "inat", with_test=False), image_size=8)
    assert data.val is None and torch.bincount(data.test.labels).tolist() == [1, 1, 1]


def test_split_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 0\nb.png zero\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        read_split_file(bad)
    root = write_image_folder(tmp_path / "gap")
    (root / "Tiny_LT_train.txt").write_text("class0/train_0.png 0\nclass2/train_0.png 2\n")
    with pytest.raises(UserError, match=r"classes \[1\] have no training image"):
        build_split_file_data(root)
    with pytest.raises(UserError, match="no \\*train\\*.txt"):
        build_split_file_data(tmp_path / "gap" / "class0")


def test_every_listed_image_is_checked_before_training(tmp_path):
    """A missing training image and a corrupt test image are found at load time, by split file and line."""
    root = write_image_folder(tmp_path / "missing")
    (root / "class1" / "train_2.png").unlink()
    line = (root / "Tiny_LT_train.txt").read_text().splitlines().index("class1/train_2.png 1") + 1
    with pytest.raises(UserError, match=rf"Tiny_LT_train.txt:{line}: image .*train_2.png does not exist"):
        build_split_file_data(root)
    root = write_image_folder(tmp_path / "corrupt")
    (root / "class2" / "test_1.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"Tiny_LT_test.txt:6: image .*test_1.png cannot be decoded"):
        build_split_file_data(root)
    (root / "Tiny_LT_val.txt").write_text("class0/val_0.png 7\n")
    with pytest.raises(UserError, match=r"Tiny_LT_val.txt:1: label 7 .* not a training class"):
        build_split_file_data(root)


def test_trainer_on_split_files(tmp_path):
    root = write_image_folder(tmp_path / "tiny")
    out = tmp_path / "out"
    classify.run(parse("--out", out, "--data", root, "--image-size", 8, "--width", 16, "--methods", "joint", "ncm", "disalign", *TINY))
    metrics = metrics_of(out)
    assert metrics["model"]["backbone"] == "small-cnn" and metrics["class_counts"] == [6, 3, 2]
    assert metrics_of(out / "seed_0")["method_details"]["joint"]["test_counts"] == [2, 2, 2]
    assert metrics["group_rule"] == "terciles"
    assert 0 <= metrics["methods"]["disalign"]["acc"] <= 1


def test_torchvision_resnet_and_the_paper_recipe_on_split_files(tmp_path):
    root = write_image_folder(tmp_path / "tiny")
    out = tmp_path / "out"
    classify.run(parse("--out", out, "--data", root, "--image-size", 16, "--model", "resnet18", "--paper-recipe",
                       "--methods", "joint", "disalign", "--max-steps", 1, *TINY))
    metrics = metrics_of(out)
    assert metrics["model"]["backbone"] == "resnet18" and metrics["model"]["features"] == 512
    head = torch.load(out / "seed_0" / "stage2_disalign.pt", weights_only=True)
    assert head["state_dict"]["magnitude"].shape == (3,) and head["args"]["paper_recipe"] is True


# --- torchrun / DDP -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    classify.run(parse(*argv))


def test_two_processes_match_one(tmp_path):
    """gloo, 2 CPU processes: counts and metrics are reduced over ranks, and the global batches make
    the run compute what one process computes (no augmentation, so both see the same images)."""
    common = ["--max-shift", 0, "--methods", "joint", "lws", "disalign", *TINY]
    mp.spawn(_ddp_worker, args=(2, _free_port(), ["--out", tmp_path / "ddp", *common]), nprocs=2, join=True)
    classify.run(parse("--out", tmp_path / "single", *common))
    ddp, single = metrics_of(tmp_path / "ddp"), metrics_of(tmp_path / "single")
    assert ddp["class_counts"] == single["class_counts"] == torch.bincount(build_digits_lt().train.labels).tolist()
    for method in ("joint", "lws", "disalign"):
        for column in GROUPED:
            assert ddp["methods"][method][column] == pytest.approx(single["methods"][method][column], abs=0.02)
