"""Long-tail detection: a two-stage DisAlign Fast R-CNN-style detector on scenes-lt (or COCO/LVIS-style data).

Stage 1 trains the whole detector (detection_model.Detector) with instance-balanced image sampling,
plain (K+1)-way cross entropy and L1 box regression. Stage 2 freezes everything and trains, on RoI
features of the training set, one of:

- ``disalign``: ``disalign_ops.nn.DisAlignROIHead`` over the frozen ``cls_score``: magnitude and
  margin on the K foreground logits (background untouched) and an input-aware confidence, with
  ``DisAlignLoss`` (generalized re-weight, rho 0.8 over foreground instance counts, background
  weight 1; paper sec. 4.3 and appendix C.2);
- ``reweight_only`` (ablation): the same generalized re-weighted loss, no calibration at all: the
  ``cls_score`` layer alone is re-trained from its stage-1 weights (cRT-style), so the gain of
  DisAlign's magnitude / margin / confidence over re-weighting alone shows;

and ``baseline`` is the stage-1 detector. All three share backbone, box head and box regression, so
one pass over the test set scores all of them. Box AP by pycocotools over the exported ground-truth
JSON, overall and for LVIS's rare / common / frequent groups (detection_eval).

Outputs in --out: ``<method>/metrics.json`` (means over seeds, their ``std`` and ``per_seed``),
``seed_<s>/<method>/metrics.json`` (``AP``, ``APr``, ``APc``, ``APf`` in [0, 1], NaN for a group
without test ground truth, and ``per_category`` AP with group and training image count),
``seed_<s>/stage1.pt``, ``stage2_disalign.pt``, ``stage2_reweight_only.pt``, ``results.md`` (paper
Table 8's shape), ``detections.png`` (test scenes: ground truth, baseline, DisAlign), ``train.log``,
and ``data/`` (the embedded scenes in COCO/LVIS format, readable back with ``--data OUT/data``).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from disalign_ops.nn import CalibrationInputs, DisAlignLoss, DisAlignROIHead

from . import detection_eval, runtime, scenes
from .detection_model import (
    Detector,
    DetectorConfig,
    box_regression_loss,
    inference_proposals,
    postprocess,
    sample_training_rois,
)
from .detection_ops import BoxCoder, clip_boxes

METHODS = ("baseline", "reweight_only", "disalign")
METHOD_TITLES = {"baseline": "Baseline", "reweight_only": "Re-weight only (cRT)", "disalign": "DisAlign"}


class DetectionSet:
    """A SceneSet as tensors: uint8 images (N, 3, S, S), per-image boxes and labels in the S x S frame,
    and each image's COCO id and scale back to its original size (for the detections)."""

    def __init__(self, scene_set: scenes.SceneSet, image_ids=None, original_sizes=None):
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


# ---------------------------------------------------------------- data


