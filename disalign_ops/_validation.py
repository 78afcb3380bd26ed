"""The one set of input rules (docs/contract.md section 4), shared by every backend and by the fake kernels.

Only metadata is checked here (shapes, dtypes, devices, enums, grad_mask, the incoming gradient of
the backward ops), so the same function runs on real, meta and fake tensors. Target values are
data: check_target_values reads them for the eager path and, with DISALIGN_CHECK_TARGETS=1, for
every backend before the launch; otherwise the kernels handle them (CPU: IndexError; CUDA: NaN
rows).
"""

from __future__ import annotations

import operator

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
    if not isinstance(ignore_index, torch.SymInt):  # a traced int is checked where it was a concrete one
        as_int_index(ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return num_classes


INT64_RANGE = (-(2**63), 2**63 - 1)


def as_int_index(ignore_index) -> int:
    """ignore_index as a Python int: an int or an integer-like (numpy integer, 0-d integer tensor),
    as F.cross_entropy accepts; it must fit in int64, the type every kernel compares targets in."""
    if isinstance(ignore_index, (bool, float)) or (
        isinstance(ignore_index, torch.Tensor) and (ignore_index.dim() != 0 or ignore_index.dtype == torch.bool)
    ):
        raise InputTypeError(f"ignore_index must be an int, got {ignore_index!r}")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise InputTypeError(f"ignore_index must be an int, got {ignore_index!r}") from None
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64 [-2**63, 2**63 - 1], got {value}")
    return value


def check_gradient_arg(name: str, grad, logits, shape) -> None:
    """The incoming gradient of a backward op: a floating-point tensor of `shape` on the logits' device."""
    _check_tensor(name, grad)
    _check_same_device(logits, **{name: grad})
    if tuple(grad.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {_describe(grad)}")


def check_grad_mask(grad_mask) -> list[bool]:
    """grad_mask of the ops: four bools, [logits, alpha, beta, confidence]."""
    entries = list(grad_mask) if isinstance(grad_mask, (list, tuple)) else None
    if entries is None or len(entries) != 4:
        raise ValueError(f"grad_mask must be a list of 4 bools [logits, alpha, beta, confidence], got {grad_mask!r}")
    if not all(isinstance(m, bool) for m in entries):
        raise InputTypeError(f"grad_mask entries must be bools [logits, alpha, beta, confidence], got {grad_mask!r}")
    return entries


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Data check of the targets for backends that cannot raise from inside their kernels.

    Reads the target tensor (a device sync on GPU): the eager path calls it always, the front end
    (api.py) for every backend with DISALIGN_CHECK_TARGETS=1, and backends that read targets on the CPU.
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
