"""The eager reference: the one definition of the math (docs/contract.md section 2) every backend is tested against.

This is the PyTorch expression users write today, upcast to the accumulation dtype (float32 for
half inputs, float64 for float64), so that it also defines the dtype contract: the loss comes back in
the accumulation dtype and autograd returns gradients in each input's own dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import accumulation_dtype


def _class_view(t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast against (N, C, d1, ...) logits."""
    return t.view((1, -1) + (1,) * (logits.dim() - 2))


def calibrated_logits(logits, alpha, beta, confidence=None) -> torch.Tensor:
    """zhat = (1 + s*alpha) * z + s*beta in the accumulation dtype (paper eq. 6); s = 1 when None."""
    acc = accumulation_dtype(logits.dtype)
    z = logits.to(acc)
    a = _class_view(alpha.to(acc), logits)
    b = _class_view(beta.to(acc), logits)
    if confidence is None:
        return (1 + a) * z + b
    s = confidence.to(acc).unsqueeze(1)
    return (1 + s * a) * z + s * b


def calibrate(logits, alpha, beta, confidence=None) -> torch.Tensor:
    """Calibrated logits in the logits' dtype."""
    return calibrated_logits(logits, alpha, beta, confidence).to(logits.dtype)


def cross_entropy(
    logits, target, alpha, beta, confidence=None, weight=None, ignore_index=-100, reduction="mean"
) -> torch.Tensor:
    """F.cross_entropy of the calibrated logits with class weights: the KL of paper eq. 8-11."""
    zhat = calibrated_logits(logits, alpha, beta, confidence)
    w = None if weight is None else weight.to(zhat.dtype)
    return F.cross_entropy(zhat, target.long(), weight=w, ignore_index=ignore_index, reduction=reduction)
