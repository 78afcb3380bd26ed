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

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from .._compat import size_hint
from .._gpu_plan import partial_rows  # the rule (and constants) shared with the CUDA planner
from .._registration import OpFamily, register_autograd, register_fake_kernels
from .._validation import (
    accumulation_dtype,
    check_calibrate_args,
    check_cross_entropy_args,
    check_grad_mask,
    check_gradient_arg,
    check_target_values,
)
from . import kernels, warp_kernels
from .warp_plan import GPU_LIMITS, INTERPRETER_LIMITS, warp_config

INTERPRETED = not isinstance(kernels._cross_entropy_kernel, triton.runtime.JITFunction)

LOSS_PER_ROW, LOSS_PER_PROGRAM, NO_LOSS = 0, 1, 2


def _launch(kernel, grid):
    """Every launch goes through here: benches/sass_triton.py replaces it to record (and compile for
    sm_90a) exactly the launches this module plans, instead of re-deriving them. Interpreted kernels
    (the custom_op path) launch directly: torch 2.11's wrap_triton accepts only @triton.jit functions."""
    if INTERPRETED:
        return kernel[grid]
    return torch.library.wrap_triton(kernel)[grid]


@dataclass(frozen=True)
class _TileLimits:
    """Tile sizes. GPU: class-contiguous rows in tiles of 16 rows (so a da/db partial row is read
    and written once per 16 rows, not per 1-2); a streaming tile of 4096 fp32 values (16 per thread
    with 8 warps); C up to `resident_max_classes` kept whole in registers (one exp2 per element),
    at most `resident_elements` per tile (2-16 rows: da/db stay in registers across tiles
    there, so partial rows are written once per program, not per tile); 512 contiguous bytes per class row of an NCHW tile (a
    warp's 32 x 16-byte loads). Chosen from the SASS of benches/sass_triton.py (registers, spills,
    instructions per element), not yet timed on a GPU. Interpreter: small tiles, so that tests on
    small shapes still cover several class blocks, the masked tail, ragged row tiles, the
    persistent loop and both the resident and the streaming kernel."""

    tile_elements: int
    contiguous_bytes: int
    max_block_classes: int
    block_rows: int
    resident_max_classes: int
    resident_elements: int
    prepass_block: int
    num_stages: int


_LIMITS = (
    _TileLimits(tile_elements=128, contiguous_bytes=64, max_block_classes=16, block_rows=16, resident_max_classes=48,
                resident_elements=1024, prepass_block=64, num_stages=1)
    if INTERPRETED
    else _TileLimits(tile_elements=4096, contiguous_bytes=512, max_block_classes=2048, block_rows=16,
                     resident_max_classes=2048, resident_elements=4096, prepass_block=1024, num_stages=2)
)


# The warp-row kernel (warp_kernels.py) runs every loss launch whose layout it fits (see
# warp_plan.py); None sends every launch to kernels.py's tile kernel (tests force that path).
_WARP_LIMITS = INTERPRETER_LIMITS if INTERPRETED else GPU_LIMITS


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
    block_classes: int  # body block width (the only block of calibrate when there is no body)
    tail_classes: int  # masked tail width >= C mod block_classes; 0: none
    resident: bool  # every class of a tile in registers: one sweep
    has_body: bool
    num_warps: int
    row_align: int  # power of two dividing every row offset (class-contiguous layouts), <= 16
    class_align: int  # power of two dividing C, <= 16 (masks constant over vectors)
    num_stages: int


def _hint(size) -> int:
    """A size as a plain int for tuning choices. Under torch.compile with dynamic shapes this reads
    the symbolic size's example value without adding a guard: tile sizes and program caps only
    change speed, never results, so they need not be re-derived for every size."""
    return size_hint(size)


def _pow2_divisor(values, cap=16) -> int:
    """The largest power of two <= cap dividing every value (0 divides nothing away)."""
    d = cap
    for v in values:
        while d > 1 and v % d:
            d //= 2
    return d


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _resident_split(num_classes: int):
    """(has_body, body, tail) covering C with the fewest padded lanes: one masked block of
    next_pow2(C), or an unmasked body of the largest power of two <= C plus a masked tail
    (det-lvis C = 1231: 1024 + 256 = 4% padding instead of 2048 = 40%)."""
    single = triton.next_power_of_2(num_classes)
    body = _prev_power_of_2(num_classes)
    if body == num_classes:
        return False, single, single
    tail = triton.next_power_of_2(num_classes - body)
    if body + tail < single:
        return True, body, tail
    return False, single, single


