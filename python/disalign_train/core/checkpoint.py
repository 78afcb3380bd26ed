"""One checkpoint format for every stage and task: ``torch.save`` of a dict with a format tag."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import runtime
from .errors import UserError

FORMAT = "disalign_train/1"


def settings(args) -> dict:
    """The command line a checkpoint came from (plain values only)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}


def save(path: str | os.PathLike, *, task: str, stage: str, state_dict: dict, config: dict, seed: int, args=None, **extra) -> None:
    """Main rank only. ``stage``: "stage1" or "stage2:<method>"; ``config`` rebuilds the model."""
    if not runtime.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    torch.save({"format": FORMAT, "task": task, "stage": stage, "config": config, "seed": seed,
                "state_dict": state, "args": settings(args) if args is not None else {}, **extra}, path)


def load(path: str | os.PathLike, task: str, stage: str) -> dict:
    """A checkpoint written by `save` for ``task``/``stage``, or a UserError saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise UserError(f"checkpoint {path} cannot be read: {error}") from error
    found = (checkpoint.get("format"), checkpoint.get("task"), checkpoint.get("stage")) if isinstance(checkpoint, dict) else None
    if found != (FORMAT, task, stage):
        raise UserError(f"checkpoint {path} is not a {task} {stage} checkpoint of this version (found {found})")
    return checkpoint
