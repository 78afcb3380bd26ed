"""Generalized re-weighting of the reference distribution (paper eq. 11)."""

from __future__ import annotations

import math
import numbers

import torch


def _as_rho(rho) -> float:
    """rho as a float: a real number (Python, numpy) or a 0-d real tensor, finite and >= 0."""
    if isinstance(rho, torch.Tensor):
        if rho.dim() != 0 or rho.dtype == torch.bool or rho.is_complex():
            raise ValueError(
                f"rho must be a finite number >= 0 or a 0-d real tensor, got a tensor of shape "
                f"{tuple(rho.shape)} and dtype {rho.dtype}"
            )
        rho = rho.item()
    elif isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r} of type {type(rho).__name__}")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    return float(rho)


def _as_counts(class_counts) -> torch.Tensor:
    if isinstance(class_counts, torch.Tensor):
        if class_counts.dtype == torch.bool or class_counts.is_complex():
            raise ValueError(f"class_counts must hold real counts, got dtype {class_counts.dtype}")
        return class_counts.detach().to(torch.float64)
    try:
        return torch.as_tensor(class_counts, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"class_counts must be a 1-D sequence or tensor of positive numbers, got {class_counts!r}"
        ) from None


def generalized_reweight(class_counts, rho: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class weights ``w_c = C * (1/r_c)^rho / sum_k (1/r_k)^rho`` with ``r_c = n_c / sum_k n_k``.

    Normalised to mean 1 as in the authors' code: rho = 0 gives all ones (instance-balanced),
    rho = 1 class-balanced weights. Computed in float64 through logarithms, so extreme imbalance
    and large rho stay finite. ``class_counts`` is a sequence or tensor of positive counts (the
    result is on its device); ``rho`` a number or a 0-d tensor.
    """
    counts = _as_counts(class_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    rho = _as_rho(rho)
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        bad = int(torch.nonzero(~(torch.isfinite(counts) & (counts > 0)))[0])
        raise ValueError(f"class_counts must be positive and finite, got class_counts[{bad}] = {counts[bad].item()}")
    log_inv_ratio = torch.log(counts.sum()) - torch.log(counts)
    weights = counts.numel() * torch.softmax(rho * log_inv_ratio, dim=0)
    return weights.to(dtype)
