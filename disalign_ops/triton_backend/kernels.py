"""Triton kernels of the DisAlign loss and calibration (docs/contract.md section 2), Liger-Kernel style.

Layout: every kernel sees the logits as a (B, C, S) view with strides (stride_image, stride_class,
stride_row): B "images", C classes, S rows per image (pixels for segmentation logits, samples or
ROIs for (N, C) logits, where usually B = 1 and S = N). Row r = b * S + s indexes the flattened
target, confidence and per-row loss. A program works on tiles of BLOCK_R rows of one image x
BLOCK_C classes, so one kernel serves both memory layouts:

* class-contiguous (stride_class == 1: (N, C) rows, channels-last maps): the tile is 1-32 rows x
  up to 2048 classes, loads are coalesced along the class dim;
* row-contiguous (stride_row == 1: NCHW maps read in place, transposed (N, C)): the tile is 512
  contiguous bytes of pixels (256 bf16 / 128 fp32) x 8-16 classes, loads are coalesced along the
  pixel dim, nothing is permuted.

Triton's coalescing pass picks the vectorised axis from the strides (a stride equal to 1 is
specialised at compile time), so the host only chooses BLOCK_R and BLOCK_C (see ops.py).

Accumulation is float32 (float64 for float64 logits: ACC_FP64); offsets are int64 (program ids are
widened before any multiplication), so tensors of more than 2^31 elements index correctly.

Out-of-range targets are never used as addresses: a row whose target is outside [0, C) and not
ignore_index is treated like an ignored row (loss 0, no gradient). Reporting it is the host's job
(ops.py), from the counts of _target_stats_kernel.
"""

import triton
import triton.language as tl


@triton.jit
def _to_acc(x, ACC_FP64: tl.constexpr):
    """Casts to the accumulation dtype: float64 for float64 logits, float32 otherwise."""
    if ACC_FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _tile_rows(tile, tiles_per_image, rows_per_image, BLOCK_R: tl.constexpr):
    """Rows of one tile: (flat row index, in-bounds mask, image index, row within the image).

    Tiles never straddle two images, so the rows of a tile are consecutive in memory when
    stride_row == 1 and the compiler can vectorise pixel loads of NCHW logits.
    """
    image = tile // tiles_per_image
    pixel = (tile - image * tiles_per_image) * BLOCK_R + tl.arange(0, BLOCK_R)
    return image * rows_per_image + pixel, pixel < rows_per_image, image, pixel


