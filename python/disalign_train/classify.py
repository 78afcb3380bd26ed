"""Long-tail classification: two-stage DisAlign and the paper's baselines, by frequency group.

Stage 1 trains a backbone and a linear or cosine classifier jointly with instance-balanced sampling
(SGD, momentum 0.9, cosine schedule). Stage 2 freezes both, extracts the features once, and fits
every classifier-level method on them: DisAlign (magnitude, margin and confidence trained with the
generalized re-weight loss through the fused op `disalign_cross_entropy`), its Table 5 ablations,
and the baselines of Table 1 (NCM, cRT, tau-normalisation, LWS, post-hoc logit adjustment).

Data: `digits-lt` (default; scikit-learn's bundled digits, no download) or `--data DIR` with
ImageNet-LT-style split files. Outputs in --out: metrics.json, results.md, per_class_accuracy.png,
reweight_curves.png, calibration.png, stage1.pt, stage2.pt, train.log; with several --seeds one
folder per seed plus summary.md and summary.json. Runs the same under torchrun (DDP).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from . import runtime
from .classification import report
from .classification.data import (
    LongTailData,
    ShardedBatchSampler,
    build_digits_lt,
    build_split_file_data,
    reduced_class_counts,
    shard,
)
from .classification.methods import METHODS, FrozenFeatures, HeadTraining, StageTwo, sgd
from .classification.metrics import (
    GROUP_RULES,
    describe_rule,
    frequency_groups,
    group_accuracy,
    per_class_accuracy,
    per_class_hits,
)
from .classification.models import BACKBONES, CLASSIFIERS, ImageClassifier, augment, build_backbone, build_classifier

DEFAULT_RHO = {"linear": 1.2, "cosine": 1.5}  # appendix A.2
# The cosine head's logits carry its scale (16): at the linear head's rate its gradients can kill the MLP's ReLU features.
DEFAULT_STAGE1_LR = {"linear": 0.05, "cosine": 0.02}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="digits-lt",
                      help="'digits-lt' (bundled, default) or a folder of ImageNet-LT-style split files "
                      "(*train*.txt, *val*.txt, *test*.txt with 'relative/path.jpg label' lines)")
    data.add_argument("--image-root", help="folder the split files' paths are relative to (default: --data)")
    data.add_argument("--train-list", help="training split file (default: the *train*.txt in --data)")
    data.add_argument("--val-list", help="validation split file (default: the *val*.txt in --data, if any)")
    data.add_argument("--test-list", help="test split file (default: *test*.txt in --data, else the val list)")
    data.add_argument("--image-size", type=int, default=64, help="split-file images are resized to this square")
    data.add_argument("--imbalance-ratio", type=float, default=50.0, help="digits-lt: largest / smallest class")
    data.add_argument("--data-seed", type=int, default=0, help="digits-lt: seed of the split")
    data.add_argument("--test-per-class", type=int, default=50, help="digits-lt: balanced test images per class")
    data.add_argument("--val-per-class", type=int, default=10, help="digits-lt: balanced validation images per class")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=("auto",) + BACKBONES, default="auto",
                       help="auto: mlp for digits-lt, cnn for split-file images")
    model.add_argument("--width", type=int, default=128, help="feature dimension of the backbone")
    model.add_argument("--classifier", choices=CLASSIFIERS, default="linear", help="cosine = the paper's '*' heads")
    model.add_argument("--cosine-scale", type=float, default=16.0)

    stage1 = parser.add_argument_group("stage 1 (joint, instance-balanced)")
    stage1.add_argument("--epochs", type=int, default=60)
    stage1.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes")
    stage1.add_argument("--lr", type=float, help="initial learning rate (default 0.05 linear, 0.02 cosine)")
    stage1.add_argument("--weight-decay", type=float, default=5e-4)
    stage1.add_argument("--max-shift", type=float, default=0.125,
                        help="augmentation: random translation up to this fraction of the image size (0: off)")
    stage1.add_argument("--stage1-checkpoint", help="skip stage 1 and start stage 2 from this stage1.pt")

    stage2 = parser.add_argument_group("stage 2 (frozen features; DisAlign and baselines)")
    stage2.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help=f"methods to fit and report (default: all): {', '.join(METHODS)}")
    stage2.add_argument("--stage2-epochs", type=int, default=30)
    stage2.add_argument("--stage2-batch-size", type=int, default=64)
    stage2.add_argument("--stage2-lr", type=float, default=0.05)
    stage2.add_argument("--stage2-weight-decay", type=float, default=5e-4)
    stage2.add_argument("--stage2-views", type=int, default=1,
                        help="train features from this many views per image (the first plain, the rest augmented)")
    stage2.add_argument("--rho", type=float, help="generalized re-weight scale (default 1.2 linear, 1.5 cosine)")
    stage2.add_argument("--logit-adjust-tau", type=float, default=1.0)
    stage2.add_argument("--group-rule", choices=GROUP_RULES, default="auto",
                        help="Many/Medium/Few: paper thresholds (>100, 20-100, <20 training images), terciles of the "
                        "ranked counts, or auto (paper when each group has at least 5 classes)")

    run_args = parser.add_argument_group("run")
    run_args.add_argument("--out", default="runs/classify", help="output folder")
    run_args.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (several: summary over seeds)")
    run_args.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    run_args.add_argument("--backend", choices=("eager", "native", "triton"), help="disalign_ops backend (default: automatic)")
    run_args.add_argument("--workers", type=int, default=0, help="DataLoader workers for split-file images")


def check_args(args) -> None:
    """Values argparse cannot check, named by their flag."""
    for flag, value, least in (
        ("--epochs", args.epochs, 0),
        ("--stage2-epochs", args.stage2_epochs, 0),
        ("--batch-size", args.batch_size, 1),
        ("--stage2-batch-size", args.stage2_batch_size, 1),
        ("--stage2-views", args.stage2_views, 1),
        ("--width", args.width, 4),
        ("--image-size", args.image_size, 1),
    ):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {args.seeds}")


def load_data(args) -> LongTailData:
    if args.data == "digits-lt":
        return build_digits_lt(args.imbalance_ratio, args.test_per_class, args.val_per_class, args.data_seed)
    return build_split_file_data(args.data, args.image_root, args.train_list, args.val_list, args.test_list, args.image_size)


def model_config(args, data: LongTailData) -> dict:
    backbone = args.backbone if args.backbone != "auto" else ("mlp" if data.name == "digits-lt" else "cnn")
    return {
        "backbone": backbone,
        "width": args.width,
        "classifier": args.classifier,
        "cosine_scale": args.cosine_scale,
        "image_shape": list(data.image_shape),
        "num_classes": data.num_classes,
    }


def build_model(config: dict) -> ImageClassifier:
    backbone = build_backbone(config["backbone"], tuple(config["image_shape"]), config["width"])
    classifier = build_classifier(config["classifier"], config["width"], config["num_classes"], config["cosine_scale"])
    return ImageClassifier(backbone, classifier)


def train_stage1(model: ImageClassifier, data: LongTailData, args, seed: int, device, logger) -> None:
    """Joint training, instance-balanced: SGD momentum 0.9, cosine decay to 0 (appendix A.2)."""
    network = model
    if runtime.world_size() > 1:
        network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    sampler = ShardedBatchSampler(data.train.labels, args.batch_size, "instance", seed, runtime.rank(), runtime.world_size())
    loader = DataLoader(data.train.dataset, batch_sampler=sampler, num_workers=args.workers)
    lr = args.lr if args.lr is not None else DEFAULT_STAGE1_LR[args.classifier]
    optimizer = sgd(model.parameters(), lr, args.weight_decay)
    logger.info("stage 1: lr %g, global batch %d, %d steps per epoch", lr, args.batch_size, len(sampler))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, args.epochs * len(sampler)))
    augment_rng = torch.Generator().manual_seed(seed * 1000 + runtime.rank())
    log_every = max(1, args.epochs // 5)
    model.train()
    for epoch in runtime.progress(range(args.epochs), desc="stage 1"):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, images: no sync per step
        for images, labels in loader:
            images = augment(images, args.max_shift, data.natural_images, augment_rng).to(device)
            loss = F.cross_entropy(network(images), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += torch.stack([loss.detach().double() * len(labels), total.new_tensor(len(labels))])
        if (epoch + 1) % log_every == 0 or epoch + 1 == args.epochs:
            runtime.all_reduce_sum(total)
            logger.info("stage 1 epoch %d/%d: loss %.4f", epoch + 1, args.epochs, total[0] / total[1])
    model.eval()


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
        checkpoint = torch.load(args.stage1_checkpoint, map_location="cpu", weights_only=True)
        config = checkpoint["config"]
        if config["num_classes"] != data.num_classes or tuple(config["image_shape"]) != data.image_shape:
            raise ValueError(
                f"--stage1-checkpoint {args.stage1_checkpoint} is for {config['num_classes']} classes of "
                f"{config['image_shape']} images; the data has {data.num_classes} classes of {list(data.image_shape)}"
            )
        model = build_model(config)
        model.load_state_dict(checkpoint["model"])
        logger.info("stage 1: loaded %s (%s backbone, %s classifier)", args.stage1_checkpoint, config["backbone"], config["classifier"])
        return model.to(device).eval(), config
    config = model_config(args, data)
    model = build_model(config).to(device)
    logger.info("stage 1: %s backbone, %s classifier, %d epochs", config["backbone"], config["classifier"], args.epochs)
    train_stage1(model, data, args, seed, device, logger)
    if runtime.is_main():
        torch.save({"model": model.state_dict(), "config": config, "seed": seed, "data": data.description}, out / "stage1.pt")
    return model, config


def stage_two(args, data: LongTailData, model: ImageClassifier, config: dict, class_counts, seed: int, device) -> StageTwo:
    """Freezes the stage-1 model and extracts its features once: what every classifier-level method starts from."""
    for p in model.parameters():
        p.requires_grad_(False)
    return StageTwo(
        classifier=model.classifier,
        new_classifier=lambda: build_classifier(config["classifier"], config["width"], data.num_classes, config["cosine_scale"]),
        features=frozen_features(model, data, args, device, seed),
        class_counts=class_counts,
        num_classes=data.num_classes,
        rho=args.rho if args.rho is not None else DEFAULT_RHO[config["classifier"]],
        training=HeadTraining(args.stage2_epochs, args.stage2_batch_size, args.stage2_lr, args.stage2_weight_decay, seed),
        logit_adjust_tau=args.logit_adjust_tau,
        backend=args.backend,
    )


def run_seed(args, data: LongTailData, seed: int, out: Path, device, logger) -> dict:
    """Both stages and every method for one seed; writes this seed's outputs and returns its metrics.json payload."""
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
    runtime.seed_everything(seed)
    class_counts = reduced_class_counts(data.train.labels, data.num_classes)
    groups, rule = frequency_groups(class_counts, args.group_rule)
    model, config = stage1_model(args, data, seed, out, device, logger)
    context = stage_two(args, data, model, config, class_counts, seed, device)
    methods = [METHODS[key] for key in METHODS if key in args.methods]
    results, heads, test_counts = {}, {}, None
    for method in methods:
        torch.manual_seed(seed)  # each method's initialisation does not depend on which others ran
        fitted = method.fit(context)
        correct, total = per_class_hits(fitted.predict, context.features.test, context.features.test_labels, data.num_classes)
        test_counts = total.long().tolist()
        results[method.key] = {
            "title": method.title,
            **group_accuracy(correct, total, groups),
            "per_class": per_class_accuracy(correct, total),
            **fitted.info,
        }
        if fitted.head is not None:
            heads[method.key] = {k: v.cpu() for k, v in fitted.head.state_dict().items()}
        r = results[method.key]
        logger.info("%-34s all %s  many %s  medium %s  few %s", method.title, *(_pct(r[c]) for c in ("all", "many", "medium", "few")))

    payload = {
        "data": data.description,
        "seed": seed,
        "model": config,
        "rho": context.rho,
        "class_counts": class_counts.tolist(),
        "test_counts": test_counts,
        "group_rule": rule,
        "group_rule_description": describe_rule(rule),
        "groups": {name: [c for c, g in enumerate(groups) if g == name] for name in ("many", "medium", "few")},
        "methods": results,
    }
    if runtime.is_main():
        write_outputs(out, payload, methods, heads)
    return payload


