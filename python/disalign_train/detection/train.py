"""Long-tail detection: a two-stage DisAlign Fast R-CNN-style detector on scenes-lt (or COCO/LVIS data).

Stage 1 trains the whole detector (detection.model.Detector, on torchvision.ops) with
instance-balanced image sampling, plain (K+1)-way cross entropy and L1 box regression. Stage 2
freezes it, caches RoI features of the training images and fits the classifier-level methods on
them (detection.methods: ``joint``, ``grw_only``, ``disalign``). One pass over the test set scores
all of them. Box AP by pycocotools over the ground-truth JSON, overall and by LVIS frequency group
(detection.metrics; terciles where the data cannot fill the LVIS groups).

Data: the embedded scenes-lt, exported as COCO/LVIS JSON into ``OUT/data`` (readable back with
``--data OUT/data``); ``--data DIR`` (train.json + train/, <test-split>.json + <test-split>/); or a
COCO/LVIS download via ``--train-json --train-images --test-json --test-images``.

Outputs in --out: ``metrics.json`` (core.summary schema: ``ap``, ``frequent_ap``, ``common_ap``,
``rare_ap``), ``results.md`` (paper Table 8's shape), ``group_metrics.png``, ``detections.png``,
``train.log``; per seed ``seed_<s>/`` with ``metrics.json`` (per-category AP too), ``stage1.pt``
and ``stage2_<method>.pt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core import checkpoint, runtime
from ..core.args import add_scene_arguments, add_shared_arguments, check_at_least, check_shared
from ..core.groups import frequency_groups
from ..core.loop import Recipe, fit
from ..core.plots import plot_group_metrics
from ..core.sampler import ShardedBatchSampler
from ..core.summary import markdown_table, metrics_payload, summarize, tail_comparison, write_report
from . import metrics as det_metrics
from .data import DetectionSet, load_data, training_batch
from .methods import METHODS, StageTwo
from .metrics import GROUPS, METRICS, RULE, TAIL_METRIC
from .model import BoxCoder, Detector, DetectorConfig, box_regression_loss, clip_boxes, inference_proposals, postprocess
from .report import draw_detections

TASK = "detect"
COLUMNS = [("ap", "AP_bbox"), ("rare_ap", "AP_bbox^r"), ("common_ap", "AP_bbox^c"), ("frequent_ap", "AP_bbox^f")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_shared_arguments(
        parser,
        data_help="folder with train.json + train/ and <test-split>.json + <test-split>/ (e.g. a previous run's "
        "OUT/data); None: the embedded scenes-lt (COCO/LVIS downloads: the --train-json ... flags)",
        data_default=None, data_seed_help="scenes-lt generator seed (fixed across --seeds)",
        out="runs/detect", epochs=24, lr=0.05, batch_size=16, stage2_epochs=9, stage2_lr=0.05, rho=0.8,
        seeds=[0, 1, 2], methods=list(METHODS), lr_help="stage-1 SGD learning rate (warm-up, cosine)",
        rho_help="generalized re-weight exponent over the foreground classes (paper appendix C.2)",
    )
    data, stage1, stage2, run = (groups[k] for k in ("data", "stage 1", "stage 2", "run"))
    data.add_argument("--test-split", default="test", help="name of the evaluation split inside --data")
    data.add_argument("--train-json", help="training instances JSON (COCO/LVIS layout, with the three flags below)")
    data.add_argument("--train-images", help="folder of the training images")
    data.add_argument("--test-json", help="evaluation instances JSON")
    data.add_argument("--test-images", help="folder of the evaluation images")
    add_scene_arguments(data, "images are resized to this square size")
    stage2.add_argument("--stage2-passes", type=int, default=2, help="passes over the training images to cache RoIs")
    stage2.add_argument("--stage2-batch-size", type=int, default=512, help="RoIs per stage-2 step (global)")
    run.add_argument("--eval-batch-size", type=int, default=4, help="test images per forward pass")
    run.add_argument("--figure-images", type=int, default=4, help="test scenes drawn in detections.png")
    run.add_argument("--figure-threshold", type=float, default=0.3, help="score threshold of drawn detections")


class Stage1Objective(nn.Module):
    """Stage-1 loss: (K+1)-way cross entropy plus L1 box regression of the sampled RoIs."""

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model

    def forward(self, images, rois, labels, targets) -> torch.Tensor:
        logits, deltas = self.model(images, rois)
        return F.cross_entropy(logits, labels) + box_regression_loss(deltas, labels, targets, self.model.config.num_classes)


def image_sampler(data: DetectionSet, batch_size: int, seed: int) -> ShardedBatchSampler:
    return ShardedBatchSampler(torch.zeros(len(data), dtype=torch.long), batch_size, "instance", seed,
                               runtime.rank(), runtime.world_size())


def train_stage1(model: Detector, data: DetectionSet, args, seed: int, device, logger) -> None:
    anchors = inference_proposals(model.config, device)
    recipe = Recipe("sgd", "warmup-cosine", args.lr, 1e-4, args.epochs, args.max_steps)
    load = lambda batches: (training_batch(model.config, data, b, anchors, device) for b in batches)  # noqa: E731
    fit(Stage1Objective(model), model.parameters(), recipe, image_sampler(data, args.batch_size, seed), load, logger,
        f"seed {seed} stage 1")
    model.eval().requires_grad_(False)


@torch.no_grad()
def training_roi_features(model: Detector, data: DetectionSet, args, seed: int, device):
    """Box-head features and labels of RoIs sampled from the training images (``--stage2-passes`` passes),
    gathered so that every rank holds all of them (the stage-2 sampler draws global batches).

    Everything below the classifier is frozen in stage 2, so these features are exactly what the
    classifier sees when stage 2 runs the whole detector; caching them makes stage 2 cheap.
    """
    anchors = inference_proposals(model.config, device)
    features, labels = [], []
    sampler = image_sampler(data, args.batch_size, seed * 1000 + 500)
    for p in range(args.stage2_passes):
        sampler.set_epoch(p)
        for indices in sampler:
            images, rois, roi_labels, _ = training_batch(model.config, data, indices, anchors, device)
            features.append(model.roi_features(images, rois))
            labels.append(roi_labels)
    parts = runtime.all_gather_objects((torch.cat(features).cpu(), torch.cat(labels).cpu()))
    return torch.cat([f for f, _ in parts]).to(device), torch.cat([y for _, y in parts]).to(device)


@torch.no_grad()
def detect(model: Detector, classifiers: dict[str, nn.Module], data: DetectionSet, args, device):
    """{method: [(image index, boxes, scores, labels) for every image of ``data``]}, boxes in the S x S frame.

    Each rank detects on its share of the images and the shares are gathered on every rank. One
    backbone/box-head pass per image serves all methods: they differ in the classifier only.
    """
    config = model.config
    proposals = inference_proposals(config, device)
    coder = BoxCoder()
    indices = list(range(runtime.rank(), len(data), runtime.world_size()))
    results: dict[str, list] = {name: [] for name in classifiers}
    for start in runtime.progress(range(0, len(indices), args.eval_batch_size), desc="detect"):
        batch = indices[start : start + args.eval_batch_size]
        images = data.images[batch].to(device)
        rois = torch.cat([F.pad(proposals, (1, 0), value=float(k)) for k in range(len(batch))])
        features = model.roi_features(images, rois)
        deltas = model.bbox_pred(features)
        boxes = clip_boxes(coder.decode(deltas, rois[:, 1:]), config.image_size, config.image_size)
        for name, classifier in classifiers.items():
            probabilities = torch.softmax(classifier(features).float(), dim=1)
            for k, i in enumerate(batch):
                rows = slice(k * len(proposals), (k + 1) * len(proposals))
                kept_boxes, scores, labels = postprocess(config, probabilities[rows], boxes[rows])
                results[name].append((i, kept_boxes.cpu(), scores.cpu(), labels.cpu()))
    gathered = runtime.all_gather_objects(results)
    return {name: sorted((r for part in gathered for r in part[name]), key=lambda r: r[0]) for name in classifiers}


def coco_results(detections, data: DetectionSet, category_ids: list[int]) -> list[dict]:
    """Per-image (index, boxes, scores, labels) in the S x S frame -> COCO result dicts in original pixels."""
    results = []
    for i, boxes, scores, labels in detections:
        scale_x, scale_y = data.scales[i].tolist()
        for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append(dict(
                image_id=data.image_ids[i], category_id=category_ids[label], score=score,
                bbox=[x0 * scale_x, y0 * scale_y, (x1 - x0) * scale_x, (y1 - y0) * scale_y],
            ))
    return results


def evaluate(detections, group_of: list[str], train: DetectionSet, test: DetectionSet, ground_truth) -> tuple[dict, dict]:
    """(flat AP metrics, per-category AP with group and training image count) of one method."""
    category_ids = det_metrics.category_ids_by_name(ground_truth, test.class_names)
    groups = dict(zip(category_ids, group_of))
    category_ap = det_metrics.per_category_ap(ground_truth, coco_results(detections, test, category_ids))
    name_of = dict(zip(category_ids, test.class_names))
    per_category = {
        name_of[c]: {"ap": ap, "group": groups[c], "train_images": int(train.image_counts[category_ids.index(c)])}
        for c, ap in category_ap.items()
    }
    return det_metrics.grouped_ap(category_ap, groups), per_category


def run_seed(seed, train: DetectionSet, test: DetectionSet, ground_truth, groups, args, out: Path, device, logger):
    """Stage 1, the stage-2 methods and evaluation for one seed: ({method: flat metrics}, per-category AP)."""
    runtime.seed_everything(seed)
    seed_dir = out / f"seed_{seed}"
    config = DetectorConfig(num_classes=len(train.class_names), image_size=args.image_size)
    model = Detector(config).to(device)
    started = time.time()
    train_stage1(model, train, args, seed, device, logger)
    logger.info(f"seed {seed} stage 1 done in {time.time() - started:.0f}s")
    checkpoint.save(seed_dir / "stage1.pt", task=TASK, stage="stage1", state_dict=model.state_dict(), config=config.__dict__,
                    seed=seed, args=args)
    features, labels = training_roi_features(model, train, args, seed, device)
    logger.info(f"seed {seed} stage 2: {len(labels)} cached RoIs")
    context = StageTwo(cls_score=model.cls_score, features=features, labels=labels, instance_counts=train.instance_counts,
                       rho=args.rho, recipe=Recipe("adam", "cosine", args.stage2_lr, 0.0, args.stage2_epochs, args.max_steps),
                       batch_size=args.stage2_batch_size, seed=seed, backend=args.backend, logger=logger,
                       paper_recipe=args.paper_recipe)
    classifiers = {}
    for method in (METHODS[k] for k in METHODS if k in args.methods):
        fitted = method.fit(context)
        classifiers[method.key] = fitted.predict
        if fitted.head is not None:
            checkpoint.save(seed_dir / f"stage2_{method.key}.pt", task=TASK, stage=f"stage2:{method.key}",
                            state_dict=fitted.head.state_dict(), config=config.__dict__, seed=seed, args=args)
    detections = detect(model, classifiers, test, args, device)
    group_of = [""] * len(train.class_names)
    for g, members in groups.items():
        for c in members:
            group_of[c] = g
    metrics, per_category = {}, {}
    for name in classifiers:
        metrics[name], per_category[name] = evaluate(detections[name], group_of, train, test, ground_truth)
        logger.info(f"seed {seed} {name:>10}: " + " ".join(
            f"{k} {'-' if metrics[name][k] is None else f'{100 * metrics[name][k]:.1f}'}" for k in METRICS))
    if seed == args.seeds[0] and args.figure_images > 0 and runtime.is_main():
        shown = {METHODS[k].title: detections[k] for k in ("joint", "disalign") if k in detections}
        draw_detections(out / "detections.png", test, group_of, shown, args.figure_images, args.figure_threshold)
    logger.info(f"seed {seed} done in {time.time() - started:.0f}s")
    return metrics, per_category


def run(args: argparse.Namespace) -> int:
    check_shared(args)
    check_at_least(args, image_size=24, num_train=1, num_test=1, stage2_passes=1, stage2_batch_size=1, eval_batch_size=1,
                   figure_images=0)
    with runtime.session(args, "disalign_train.detect") as (device, out, logger):
        started = time.time()
        train, test, ground_truth = load_data(args, out, logger)
        groups, rule = frequency_groups(train.image_counts, RULE, args.group_rule)
        rule_text = RULE.describe(rule)
        logger.info("groups by %s: %s", rule_text, {g: len(m) for g, m in groups.items()})
        titles = {k: METHODS[k].title for k in METHODS}
        per_seed = {}
        for seed in args.seeds:
            per_seed[seed], per_category = run_seed(seed, train, test, ground_truth, groups, args, out, device, logger)
            runtime.write_json(out / f"seed_{seed}" / "metrics.json", metrics_payload(
                TASK, groups, train.class_names, rule, rule_text, [seed], summarize({seed: per_seed[seed]}, METRICS, titles),
                per_category=per_category))
        methods = summarize(per_seed, METRICS, titles)
        runtime.write_json(out / "metrics.json", metrics_payload(TASK, groups, train.class_names, rule, rule_text, args.seeds,
                                                                 methods, train_image_counts=train.image_counts.tolist()))
        seeds = ", ".join(map(str, args.seeds))
        intro = (f"Box AP on {len(test)} test images (percent; mean ± std over seeds {seeds}; change from the stage-1 "
                 f"baseline in brackets). Groups: {rule_text} ({', '.join(f'{g} {len(groups[g])}' for g in GROUPS)} categories).")
        text = write_report(out, f"Long-tail detection, seeds {seeds}", intro,
                            markdown_table(methods, COLUMNS, "joint" if "joint" in methods else None),
                            tail_comparison(methods, "ap", TAIL_METRIC, "joint"))
        if runtime.is_main():
            plot_group_metrics(out / "group_metrics.png", methods, "ap", list(GROUPS), "box AP", "Box AP by group")
        logger.info("\n" + text)
        logger.info(f"done in {time.time() - started:.0f}s on {runtime.world_size()} process(es); outputs in {out}")
    return 0
