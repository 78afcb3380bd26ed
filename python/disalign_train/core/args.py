"""The flag vocabulary every trainer shares, defined once (torch-free: `disalign-train --help` is fast).

A task calls `add_shared_arguments(parser, **its defaults)`, adds its own flags to the returned
groups, and calls `check_shared(args)` before any work.
"""

from __future__ import annotations

import argparse

from .errors import UserError

BACKENDS = ("eager", "native", "triton")
GROUP_RULES = ("auto", "paper", "terciles")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, module docstrings kept as written."""


def add_shared_arguments(
    parser: argparse.ArgumentParser,
    *,
    data_help: str,
    data_default,
    data_seed_help: str,
    out: str,
    epochs: int,
    lr: float | None,
    batch_size: int,
    stage2_epochs: int,
    stage2_lr: float,
    rho: float | None,
    seeds: list[int],
    methods: list[str],
    lr_help: str = "stage-1 learning rate",
    rho_help: str = "generalized re-weight exponent of the stage-2 loss",
    threads: int = 1,
) -> dict[str, argparse._ArgumentGroup]:
    """The shared flags, in four groups (data, stage 1, stage 2, run); returns the groups by name."""
    groups = {name: parser.add_argument_group(name) for name in ("data", "stage 1", "stage 2", "run")}
    data, stage1, stage2, run = groups.values()
    data.add_argument("--data", default=data_default, help=data_help)
    data.add_argument("--data-seed", type=int, default=0, help=data_seed_help)

    stage1.add_argument("--epochs", type=int, default=epochs, help="stage-1 epochs")
    stage1.add_argument("--lr", type=float, default=lr, help=lr_help)
    stage1.add_argument("--batch-size", type=int, default=batch_size, help="stage-1 global batch, split over processes")

    stage2.add_argument("--stage2-epochs", type=int, default=stage2_epochs, help="stage-2 epochs (each learnable method)")
    stage2.add_argument("--stage2-lr", type=float, default=stage2_lr, help="stage-2 learning rate")
    stage2.add_argument("--rho", type=float, default=rho, help=rho_help)
    stage2.add_argument("--methods", nargs="+", choices=methods, default=list(methods), metavar="METHOD",
                        help=f"methods to fit and report: {', '.join(methods)}")
    stage2.add_argument("--group-rule", choices=GROUP_RULES, default="auto",
                        help="frequency groups: the paper's thresholds, terciles of the ranked training counts, "
                        "or auto (paper where every group is filled, else terciles)")
    stage2.add_argument("--paper-recipe", action="store_true",
                        help="the authors' released head and loss variants instead of the defaults (README: deviations)")

    run.add_argument("--out", default=out, help="output folder")
    run.add_argument("--seeds", type=int, nargs="+", default=seeds, help="training seeds: one run each, mean and std over them")
    run.add_argument("--threads", type=int, default=threads,
                     help="CPU threads per process (measured: more threads are slower for these small models on a "
                     "shared machine; use torchrun processes for more cores)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    run.add_argument("--backend", choices=BACKENDS, default=None,
                     help="disalign_ops backend (default: automatic; triton on the CPU needs TRITON_INTERPRET=1)")
    run.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps per stage (quick runs, tests)")
    run.add_argument("--debug", action="store_true", help="full tracebacks for errors in the command line or the data")
    return groups


def check_shared(args) -> None:
    """Values argparse cannot check, named by their flag."""
    for flag, least in (("epochs", 0), ("stage2_epochs", 0), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, flag)
        if value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    for flag in ("lr", "stage2_lr", "rho"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must be distinct, got {args.seeds}")
    if not args.methods:
        raise UserError("--methods needs at least one method")


def check_at_least(args, **least: int) -> None:
    """Task flags with a lower bound: ``check_at_least(args, width=4)``."""
    for name, bound in least.items():
        value = getattr(args, name)
        if value is not None and value < bound:
            raise UserError(f"--{name.replace('_', '-')} must be >= {bound}, got {value}")


def add_scene_arguments(data: argparse._ArgumentGroup, image_size_help: str) -> None:
    """The size flags of the embedded scenes-lt set (segment and detect)."""
    data.add_argument("--image-size", type=int, default=64, help=image_size_help)
    data.add_argument("--num-train", type=int, default=600, help="scenes-lt training images")
    data.add_argument("--num-test", type=int, default=200, help="scenes-lt test images (balanced things)")
