"""Long-tail classification: two-stage DisAlign and the paper's baselines, by frequency group.

Stage 1 trains a backbone and a linear or cosine classifier jointly with instance-balanced sampling
(SGD, momentum 0.9, cosine schedule). Stage 2 freezes both, extracts the features once, and fits
every classifier-level method on them: DisAlign (magnitude, margin and confidence trained with the
generalized re-weight loss through the fused op `disalign_cross_entropy`), its Table 5 ablations,
and the baselines of Table 1 (NCM, cRT, tau-normalisation, LWS, post-hoc logit adjustment).

Data: `digits-lt` (default; scikit-learn's bundled digits, no download) or `--data DIR` with
ImageNet-LT-style split files (every listed image is checked before training). Outputs in --out:
metrics.json (core.summary schema), results.md, group_metrics.png, per_class_accuracy.png,
reweight_curves.png, calibration.png, train.log; per seed seed_<s>/ with metrics.json, stage1.pt
and stage2.pt. Runs the same under torchrun (DDP).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..core import checkpoint, runtime
from ..core.args import add_shared_arguments, check_at_least, check_shared
from ..core.errors import UserError
from ..core.groups import frequency_groups
from ..core.loop import Recipe, fit
from ..core.plots import plot_group_metrics
from ..core.sampler import ShardedBatchSampler, reduced_class_counts, shard
from ..core.summary import markdown_table, metrics_payload, summarize, tail_comparison, write_report
from . import report
from .data import LongTailData, build_digits_lt, build_split_file_data
from .methods import METHODS, FrozenFeatures, StageTwo
from .metrics import GROUPS, METRICS, RULE, TAIL_METRIC, group_accuracy, per_class_accuracy, per_class_hits
from .model import BACKBONES, CLASSIFIERS, ImageClassifier, augment, build_backbone, build_classifier, feature_dim

TASK = "classify"
DEFAULT_RHO = {"linear": 1.2, "cosine": 1.5}  # appendix A.2
# The cosine head's logits carry its scale (16): at the linear head's rate its gradients can kill the MLP's ReLU features.
DEFAULT_STAGE1_LR = {"linear": 0.05, "cosine": 0.02}
COLUMNS = [("acc", "All"), ("many_acc", "Many"), ("medium_acc", "Medium"), ("few_acc", "Few")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_shared_arguments(
        parser,
        data_help="'digits-lt' (bundled) or a folder of ImageNet-LT-style split files (*train*.txt, *val*.txt, "
        "*test*.txt with 'relative/path.jpg label' lines)",
        data_default="digits-lt", data_seed_help="digits-lt: seed of the split",
        out="runs/classify", epochs=60, lr=None, batch_size=64, stage2_epochs=30, stage2_lr=0.05, rho=None,
        seeds=[0], methods=list(METHODS),
        lr_help="stage-1 learning rate (None: 0.05 linear, 0.02 cosine)",
        rho_help="generalized re-weight exponent (None: 1.2 linear, 1.5 cosine; appendix A.2)",
    )
    data, stage1, stage2, run = (groups[k] for k in ("data", "stage 1", "stage 2", "run"))
    data.add_argument("--image-root", help="folder the split files' paths are relative to (None: --data)")
    data.add_argument("--train-list", help="training split file (None: the *train*.txt in --data)")
    data.add_argument("--val-list", help="validation split file (None: the *val*.txt in --data, if any)")
    data.add_argument("--test-list", help="test split file (None: *test*.txt in --data, else the val list)")
    data.add_argument("--image-size", type=int, default=64, help="split-file images are resized to this square")
    data.add_argument("--imbalance-ratio", type=float, default=50.0, help="digits-lt: largest / smallest class")
    data.add_argument("--test-per-class", type=int, default=50, help="digits-lt: balanced test images per class")
    data.add_argument("--val-per-class", type=int, default=10, help="digits-lt: balanced validation images per class")
    stage1.add_argument("--model", choices=("auto",) + BACKBONES, default="auto",
                        help="backbone; auto: mlp for digits-lt, small-cnn for split-file images (resnet*: torchvision, "
                        "random init)")
    stage1.add_argument("--width", type=int, default=128, help="feature dimension of mlp / small-cnn")
    stage1.add_argument("--classifier", choices=CLASSIFIERS, default="linear", help="cosine = the paper's '*' heads")
    stage1.add_argument("--cosine-scale", type=float, default=16.0)
    stage1.add_argument("--weight-decay", type=float, default=5e-4)
    stage1.add_argument("--max-shift", type=float, default=0.125,
                        help="augmentation: random translation up to this fraction of the image size (0: off)")
    stage1.add_argument("--stage1-checkpoint", help="skip stage 1 and start stage 2 from this stage1.pt")
    stage2.add_argument("--stage2-batch-size", type=int, default=64)
    stage2.add_argument("--stage2-weight-decay", type=float, default=5e-4)
    stage2.add_argument("--stage2-views", type=int, default=1,
                        help="train features from this many views per image (the first plain, the rest augmented)")
    stage2.add_argument("--logit-adjust-tau", type=float, default=1.0)
    run.add_argument("--workers", type=int, default=0, help="DataLoader workers for split-file images")


def check_args(args) -> None:
    check_shared(args)
    check_at_least(args, stage2_batch_size=1, stage2_views=1, width=4, image_size=1, workers=0)


def load_data(args) -> LongTailData:
    if args.data == "digits-lt":
        return build_digits_lt(args.imbalance_ratio, args.test_per_class, args.val_per_class, args.data_seed)
    return build_split_file_data(args.data, args.image_root, args.train_list, args.val_list, args.test_list, args.image_size)


def model_config(args, data: LongTailData) -> dict:
    backbone = args.model if args.model != "auto" else ("mlp" if data.name == "digits-lt" else "small-cnn")
    return {
        "backbone": backbone,
        "width": args.width,
        "features": feature_dim(backbone, args.width),
        "classifier": args.classifier,
        "cosine_scale": args.cosine_scale,
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
    }


def build_model(config: dict) -> ImageClassifier:
    backbone = build_backbone(config["backbone"], tuple(config["image_shape"]), config["width"])
    classifier = build_classifier(config["classifier"], config["features"], config["num_classes"], config["cosine_scale"])
    return ImageClassifier(backbone, classifier)


class Stage1Objective(nn.Module):
    """Stage-1 loss: plain cross entropy of the whole network."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), labels)


