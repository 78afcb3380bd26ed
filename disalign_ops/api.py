"""Public functional API (docs/contract.md section 3): one entry point per operation, any backend."""

from __future__ import annotations

import os

import torch

from . import reference
from ._registration import OpFamily
from ._validation import as_int_index, check_calibrate_args, check_cross_entropy_args, check_target_values, grad_mask
from .backends import has_native_ops, measured_case, resolve_backend


def _reject_positional(function: str, positional: tuple[str, ...], extra: tuple, keywords: str) -> None:
    """Arguments after ``beta`` are keyword-only. A plain ``*`` would do, but its TypeError does not say
    which keyword was meant, and ``F.cross_entropy`` users pass class weights positionally by habit."""
    if extra:
        raise TypeError(
            f"{function}() takes {len(positional)} positional arguments ({', '.join(positional)}) but "
            f"{len(positional) + len(extra)} were given; arguments after beta are keyword-only: pass {keywords}"
        )


def _check_targets_requested() -> bool:
    """DISALIGN_CHECK_TARGETS=1: check target values before every op launch (one host sync on GPU),
    so a bad target raises IndexError as on the CPU instead of giving NaN rows. Read per call."""
    return os.environ.get("DISALIGN_CHECK_TARGETS") == "1"


# OpFamily by backend name, looked up once: the attribute lookups on torch.ops cost ~50 us per call
# when a step runs with cold caches (after the kernel has streamed the logits).
_OP_FAMILIES: dict[str, OpFamily] = {}


def op_family(backend: str) -> OpFamily:
    """The four operators of an op-based backend ("native" or "triton")."""
    family = _OP_FAMILIES.get(backend)
    if family is None:
        namespace = {"native": torch.ops.disalign, "triton": torch.ops.disalign_triton}[backend]
        family = _OP_FAMILIES[backend] = OpFamily(
            namespace.cross_entropy, namespace.cross_entropy_backward, namespace.calibrate, namespace.calibrate_backward
        )
    return family


def disalign_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *positional: object,
    confidence: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Class-weighted cross entropy of the DisAlign-calibrated logits, fused (docs/contract.md section 2).

    Equals ``F.cross_entropy((1 + s*alpha)*z + s*beta, target, weight=weight, ...)`` without
    materialising the calibrated logits. ``logits`` is (N, C) or (N, C, d1, ...); ``target`` and
    ``confidence`` are (N,) or (N, d1, ...); ``alpha``, ``beta``, ``weight`` are (C,). The loss is
    float32 (float64 for float64 logits); gradients come back in each input's dtype.

    Args:
        logits: (N, C) or (N, C, d1, ...), float16/bfloat16/float32/float64, any strides.
        target: (N,) or (N, d1, ...), int64 or int32; values in [0, C) or ``ignore_index``.
        alpha, beta: (C,) magnitude and margin of eq. 6 (``alpha = a' - 1`` for the eq. 5 form).
        confidence: keyword-only; per-row s in [0, 1], the shape of ``target``; None means s = 1.
        weight: keyword-only; (C,) class weights (not differentiable, as in ``F.cross_entropy``).
        ignore_index, reduction: keyword-only; as in ``F.cross_entropy`` (ignore_index: an int or an
            integer-like such as a numpy integer or a 0-d integer tensor, within int64).
        backend: keyword-only; None (automatic, ``DISALIGN_BACKEND`` overrides), "eager", "native", "triton".

    Returns:
        The loss: a scalar for "mean"/"sum", the shape of ``target`` for "none".

    Raises:
        IndexError: a target outside [0, C) that is not ``ignore_index``, on the CPU (every backend),
            with the eager backend, and on any device when ``DISALIGN_CHECK_TARGETS=1`` (checked here
            before the launch, one host sync; not while torch.compile traces). Otherwise the CUDA
            kernels give such a row a NaN loss and NaN gradients.
        RuntimeError: ``weight.requires_grad`` (not differentiable), or a backward with
            ``create_graph=True`` on the native/Triton backends (first derivatives only).
    """
    _reject_positional("disalign_cross_entropy", ("logits", "target", "alpha", "beta"), positional, "confidence= or weight=")
    if not isinstance(ignore_index, torch.SymInt):
        ignore_index = as_int_index(ignore_index)
    num_classes = check_cross_entropy_args(logits, target, alpha, beta, confidence, weight, ignore_index, reduction)
    name = resolve_backend(backend, logits.device, measured_case(logits) if backend is None else None)
    if (name == "eager" or _check_targets_requested()) and not torch.compiler.is_compiling():
        check_target_values(target, num_classes, ignore_index)
    if name == "eager":
        return reference.cross_entropy(logits, target, alpha, beta, confidence, weight, ignore_index, reduction)
    mask = grad_mask(logits, alpha, beta, confidence) if reduction != "none" else [False] * 4
    ops = op_family(name)
    return ops.cross_entropy(logits, target, alpha, beta, confidence, weight, ignore_index, reduction, mask)[0]


def calibrate(
    logits: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *positional: object,
    confidence: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Calibrated logits ``(1 + s*alpha)*z + s*beta`` (paper eq. 6) in the logits' dtype, with autograd.

    Args:
        logits, alpha, beta: as in :func:`disalign_cross_entropy`.
        confidence: keyword-only; per-row s, the shape of logits without the class dim, or None (s = 1).
        backend: keyword-only; as in :func:`disalign_cross_entropy`.

    Returns:
        zhat, the shape, dtype and device of ``logits``.
    """
    _reject_positional("calibrate", ("logits", "alpha", "beta"), positional, "confidence=")
    check_calibrate_args(logits, alpha, beta, confidence)
    name = resolve_backend(backend, logits.device)
    if name == "eager":
        return reference.calibrate(logits, alpha, beta, confidence)
    return op_family(name).calibrate(logits, alpha, beta, confidence)


def empty_cache() -> int:
    """Frees the memory the native CPU ops keep for their logits-sized outputs, as
    ``torch.cuda.empty_cache()`` does for CUDA's caching allocator.

    The CPU ops take ``grad_logits`` and the calibrated logits (outputs of 1 MiB and more) from blocks
    they keep after such an output is freed, so the next training step writes memory that is already
    mapped instead of faulting a fresh mapping in page by page; at most two idle blocks are kept
    (csrc/cpu/output_cache.h). ``DISALIGN_CPU_OUTPUT_CACHE=0`` turns the reuse off.

    Returns:
        The bytes freed (0 without the compiled extension, which is then not holding any).
    """
    if not has_native_ops():
        return 0
    return torch.ops.disalign.empty_cpu_output_cache()