def _pct(value) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def write_outputs(out: Path, payload: dict, methods, heads: dict) -> None:
    runtime.write_json(out / "metrics.json", payload)
    torch.save({"heads": heads, "rho": payload["rho"], "class_counts": payload["class_counts"], "model": payload["model"]}, out / "stage2.pt")
    table = report.results_table(payload["methods"], methods)
    header = (
        f"# Long-tail classification, seed {payload['seed']}\n\n{payload['data']}\n\n"
        f"Classifier: {payload['model']['classifier']}, backbone: {payload['model']['backbone']}, rho = {payload['rho']:g}. "
        f"Groups: {payload['group_rule_description']}. Accuracies are class-balanced top-1 in percent.\n\n"
    )
    (out / "results.md").write_text(header + table + "\n" + method_notes(payload["methods"]))
    counts = payload["class_counts"]
    report.plot_reweight_curves(out / "reweight_curves.png", counts)
    shown = {m.title: payload["methods"][m.key]["per_class"] for m in methods if m.key in ("joint", "disalign")}
    if shown:
        report.plot_per_class_accuracy(out / "per_class_accuracy.png", counts, shown)
    if "disalign" in heads:
        head = heads["disalign"]
        report.plot_calibration(out / "calibration.png", counts, head["magnitude"].tolist(), head["margin"].tolist())


