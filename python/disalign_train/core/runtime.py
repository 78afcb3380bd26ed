"""Devices, threads, the disalign_ops backend, seeding, torchrun/DDP, progress bars, output folder, log, JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .errors import UserError


def pick_device(name: str | None) -> torch.device:
    """--device: "cpu", "cuda", "cuda:1"; default cuda when available. Under torchrun each rank takes its local GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int, device: torch.device) -> None:
    """--threads intra-op threads per process on the CPU (under torchrun never more than the process's
    share of the cores: no oversubscription)."""
    if device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, (os.cpu_count() or 1) // local_processes)
    torch.set_num_threads(max(1, min(threads, share)))


def resolve_backend(name: str | None, device: torch.device) -> str:
    """--backend checked before any training: the backend stage 2 will use, or a UserError saying why not."""
    from disalign_ops.backends import available_backends, resolve_backend as resolve

    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            "--backend triton on the CPU runs only under Triton's interpreter: start the command with "
            "TRITON_INTERPRET=1 (e.g. TRITON_INTERPRET=1 disalign-train ...), or use --backend native"
        )
    try:
        return resolve(name, device)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"--backend {name}: {error} (available on {device}: {available_backends(device)})") from error


def init_distributed(device: torch.device) -> bool:
    """Joins the process group when started by torchrun (gloo on CPU, nccl on GPU). Returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (a no-op on one process), e.g. after the main rank wrote shared files."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op on one process); returns the reduced tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def progress(iterable=None, **kwargs):  # noqa: D401
    """tqdm bar on the main rank when stderr is a terminal; silent otherwise (logs, CI, other ranks)."""
    kwargs.setdefault("disable", not (is_main() and sys.stderr.isatty()))
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def prepare_output(out_dir: str | os.PathLike, name: str = "disalign_train") -> tuple[Path, logging.Logger]:
    """Creates --out and returns it with a logger writing to OUT/train.log and stdout (main rank only)."""
    out = Path(out_dir)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.FileHandler(out / "train.log"), logging.StreamHandler(sys.stdout)):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return out, logger


def write_json(path: str | os.PathLike, payload) -> None:
    if is_main():
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def session(args, name: str):
    """What every trainer does before and after its work: device, --threads, --backend checked (before
    any training), torchrun's process group, --out with its log. Yields (device, out, logger)."""
    device = pick_device(args.device)
    set_threads(args.threads, device)
    resolved = resolve_backend(args.backend, device)
    # An explicit --backend (or DISALIGN_BACKEND) is passed on resolved; without one the ops choose per
    # call (on CUDA from the measured timings, disalign_ops.backends.measured_backend).
    args.backend = resolved if args.backend is not None else None
    init_distributed(device)
    try:
        out, logger = prepare_output(args.out, name)
        yield device, out, logger
    finally:
        shutdown_distributed()