def train_stage1(model: ImageClassifier, data: LongTailData, args, seed: int, device, logger) -> None:
    """Joint training, instance-balanced: SGD momentum 0.9, cosine decay to 0 (appendix A.2)."""
    sampler = ShardedBatchSampler(data.train.labels, args.batch_size, "instance", seed, runtime.rank(), runtime.world_size())
    lr = args.lr if args.lr is not None else DEFAULT_STAGE1_LR[args.classifier]
    recipe = Recipe("sgd", "cosine", lr, args.weight_decay, args.epochs, args.max_steps)
    generator = torch.Generator().manual_seed(seed * 1000 + runtime.rank())

    def load(batches):
        for images, labels in DataLoader(data.train.dataset, batch_sampler=batches, num_workers=args.workers):
            yield augment(images, args.max_shift, data.natural_images, generator).to(device), labels.to(device)

    logger.info("seed %d stage 1: lr %g, global batch %d, %d steps per epoch", seed, lr, args.batch_size, len(sampler))
    fit(Stage1Objective(model), model.parameters(), recipe, sampler, load, logger, f"seed {seed} stage 1")


@torch.no_grad()
def extract_features(model: ImageClassifier, split, args, device, views: int, natural_images: bool, seed: int, gather: bool):
    """Frozen-backbone features of this rank's shard; with ``gather`` every rank gets all of them
    (``views`` copies, the first plain, the rest augmented), in split order."""
    indices = shard(len(split.labels))
    loader = DataLoader(Subset(split.dataset, indices.tolist()), batch_size=256, num_workers=args.workers)
    generator = torch.Generator().manual_seed(seed * 1000 + 500 + runtime.rank())
    per_view = [[] for _ in range(views)]
    for images, _ in runtime.progress(loader, desc="features"):
        for view, chunks in enumerate(per_view):
            batch = images if view == 0 else augment(images, args.max_shift, natural_images, generator)
            chunks.append(model.backbone(batch.to(device)))
    features = torch.stack([torch.cat(chunks) for chunks in per_view])  # (views, shard size, D)
    if not gather:
        return features[0], split.labels[indices].to(device)
    full = features.new_zeros(views, len(split.labels), features.shape[-1])
    full[:, indices.to(device)] = features
    runtime.all_reduce_sum(full)
    return full.flatten(0, 1), split.labels.repeat(views).to(device)


