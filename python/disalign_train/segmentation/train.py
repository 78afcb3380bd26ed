"""Semantic segmentation: a small FCN, stage 1 cross entropy, stage 2 DisAlign on its 1x1 classifier.

Data: ``--data ROOT`` is an ADE20K-style folder (images/{training,validation}, annotations/...,
objectInfo.csv or objectInfo150.csv; see ``segmentation.data``). Without it the embedded scenes-lt
set is generated into ``OUT/data/scenes-lt`` in that layout (rebuilt when the flags it was made
from change) and read back through the same loader.

Methods (``segmentation.methods``): ``joint`` (the stage-1 network), ``grw_only`` (the classifier
retrained with the re-weighted loss), ``disalign``. Outputs in ``--out``: ``metrics.json``
(core.summary schema: ``miou``, ``macc``, ``head_miou`` ... ``tail_macc``), ``results.md`` (paper
Table 6 layout), ``group_metrics.png``, ``predictions.png``, ``train.log``; per seed ``seed_<s>/``
with ``metrics.json`` (per-class IoU and accuracy too), ``stage1.pt`` and ``stage2_<method>.pt``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import checkpoint, runtime
from ..core.args import add_scene_arguments, add_shared_arguments, check_at_least, check_shared
from ..core.groups import frequency_groups
from ..core.loop import Recipe, fit
from ..core.plots import plot_group_metrics
from ..core.summary import markdown_table, metrics_payload, summarize, tail_comparison, write_report
from ..scenes import IGNORE_INDEX
from .data import load_data, to_tensors
from .methods import METHODS, StageTwo, flip_batches, sampler_for
from .metrics import GROUPS, METRICS, RULE, TAIL_METRIC, confusion_matrix, segmentation_metrics
from .model import SmallFCN
from .report import predict, save_predictions_figure

TASK = "segment"
RHO = {"default": 0.3, "paper-recipe": 0.2}  # paper sec. 4.2; the authors' released ADE20K config
COLUMNS = [("miou", "mIoU"), ("head_miou", "mIoU head"), ("body_miou", "mIoU body"), ("tail_miou", "mIoU tail"),
           ("macc", "mAcc"), ("head_macc", "mAcc head"), ("body_macc", "mAcc body"), ("tail_macc", "mAcc tail")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_shared_arguments(
        parser,
        data_help="ADE20K-style root (None: generate scenes-lt into OUT/data)", data_default=None,
        data_seed_help="scenes-lt generator seed (fixed across --seeds)",
        out="runs/segment", epochs=20, lr=1e-2, batch_size=32, stage2_epochs=16, stage2_lr=1.0, rho=None,
        seeds=[0, 1, 2], methods=list(METHODS), lr_help="stage-1 AdamW learning rate (one-cycle schedule)",
        rho_help="generalized re-weight exponent (None: 0.3 as in the paper; 0.2 with --paper-recipe, the authors' config)",
    )
    data, stage1, stage2, run = (groups[k] for k in ("data", "stage 1", "stage 2", "run"))
    data.add_argument("--train-split", default="training")
    data.add_argument("--test-split", default="validation")
    add_scene_arguments(data, "scenes-lt size, and the size --data images are resized to")
    stage1.add_argument("--width", type=int, default=16, help="base channel width of the FCN")
    stage2.add_argument("--confidence-lr", type=float, default=2e-2,
                        help="DisAlign confidence layer learning rate (--stage2-lr is magnitude and margin's: logit units)")
    stage2.add_argument("--grw-lr", type=float, default=5e-2, help="learning rate of the grw_only classifier retraining")
    run.add_argument("--num-visualize", type=int, default=4, help="test scenes in predictions.png")


class Stage1Objective(nn.Module):
    """Stage-1 loss: plain cross entropy with ignore index 255."""

    def __init__(self, model: SmallFCN):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), labels, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(predictor, images, labels, num_classes, device) -> np.ndarray:
    """Confusion matrix over the test set; each rank scores its shard, summed over ranks."""
    shard = slice(runtime.rank(), None, runtime.world_size())
    prediction = predict(predictor, images[shard], device)
    confusion = confusion_matrix(labels[shard].numpy(), prediction.numpy(), num_classes, IGNORE_INDEX)
    return runtime.all_reduce_sum(torch.from_numpy(confusion)).numpy()


def run_seed(seed, args, data: dict, groups, device, out: Path, logger) -> tuple[dict, dict, dict]:
    """Stage 1 and every stage-2 method for one seed: (flat metrics, per-class values, predictors) per method."""
    num_classes = len(data["class_names"])
    seed_dir = out / f"seed_{seed}"
    runtime.seed_everything(seed)
    model = SmallFCN(num_classes, args.width).to(device)
    started = time.time()
    recipe = Recipe("adamw", "onecycle", args.lr, 1e-4, args.epochs, args.max_steps)
    fit(Stage1Objective(model), model.parameters(), recipe, sampler_for(data["train_images"], args.batch_size, seed),
        flip_batches(data["train_images"], data["train_labels"], seed, device), logger, f"seed {seed} stage 1")
    model.eval().requires_grad_(False)
    logger.info("seed %d stage 1: %.1fs", seed, time.time() - started)
    config = {"num_classes": num_classes, "width": args.width, "class_names": data["class_names"]}
    checkpoint.save(seed_dir / "stage1.pt", task=TASK, stage="stage1", state_dict=model.state_dict(), config=config,
                    seed=seed, args=args)
    context = StageTwo(
        model=model, images=data["train_images"], labels=data["train_labels"], pixel_counts=data["pixel_counts"],
        rho=args.rho, recipe=Recipe("adamw", "onecycle", args.stage2_lr, 1e-4, args.stage2_epochs, args.max_steps),
        confidence_lr=args.confidence_lr, grw_lr=args.grw_lr, batch_size=args.batch_size, seed=seed, device=device,
        backend=args.backend, logger=logger, paper_recipe=args.paper_recipe,
    )
    metrics, per_class, predictors = {}, {}, {}
    for method in (METHODS[k] for k in METHODS if k in args.methods):
        torch.manual_seed(seed)
        fitted = method.fit(context)
        if fitted.head is not None:
            checkpoint.save(seed_dir / f"stage2_{method.key}.pt", task=TASK, stage=f"stage2:{method.key}",
                            state_dict=fitted.head.state_dict(), config=config, seed=seed, args=args)
        confusion = evaluate(fitted.predict, data["test_images"], data["test_labels"], num_classes, device)
        metrics[method.key], per_class[method.key] = segmentation_metrics(confusion, groups)
        predictors[method.key] = fitted.predict
        m = metrics[method.key]
        logger.info("seed %d %-10s mIoU %s (head %s body %s tail %s)  mAcc %s (tail %s)", seed, method.key,
                    *(_pct(m[k]) for k in ("miou", "head_miou", "body_miou", "tail_miou", "macc", "tail_macc")))
    return metrics, per_class, predictors


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def run(args) -> int:
    check_shared(args)
    check_at_least(args, width=2, image_size=24, num_train=1, num_test=1, num_visualize=0)
    if args.rho is None:
        args.rho = RHO["paper-recipe" if args.paper_recipe else "default"]
    with runtime.session(args, "disalign_train.segment") as (device, out, logger):
        train_set, test_set = load_data(args, logger)
        class_names = train_set.seg_class_names
        pixel_counts = train_set.seg_pixel_counts()
        groups, rule = frequency_groups(pixel_counts, RULE, args.group_rule)
        logger.info("%d classes, %d train / %d test images; groups by %s: %s", len(class_names), len(train_set),
                    len(test_set), RULE.describe(rule), {g: len(groups[g]) for g in GROUPS})
        train_images, train_labels = to_tensors(train_set)
        test_images, test_labels = to_tensors(test_set)
        data = dict(train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                    class_names=class_names, pixel_counts=pixel_counts)
        per_seed, figure_predictors = {}, None
        titles = {k: METHODS[k].title for k in METHODS}
        rule_text = RULE.describe(rule)
        for seed in args.seeds:
            per_seed[seed], per_class, predictors = run_seed(seed, args, data, groups, device, out, logger)
            figure_predictors = figure_predictors or predictors
            runtime.write_json(out / f"seed_{seed}" / "metrics.json", metrics_payload(
                TASK, groups, class_names, rule, rule_text, [seed], summarize({seed: per_seed[seed]}, METRICS, titles),
                per_class=per_class, class_names=class_names))
        methods = summarize(per_seed, METRICS, titles)
        runtime.write_json(out / "metrics.json", metrics_payload(TASK, groups, class_names, rule, rule_text, args.seeds,
                                                                 methods, rho=args.rho, pixel_counts=pixel_counts.tolist()))
        seeds = ", ".join(map(str, args.seeds))
        intro = (f"{len(class_names)} classes, {len(train_set)} train / {len(test_set)} test images. Groups: {rule_text} "
                 f"({', '.join(f'{g} {len(groups[g])}' for g in GROUPS)} classes). Percent, mean ± std over seeds {seeds}; "
                 f"in brackets the change from the stage-1 baseline. rho = {args.rho:g}.")
        text = write_report(out, f"Semantic segmentation, seeds {seeds}", intro,
                            markdown_table(methods, COLUMNS, "joint" if "joint" in methods else None),
                            tail_comparison(methods, "miou", TAIL_METRIC, "joint"))
        if runtime.is_main():
            plot_group_metrics(out / "group_metrics.png", methods, "miou", list(GROUPS), "mIoU", "mIoU by group")
            if args.num_visualize:
                save_predictions_figure(out / "predictions.png", test_set, test_images, figure_predictors, class_names,
                                        groups["tail"], device, args.num_visualize, f"test scenes, seed {args.seeds[0]}")
        logger.info("\n%s", text)
        return 0