def load_data(args, out: Path, logger):
    """(train DetectionSet, test DetectionSet, ground-truth COCO of the test set)."""
    if args.data:
        root = Path(args.data)
        train_json, test_json = root / "train.json", root / f"{args.test_split}.json"
        for path in (train_json, test_json):
            if not path.exists():
                raise FileNotFoundError(f"--data {root}: missing {path.name} (expected train.json and {test_json.name})")
    else:
        root = out / "data"
        train_json, test_json = root / "train.json", root / "test.json"
        if runtime.is_main():
            train_set, test_set = scenes.make_scenes_lt(
                seed=args.scene_seed, num_train=args.num_train, num_test=args.num_test, image_size=args.image_size
            )
            scenes.export_coco(train_set, train_json, root / "train")
            scenes.export_coco(test_set, test_json, root / "test", frequency_from=train_set)
        runtime.barrier()
    train_set = scenes.load_coco(train_json, root / "train", image_size=args.image_size)
    test_set = scenes.load_coco(test_json, root / test_json.stem, image_size=args.image_size)
    ground_truth = detection_eval.load_ground_truth(test_json)
    image_ids = sorted(ground_truth.getImgIds())  # load_coco orders images by id too
    sizes = [(ground_truth.imgs[i]["width"], ground_truth.imgs[i]["height"]) for i in image_ids]
    if train_set.thing_class_names != test_set.thing_class_names:
        raise ValueError(f"{train_json} and {test_json} have different categories")
    logger.info(f"data {root}: {len(train_set)} train / {len(test_set)} test images, "
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


def rank_shard(num_items: int, epoch_seed: int) -> list[int]:
    """This rank's share of a seeded permutation (the same on every rank), equal-sized across ranks."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(epoch_seed))
    per_rank = num_items // runtime.world_size()
    return order[runtime.rank() * per_rank : (runtime.rank() + 1) * per_rank].tolist()


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def per_process(global_batch_size: int) -> int:
    """Each process's part of a global batch, so that torchrun runs the same schedule as one process."""
    return max(1, global_batch_size // runtime.world_size())


# ---------------------------------------------------------------- stage 1


def train_stage1(model: Detector, data: DetectionSet, args, seed: int, device, logger) -> None:
    config = model.config
    anchors = inference_proposals(config, device)
    wrapped = DistributedDataParallel(model) if runtime.world_size() > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    batch_size = per_process(args.batch_size)
    steps_per_epoch = math.ceil((len(data) // runtime.world_size()) / batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = max(1, min(50, total_steps // 10))

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    bar = runtime.progress(total=total_steps, desc=f"seed {seed} stage 1")
    for epoch in range(args.epochs):
        totals = torch.zeros(3, device=device)  # summed cls loss, box loss, steps
        for indices in batches(rank_shard(len(data), seed * 1000 + epoch), batch_size):
            images, rois, labels, targets = training_batch(config, data, indices, anchors, device)
            logits, deltas = wrapped(images, rois)
            loss_cls = F.cross_entropy(logits, labels)
            loss_box = box_regression_loss(deltas, labels, targets, config.num_classes)
            optimizer.zero_grad(set_to_none=True)
            (loss_cls + loss_box).backward()
            optimizer.step()
            scheduler.step()
            totals += torch.stack([loss_cls.detach(), loss_box.detach(), torch.ones_like(loss_box)])
            bar.update()
        totals = runtime.all_reduce_sum(totals)
        logger.info(f"seed {seed} stage 1 epoch {epoch + 1}/{args.epochs}: "
                    f"cls {totals[0] / totals[2]:.4f} box {totals[1] / totals[2]:.4f}")
    bar.close()
    if runtime.world_size() > 1:  # DDP syncs parameters; BatchNorm statistics are each rank's own: average them
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(runtime.all_reduce_sum(buffer.clone()) / runtime.world_size())
    model.eval()


# ---------------------------------------------------------------- stage 2


@torch.no_grad()
def training_roi_features(model: Detector, data: DetectionSet, args, seed: int, device):
    """Box-head features and labels of RoIs sampled from the training images (``--stage2-passes`` passes).

    Everything below the classifier is frozen in stage 2, so these features are exactly what the
    classifier sees when stage 2 runs the whole detector; caching them makes stage 2 cheap.
    """
    anchors = inference_proposals(model.config, device)
    features, labels = [], []
    for p in range(args.stage2_passes):
        for indices in batches(rank_shard(len(data), seed * 1000 + 500 + p), per_process(args.batch_size)):
            images, rois, roi_labels, _ = training_batch(model.config, data, indices, anchors, device)
            features.append(model.roi_features(images, rois))
            labels.append(roi_labels)
    return torch.cat(features), torch.cat(labels)


def train_on_features(params, loss_of_batch, features, labels, args, desc: str):
    """Stage 2: ``--stage2-steps`` Adam steps (cosine decay) on random batches of cached RoI features.

    The trained modules are tiny, so gradients are summed over ranks by hand (the same number of
    steps on every rank keeps the collectives in step) rather than through DDP.
    """
    optimizer = torch.optim.Adam(params, lr=args.stage2_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.stage2_steps)
    for _ in runtime.progress(range(args.stage2_steps), desc=desc):
        batch = torch.randint(len(labels), (per_process(args.stage2_batch_size),), device=labels.device)
        loss = loss_of_batch(features[batch], labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if runtime.world_size() > 1:
                p.grad = runtime.all_reduce_sum(p.grad) / runtime.world_size()
        optimizer.step()
        scheduler.step()
    return loss.item()


def foreground_weights_loss(counts, args):
    """DisAlignLoss with generalized re-weight over the foreground instance counts, background weight 1.

    A category without training instances counts as 1 (re-weighting needs positive counts)."""
    counts = np.maximum(np.asarray(counts), 1)
    return DisAlignLoss(counts.tolist(), rho=args.rho, background_index=-1, backend=args.backend)


def train_stage2(model: Detector, data: DetectionSet, args, seed: int, device, logger) -> dict[str, nn.Module]:
    """The classifiers of the three methods: the stage-1 ``cls_score``, a re-trained copy, a DisAlign head."""
    features, labels = training_roi_features(model, data, args, seed, device)
    loss_fn = foreground_weights_loss(data.instance_counts, args).to(device)
    logger.info(f"seed {seed} stage 2: {len(labels)} cached RoIs per rank, "
                f"foreground weights {[round(w, 2) for w in loss_fn.weight[:-1].tolist()]}")

    # Re-weight only: the same loss with no calibration (alpha = beta = 0, s = 1) on a re-trained cls_score.
    reweighted = copy.deepcopy(model.cls_score).requires_grad_(True)
    no_calibration = torch.zeros(model.config.num_classes + 1, device=device)
    final = train_on_features(
        list(reweighted.parameters()),
        lambda x, y: loss_fn(CalibrationInputs(reweighted(x), no_calibration, no_calibration, None), y),
        features, labels, args, f"seed {seed} re-weight only",
    )
    logger.info(f"seed {seed} stage 2 re-weight only: final loss {final:.4f}")

    torch.manual_seed(seed)  # the confidence layer starts the same on every rank, whatever ran before
    head = DisAlignROIHead(model.cls_score, background_index=-1, backend=args.backend).to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    final = train_on_features(
        params, lambda x, y: loss_fn(head.calibration_inputs(x), y), features, labels, args, f"seed {seed} DisAlign"
    )
    logger.info(f"seed {seed} stage 2 DisAlign: final loss {final:.4f}, magnitude "
                f"{[round(v, 2) for v in head.magnitude.tolist()]}, margin {[round(v, 2) for v in head.margin.tolist()]}")
    head.eval()
    return {"baseline": model.cls_score, "reweight_only": reweighted, "disalign": head}


def stage2_parameters(classifiers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Names of the trainable parameters of each stage-2 classifier (what stage 2 may change)."""
    return {name: [n for n, p in c.named_parameters() if p.requires_grad] for name, c in classifiers.items() if name != "baseline"}


# ---------------------------------------------------------------- evaluation


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
    for batch in runtime.progress(batches(indices, args.eval_batch_size), desc="detect"):
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


def evaluate(detections, train: DetectionSet, test: DetectionSet, ground_truth) -> dict:
    """AP / APr / APc / APf (groups from training image counts) and per-category AP of one method."""
    category_ids = detection_eval.category_ids_by_name(ground_truth, test.class_names)
    groups = {c: detection_eval.frequency_group(int(n)) for c, n in zip(category_ids, train.image_counts)}
    category_ap = detection_eval.per_category_ap(ground_truth, coco_results(detections, test, category_ids))
    metrics = detection_eval.grouped_ap(category_ap, groups)
    name_of = dict(zip(category_ids, test.class_names))
    metrics["per_category"] = {
        name_of[c]: {"AP": ap, "group": groups[c], "train_images": int(train.image_counts[category_ids.index(c)])}
        for c, ap in category_ap.items()
    }
    return metrics


# ---------------------------------------------------------------- reports

GROUP_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#2ca02c"}


def draw_detections(path: Path, test: DetectionSet, train: DetectionSet, detections: dict, count: int, threshold: float):
    """Test scenes with the most rare-category instances: ground truth | baseline | DisAlign (score >= threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [detection_eval.frequency_group(int(n)) for n in train.image_counts]
    rare_instances = [sum(groups[label] == "r" for label in labels.tolist()) for labels in test.labels]
    chosen = sorted(range(len(test)), key=lambda i: (-rare_instances[i], i))[:count]
    panels = [("ground truth", None), ("baseline", detections["baseline"]), ("DisAlign", detections["disalign"])]
    by_image = {name: {d[0]: d for d in dets} for name, dets in panels if dets is not None}
    fig, axes = plt.subplots(len(chosen), len(panels), figsize=(3.2 * len(panels), 3.2 * len(chosen)), squeeze=False)
    for row, i in enumerate(chosen):
        for col, (title, dets) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(test.images[i].permute(1, 2, 0).numpy())
            ax.set_axis_off()
            if dets is None:
                boxes, labels, scores = test.boxes[i], test.labels[i], [None] * len(test.labels[i])
            else:
                _, boxes, all_scores, labels = by_image[title][i]
                keep = all_scores >= threshold
                boxes, labels, scores = boxes[keep], labels[keep], all_scores[keep].tolist()
            for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels.tolist(), scores):
                colour = GROUP_COLOURS[groups[label]]
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
                text = test.class_names[label] + ("" if score is None else f" {score:.2f}")
                ax.text(x0 - 0.5, y0 - 1, text, color="white", fontsize=5.5, va="bottom",
                        bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, lw=0))
            if row == 0:
                ax.set_title(title)
    fig.suptitle(f"boxes: rare red, common orange, frequent green; detections with score >= {threshold}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_KEYS = ("AP", "APr", "APc", "APf")


def summarise(per_seed: list[dict], seeds: list[int]) -> dict:
    """Means over seeds of AP / APr / APc / APf, their ``std``, and each seed's values."""
    values = {key: np.array([m[key] for m in per_seed], dtype=np.float64) for key in SUMMARY_KEYS}
    return {
        **{key: float(v.mean()) for key, v in values.items()},
        "std": {key: float(v.std()) for key, v in values.items()},
        "seeds": list(seeds),
        "per_seed": [{"seed": seed, **{key: m[key] for key in SUMMARY_KEYS}} for seed, m in zip(seeds, per_seed)],
    }


def results_table(summaries: dict[str, dict], seeds: list[int], image_counts) -> str:
    """Markdown table in the shape of paper Table 8 (box AP in percent, mean ± std over seeds, gain over baseline)."""
    groups = [detection_eval.frequency_group(int(n)) for n in image_counts]
    lines = [
        f"Box AP on the test scenes (percent; mean ± std over seeds {', '.join(map(str, seeds))}; "
        "gain over the baseline in brackets).",
        "LVIS groups by training images: rare (1-10) {}, common (11-100) {}, frequent (>100) {} categories.".format(
            *(groups.count(g) for g in detection_eval.FREQUENCY_GROUPS)
        ),
        "",
        "| Method | AP_bbox | AP_bbox^r | AP_bbox^c | AP_bbox^f |",
        "| --- | --- | --- | --- | --- |",
    ]
    baseline = summaries["baseline"]
    for method in METHODS:
        cells = []
        for key in SUMMARY_KEYS:
            s = summaries[method]
            cell = f"{100 * s[key]:.1f} ± {100 * s['std'][key]:.1f}"
            if method != "baseline":
                cell += f" ({100 * (s[key] - baseline[key]):+.1f})"
            cells.append(cell)
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/detect", help="output folder")
    parser.add_argument("--data", default=None,
                        help="COCO/LVIS-style folder with train.json + train/ images and <test-split>.json + <test-split>/ "
                             "images (e.g. a previous run's OUT/data); default: the embedded scenes-lt")
    parser.add_argument("--test-split", default="test", help="name of the evaluation split inside --data")
    parser.add_argument("--image-size", type=int, default=64, help="images are resized to this square size")
    parser.add_argument("--num-train", type=int, default=600, help="embedded scenes: training images")
    parser.add_argument("--num-test", type=int, default=200, help="embedded scenes: test images")
    parser.add_argument("--scene-seed", type=int, default=0, help="embedded scenes: generator seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (metrics: mean and std)")
    parser.add_argument("--epochs", type=int, default=24, help="stage 1 epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 1 images per step (split over torchrun processes)")
    parser.add_argument("--lr", type=float, default=0.05, help="stage 1 SGD learning rate")
    parser.add_argument("--rho", type=float, default=0.8, help="generalized re-weight exponent (foreground classes)")
    parser.add_argument("--stage2-passes", type=int, default=2, help="passes over the training images to cache RoIs")
    parser.add_argument("--stage2-steps", type=int, default=1000, help="stage 2 Adam steps (each method)")
    parser.add_argument("--stage2-batch-size", type=int, default=512, help="RoIs per stage 2 step (split over processes)")
    parser.add_argument("--stage2-lr", type=float, default=0.05, help="stage 2 Adam learning rate")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="test images per forward pass")
    parser.add_argument("--figure-images", type=int, default=4, help="test scenes drawn in detections.png")
    parser.add_argument("--figure-threshold", type=float, default=0.3, help="score threshold of drawn detections")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process: the detector's ops are small, so extra intra-op threads mostly "
                             "spin-wait (badly on a shared machine); use torchrun processes for more cores")
    parser.add_argument("--backend", default=None, choices=["eager", "native", "triton"],
                        help="disalign_ops backend for stage 2 (default: automatic)")


def run_seed(seed: int, train: DetectionSet, test: DetectionSet, ground_truth, args, out: Path, device, logger):
    """Stage 1, both stage-2 methods and evaluation for one seed; returns {method: metrics}."""
    runtime.seed_everything(seed)
    seed_dir = out / f"seed_{seed}"
    config = DetectorConfig(num_classes=len(train.class_names), image_size=args.image_size)
    model = Detector(config).to(device)
    started = time.time()
    train_stage1(model, train, args, seed, device, logger)
    logger.info(f"seed {seed} stage 1 done in {time.time() - started:.0f}s")
    classifiers = train_stage2(model, train, args, seed, device, logger)
    detections = detect(model, classifiers, test, args, device)
    logger.info(f"seed {seed} detections on {len(test)} test images: "
                + ", ".join(f"{name} {sum(len(d[2]) for d in detections[name])}" for name in METHODS))
    metrics = {}
    if runtime.is_main():
        seed_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config.__dict__, "model": model.state_dict()}, seed_dir / "stage1.pt")
        for name in ("reweight_only", "disalign"):
            torch.save(classifiers[name].state_dict(), seed_dir / f"stage2_{name}.pt")
        for name in METHODS:
            metrics[name] = evaluate(detections[name], train, test, ground_truth)
            (seed_dir / name).mkdir(exist_ok=True)
            runtime.write_json(seed_dir / name / "metrics.json", metrics[name])
            logger.info(f"seed {seed} {name:>13}: " + " ".join(f"{k} {100 * metrics[name][k]:.1f}" for k in SUMMARY_KEYS))
        if seed == args.seeds[0] and args.figure_images > 0:
            draw_detections(out / "detections.png", test, train, detections, args.figure_images, args.figure_threshold)
    logger.info(f"seed {seed} done in {time.time() - started:.0f}s")
    return metrics


def run(args: argparse.Namespace) -> int:
    device = runtime.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    runtime.init_distributed(device)
    try:
        out, logger = runtime.prepare_output(args.out, "disalign_train.detect")
        started = time.time()
        train, test, ground_truth = load_data(args, out, logger)
        per_seed = [run_seed(seed, train, test, ground_truth, args, out, device, logger) for seed in args.seeds]
        if runtime.is_main():
            summaries = {name: summarise([m[name] for m in per_seed], args.seeds) for name in METHODS}
            for name, summary in summaries.items():
                (out / name).mkdir(exist_ok=True)
                runtime.write_json(out / name / "metrics.json", {"method": name, **summary})
            table = results_table(summaries, args.seeds, train.image_counts)
            (out / "results.md").write_text(table)
            logger.info("\n" + table)
        logger.info(f"done in {time.time() - started:.0f}s on {runtime.world_size()} process(es); outputs in {out}")
    finally:
        runtime.shutdown_distributed()
    return 0
