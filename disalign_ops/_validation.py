"""The one set of input rules (docs/contract.md section 4), shared by every backend and by the fake kernels.

Only metadata is checked here (shapes, dtypes, devices, enums), so the same function runs on real,
meta and fake tensors. Target values are data: each backend checks them where it reads them (the
eager path below, the C++ kernels, the Triton kernels' out-of-range flag).
"""

from __future__ import annotations

import torch

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("none", "mean", "sum")


class InputTypeError(TypeError, ValueError):
    """A wrong type or dtype: a TypeError by Python convention and a ValueError, as docs/contract.md section 4 lists."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, value, allowed_dtypes=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if allowed_dtypes is not None and value.dtype not in allowed_dtypes:
        allowed = ", ".join(str(d) for d in allowed_dtypes)
        raise InputTypeError(f"{name} must have dtype in ({allowed}), got {value.dtype}")
    if allowed_dtypes is None and not value.dtype.is_floating_point:
        raise InputTypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_same_device(logits: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != logits.device:
            raise RuntimeError(
                f"{name} is on {t.device} but logits is on {logits.device}; all tensors must be on one device"
            )


def check_calibrate_args(logits, alpha, beta, confidence=None) -> int:
    """Validates the calibration inputs and returns the number of classes C."""
    _check_tensor("logits", logits, LOGITS_DTYPES)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, C) or (N, C, d1, ...), got {_describe(logits)}")
    num_classes = logits.shape[1]
    if num_classes < 1:
        raise ValueError(f"logits must have at least one class (dim 1), got {_describe(logits)}")
    for name, t in (("alpha", alpha), ("beta", beta)):
        _check_tensor(name, t)
        if tuple(t.shape) != (num_classes,):
            raise ValueError(f"{name} must have shape (C,) = ({num_classes},) to match logits, got {_describe(t)}")
    row_shape = (logits.shape[0],) + tuple(logits.shape[2:])
    if confidence is not None:
        _check_tensor("confidence", confidence)
        if tuple(confidence.shape) != row_shape:
            raise ValueError(
                f"confidence must have shape {row_shape} (logits without the class dim), got {_describe(confidence)}"
            )
    _check_same_device(logits, alpha=alpha, beta=beta, confidence=confidence)
    return num_classes


def check_cross_entropy_args(
    logits, target, alpha, beta, confidence=None, weight=None, ignore_index=-100, reduction="mean"
) -> int:
    """Validates the loss inputs and returns the number of classes C."""
    num_classes = check_calibrate_args(logits, alpha, beta, confidence)
    _check_tensor("target", target, TARGET_DTYPES)
    row_shape = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != row_shape:
        raise ValueError(
            f"target must have shape {row_shape} (logits {tuple(logits.shape)} without the class dim), "
            f"got {_describe(target)}"
        )
    if weight is not None:
        _check_tensor("weight", weight)
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape (C,) = ({num_classes},) to match logits, got {_describe(weight)}")
    _check_same_device(logits, target=target, weight=weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputTypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return num_classes


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Data check of the targets for backends that cannot raise from inside their kernels.

    Reads the target tensor (a device sync on GPU), so only the eager path calls it.
    """
    invalid = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(invalid.any()):
        bad = int(target[invalid][0])
        raise IndexError(
            f"target contains {bad}, which is outside [0, C) = [0, {num_classes}) and is not "
            f"ignore_index={ignore_index}"
        )


def grad_mask(logits, alpha, beta, confidence) -> list[bool]:
    """Which of [logits, alpha, beta, confidence] need gradients in the current autograd mode."""
    if not torch.is_grad_enabled():
        return [False] * 4
    return [t is not None and t.requires_grad for t in (logits, alpha, beta, confidence)]
