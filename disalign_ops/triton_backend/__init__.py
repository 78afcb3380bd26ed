"""The Triton backend: `torch.ops.disalign_triton`, fused Triton kernels of the DisAlign loss.

Importing this package registers the four operators (with the shared autograd of
`disalign_ops._registration`) once, when Triton can be imported; without Triton it registers
nothing and `is_available` is False. CUDA tensors run compiled kernels; CPU tensors run under the
Triton interpreter, which needs TRITON_INTERPRET=1 in the environment before this package is first
imported (Triton reads it when the kernels are defined; with it set, CUDA tensors are interpreted
too, slowly).
"""

import os

import torch

try:
    import triton  # noqa: F401
except ImportError:
    ops = None
else:
    from . import ops


def is_available(device_type: str) -> bool:
    """Whether the Triton ops can run on tensors of `device_type` ("cuda" or "cpu")."""
    if ops is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and ops.INTERPRETED
    return False