@triton.jit
def _row_confidence(confidence_ptr, rows, row_mask, HAS_CONFIDENCE: tl.constexpr, ACC_FP64: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """Per-row confidence s, or s = 1 for input-agnostic calibration (confidence=None)."""
    if HAS_CONFIDENCE:
        return _to_acc(tl.load(confidence_ptr + rows, mask=row_mask, other=1.0), ACC_FP64)
    else:
        return _to_acc(tl.full([BLOCK_R], 1.0, tl.float32), ACC_FP64)


@triton.jit
def _calibrated_block(logits_ptr, row_offsets, stride_class, alpha_ptr, beta_ptr, s, cols, in_class, mask,
                      ACC_FP64: tl.constexpr):
    """Loads one [BLOCK_R, BLOCK_C] tile and calibrates it: zhat = (1 + s*a) * z + s*b (paper eq. 6).

    Returns z, a, b, the multiplier (1 + s*a) and zhat, all in the accumulation dtype; masked
    elements read as z = 0 and must be masked again by the caller. alpha and beta (C values) stay
    in L1/L2 across tiles, so only the logits cost HBM traffic.
    """
    class_offsets = cols.to(tl.int64) * stride_class
    z = _to_acc(tl.load(logits_ptr + row_offsets[:, None] + class_offsets[None, :], mask=mask, other=0.0), ACC_FP64)
    a = _to_acc(tl.load(alpha_ptr + cols, mask=in_class, other=0.0), ACC_FP64)
    b = _to_acc(tl.load(beta_ptr + cols, mask=in_class, other=0.0), ACC_FP64)
    multiplier = 1.0 + s[:, None] * a[None, :]
    return z, a, b, multiplier, multiplier * z + s[:, None] * b[None, :]


@triton.jit
def _calibration_vjp(dzhat, z, a, b, s, multiplier, cols, in_class, mask,
                     grad_logits_ptr, grad_row_offsets, grad_stride_class, grad_confidence_acc,
                     class_partials_ptr, partial_offset, beta_slot_offset, partial_read_limit,
                     GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr,
                     GRAD_CONFIDENCE: tl.constexpr):
    """Chain rule through the calibration for one tile, given dL/dzhat:

        dz = dzhat * (1 + s*a)            stored, in the logits' dtype
        ds += dzhat * (a*z + b)           accumulated per element, reduced over classes by the caller
        da[j] += sum_rows dzhat * s * z   into this program's partial row (no atomics)
        db[j] += sum_rows dzhat * s

    class_partials_ptr is a [slots, programs, C] buffer: da in slot 0 when wanted, db in the next
    slot (beta_slot_offset = programs * C when da is wanted, else 0). A program's rows (at
    partial_offset = pid * C in each slot) belong to this program only, so the read-modify-write
    is race-free and the final reduction over programs (on the host, in a fixed order) is
    deterministic. The load and the store use the same pointer tensor, hence the same thread owns
    an element in both, across the persistent loop too. A program's first tile writes without
    reading (partial_read_limit = 0), so the buffer needs no zero fill.
    """
    dzhat = tl.where(mask, dzhat, 0.0)
    if GRAD_LOGITS:
        grad_ptrs = grad_logits_ptr + grad_row_offsets[:, None] + (cols.to(tl.int64) * grad_stride_class)[None, :]
        tl.store(grad_ptrs, (dzhat * multiplier).to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if GRAD_CONFIDENCE:
        grad_confidence_acc += dzhat * (a[None, :] * z + b[None, :])
    read_partials = cols < partial_read_limit  # C, or 0 on the program's first tile
    if GRAD_ALPHA:
        alpha_ptrs = class_partials_ptr + partial_offset + cols
        column_sum = tl.sum(dzhat * s[:, None] * z, axis=0)
        tl.store(alpha_ptrs, tl.load(alpha_ptrs, mask=read_partials, other=0.0) + column_sum, mask=in_class)
    if GRAD_BETA:
        beta_ptrs = class_partials_ptr + beta_slot_offset + partial_offset + cols
        column_sum = tl.sum(dzhat * s[:, None], axis=0)
        tl.store(beta_ptrs, tl.load(beta_ptrs, mask=read_partials, other=0.0) + column_sum, mask=in_class)
    return grad_confidence_acc


@triton.jit
def _target_stats_kernel(target_ptr, weight_ptr, stats_ptr, num_rows, num_classes, ignore_index,
                         HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Per-block sums over the targets, read once before the loss kernel (8 bytes per row), into
    a [2, blocks] buffer (one host reduction sums both rows):

    stats[0, block] = sum of w[y] over valid rows  (the "mean" denominator, F.cross_entropy's rule)
    stats[1, block] = number of targets outside [0, C) that are not ignore_index

    The weight gather is masked by the range check, so a bad target is never an address.
    """
    block = tl.program_id(0).to(tl.int64)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    target = tl.load(target_ptr + rows, mask=rows < num_rows, other=ignore_index).to(tl.int64)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    valid = counted & in_range
    if HAS_WEIGHT:
        weight = _to_acc(tl.load(weight_ptr + tl.where(valid, target, 0), mask=valid, other=0.0), ACC_FP64)
    else:
        weight = _to_acc(valid.to(tl.float32), ACC_FP64)
    tl.store(stats_ptr + block, tl.sum(weight, axis=0))
    # Counted in the accumulation dtype beside the weight sums: exact per block, and the host only
    # asks whether the total is 0.
    bad = _to_acc((counted & ~in_range).to(tl.float32), ACC_FP64)
    tl.store(stats_ptr + tl.num_programs(0) + block, tl.sum(bad, axis=0))


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_stride_image, logits_stride_class, logits_stride_row,
    target_ptr, alpha_ptr, beta_ptr, confidence_ptr, weight_ptr,
    grad_scale_ptr, grad_scale_stride,
    loss_ptr,
    grad_logits_ptr, grad_stride_image, grad_stride_class, grad_stride_row,
    grad_confidence_ptr, class_partials_ptr,
    num_tiles, tiles_per_image, rows_per_image, num_classes, ignore_index,
    HAS_CONFIDENCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, LOSS_MODE: tl.constexpr,
    GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr, GRAD_CONFIDENCE: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fused calibration + softmax + weighted cross entropy, and its gradients, in one pass.

    Per tile of rows (programs loop over tiles pid, pid + num_programs, ... so that the number of
    partial rows for da/db is bounded by the grid, not by N):

    Sweep 1 streams the classes in BLOCK_C blocks with an online max / sum-exp (numerically the
    log-sum-exp of F.cross_entropy, fine for logits of magnitude 1e4 and fp16 near its maximum) and
    picks zhat[y] out of the same blocks (a compare-select, never a gather at an address computed
    from the target). The loss of a valid row is w[y] * (lse - zhat[y]).

    Sweep 2 (only when gradients are wanted) re-reads the tile, which a program touched a moment
    ago and which is still in L1/L2 (row-major: BLOCK_R x C x 2-4 bytes, e.g. 1 x 8142 x 2 B = 16 KB;
    NCHW: 256 pixels x 150 classes x 2 B = 77 KB; a few programs per SM x 132 SMs stay well under
    the 50 MB L2 of an H100), and writes

        dzhat = g * w[y] * (softmax(zhat) - onehot(y)),   g = grad_scale[row]

    through _calibration_vjp. HBM traffic is therefore one read of the logits plus, in full mode,
    one write of dlogits; per row 8 B of target, 2-4 B of confidence and of its gradient, 4 B of
    loss; per program 2 x C x 4 B of da/db partials. For seg-ade in bf16 (8 x 150 x 512 x 512) that
    is 629 MB of logits against ~50 MB of everything else (int64 targets read twice, with the
    prepass, 16 MB each; fp32 confidence and its gradient, 8 MB each). Compute: two exp per element (one per sweep), about what the H100's special-function
    units sustain at the bf16 memory rate, so the kernel should stay memory-bound.

    LOSS_MODE: 0 = store the per-row loss (reduction "none"); 1 = store one partial sum per program
    (reduction "mean"/"sum", reduced by the host in a fixed order: deterministic, no atomics);
    2 = no loss (the backward of reduction "none", where grad_scale is the per-row grad_loss).
    """
    pid = tl.program_id(0).to(tl.int64)
    partial_offset = pid * num_classes
    beta_slot_offset = GRAD_ALPHA * tl.num_programs(0).to(tl.int64) * num_classes
    loss_sum = _to_acc(tl.zeros([BLOCK_R], tl.float32), ACC_FP64)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows, row_mask, image, pixel = _tile_rows(tile, tiles_per_image, rows_per_image, BLOCK_R)
        row_offsets = image * logits_stride_image + pixel * logits_stride_row
        target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        valid = row_mask & (target != ignore_index) & (target >= 0) & (target < num_classes)
        # Class ids fit in int32 once range-checked; invalid rows match no class.
        target_class = tl.where(valid, target, -1).to(tl.int32)
        s = _row_confidence(confidence_ptr, rows, row_mask, HAS_CONFIDENCE, ACC_FP64, BLOCK_R)

        row_max = _to_acc(tl.full([BLOCK_R], float("-inf"), tl.float32), ACC_FP64)
        sum_exp = _to_acc(tl.zeros([BLOCK_R], tl.float32), ACC_FP64)
        target_logit = _to_acc(tl.zeros([BLOCK_R], tl.float32), ACC_FP64)
        for class_start in range(0, num_classes, BLOCK_C):
            cols = class_start + tl.arange(0, BLOCK_C)
            in_class = cols < num_classes
            mask = row_mask[:, None] & in_class[None, :]
            z, a, b, multiplier, zhat = _calibrated_block(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                          beta_ptr, s, cols, in_class, mask, ACC_FP64)
            # Only classes are masked: rows past the end stay finite (never stored), no inf - inf.
            zhat = tl.where(in_class[None, :], zhat, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(zhat, axis=1))
            # Rows that have seen only -inf so far keep a finite shift, so exp() never sees inf - inf.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(zhat - shift[:, None]), axis=1)
            row_max = new_max
            if LOSS_MODE != 2:
                target_logit += tl.sum(tl.where(cols[None, :] == target_class[:, None], zhat, 0.0), axis=1)
        log_normalizer = row_max + tl.log(sum_exp)

        if HAS_WEIGHT:
            class_weight = tl.load(weight_ptr + tl.where(valid, target_class, 0), mask=valid, other=0.0)
            row_weight = _to_acc(class_weight, ACC_FP64)
        else:
            row_weight = _to_acc(valid.to(tl.float32), ACC_FP64)
        if LOSS_MODE == 0:
            tl.store(loss_ptr + rows, tl.where(valid, row_weight * (log_normalizer - target_logit), 0.0),
                     mask=row_mask)
        elif LOSS_MODE == 1:
            loss_sum += tl.where(valid, row_weight * (log_normalizer - target_logit), 0.0)

        if GRAD_LOGITS or GRAD_ALPHA or GRAD_BETA or GRAD_CONFIDENCE:
            row_scale = _to_acc(tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_mask, other=0.0),
                                ACC_FP64)
            # Ignored rows get exactly no gradient, also when "mean" has no valid row (scale 1/0).
            row_grad = row_weight * tl.where(valid, row_scale, 0.0)
            grad_row_offsets = image * grad_stride_image + pixel * grad_stride_row
            grad_confidence_acc = _to_acc(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), ACC_FP64)
            for class_start in range(0, num_classes, BLOCK_C):
                cols = class_start + tl.arange(0, BLOCK_C)
                in_class = cols < num_classes
                mask = row_mask[:, None] & in_class[None, :]
                z, a, b, multiplier, zhat = _calibrated_block(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                              beta_ptr, s, cols, in_class, mask, ACC_FP64)
                probs = tl.exp(zhat - log_normalizer[:, None])
                is_target = (cols[None, :] == target_class[:, None]).to(probs.dtype)
                dzhat = row_grad[:, None] * (probs - is_target)
                grad_confidence_acc = _calibration_vjp(
                    dzhat, z, a, b, s, multiplier, cols, in_class, mask,
                    grad_logits_ptr, grad_row_offsets, grad_stride_class, grad_confidence_acc,
                    class_partials_ptr, partial_offset, beta_slot_offset, tl.where(tile == pid, 0, num_classes),
                    GRAD_LOGITS, GRAD_ALPHA, GRAD_BETA, GRAD_CONFIDENCE,
                )
            if GRAD_CONFIDENCE:
                grad_confidence = tl.sum(grad_confidence_acc, axis=1)
                tl.store(grad_confidence_ptr + rows, grad_confidence.to(grad_confidence_ptr.dtype.element_ty),
                         mask=row_mask)
    if LOSS_MODE == 1:
        tl.store(loss_ptr + pid, tl.sum(loss_sum, axis=0))


@triton.jit
def _calibrate_kernel(
    logits_ptr, logits_stride_image, logits_stride_class, logits_stride_row,
    alpha_ptr, beta_ptr, confidence_ptr,
    out_ptr, out_stride_image, out_stride_class, out_stride_row,
    tiles_per_image, rows_per_image, num_classes,
    HAS_CONFIDENCE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """zhat = (1 + s*a) * z + s*b for one [BLOCK_R, BLOCK_C] tile (grid: row tiles x class blocks).

    Elementwise: one read and one write of the logits' bytes, in the logits' dtype and strides.
    """
    tile = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows, row_mask, image, pixel = _tile_rows(tile, tiles_per_image, rows_per_image, BLOCK_R)
    in_class = cols < num_classes
    mask = row_mask[:, None] & in_class[None, :]
    s = _row_confidence(confidence_ptr, rows, row_mask, HAS_CONFIDENCE, ACC_FP64, BLOCK_R)
    z, a, b, multiplier, zhat = _calibrated_block(logits_ptr, image * logits_stride_image + pixel * logits_stride_row,
                                                  logits_stride_class, alpha_ptr, beta_ptr, s, cols, in_class, mask,
                                                  ACC_FP64)
    out_offsets = (image * out_stride_image + pixel * out_stride_row)[:, None] + (cols.to(tl.int64) *
                                                                                 out_stride_class)[None, :]
    tl.store(out_ptr + out_offsets, zhat.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _calibrate_backward_kernel(
    grad_ptr, grad_stride_image, grad_stride_class, grad_stride_row,
    logits_ptr, logits_stride_image, logits_stride_class, logits_stride_row,
    alpha_ptr, beta_ptr, confidence_ptr,
    grad_logits_ptr, grad_logits_stride_image, grad_logits_stride_class, grad_logits_stride_row,
    grad_confidence_ptr, class_partials_ptr,
    num_tiles, tiles_per_image, rows_per_image, num_classes,
    HAS_CONFIDENCE: tl.constexpr, GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr,
    GRAD_CONFIDENCE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward of calibrate for an incoming dL/dzhat: the chain rule of _calibration_vjp per tile.

    One read of grad and of the logits, one write of dlogits when wanted; ds is a per-row sum over
    the classes (hence a program owns whole rows and loops over class blocks), da/db go to
    per-program partial rows as in the loss kernel.
    """
    pid = tl.program_id(0).to(tl.int64)
    partial_offset = pid * num_classes
    beta_slot_offset = GRAD_ALPHA * tl.num_programs(0).to(tl.int64) * num_classes
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows, row_mask, image, pixel = _tile_rows(tile, tiles_per_image, rows_per_image, BLOCK_R)
        row_offsets = image * logits_stride_image + pixel * logits_stride_row
        grad_row_offsets = image * grad_stride_image + pixel * grad_stride_row
        grad_logits_row_offsets = image * grad_logits_stride_image + pixel * grad_logits_stride_row
        s = _row_confidence(confidence_ptr, rows, row_mask, HAS_CONFIDENCE, ACC_FP64, BLOCK_R)
        grad_confidence_acc = _to_acc(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), ACC_FP64)
        for class_start in range(0, num_classes, BLOCK_C):
            cols = class_start + tl.arange(0, BLOCK_C)
            in_class = cols < num_classes
            mask = row_mask[:, None] & in_class[None, :]
            z, a, b, multiplier, zhat = _calibrated_block(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                          beta_ptr, s, cols, in_class, mask, ACC_FP64)
            grad_ptrs = grad_ptr + grad_row_offsets[:, None] + (cols.to(tl.int64) * grad_stride_class)[None, :]
            dzhat = _to_acc(tl.load(grad_ptrs, mask=mask, other=0.0), ACC_FP64)
            grad_confidence_acc = _calibration_vjp(
                dzhat, z, a, b, s, multiplier, cols, in_class, mask,
                grad_logits_ptr, grad_logits_row_offsets, grad_logits_stride_class, grad_confidence_acc,
                class_partials_ptr, partial_offset, beta_slot_offset, tl.where(tile == pid, 0, num_classes),
                GRAD_LOGITS, GRAD_ALPHA, GRAD_BETA, GRAD_CONFIDENCE,
            )
        if GRAD_CONFIDENCE:
            grad_confidence = tl.sum(grad_confidence_acc, axis=1)
            tl.store(grad_confidence_ptr + rows, grad_confidence.to(grad_confidence_ptr.dtype.element_ty),
                     mask=row_mask)