def _tile_config(layout: _RowLayout, num_classes: int, element_size: int, acc_size: int) -> _TileConfig:
    """Tiles from the memory layout of the logits (the first tensor of the layout); alignment
    from every tensor of the layout (the kernels address them with the same offsets)."""
    limits = _LIMITS
    strides = [tuple(_hint(s) for s in t) for t in layout.strides]
    _, stride_class, stride_row = strides[0]
    rows_per_image = _hint(layout.rows_per_image)
    num_classes = _hint(num_classes)
    rows = triton.next_power_of_2(max(rows_per_image, 1))
    pixel_contiguous = rows_per_image > 1 and stride_row < stride_class
    resident = num_classes <= limits.resident_max_classes
    if resident:
        has_body, block_classes, tail = _resident_split(num_classes)
        lanes = block_classes * has_body + tail
    else:
        has_body, lanes = True, 0
    if pixel_contiguous:
        # Pixel-contiguous (NCHW): a warp reads `contiguous_bytes` of one class row per load.
        block_rows = min(rows, limits.contiguous_bytes // element_size)
        if resident:
            block_rows = min(block_rows, _prev_power_of_2(max(1, limits.resident_elements // lanes)))
        else:
            block_classes = min(triton.next_power_of_2(num_classes), limits.max_block_classes,
                                max(1, limits.tile_elements // block_rows))
    else:
        block_rows = min(rows, limits.block_rows)
        if resident:
            block_rows = min(block_rows, _prev_power_of_2(max(1, limits.resident_elements // lanes)))
        else:
            block_classes = min(triton.next_power_of_2(num_classes), limits.max_block_classes,
                                max(1, limits.tile_elements // limits.block_rows))
    if not resident:
        rest = num_classes % block_classes
        tail = triton.next_power_of_2(rest) if rest else 0
        lanes = block_classes
    class_contiguous = all(st[1] == 1 for st in strides)
    row_align = _pow2_divisor([v for st in strides for v in (st[0], st[2])]) if class_contiguous else 1
    # <= 16 values per thread: ptxas then fits every launch in 255 registers without spills.
    num_warps = min(16, triton.next_power_of_2(triton.cdiv(block_rows * lanes, 512)))
    return _TileConfig(block_rows, block_classes, tail, resident, has_body, num_warps, row_align,
                       _pow2_divisor([num_classes]), limits.num_stages)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another; a few exercise the persistent loop


def _num_programs(num_tiles: int, device: torch.device, class_partials_bytes: int, logits_bytes: int) -> int:
    """One program per tile, unless da/db partial rows are written: then a persistent grid.

    Each program owns a partial row of C floats for da and for db; a persistent grid of P programs
    needs P x C of them. P is what fits in PARTIALS_FRACTION_OF_LOGITS of the logits' bytes (the
    shared GPU budget), capped at four per SM (a few waves amortise the partials), but never fewer
    than MIN_BLOCKS_PER_SM per SM (the floor wins): disalign_ops/_gpu_plan.py's partial_rows, the
    CUDA planner's rule, with four programs per SM wanted. On 132 SMs seg-ade gets 528 programs
    (0.1% of bf16 logits); the (N, C) benchmark shapes, whose N is small for their C, get 132, which
    is over the budget (cls-inat 4096 x 8142: 8.6 MB, 12.9% of bf16 logits) because a deterministic
    reduction without atomics needs one partial row per resident program (the CUDA kernels reduce
    across thread-block clusters on sm_90 first; Triton has no distributed shared memory).
    """
    if class_partials_bytes == 0:
        return num_tiles
    sms = _num_sms(device)
    programs = partial_rows(_hint(logits_bytes), _hint(class_partials_bytes), sms, 4 * sms)
    # sym_min keeps the program count exact (never more programs than tiles) for symbolic sizes.
    return torch.sym_min(num_tiles, programs)


def _on_device(t: Tensor):
    """Launch on the tensor's device, not the current one (Triton launches on the current device).
    Plain tensors only: fake/functional tensors (tracing) have no device to enter, and the
    compiled graph guards the device itself."""
    if t.device.type != "cuda" or type(t) is not torch.Tensor or torch.compiler.is_compiling() \
            or get_proxy_mode() is not None:
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


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
    if logits_shaped[0].numel() == 0:
        # Nothing to launch; `.contiguous()` of an empty tensor keeps odd strides, so no layout is
        # derived from them (issue 10: AttributeError for randn(2, 3, 4, 0).transpose(2, 3)).
        strides = tuple((0, 1, 1) for _ in logits_shaped)
        return _Canonical(list(logits_shaped), _RowLayout(1, 0, strides), list(logits_shaped))
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

    def __init__(self, logits, alpha, beta, confidence, grad_mask, inputs=(), warp_rows=False):
        self.wanted = [bool(m) and t is not None for m, t in zip(grad_mask, (logits, alpha, beta, confidence))]
        self.grads = [(t if t is not None else logits).new_empty((0,)) for t in (logits, alpha, beta, confidence)]
        outputs = [torch.empty_like(logits)] if self.wanted[0] else []
        self.canonical = _canonicalize([logits, *inputs, *outputs])
        self.grad_logits_index = 1 + len(inputs)
        layout = self.canonical.layout
        self.num_classes = logits.shape[1]
        acc = accumulation_dtype(logits.dtype)
        self.config = _tile_config(layout, self.num_classes, logits.element_size(), acc.itemsize)
        # The warp-row kernel for the loss where the layout fits it. Its constexprs are exact claims
        # (the class blocks cover C, V divides the strides, images are at least a tile long), so
        # they come from concrete sizes only: a symbolic C or stride (torch.compile, dynamic shapes)
        # takes the tile kernel, a symbolic row count scalar loads and row masks (safe for any size).
        self.warp = None
        concrete = [self.num_classes] + [v for st in layout.strides for v in st]
        if warp_rows and _WARP_LIMITS is not None and not any(isinstance(v, torch.SymInt) for v in concrete):
            self.warp = warp_config(layout.strides, _hint(layout.rows_per_image), self.num_classes,
                                    logits.element_size(), _WARP_LIMITS, acc.itemsize,
                                    exact=not isinstance(layout.rows_per_image, torch.SymInt))
        rows_per_tile = self.warp.rows_per_tile if self.warp else self.config.block_rows
        self.tiles_per_image = triton.cdiv(layout.rows_per_image, rows_per_tile)
        self.num_tiles = layout.images * self.tiles_per_image
        partial_bytes = (int(self.wanted[1]) + int(self.wanted[2])) * self.num_classes * acc.itemsize
        self.programs = _num_programs(self.num_tiles, logits.device, partial_bytes,
                                      logits.numel() * logits.element_size())
        # Per-program partial rows of da and/or db in one buffer; the kernels write before they read.
        # Rows padded to 16 values, so that every program's row starts 16-byte aligned (vector loads).
        slots = int(self.wanted[1]) + int(self.wanted[2])
        self.partial_stride = (self.num_classes + 15) // 16 * 16
        self.class_partials = torch.empty_strided(
            (slots, self.programs, self.num_classes), (self.programs * self.partial_stride, self.partial_stride, 1),
            dtype=acc, device=logits.device)
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
        partials = self.class_partials if self.wanted[1] or self.wanted[2] else None
        return self.grad_confidence_rows, partials, self.partial_stride

    def grid_args(self):
        return self.num_tiles, self.tiles_per_image, self.canonical.layout.rows_per_image, self.num_classes

    def meta(self):
        return dict(GRAD_LOGITS=self.wanted[0], GRAD_ALPHA=self.wanted[1], GRAD_BETA=self.wanted[2],
                    GRAD_CONFIDENCE=self.wanted[3], BLOCK_R=self.config.block_rows,
                    BLOCK_C=self.config.block_classes, num_warps=self.config.num_warps)

    def loss_kernel(self):
        return warp_kernels._warp_rows_kernel if self.warp else kernels._cross_entropy_kernel

    def loss_meta(self):
        """The loss kernel's further constexprs: tail, resident sweep, alignment, pipelining."""
        if self.warp:
            return dict(GRAD_LOGITS=self.wanted[0], GRAD_ALPHA=self.wanted[1], GRAD_BETA=self.wanted[2],
                        GRAD_CONFIDENCE=self.wanted[3], **self.warp.meta())
        c = self.config
        return dict(self.meta(), TAIL_C=c.tail_classes, RESIDENT=c.resident, HAS_BODY=c.has_body,
                    ROW_ALIGN=c.row_align, CLASS_ALIGN=c.class_align, NUM_STAGES=c.num_stages)

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
    plan = _TilePlan(logits, alpha, beta, confidence, grad_mask, warp_rows=True)
    acc = accumulation_dtype(logits.dtype)
    loss_size = {LOSS_PER_ROW: target_rows.numel(), LOSS_PER_PROGRAM: plan.programs, NO_LOSS: 0}[loss_mode]
    loss = logits.new_empty((loss_size,), dtype=acc)
    if plan.programs > 0:
        _launch(plan.loss_kernel(), (plan.programs,))(
            *plan.operand(0),
            target_rows, alpha.contiguous(), beta.contiguous(), _flat_rows(confidence), _contiguous(weight),
            grad_scale, grad_scale_stride,
            loss,
            *plan.grad_logits_operand(), *plan.grad_operands(),
            *plan.grid_args(), ignore_index,
            HAS_CONFIDENCE=confidence is not None, HAS_WEIGHT=weight is not None, LOSS_MODE=loss_mode,
            ACC_FP64=acc == torch.float64, **plan.loss_meta(),
        )
    return (loss, *plan.gradients(alpha, beta, confidence))


def _target_stats(target_rows, weight, num_classes, ignore_index, acc):
    """Sum of w[y] over valid rows (NaN when a target is out of range) as a device scalar, no sync."""
    num_rows = target_rows.numel()
    block = min(_LIMITS.prepass_block, triton.next_power_of_2(max(_hint(num_rows), 1)))
    blocks = triton.cdiv(num_rows, block)
    stats = target_rows.new_empty((blocks,), dtype=acc)
    if blocks > 0:
        _launch(kernels._target_stats_kernel, (blocks,))(
            target_rows, _contiguous(weight), stats,
            num_rows, num_classes, ignore_index,
            HAS_WEIGHT=weight is not None, ACC_FP64=acc == torch.float64, BLOCK=block,
        )
    return stats.sum()


def _check_targets_on_cpu(target, num_classes, ignore_index) -> None:
    """Out-of-range targets: an IndexError naming the value on the CPU (a free synchronous check).
    On CUDA nothing is checked here (that would sync): the kernels poison such rows with NaN, and
    DISALIGN_CHECK_TARGETS=1 makes the front-end check them first (disalign_ops.api)."""
    if target.device.type == "cpu":
        check_target_values(target, num_classes, ignore_index)


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
    check_grad_mask(grad_mask)
    if reduction == "none" and any(grad_mask):
        raise ValueError(
            f"grad_mask must be all False for reduction='none' (gradients come from cross_entropy_backward), "
            f"got {list(grad_mask)}"
        )
    _check_targets_on_cpu(target, num_classes, ignore_index)
    acc = accumulation_dtype(logits.dtype)
    target_rows = _flat_rows(target)
    with _on_device(logits):
        return _cross_entropy(logits, target, target_rows, alpha, beta, confidence, weight, ignore_index, reduction,
                              grad_mask, acc)


def _cross_entropy(logits, target, target_rows, alpha, beta, confidence, weight, ignore_index, reduction, grad_mask,
                   acc):
    if reduction == "none":
        loss_rows, *grads = _launch_cross_entropy(logits, target_rows, alpha, beta, confidence, weight, ignore_index,
                                                  LOSS_PER_ROW, None, 0, [False] * 4)
        return (loss_rows.view(target.shape), *grads)
    weight_sum = _target_stats(target_rows, weight, logits.shape[1], ignore_index, acc)
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
    check_grad_mask(grad_mask)
    check_gradient_arg("grad_loss", grad_loss, logits, target.shape)
    _check_targets_on_cpu(target, num_classes, ignore_index)
    acc = accumulation_dtype(logits.dtype)
    # In the accumulation dtype, never the logits' (a loss scale of 65536 is inf in float16).
    grad_rows = grad_loss.to(acc).contiguous().view(-1)
    with _on_device(logits):
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
        with _on_device(logits):
            _launch(kernels._calibrate_kernel, grid)(
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
    check_grad_mask(grad_mask)
    check_gradient_arg("grad", grad, logits, logits.shape)
    plan = _TilePlan(logits, alpha, beta, confidence, grad_mask, inputs=[grad])
    if plan.programs > 0:
        with _on_device(logits):
            _launch(kernels._calibrate_backward_kernel, (plan.programs,))(
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
register_autograd(FAMILY, own_kernel=False)
