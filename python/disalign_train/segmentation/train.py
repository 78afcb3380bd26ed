"""Semantic segmentation: a small FCN, stage 1 cross entropy, stage 2 DisAlign on its 1x1 classifier.

Data: ``--data ROOT`` is an ADE20K-style folder (images/{training,validation}, annotations/...,
objectInfo.csv or objectInfo150.csv; see ``disalign_train.scenes``). Without it the embedded
scenes-lt set is generated, exported to ``OUT/data/scenes-lt`` in that layout and read back
through the same loader.

Methods, all on the same stage-1 network (per seed):

- ``baseline``: stage 1 only, plain cross entropy with ignore index 255, instance-balanced.
- ``disalign``: backbone and 1x1 classifier frozen; ``DisAlignConv2d.from_conv`` adds magnitude,
  margin and a per-pixel confidence, trained with the generalized re-weighted loss (rho 0.3 from
  training pixel frequencies) through ``disalign_cross_entropy`` on the (B, C, H, W) logits in place.
- ``grw``: the re-weight-only ablation. Backbone frozen, no calibration function: the 1x1
  classifier itself (initialised from stage 1) is retrained with the same GRW-weighted cross
  entropy, i.e. cRT with generalized re-weighting instead of class-balanced sampling. It goes
  through the same fused op with alpha = beta = 0 and no confidence.

Outputs in ``--out``: ``metrics.json`` (every method averaged over seeds, with the groups),
``seed_<s>/<method>/metrics.json`` and ``seed_<s>/stage1.pt``,
``stage2_disalign.pt``, ``stage2_grw.pt``; ``<method>/metrics.json`` averaged over seeds (with
``std`` and ``per_seed``); ``results.md`` (paper Table 6 layout); ``predictions.png``;
``train.log``. metrics.json schema: ``miou``, ``macc`` in [0, 1]; ``head``/``body``/``tail``:
``{"miou", "macc", "num_classes"}``; ``group_rule`` and ``groups`` (class names per group);
``per_class`` IoU/accuracy (null where a class is absent); ``pixels_evaluated``.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disalign_ops.nn import CalibrationInputs, DisAlignConv2d, DisAlignLoss

from . import runtime, scenes
from .segmentation_metrics import (
    GROUPS,
    confusion_matrix,
    describe_rule,
    frequency_groups,
    segmentation_metrics,
    summarize_runs,
    table6_markdown,
)

METHODS = ("baseline", "grw", "disalign")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, help="ADE20K-style root; default: generate scenes-lt")
    data.add_argument("--train-split", default="training")
    data.add_argument("--test-split", default="validation")
    data.add_argument("--image-size", type=int, default=64, help="scenes-lt size, and the size --data images are resized to")
    data.add_argument("--num-train", type=int, default=600, help="scenes-lt training images")
    data.add_argument("--num-test", type=int, default=200, help="scenes-lt test images (balanced things)")
    data.add_argument("--data-seed", type=int, default=0, help="scenes-lt generator seed (fixed across --seeds)")
    train = parser.add_argument_group("training")
    train.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds; results are averaged")
    train.add_argument("--width", type=int, default=16, help="base channel width of the FCN")
    train.add_argument("--batch-size", type=int, default=32, help="global batch size (split over ranks)")
    train.add_argument("--stage1-epochs", type=int, default=20)
    train.add_argument("--stage1-lr", type=float, default=1e-2)
    train.add_argument("--stage2-epochs", type=int, default=16)
    train.add_argument("--stage2-lr", type=float, default=1.0,
                       help="DisAlign magnitude and margin learning rate (AdamW; they live in logit units)")
    train.add_argument("--confidence-lr", type=float, default=2e-2, help="DisAlign confidence layer learning rate")
    train.add_argument("--grw-lr", type=float, default=5e-2, help="learning rate of the re-weight-only classifier retraining")
    train.add_argument("--rho", type=float, default=0.3, help="generalized re-weight exponent (paper: 0.3)")
    train.add_argument("--max-steps", type=int, default=None, help="cap on steps per stage (smoke tests)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--backend", default=None, choices=["eager", "native", "triton"], help="disalign_ops backend")
    parser.add_argument("--out", default="runs/scenes-lt-segment", help="output folder")
    parser.add_argument("--num-visualize", type=int, default=4, help="test scenes in predictions.png")


# ---------------------------------------------------------------- model


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallFCN(nn.Module):
    """Encoder to 1/8 resolution, FCN-style decoder with skips back to 1/2, features bilinearly
    upsampled to full resolution plus a shallow full-resolution branch, then the 1x1 classifier."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.enc2 = nn.Sequential(conv_bn_relu(3, width, 2), conv_bn_relu(width, width))
        self.enc4 = nn.Sequential(conv_bn_relu(width, 2 * width, 2), conv_bn_relu(2 * width, 2 * width))
        self.enc8 = nn.Sequential(conv_bn_relu(2 * width, 4 * width, 2), conv_bn_relu(4 * width, 4 * width))
        self.dec4 = conv_bn_relu(6 * width, 2 * width)
        self.dec2 = conv_bn_relu(3 * width, 2 * width)
        self.full = conv_bn_relu(3, width // 2)
        self.feature_channels = 2 * width + width // 2
        self.classifier = nn.Conv2d(self.feature_channels, num_classes, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, feature_channels, H, W) per-pixel features."""
        f2 = self.enc2(x)
        f4 = self.enc4(f2)
        f8 = self.enc8(f4)
        d4 = self.dec4(torch.cat([_upsample(f8, f4), f4], 1))
        d2 = self.dec2(torch.cat([_upsample(d4, f2), f2], 1))
        return torch.cat([_upsample(d2, x), self.full(x)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ReweightedClassifier(nn.Module):
    """The GRW-only ablation head: a trainable copy of the 1x1 classifier, uncalibrated.

    ``calibration_inputs`` has the DisAlign heads' interface (alpha = beta = 0, no confidence), so
    the same ``DisAlignLoss`` and stage-2 loop train it.
    """

    def __init__(self, classifier: nn.Conv2d):
        super().__init__()
        self.classifier = classifier.requires_grad_(True)
        self.register_buffer("zeros", torch.zeros(classifier.out_channels))

    def calibration_inputs(self, x: torch.Tensor) -> CalibrationInputs:
        return CalibrationInputs(self.classifier(x), self.zeros, self.zeros, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


class Stage1Step(nn.Module):
    """Stage-1 loss: plain cross entropy with ignore index 255."""

    def __init__(self, model: SmallFCN):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), labels, ignore_index=scenes.IGNORE_INDEX)


class Stage2Step(nn.Module):
    """Stage-2 loss: frozen backbone features in inference mode, then a head's GRW loss via the fused op."""

    def __init__(self, model: SmallFCN, head: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model, self.head, self.loss_fn = model, head, loss_fn
        for p in model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen backbone: BatchNorm keeps its stage-1 statistics
        self.head.train(mode)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.features(images)
        return self.loss_fn(self.head.calibration_inputs(features), labels)


# ---------------------------------------------------------------- data


def load_data(args, logger) -> tuple[scenes.SceneSet, scenes.SceneSet]:
    if args.data is None:
        root = Path(args.out) / "data" / "scenes-lt"
        if runtime.is_main() and not (root / "images" / args.test_split).is_dir():
            train, test = scenes.make_scenes_lt(args.data_seed, args.num_train, args.num_test, args.image_size)
            scenes.export_ade20k(train, root, args.train_split)
            scenes.export_ade20k(test, root, args.test_split)
            logger.info("generated scenes-lt (seed %d): %d train / %d test images -> %s",
                        args.data_seed, len(train), len(test), root)
        runtime.barrier()
    else:
        root = Path(args.data)
    image_size = None if args.data is None else args.image_size
    train = scenes.load_ade20k(root, args.train_split, image_size)
    test = scenes.load_ade20k(root, args.test_split, image_size)
    return train, test


def to_tensors(scene_set: scenes.SceneSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, H, W) float32 in [-1, 1] and labels (N, H, W) int64."""
    images = np.stack([s.image for s in scene_set.scenes]).transpose(0, 3, 1, 2)
    labels = np.stack([s.semantic for s in scene_set.scenes]).astype(np.int64)
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0), torch.from_numpy(labels)


# ---------------------------------------------------------------- training and evaluation


def train_stage(step: nn.Module, param_groups, images, labels, *, epochs, batch_size, seed, device, max_steps, desc):
    """The one training loop of every stage: AdamW over ``param_groups`` ([{"params", "lr"}], the
    trainable parameters of ``step``), a one-cycle (warm-up, cosine) schedule, random horizontal
    flips, each rank on its slice of a shared permutation (DDP when distributed). Returns the last loss."""
    world, rank = runtime.world_size(), runtime.rank()
    per_rank = max(1, batch_size // world)
    steps_per_epoch = max(1, len(images) // (per_rank * world))
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    module = step
    if world > 1:
        module = nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=1e-4)
    max_lr = [group["lr"] for group in param_groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    step.train()
    loss = torch.tensor(float("nan"))
    bar = runtime.progress(total=total, desc=desc)
    done = 0
    while done < total:
        order = torch.randperm(len(images), generator=generator)
        flips = torch.rand(len(images), generator=generator) < 0.5
        for i in range(steps_per_epoch):
            if done == total:
                break
            index = order[(i * world + rank) * per_rank : (i * world + rank + 1) * per_rank]
            x, y = images[index], labels[index]
            flip = flips[index]
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            loss = module(x.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return loss.item()


@torch.no_grad()
def predict(predictor, images: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([predictor(images[i : i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def evaluate(predictor, images, labels, num_classes, device) -> np.ndarray:
    """Confusion matrix over the test set; each rank scores its shard, summed over ranks."""
    shard = slice(runtime.rank(), None, runtime.world_size())
    prediction = predict(predictor, images[shard], device)
    confusion = confusion_matrix(labels[shard].numpy(), prediction.numpy(), num_classes, scenes.IGNORE_INDEX)
    return runtime.all_reduce_sum(torch.from_numpy(confusion)).numpy()


@dataclass
class PreparedData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    pixel_counts: np.ndarray  # labelled training pixels per class
    groups: dict[str, list[int]]
    group_rule: str


def run_seed(seed, args, data: PreparedData, device, out: Path, logger) -> tuple[dict, dict]:
    """Stage 1 and both stage-2 variants for one seed: (metrics per method, predictors for the figure)."""
    class_names, groups, rule = data.class_names, data.groups, data.group_rule
    num_classes = len(class_names)
    # generalized_reweight needs positive counts: a class without training pixels counts as one pixel.
    class_counts = np.maximum(data.pixel_counts, 1)
    seed_dir = out / f"seed_{seed}"
    common = dict(batch_size=args.batch_size, device=device, max_steps=args.max_steps)

    runtime.seed_everything(seed)
    model = SmallFCN(num_classes, args.width).to(device)
    started = time.time()
    all_weights = [{"params": list(model.parameters()), "lr": args.stage1_lr}]
    loss = train_stage(Stage1Step(model), all_weights, data.train_images, data.train_labels, epochs=args.stage1_epochs,
                       seed=seed, desc=f"seed {seed} stage 1", **common)
    model.eval()
    logger.info("seed %d stage 1: %.1fs, last loss %.3f", seed, time.time() - started, loss)
    save_checkpoint(seed_dir / "stage1.pt", model.state_dict(), args, class_names)

    predictors = {"baseline": model}
    results = {"baseline": evaluate(model, data.test_images, data.test_labels, num_classes, device)}
    for method in ("grw", "disalign"):
        if method == "disalign":
            head = DisAlignConv2d.from_conv(model.classifier, input_aware=True, backend=args.backend)
        else:
            head = ReweightedClassifier(copy.deepcopy(model.classifier))
        step = Stage2Step(model, head.to(device), DisAlignLoss(class_counts, args.rho, ignore_index=scenes.IGNORE_INDEX,
                                                               backend=args.backend).to(device))
        started = time.time()
        loss = train_stage(step, stage2_param_groups(head, args), data.train_images, data.train_labels,
                           epochs=args.stage2_epochs, seed=seed + 1000, desc=f"seed {seed} stage 2 {method}", **common)
        head.eval()
        logger.info("seed %d stage 2 %s: %.1fs, last loss %.3f", seed, method, time.time() - started, loss)
        save_checkpoint(seed_dir / f"stage2_{method}.pt", head.state_dict(), args, class_names)
        predictors[method] = _HeadPredictor(model, head)
        results[method] = evaluate(predictors[method], data.test_images, data.test_labels, num_classes, device)
    metrics = {}
    for method in METHODS:
        metrics[method] = segmentation_metrics(results[method], groups)
        metrics[method].update(method=method, seed=seed, group_rule=rule, pixels_evaluated=int(results[method].sum()),
                               groups={g: [class_names[c] for c in groups[g]] for g in GROUPS}, class_names=class_names)
        runtime.write_json(_ensure_dir(seed_dir / method) / "metrics.json", metrics[method])
        logger.info("seed %d %-8s mIoU %.3f (head %.3f body %.3f tail %.3f)  mAcc %.3f (tail %.3f)", seed, method,
                    metrics[method]["miou"], *(metrics[method][g]["miou"] for g in GROUPS),
                    metrics[method]["macc"], metrics[method]["tail"]["macc"])
    return metrics, predictors


def stage2_param_groups(head: nn.Module, args) -> list[dict]:
    """Magnitude and margin are in logit units and need far larger steps than the confidence layer's
    or a classifier's weights (one shared rate either barely moves them or saturates the confidence)."""
    if isinstance(head, ReweightedClassifier):
        return [{"params": list(head.classifier.parameters()), "lr": args.grw_lr}]
    groups = [{"params": [head.magnitude, head.margin], "lr": args.stage2_lr}]
    if head.confidence is not None:
        groups.append({"params": list(head.confidence.parameters()), "lr": args.confidence_lr})
    return groups


class _HeadPredictor(nn.Module):
    def __init__(self, model: SmallFCN, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(images))


def _ensure_dir(path: Path) -> Path:
    if runtime.is_main():
        path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(path: Path, state_dict, args, class_names) -> None:
    if runtime.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "run"}  # `run` is the CLI's function
        torch.save({"state_dict": state_dict, "args": settings, "class_names": class_names}, path)


# ---------------------------------------------------------------- figure


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class (tab20 + hsv), grey for ignore."""
    import matplotlib

    colours = [matplotlib.colormaps["tab20"](i % 20)[:3] for i in range(min(num_classes, 20))]
    colours += [matplotlib.colormaps["hsv"](i / max(num_classes - 20, 1))[:3] for i in range(num_classes - 20)]
    table = np.full((256, 3), 128, dtype=np.uint8)
    table[:num_classes] = (np.array(colours) * 255).astype(np.uint8)
    return table


def save_predictions_figure(path, test_set, test_images, predictors, class_names, tail_classes, device, count, title):
    """Rows: test scenes with the most tail pixels; columns: image, ground truth, baseline, DisAlign."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.patches import Rectangle

    tail = np.asarray(sorted(tail_classes), dtype=np.int64)
    tail_pixels = np.array([np.isin(s.semantic, tail).sum() for s in test_set.scenes])
    chosen = np.argsort(-tail_pixels, kind="stable")[:count]
    colours = palette(len(class_names))
    shown_methods = ("baseline", "disalign")
    predictions = {name: predict(predictors[name], test_images[chosen], device).numpy() for name in shown_methods}
    columns = ["image", "ground truth", *shown_methods]
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(chosen)))
    axes = fig.subplots(len(chosen), len(columns), squeeze=False)
    for row, index in enumerate(chosen):
        panels = [test_set.scenes[index].image, colours[test_set.scenes[index].semantic]]
        panels += [colours[predictions[name][row]] for name in shown_methods]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=9)
    shown = [test_set.scenes[i].semantic.ravel() for i in chosen] + [p.ravel() for p in predictions.values()]
    present = [int(c) for c in np.unique(np.concatenate(shown)) if c != scenes.IGNORE_INDEX]
    handles = [Rectangle((0, 0), 1, 1, color=colours[c] / 255) for c in present]
    labels = [class_names[c] + (" (tail)" if c in tail else "") for c in present]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(present) // 3), 1, 1))
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- entry point


