"""The `torch.ops.disalign_triton` operators: host-side layout, launch heuristics and registration.

The four operators have the schemas and output conventions of the native `torch.ops.disalign` ops
(csrc/disalign.cpp), so `disalign_ops._registration.register_autograd` serves both families.

Registration depends on how the kernels were built:

* compiled Triton (CUDA): `torch.library.triton_op`, whose kernels are launched through
  `torch.library.wrap_triton`. torch.compile traces into the operator and Inductor sees the
  kernels; the fake kernel is the operator function itself (triton_op registers it, and it only
  allocates, launches wrapped kernels and uses torch ops, so it runs on fake tensors).
* TRITON_INTERPRET=1 (CPU tensors, tests): the kernels are Python functions that touch the data,
  so they cannot run on fake tensors and cannot be traced. The operators are opaque
  `torch.library.custom_op`s with the shared fake kernels of `_registration`, and torch.compile
  calls them as black boxes.

Schemas come from the type hints (triton_op infers them and ignores an explicit schema), which
spells `int ignore_index` as `SymInt ignore_index` and `bool[4] grad_mask` as `bool[] grad_mask`;
the calls are the same. Both registrations use the inferred form, so the two modes agree.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from .._compat import size_hint

from .._registration import OpFamily, register_autograd, register_fake_kernels
from .._validation import accumulation_dtype, check_calibrate_args, check_cross_entropy_args, check_target_values
from . import kernels

INTERPRETED = not isinstance(kernels._cross_entropy_kernel, triton.runtime.JITFunction)

LOSS_PER_ROW, LOSS_PER_PROGRAM, NO_LOSS = 0, 1, 2


@dataclass(frozen=True)
class _TileLimits:
    """Tile sizes. GPU: 8 KB of accumulators per tile (2048 fp32 values, 8 per thread with 8 warps;
    ptxas for sm_90 reports no spills and 100-130 registers for C = 150 to 8142, because the class
    dim is blocked, never held whole) and 512 contiguous bytes per class row of an NCHW tile (a
    warp's 32 x 16-byte loads). Chosen from register counts and byte arithmetic, not yet timed on
    a GPU. Interpreter: small tiles, so that tests on small shapes still cover several class
    blocks, ragged last blocks and the persistent loop."""

    tile_bytes: int
    contiguous_bytes: int
    max_block_classes: int
    max_block_rows: int
    prepass_block: int


_LIMITS = (
    _TileLimits(tile_bytes=1024, contiguous_bytes=64, max_block_classes=16, max_block_rows=16, prepass_block=64)
    if INTERPRETED
    else _TileLimits(tile_bytes=8192, contiguous_bytes=512, max_block_classes=2048, max_block_rows=32,
                     prepass_block=1024)
)


@dataclass(frozen=True)
class _RowLayout:
    """A (B, C, S) view of logits-shaped tensors: B images of S rows, strides per tensor."""

    images: int
    rows_per_image: int
    strides: tuple  # one (stride_image, stride_class, stride_row) per tensor


def _row_layout(shape, *strides) -> Optional[_RowLayout]:
    """Collapses the row dims (0, 2, 3, ...) of tensors of one shape into at most two, or None.

    Dims are merged while every tensor's memory allows it (stride[d] == stride[d+1] * size[d+1]),
    as the C++ kernels do, so NCHW maps become (N, C, H*W), channels-last and (N, C) rows become one
    image of N*H*W rows, and a transposed (N, C) tensor becomes one image of N pixel-contiguous rows.
    """
    groups = []  # (size, per-tensor strides), in logical order
    for dim in [0] + list(range(2, len(shape))):
        size = shape[dim]
        if size == 1:
            continue
        dim_strides = [s[dim] for s in strides]
        if groups and all(prev == cur * size for prev, cur in zip(groups[-1][1], dim_strides)):
            groups[-1] = (groups[-1][0] * size, dim_strides)
        else:
            groups.append((size, dim_strides))
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, (1, [0] * len(strides)))
    (images, image_strides), (rows, row_strides) = groups
    per_tensor = tuple((si, s[1], sr) for si, s, sr in zip(image_strides, strides, row_strides))
    return _RowLayout(images, rows, per_tensor)


@dataclass(frozen=True)
class _TileConfig:
    block_rows: int
    block_classes: int
    num_warps: int


def _hint(size) -> int:
    """A size as a plain int for tuning choices. Under torch.compile with dynamic shapes this reads
    the symbolic size's example value without adding a guard: tile sizes and program caps only
    change speed, never results, so they need not be re-derived for every size."""
    return size_hint(size)


def _tile_config(layout: _RowLayout, num_classes: int, element_size: int, acc_size: int) -> _TileConfig:
    """BLOCK_R x BLOCK_C from the memory layout of the logits (the first tensor of the layout)."""
    _, stride_class, stride_row = (_hint(s) for s in layout.strides[0])
    limits = _LIMITS
    tile_elements = limits.tile_bytes // acc_size
    rows_per_image = _hint(layout.rows_per_image)
    rows = triton.next_power_of_2(max(rows_per_image, 1))
    classes = triton.next_power_of_2(_hint(num_classes))
    if rows_per_image > 1 and stride_row < stride_class:
        # Pixel-contiguous (NCHW): a warp reads `contiguous_bytes` of one class row per load.
        block_rows = min(rows, limits.contiguous_bytes // element_size)
        block_classes = min(classes, limits.max_block_classes, max(1, tile_elements // block_rows))
    else:
        # Class-contiguous (rows of C classes): blocks of up to 2048 classes; a small C packs rows.
        block_classes = min(classes, limits.max_block_classes, tile_elements)
        block_rows = min(rows, limits.max_block_rows, max(1, tile_elements // block_classes))
    num_warps = max(1, min(8, block_rows * block_classes // 256))
    return _TileConfig(block_rows, block_classes, num_warps)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another; a few exercise the persistent loop


def _num_programs(num_tiles: int, device: torch.device, class_partials_bytes: int, logits_bytes: int) -> int:
    """One program per tile, unless da/db partial rows are written: then a persistent grid.

    Each program owns a partial row of C floats for da and for db. With one program per tile,
    (N, C) logits would need about N x C partials (as much as the logits); a persistent grid of P
    programs needs P x C. P is what fits in 4% of the logits' bytes (the stage-2 memory budget),
    at least one program per SM (every SM busy) and at most four (a few waves amortise the
    partials; more only adds partial traffic). On an H100 (132 SMs): seg-ade (8 x 150 x 512 x 512)
    gets 528 programs of ~16 tiles (partials 0.6 MB, 0.1% of bf16 logits); cls-inat (4096 x 8142)
    gets 132 programs of 31 rows (8.6 MB: 6.5% of fp32 logits, 13% of bf16 ones, the price of
    determinism without atomics).
    """
    if class_partials_bytes == 0:
        return num_tiles
    resident = _num_sms(device)
    within_budget = (_hint(logits_bytes) // 25) // _hint(class_partials_bytes)
    # sym_min keeps the program count exact (never more programs than tiles) for symbolic sizes.
    return torch.sym_min(num_tiles, max(resident, min(4 * resident, within_budget)))


@dataclass
class _Canonical:
    """Logits and the logits-shaped tensors beside them in one (B, C, S) layout.

    `tensors` are what the kernels read/write (contiguous copies where the layout could not be
    collapsed); `finish(i)` returns output i with the strides `empty_like` gives the original.
    """

    tensors: list
    layout: _RowLayout
    originals: list

    def finish(self, index: int) -> Tensor:
        result, original = self.tensors[index], self.originals[index]
        if result is original:
            return result
        return original.copy_(result)


def _canonicalize(logits_shaped: list) -> _Canonical:
    layout = _row_layout(logits_shaped[0].shape, *(t.stride() for t in logits_shaped))
    if layout is not None:
        return _Canonical(list(logits_shaped), layout, list(logits_shaped))
    # Rare: more than two non-collapsible row dims (e.g. a permuted spatial view): run on copies.
    contiguous = [t.contiguous() for t in logits_shaped]
    return _Canonical(contiguous, _row_layout(contiguous[0].shape, *(t.stride() for t in contiguous)),
                      list(logits_shaped))


def _shaped_like(flat: Tensor, like: Tensor) -> Tensor:
    """A row-ordered flat result with the shape (and `empty_like` strides) of `like`."""
    if like.is_contiguous():
        return flat.view(like.shape)
    return torch.empty_like(like).copy_(flat.view(like.shape))


def _flat_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-row tensor (target, confidence) as a contiguous vector in row order."""
    return None if t is None else t.contiguous().view(-1)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class _TilePlan:
    """Layout, tile sizes, grid and gradient buffers of one launch of a persistent tile kernel.

    `inputs` are further logits-shaped tensors the kernel reads (the incoming grad of
    calibrate_backward); dlogits, when wanted, is allocated with `empty_like(logits)` strides.
    Gradients that are not wanted are the 0-element placeholders of the output conventions.
    """

    def __init__(self, logits, alpha, beta, confidence, grad_mask, inputs=()):
        self.wanted = [bool(m) and t is not None for m, t in zip(grad_mask, (logits, alpha, beta, confidence))]
        self.grads = [(t if t is not None else logits).new_empty((0,)) for t in (logits, alpha, beta, confidence)]
        outputs = [torch.empty_like(logits)] if self.wanted[0] else []
        self.canonical = _canonicalize([logits, *inputs, *outputs])
        self.grad_logits_index = 1 + len(inputs)
        layout = self.canonical.layout
        self.num_classes = logits.shape[1]
        acc = accumulation_dtype(logits.dtype)
        self.config = _tile_config(layout, self.num_classes, logits.element_size(), acc.itemsize)
        self.tiles_per_image = triton.cdiv(layout.rows_per_image, self.config.block_rows)
        self.num_tiles = layout.images * self.tiles_per_image
        partial_bytes = (int(self.wanted[1]) + int(self.wanted[2])) * self.num_classes * acc.itemsize
        self.programs = _num_programs(self.num_tiles, logits.device, partial_bytes,
                                      logits.numel() * logits.element_size())
        # Per-program partial rows of da and/or db in one buffer; the kernels write before they read.
        slots = int(self.wanted[1]) + int(self.wanted[2])
        self.class_partials = logits.new_empty((slots, self.programs, self.num_classes), dtype=acc)
        num_rows = layout.images * layout.rows_per_image
        self.grad_confidence_rows = (logits.new_empty((num_rows,), dtype=confidence.dtype)
                                     if self.wanted[3] else None)

    def operand(self, index):
        """(tensor, stride_image, stride_class, stride_row) of canonical tensor `index`."""
        return (self.canonical.tensors[index], *self.canonical.layout.strides[index])

    def grad_logits_operand(self):
        return self.operand(self.grad_logits_index) if self.wanted[0] else (None, 0, 0, 0)

    def grad_operands(self):
        """The kernels' (grad_confidence_ptr, class_partials_ptr) arguments."""
        return self.grad_confidence_rows, self.class_partials if self.wanted[1] or self.wanted[2] else None

    def grid_args(self):
        return self.num_tiles, self.tiles_per_image, self.canonical.layout.rows_per_image, self.num_classes

    def meta(self):
        return dict(GRAD_LOGITS=self.wanted[0], GRAD_ALPHA=self.wanted[1], GRAD_BETA=self.wanted[2],
                    GRAD_CONFIDENCE=self.wanted[3], BLOCK_R=self.config.block_rows,
                    BLOCK_C=self.config.block_classes, num_warps=self.config.num_warps)

    def gradients(self, alpha, beta, confidence):
        """[dlogits, dalpha, dbeta, dconfidence] after the launch; partial rows summed in a fixed
        order (deterministic) into each input's dtype."""
        grads = list(self.grads)
        if self.wanted[0]:
            grads[0] = self.canonical.finish(self.grad_logits_index)
        slots = iter(self.class_partials)  # summed one by one: outputs of an op must not alias
        for i, like in ((1, alpha), (2, beta)):
            if self.wanted[i]:
                grads[i] = next(slots).sum(dim=0).to(like.dtype)
        if self.wanted[3]:
            grads[3] = _shaped_like(self.grad_confidence_rows, confidence)
        return grads


def _launch_cross_entropy(logits, target_rows, alpha, beta, confidence, weight, ignore_index, loss_mode,
                          grad_scale, grad_scale_stride, grad_mask):
    """Runs the fused kernel; returns (loss buffer, grad_logits, grad_alpha, grad_beta, grad_confidence).

    The loss buffer holds one value per row (LOSS_PER_ROW), one partial sum per program
    (LOSS_PER_PROGRAM) or nothing (NO_LOSS).
    """
    plan = _TilePlan(logits, alpha, beta, confidence, grad_mask)
    acc = accumulation_dtype(logits.dtype)
    loss_size = {LOSS_PER_ROW: target_rows.numel(), LOSS_PER_PROGRAM: plan.programs, NO_LOSS: 0}[loss_mode]
    loss = logits.new_empty((loss_size,), dtype=acc)
    if plan.programs > 0:
        torch.library.wrap_triton(kernels._cross_entropy_kernel)[(plan.programs,)](
            *plan.operand(0),
            target_rows, alpha.contiguous(), beta.contiguous(), _flat_rows(confidence), _contiguous(weight),
            grad_scale, grad_scale_stride,
            loss,
            *plan.grad_logits_operand(), *plan.grad_operands(),
            *plan.grid_args(), ignore_index,
            HAS_CONFIDENCE=confidence is not None, HAS_WEIGHT=weight is not None, LOSS_MODE=loss_mode,
            ACC_FP64=acc == torch.float64, **plan.meta(),
        )
    return (loss, *plan.gradients(alpha, beta, confidence))


def _target_stats(target_rows, weight, num_classes, ignore_index, acc):
    """(sum of w[y] over valid rows, number of out-of-range targets) as device scalars, no sync.

    Both per-block results share one buffer so that one reduction launch sums them.
    """
    num_rows = target_rows.numel()
    block = min(_LIMITS.prepass_block, triton.next_power_of_2(max(_hint(num_rows), 1)))
    blocks = triton.cdiv(num_rows, block)
    stats = target_rows.new_empty((2, blocks), dtype=acc)
    if blocks > 0:
        torch.library.wrap_triton(kernels._target_stats_kernel)[(blocks,)](
            target_rows, _contiguous(weight), stats,
            num_rows, num_classes, ignore_index,
            HAS_WEIGHT=weight is not None, ACC_FP64=acc == torch.float64, BLOCK=block,
        )
    weight_sum, bad_count = stats.sum(dim=1)
    return weight_sum, bad_count


def _report_bad_targets(target, num_classes, ignore_index, bad_count) -> None:
    """Out-of-range targets: an IndexError naming the value on CPU (a free synchronous check);
    on CUDA a device-side assert (asynchronous, like F.cross_entropy's), because reading the value
    back would cost a host sync per call. The kernels never read out of bounds either way."""
    if target.device.type == "cpu":
        check_target_values(target, num_classes, ignore_index)
    else:
        torch._assert_async(
            bad_count == 0,
            f"disalign_triton.cross_entropy: target has values outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}",
        )


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    alpha: Tensor,
    beta: Tensor,
    confidence: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_classes = check_cross_entropy_args(logits, target, alpha, beta, confidence, weight, ignore_index, reduction)
    if reduction == "none" and any(grad_mask):
        raise ValueError(
            f"grad_mask must be all False for reduction='none' (gradients come from cross_entropy_backward), "
            f"got {list(grad_mask)}"
        )
    acc = accumulation_dtype(logits.dtype)
    target_rows = _flat_rows(target)
    weight_sum, bad_count = _target_stats(target_rows, weight, num_classes, ignore_index, acc)
    _report_bad_targets(target, num_classes, ignore_index, bad_count)
    if reduction == "none":
        loss_rows, *grads = _launch_cross_entropy(logits, target_rows, alpha, beta, confidence, weight, ignore_index,
                                                  LOSS_PER_ROW, None, 0, [False] * 4)
        return (loss_rows.view(target.shape), *grads)
    # The gradients of the reduced loss for grad_output = 1: dL/dloss[i] is 1/sum(w[y]) for "mean".
    grad_scale = (1.0 / weight_sum if reduction == "mean" else torch.ones_like(weight_sum)).reshape(1)
    partial_losses, *grads = _launch_cross_entropy(logits, target_rows, alpha, beta, confidence, weight,
                                                   ignore_index, LOSS_PER_PROGRAM, grad_scale, 0, grad_mask)
    loss = partial_losses.sum()
    return (loss / weight_sum if reduction == "mean" else loss, *grads)


def cross_entropy_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    alpha: Tensor,
    beta: Tensor,
    confidence: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    grad_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    num_classes = check_cross_entropy_args(logits, target, alpha, beta, confidence, weight, ignore_index, "none")
    if tuple(grad_loss.shape) != tuple(target.shape):
        raise ValueError(f"grad_loss must have the shape of target {tuple(target.shape)}, got {tuple(grad_loss.shape)}")
    if target.device.type == "cpu":  # free there; on CUDA the forward already asserted on these targets
        check_target_values(target, num_classes, ignore_index)
    acc = accumulation_dtype(logits.dtype)
    grad_rows = grad_loss.to(acc).contiguous().view(-1)
    _, *grads = _launch_cross_entropy(logits, _flat_rows(target), alpha, beta, confidence, weight, ignore_index,
                                      NO_LOSS, grad_rows, 1, grad_mask)
    return tuple(grads)


def calibrate(logits: Tensor, alpha: Tensor, beta: Tensor, confidence: Optional[Tensor]) -> Tensor:
    num_classes = check_calibrate_args(logits, alpha, beta, confidence)
    out = torch.empty_like(logits)
    canonical = _canonicalize([logits, out])
    layout = canonical.layout
    config = _tile_config(layout, num_classes, logits.element_size(), accumulation_dtype(logits.dtype).itemsize)
    tiles_per_image = triton.cdiv(layout.rows_per_image, config.block_rows)
    grid = (layout.images * tiles_per_image, triton.cdiv(num_classes, config.block_classes))
    if logits.numel() > 0:
        torch.library.wrap_triton(kernels._calibrate_kernel)[grid](
            canonical.tensors[0], *layout.strides[0], alpha.contiguous(), beta.contiguous(), _flat_rows(confidence),
            canonical.tensors[1], *layout.strides[1],
            tiles_per_image, layout.rows_per_image, num_classes,
            HAS_CONFIDENCE=confidence is not None, ACC_FP64=logits.dtype == torch.float64,
            BLOCK_R=config.block_rows, BLOCK_C=config.block_classes, num_warps=config.num_warps,
        )
    return canonical.finish(1)


def calibrate_backward(
    grad: Tensor, logits: Tensor, alpha: Tensor, beta: Tensor, confidence: Optional[Tensor], grad_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_calibrate_args(logits, alpha, beta, confidence)
    if tuple(grad.shape) != tuple(logits.shape):
        raise ValueError(f"grad must have the shape of logits {tuple(logits.shape)}, got {tuple(grad.shape)}")
    plan = _TilePlan(logits, alpha, beta, confidence, grad_mask, inputs=[grad])
    if plan.programs > 0:
        torch.library.wrap_triton(kernels._calibrate_backward_kernel)[(plan.programs,)](
            *plan.operand(1), *plan.operand(0),
            alpha.contiguous(), beta.contiguous(), _flat_rows(confidence),
            *plan.grad_logits_operand(), *plan.grad_operands(),
            *plan.grid_args(),
            HAS_CONFIDENCE=confidence is not None, ACC_FP64=logits.dtype == torch.float64, **plan.meta(),
        )
    return tuple(plan.gradients(alpha, beta, confidence))


def _register(name, fn):
    qualname = f"disalign_triton::{name}"
    if INTERPRETED:
        return torch.library.custom_op(qualname, fn, mutates_args=())
    return torch.library.triton_op(qualname, fn, mutates_args=())


_register("cross_entropy", cross_entropy)
_register("cross_entropy_backward", cross_entropy_backward)
_register("calibrate", calibrate)
_register("calibrate_backward", calibrate_backward)

FAMILY = OpFamily(
    torch.ops.disalign_triton.cross_entropy,
    torch.ops.disalign_triton.cross_entropy_backward,
    torch.ops.disalign_triton.calibrate,
    torch.ops.disalign_triton.calibrate_backward,
)
if INTERPRETED:
    register_fake_kernels(FAMILY)
register_autograd(FAMILY)
