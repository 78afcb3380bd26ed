"""Generalized re-weighting of the reference distribution (paper eq. 11)."""

from __future__ import annotations

import math

import torch


def generalized_reweight(class_counts, rho: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class weights ``w_c = C * (1/r_c)^rho / sum_k (1/r_k)^rho`` with ``r_c = n_c / sum_k n_k``.

    Normalised to mean 1 as in the authors' code: rho = 0 gives all ones (instance-balanced),
    rho = 1 class-balanced weights. Computed in float64 through logarithms, so extreme imbalance
    and large rho stay finite. ``class_counts`` is a sequence or tensor of positive counts.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu" if not isinstance(class_counts, torch.Tensor) else class_counts.device)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        bad = int(torch.nonzero(~(torch.isfinite(counts) & (counts > 0)))[0])
        raise ValueError(f"class_counts must be positive and finite, got class_counts[{bad}] = {counts[bad].item()}")
    log_inv_ratio = torch.log(counts.sum()) - torch.log(counts)
    weights = counts.numel() * torch.softmax(rho * log_inv_ratio, dim=0)
    return weights.to(dtype)