def frozen_features(model: ImageClassifier, data: LongTailData, args, device, seed: int) -> FrozenFeatures:
    common = dict(args=args, device=device, natural_images=data.natural_images, seed=seed)
    train, train_labels = extract_features(model, data.train, views=args.stage2_views, gather=True, **common)
    test, test_labels = extract_features(model, data.test, views=1, gather=False, **common)
    val, val_labels = (None, None)
    if data.val is not None:
        val, val_labels = extract_features(model, data.val, views=1, gather=False, **common)
    return FrozenFeatures(train, train_labels, val, val_labels, test, test_labels)


def stage1_model(args, data: LongTailData, seed: int, out: Path, device, logger) -> tuple[ImageClassifier, dict]:
    """The stage-1 model: loaded from --stage1-checkpoint, or trained and saved as OUT/stage1.pt."""
    if args.stage1_checkpoint:
        saved = checkpoint.load(args.stage1_checkpoint, TASK, "stage1")
        config = saved["config"]
        if config["num_classes"] != data.num_classes or tuple(config["image_shape"]) != data.image_shape:
            raise UserError(
                f"--stage1-checkpoint {args.stage1_checkpoint} is for {config['num_classes']} classes of "
                f"{config['image_shape']} images; the data has {data.num_classes} classes of {list(data.image_shape)}"
            )
        model = build_model(config)
        model.load_state_dict(saved["state_dict"])
        logger.info("stage 1: loaded %s (%s backbone, %s classifier)", args.stage1_checkpoint, config["backbone"], config["classifier"])
        return model.to(device).eval(), config
    config = model_config(args, data)
    model = build_model(config).to(device)
    logger.info("seed %d stage 1: %s backbone, %s classifier, %d epochs", seed, config["backbone"], config["classifier"], args.epochs)
    train_stage1(model, data, args, seed, device, logger)
    checkpoint.save(out / "stage1.pt", task=TASK, stage="stage1", state_dict=model.state_dict(), config=config, seed=seed,
                    args=args, data=data.description)
    return model, config


def stage_two(args, data: LongTailData, model: ImageClassifier, config: dict, class_counts, seed: int, device, logger) -> StageTwo:
    """Freezes the stage-1 model and extracts its features once: what every classifier-level method starts from."""
    for p in model.parameters():
        p.requires_grad_(False)
    return StageTwo(
        classifier=model.classifier,
        new_classifier=lambda: build_classifier(config["classifier"], config["features"], data.num_classes, config["cosine_scale"]),
        features=frozen_features(model, data, args, device, seed),
        class_counts=class_counts,
        num_classes=data.num_classes,
        rho=args.rho if args.rho is not None else DEFAULT_RHO[config["classifier"]],
        recipe=Recipe("sgd", "cosine", args.stage2_lr, args.stage2_weight_decay, args.stage2_epochs, args.max_steps),
        batch_size=args.stage2_batch_size,
        seed=seed,
        logit_adjust_tau=args.logit_adjust_tau,
        backend=args.backend,
        logger=logger,
        paper_recipe=args.paper_recipe,
    )


def run_seed(args, data: LongTailData, groups: dict, seed: int, out: Path, device, logger) -> tuple[dict, dict]:
    """Both stages and every method for one seed: ({method: flat metrics}, this seed's details)."""
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
    runtime.seed_everything(seed)
    class_counts = reduced_class_counts(data.train.labels, data.num_classes)
    model, config = stage1_model(args, data, seed, out, device, logger)
    context = stage_two(args, data, model, config, class_counts, seed, device, logger)
    metrics, details, heads = {}, {}, {}
    for method in (METHODS[key] for key in METHODS if key in args.methods):
        torch.manual_seed(seed)  # each method's initialisation does not depend on which others ran
        fitted = method.fit(context)
        correct, total = per_class_hits(fitted.predict, context.features.test, context.features.test_labels, data.num_classes)
        metrics[method.key] = group_accuracy(correct, total, groups)
        details[method.key] = {"per_class": per_class_accuracy(correct, total), "test_counts": total.long().tolist(), **fitted.info}
        if fitted.head is not None:
            heads[method.key] = fitted.head.state_dict()
        m = metrics[method.key]
        logger.info("seed %d %-34s all %s  many %s  medium %s  few %s", seed, method.title,
                    *(_pct(m[c]) for c, _ in COLUMNS))
    for key, state in heads.items():
        checkpoint.save(out / f"stage2_{key}.pt", task=TASK, stage=f"stage2:{key}", state_dict=state, config=config, seed=seed,
                        args=args, rho=context.rho, class_counts=class_counts.tolist())
    return metrics, {"model": config, "rho": context.rho, "class_counts": class_counts.tolist(), "method_details": details}