def check_arguments(args) -> None:
    for name in ("stage1_epochs", "stage2_epochs", "batch_size", "width", "image_size", "num_train", "num_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.rho < 0:
        raise ValueError(f"--rho must be >= 0, got {args.rho}")


def run(args) -> int:
    check_arguments(args)
    device = runtime.pick_device(args.device)
    runtime.share_cpu_threads(device)
    runtime.init_distributed(device)
    try:
        out, logger = runtime.prepare_output(args.out, "disalign_train.segment")
        train_set, test_set = load_data(args, logger)
        class_names = train_set.seg_class_names
        pixel_counts = train_set.seg_pixel_counts()
        groups, rule = frequency_groups(pixel_counts)
        logger.info("%d classes, %d train / %d test images; groups by %s: %s", len(class_names), len(train_set),
                    len(test_set), describe_rule(rule), {g: len(groups[g]) for g in GROUPS})
        data = PreparedData(*to_tensors(train_set), *to_tensors(test_set), class_names, pixel_counts, groups, rule)
        per_seed = {method: [] for method in METHODS}
        for seed in args.seeds:
            metrics, predictors = run_seed(seed, args, data, device, out, logger)
            if seed == args.seeds[0]:
                figure_predictors = predictors
            for method in METHODS:
                per_seed[method].append(metrics[method])
        summaries = {}
        for method in METHODS:
            summaries[method] = summarize_runs(per_seed[method])
            payload = summaries[method] | {"method": method, "seeds": list(args.seeds), "group_rule": rule,
                                           "per_seed": [{k: m[k] for k in ("seed", "miou", "macc", *GROUPS)}
                                                        for m in per_seed[method]]}
            runtime.write_json(_ensure_dir(out / method) / "metrics.json", payload)
        runtime.write_json(out / "metrics.json", {
            "task": "segment", "seeds": list(args.seeds), "group_rule": rule, "group_rule_text": describe_rule(rule),
            "groups": {g: [class_names[c] for c in groups[g]] for g in GROUPS}, "methods": summaries,
        })
        table = table6_markdown(summaries)
        report = (f"Semantic segmentation, {len(args.seeds)} seed(s) {list(args.seeds)}: mean ± std (percent), "
                  f"delta to the baseline in parentheses.\nGroups: {describe_rule(rule)} "
                  f"({', '.join(f'{g} {len(groups[g])}' for g in GROUPS)} classes).\n\n{table}")
        if runtime.is_main():
            (out / "results.md").write_text(report)
            save_predictions_figure(out / "predictions.png", test_set, data.test_images, figure_predictors, class_names,
                                    groups["tail"], device, args.num_visualize, f"test scenes, seed {args.seeds[0]}")
        logger.info("\n%s", report)
        return 0
    finally:
        runtime.shutdown_distributed()
