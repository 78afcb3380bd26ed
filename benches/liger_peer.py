"""Liger-Kernel's fused cross entropy as a peer anchor of the GPU benchmark (bench_ops.py backend "liger").

LigerCrossEntropyLoss on the benchmark's logits as (N, C) rows, with the same class weights and
ignore_index: the DisAlign loss at alpha = beta = 0 without the confidence, i.e. what one fused
softmax-cross-entropy kernel costs, not the same computation. Segmentation logits are permuted to
(B*H*W, C) once, outside the timing (a copy the DisAlign ops do not need). Liger computes the
gradient inside its forward and writes it over its input, so in full mode it gets its own copy of the
logits, restored before every call outside the timing (step.setup); in stage 2 its input needs no
gradient and it only reads. The wheel travels in benches/wheels (the GPU machine is offline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available(device: torch.device) -> bool:
    """Liger-Kernel runs its Triton kernels on CUDA only (benches/wheels brings the wheel along)."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # ImportError, or a Triton/torch it does not support
        return False
    return True


def make_step(problem):
    """A bench_ops step: Liger's loss on `problem` (a bench_ops.Problem), with .setup, .expected_loss, .note."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    logits, target = problem.logits.detach(), problem.target
    if logits.dim() > 2:  # (B, C, H, W) -> (B*H*W, C): Liger needs class-contiguous rows; a copy
        # (reshape alone can return a transposed view, e.g. for B = 1, which Liger would copy inside the timing)
        logits, target = logits.movedim(1, -1).reshape(-1, logits.shape[1]).contiguous(), target.reshape(-1)
    full = problem.mode == "full"
    expected = F.cross_entropy(logits.float(), target, weight=problem.weight, ignore_index=problem.ignore_index)
    pristine = logits
    rows = logits.clone(memory_format=torch.contiguous_format).requires_grad_() if full else logits
    loss_fn = LigerCrossEntropyLoss(weight=problem.weight, ignore_index=problem.ignore_index, reduction="mean")

    def step():
        loss = loss_fn(rows, target)
        if full:
            loss.backward()
        return loss.detach()

    def setup():
        rows.grad = None
        with torch.no_grad():
            rows.copy_(pristine)  # the last call overwrote its input with the gradient

    step.setup = setup if full else None
    step.expected_loss = expected
    step.note = "Liger-Kernel cross entropy, alpha = beta = 0, no confidence" + (
        "; NCHW permuted to (B*H*W, C) by a copy outside the timing" if problem.logits.dim() > 2 else "")
    return step