def method_notes(results: dict) -> str:
    """The hyper-parameters the hand-crafted baselines used, under the table."""
    notes = []
    if "tau_norm" in results:
        tau = results["tau_norm"]
        chosen = "chosen on the validation split" if tau["tau_selected_on"] == "val" else "fixed (no validation split)"
        notes.append(f"tau-normalisation: tau = {tau['tau']:g}, {chosen}.")
    if "logit_adjust" in results:
        notes.append(f"Logit adjustment: z - tau * log(prior) with tau = {results['logit_adjust']['tau']:g}.")
    return "".join(f"\n{note}\n" for note in notes)


def write_summary(out: Path, per_seed: dict[int, dict], methods) -> str:
    table = report.seeds_table({s: p["methods"] for s, p in per_seed.items()}, methods)
    text = f"# Long-tail classification over seeds {', '.join(map(str, per_seed))}\n\n{next(iter(per_seed.values()))['data']}\n\n"
    text += "Mean ± standard deviation over seeds of class-balanced top-1 (%).\n\n" + table + "\n"
    if all(key in per_seed[next(iter(per_seed))]["methods"] for key in ("joint", "disalign")):
        comparison, every_seed = report.seed_comparison({s: p["methods"] for s, p in per_seed.items()})
        text += f"\nDisAlign vs Joint per seed:\n\n{comparison}\n\nDisAlign beats Joint on all and few for every seed: {'yes' if every_seed else 'no'}\n"
    (out / "summary.md").write_text(text)
    runtime.write_json(out / "summary.json", {str(s): p["methods"] for s, p in per_seed.items()})
    return text


def run(args: argparse.Namespace) -> int:
    check_args(args)
    device = runtime.pick_device(args.device)
    runtime.share_cpu_threads(device)
    runtime.init_distributed(device)
    try:
        out, logger = runtime.prepare_output(args.out, "disalign_train.classify")
        data = load_data(args)
        logger.info("%s", data.description)
        per_seed = {}
        for seed in args.seeds:
            seed_out = out if len(args.seeds) == 1 else out / f"seed_{seed}"
            per_seed[seed] = run_seed(args, data, seed, seed_out, device, logger)
        methods = [METHODS[key] for key in METHODS if key in args.methods]
        if runtime.is_main():
            if len(args.seeds) == 1:
                logger.info("\n%s", (out / "results.md").read_text())
            else:
                logger.info("\n%s", write_summary(out, per_seed, methods))
            logger.info("outputs in %s", out)
    finally:
        runtime.shutdown_distributed()
    return 0