def _pct(value) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def method_notes(details: dict) -> str:
    """The hyper-parameters the hand-crafted baselines used, under the table."""
    notes = []
    if "tau_norm" in details:
        tau = details["tau_norm"]
        chosen = "chosen on the validation split" if tau["tau_selected_on"] == "val" else "fixed (no validation split)"
        notes.append(f"tau-normalisation: tau = {tau['tau']:g}, {chosen}.")
    if "logit_adjust" in details:
        notes.append(f"Logit adjustment: z - tau * log(prior) with tau = {details['logit_adjust']['tau']:g}.")
    return "\n".join(notes)


def write_outputs(out: Path, args, data: LongTailData, groups, rule, per_seed: dict, details: dict) -> str:
    keys = [k for k in METHODS if k in args.methods]
    titles = {k: METHODS[k].title for k in keys}
    methods = summarize(per_seed, METRICS, titles)
    names = [str(c) for c in range(data.num_classes)]
    rule_text = RULE.describe(rule)
    first = details[args.seeds[0]]
    for seed, seed_metrics in per_seed.items():
        payload = metrics_payload(TASK, groups, names, rule, rule_text, [seed], summarize({seed: seed_metrics}, METRICS, titles),
                                  data=data.description, **details[seed])
        runtime.write_json(out / f"seed_{seed}" / "metrics.json", payload)
    runtime.write_json(out / "metrics.json", metrics_payload(TASK, groups, names, rule, rule_text, args.seeds, methods,
                                                             data=data.description, model=first["model"], rho=first["rho"],
                                                             class_counts=first["class_counts"]))
    align = {k: METHODS[k].align for k in keys}
    table = markdown_table(methods, COLUMNS, "joint" if "joint" in methods else None, extra={"Align type": align})
    seeds = ", ".join(map(str, args.seeds))
    intro = (f"{data.description}\n\nClassifier: {first['model']['classifier']}, backbone: {first['model']['backbone']}, "
             f"rho = {first['rho']:g}. Groups: {rule_text}. Class-balanced top-1 in percent, mean ± std over seeds {seeds}; "
             "in brackets the change from the stage-1 baseline (Joint).")
    comparison = tail_comparison(methods, "acc", TAIL_METRIC, "joint")
    text = write_report(out, f"Long-tail classification, seeds {seeds}", intro, table, comparison,
                        method_notes(first["method_details"]))
    if runtime.is_main():
        plot_group_metrics(out / "group_metrics.png", methods, "acc", list(GROUPS), "class-balanced top-1", "Accuracy by group")
        counts = first["class_counts"]
        report.plot_reweight_curves(out / "reweight_curves.png", counts)
        shown = {METHODS[k].title: first["method_details"][k]["per_class"] for k in keys if k in ("joint", "disalign")}
        if shown:
            report.plot_per_class_accuracy(out / "per_class_accuracy.png", counts, shown)
        last = out / f"seed_{args.seeds[0]}" / "stage2_disalign.pt"
        if last.exists():
            head = checkpoint.load(last, TASK, "stage2:disalign")["state_dict"]
            report.plot_calibration(out / "calibration.png", counts, head["magnitude"].tolist(), head["margin"].tolist())
    return text


def run(args: argparse.Namespace) -> int:
    check_args(args)
    with runtime.session(args, "disalign_train.classify") as (device, out, logger):
        data = load_data(args)
        logger.info("%s", data.description)
        groups, rule = frequency_groups(reduced_class_counts(data.train.labels, data.num_classes).numpy(), RULE, args.group_rule)
        logger.info("groups (%s): %s", RULE.describe(rule), groups)
        per_seed, details = {}, {}
        for seed in args.seeds:
            per_seed[seed], details[seed] = run_seed(args, data, groups, seed, out / f"seed_{seed}", device, logger)
        text = write_outputs(out, args, data, groups, rule, per_seed, details)
        logger.info("\n%s", text)
        logger.info("outputs in %s", out)
    return 0
