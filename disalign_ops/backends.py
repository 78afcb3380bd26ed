"""Backend registry and the automatic choice.

"eager"  : disalign_ops.reference, plain PyTorch autograd (always available).
"native" : torch.ops.disalign, the compiled C++ extension (CPU kernels; CUDA kernels when built with CUDA).
"triton" : torch.ops.disalign_triton, the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

backend=None picks, in order: the DISALIGN_BACKEND environment variable, then "native" where it
has a kernel for the device, then "triton", then "eager".
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("eager", "native", "triton")


@functools.lru_cache(maxsize=None)
def _native_has_kernel(device_type: str) -> bool:
    from . import _C  # noqa: F401  (loads the extension, registering torch.ops.disalign)

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("disalign::cross_entropy", key)


def _triton_available(device_type: str) -> bool:
    from . import triton_backend

    return triton_backend.is_available(device_type)


def available_backends(device="cpu") -> list[str]:
    """The backends that can run on `device` (a torch.device, or a string such as "cpu", "cuda:0")."""
    device_type = torch.device(device).type
    names = ["eager"]
    if _native_has_kernel(device_type):
        names.append("native")
    if _triton_available(device_type):
        names.append("triton")
    return names


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on `device`: the requested one (validated) or the automatic choice.

    torch.compile evaluates it once while tracing and keeps the answer as a constant (its inputs
    are constants of the graph; the dispatcher query inside it cannot be traced).
    """
    requested = backend if backend is not None else os.environ.get("DISALIGN_BACKEND") or None
    available = available_backends(device)
    if requested is None:
        for name in ("native", "triton", "eager"):
            if name in available:
                return name
    if requested not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {requested!r}")
    if requested not in available:
        source = "backend" if backend is not None else "DISALIGN_BACKEND"
        raise RuntimeError(
            f"{source}={requested!r} is not available for device {device}; available: {available}"
        )
    return requested
