"""Triton kernels of the DisAlign loss and calibration (docs/contract.md section 2), Liger-Kernel style.

The loss of class- or pixel-contiguous logits (every benchmark layout) runs warp_kernels.py's
warp-row kernel instead (docs/triton.md); _cross_entropy_kernel here serves the other layouts and
C above that kernel's reach, and the calibrate kernels serve every layout.

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

Out-of-range targets are never used as addresses. A row whose target is outside [0, C) and not
ignore_index is poisoned (the bad-target policy of the GPU backends): its loss, dlogits row and
contributions to dalpha/dbeta/dconfidence are NaN, and so is the "mean" denominator. On the CPU
the host raises IndexError before any launch (ops.py).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


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
    """Per-block sums of the "mean" denominator, read once before the loss kernel (8 bytes per row):

    stats[block] = sum of w[y] over valid rows (F.cross_entropy's rule), NaN when the block has a
    target outside [0, C) that is not ignore_index (the bad-target policy: such a row is poisoned).

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
    weight = tl.where(counted & ~in_range, float("nan"), weight)
    tl.store(stats_ptr + block, tl.sum(weight, axis=0))


@triton.jit
def _load_calibrated(logits_ptr, row_offsets, stride_class, alpha_ptr, beta_ptr, s, row_mask, class_start, num_classes,
                     WIDTH: tl.constexpr, MASKED: tl.constexpr, ACC_FP64: tl.constexpr):
    """One [BLOCK_R, WIDTH] block of classes from class_start: (cols, z, a, b, x = zhat * log2(e)).

    zhat = (1 + s*a) * z + s*b (paper eq. 6) in this multiplier form, which keeps zhat = -inf for
    z = -inf (z + s*(a*z + b) would give inf - inf); the softmax runs in base 2 (exp2 is the
    hardware's exponential), so x = (log2(e) + s*a*log2(e)) * z + s*b*log2(e). MASKED (the tail
    block only) masks the classes past C and sets their x to -inf; the body is unmasked, so its
    loads vectorise. Rows past the end are masked (constant along the class axis: no cost to
    vectorisation) and read as z = 0, which keeps them finite.
    """
    cols = class_start + tl.arange(0, WIDTH)
    ptrs = logits_ptr + row_offsets[:, None] + (cols.to(tl.int64) * stride_class)[None, :]
    if MASKED:
        in_class = cols < num_classes
        z = _to_acc(tl.load(ptrs, mask=row_mask[:, None] & in_class[None, :], other=0.0), ACC_FP64)
        a = _to_acc(tl.load(alpha_ptr + cols, mask=in_class, other=0.0), ACC_FP64)
        b = _to_acc(tl.load(beta_ptr + cols, mask=in_class, other=0.0), ACC_FP64)
    else:
        z = _to_acc(tl.load(ptrs, mask=row_mask[:, None], other=0.0), ACC_FP64)
        a = _to_acc(tl.load(alpha_ptr + cols), ACC_FP64)
        b = _to_acc(tl.load(beta_ptr + cols), ACC_FP64)
    x = (LOG2E + s[:, None] * (a * LOG2E)[None, :]) * z + s[:, None] * (b * LOG2E)[None, :]
    if MASKED:
        x = tl.where(in_class[None, :], x, float("-inf"))
    return cols, z, a, b, x


@triton.jit
def _online_max_sum(row_max, sum_exp, x):
    """Folds a block of base-2 logits into the running (max, sum of 2^(x - max)) of each row: one
    exp2 per element, one per row for the rescale. Rows that have seen only -inf keep a finite
    shift, so exp2 never sees inf - inf."""
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    sum_exp = sum_exp * tl.exp2(row_max - shift) + tl.sum(tl.exp2(x - shift[:, None]), axis=1)
    return new_max, sum_exp


@triton.jit
def _lane_online_max_sum(lane_max, lane_sum, x):
    """Per lane (row x class slot) running max / sum of 2^(x - max), with one exp2 per element and
    no cross-thread reduction inside the class loop: a new maximum rescales the sum by 2^(old - new),
    an element below it adds 2^(x - max), and both are the same exp2(-|x - max|). lane_max starts at
    -FLT_MAX, not -inf, so that -inf logits (and masked classes) add exactly 0 instead of inf - inf."""
    d = x - lane_max
    e = tl.exp2(-tl.abs(d))
    lane_sum = tl.where(d > 0, lane_sum * e + 1.0, lane_sum + e)
    return tl.maximum(lane_max, x), lane_sum


@triton.jit
def _rows_from_lanes(lane_max, lane_sum):
    """(row max, row sum of 2^(x - row max)) from the per-lane accumulators: once per tile."""
    row_max = tl.max(lane_max, axis=1)
    return row_max, tl.sum(lane_sum * tl.exp2(lane_max - row_max[:, None]), axis=1)


@triton.jit
def _block_vjp(probs, cols, z, a, b, s, row_mask, target_class, row_grad, row_grad_s, num_classes,
               grad_logits_ptr, grad_row_offsets, grad_stride_class,
               MASKED: tl.constexpr, GRAD_LOGITS: tl.constexpr, GRAD_CONFIDENCE: tl.constexpr):
    """Gradients of one block of classes given the softmax `probs` (zero past C). With
    q = p - onehot(y), g = row_grad = grad_scale * w[y] (NaN for a poisoned row), v = row_grad_s = g*s:

        dzhat = g * q                          (dL/dzhat)
        dz    = dzhat * (1 + s*a)              stored, in the logits' dtype
        ds    = g * sum_classes q * (a*z + b)  returned per element without the factor g (the
                                               caller sums the classes and scales once per row)
        da[j] = sum_rows v * q * z             returned (column sums of the block)
        db[j] = sum_rows v * q                 returned

    Rows past the end have g = 0 and finite probs, so they add exact zeros.
    """
    q = tl.where(cols[None, :] == target_class[:, None], probs - 1.0, probs)
    if GRAD_LOGITS:
        grad_ptrs = grad_logits_ptr + grad_row_offsets[:, None] + (cols.to(tl.int64) * grad_stride_class)[None, :]
        grad_z = (row_grad[:, None] * q * (1.0 + s[:, None] * a[None, :])).to(grad_logits_ptr.dtype.element_ty)
        if MASKED:
            tl.store(grad_ptrs, grad_z, mask=row_mask[:, None] & (cols < num_classes)[None, :])
        else:
            tl.store(grad_ptrs, grad_z, mask=row_mask[:, None])
    vq = row_grad_s[:, None] * q
    if GRAD_CONFIDENCE:
        ds = q * (a[None, :] * z + b[None, :])
    else:
        ds = tl.zeros_like(q)
    return ds, tl.sum(vq * z, axis=0), tl.sum(vq, axis=0)


@triton.jit
def _add_to_partial_rows(partials_ptr, partial_offset, beta_slot_offset, da, db, first_tile, cols, num_classes,
                         MASKED: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr):
    """Adds a block's da/db column sums to this program's partial rows.

    partials_ptr is a [slots, programs, partial_stride] buffer: da in slot 0 when wanted, db in the
    next (beta_slot_offset). A program's row belongs to it alone, so the read-modify-write needs no
    atomics and the host's final sum over programs, in a fixed order, is deterministic; the load and
    the store use the same pointers, so one thread owns an element in both. On the program's first
    tile the (uninitialised) row is not added (first_tile), so the buffer needs no zero fill.
    """
    if GRAD_ALPHA:
        _add_to_partial_row(partials_ptr + partial_offset + cols, da, first_tile, cols, num_classes, MASKED)
    if GRAD_BETA:
        _add_to_partial_row(partials_ptr + beta_slot_offset + partial_offset + cols, db, first_tile, cols,
                            num_classes, MASKED)


@triton.jit
def _add_to_partial_row(ptrs, column_sum, first_tile, cols, num_classes, MASKED: tl.constexpr):
    if MASKED:
        in_class = cols < num_classes
        previous = tl.load(ptrs, mask=in_class, other=0.0)
        tl.store(ptrs, tl.where(first_tile, 0.0, previous) + column_sum, mask=in_class)
    else:
        previous = tl.load(ptrs)
        tl.store(ptrs, tl.where(first_tile, 0.0, previous) + column_sum)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_stride_image, logits_stride_class, logits_stride_row,
    target_ptr, alpha_ptr, beta_ptr, confidence_ptr, weight_ptr,
    grad_scale_ptr, grad_scale_stride,
    loss_ptr,
    grad_logits_ptr, grad_stride_image, grad_stride_class, grad_stride_row,
    grad_confidence_ptr, class_partials_ptr, partial_stride,
    num_tiles, tiles_per_image, rows_per_image, num_classes, ignore_index,
    HAS_CONFIDENCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, LOSS_MODE: tl.constexpr,
    GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr, GRAD_CONFIDENCE: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TAIL_C: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_BODY: tl.constexpr, ROW_ALIGN: tl.constexpr, CLASS_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Fused calibration + softmax + weighted cross entropy, and its gradients, in one pass.

    Programs loop over tiles pid, pid + num_programs, ... (so the da/db partial rows are bounded by
    the grid, not by N). A tile is BLOCK_R rows; its classes are the body, whole blocks of BLOCK_C
    loaded without a class mask, then a masked tail of TAIL_C >= C mod BLOCK_C (0: none).

    Loss of a valid row: w[y] * (lse - zhat[y]); zhat[y] is gathered per row (one load at a
    range-checked address), not selected out of every block. Gradient, with p = softmax(zhat):

        dL/dzhat = g * w[y] * (p - onehot(y)),   g = grad_scale[row]

    and the chain rule through the calibration in _block_vjp.

    RESIDENT (C fits one body block, when HAS_BODY, plus the tail: every class of the tile stays in registers):
    one sweep, one exp2 per element (p = 2^(x - max) / sum). Otherwise two sweeps: an online
    max / sum-exp over the blocks, then the gradient sweep re-reads the tile from L1/L2 (a program
    touched it a moment ago) and recomputes 2^(x - lse): two exp2 per element, the price of
    classes too many to keep on chip (C = 8142: 16 rows x 16 KB in bf16).

    Targets outside [0, C) that are not ignore_index are never used as addresses: such a row is
    poisoned (weight NaN), so its loss, dlogits row and contributions to da/db/ds are NaN.

    LOSS_MODE: 0 = store the per-row loss (reduction "none"); 1 = store one partial sum per program
    (reduction "mean"/"sum", reduced by the host in a fixed order: deterministic, no atomics);
    2 = no loss (the backward of reduction "none", where grad_scale is the per-row grad_loss).
    """
    WANT_GRADS: tl.constexpr = GRAD_LOGITS or GRAD_ALPHA or GRAD_BETA or GRAD_CONFIDENCE
    pid = tl.program_id(0).to(tl.int64)
    partial_offset = pid * partial_stride
    beta_slot_offset = GRAD_ALPHA * tl.num_programs(0).to(tl.int64) * partial_stride
    num_classes = tl.multiple_of(num_classes, CLASS_ALIGN)
    if RESIDENT:
        body_end = BLOCK_C if HAS_BODY else 0
    else:
        body_end = num_classes - num_classes % BLOCK_C
    loss_sum = _to_acc(tl.zeros([BLOCK_R], tl.float32), ACC_FP64)
    # Resident tiles cover every class, so a program's da/db column sums stay in registers across
    # its tiles and reach its partial rows once, at the end (no per-tile read-modify-write).
    if RESIDENT:
        da_tail = _to_acc(tl.zeros([TAIL_C], tl.float32), ACC_FP64)
        db_tail = _to_acc(tl.zeros([TAIL_C], tl.float32), ACC_FP64)
    if RESIDENT and HAS_BODY:
        da_body = _to_acc(tl.zeros([BLOCK_C], tl.float32), ACC_FP64)
        db_body = _to_acc(tl.zeros([BLOCK_C], tl.float32), ACC_FP64)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rows, row_mask, image, pixel = _tile_rows(tile, tiles_per_image, rows_per_image, BLOCK_R)
        row_offsets = tl.multiple_of(image * logits_stride_image + pixel * logits_stride_row, ROW_ALIGN)
        grad_row_offsets = tl.multiple_of(image * grad_stride_image + pixel * grad_stride_row, ROW_ALIGN)
        target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        counted = row_mask & (target != ignore_index)
        in_range = (target >= 0) & (target < num_classes)
        valid = counted & in_range
        # Class ids fit in int32 once range-checked; other rows match no class.
        target_class = tl.where(valid, target, -1).to(tl.int32)
        safe_class = tl.where(valid, target, 0)
        s = _row_confidence(confidence_ptr, rows, row_mask, HAS_CONFIDENCE, ACC_FP64, BLOCK_R)
        if HAS_WEIGHT:
            row_weight = _to_acc(tl.load(weight_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
        else:
            row_weight = _to_acc(valid.to(tl.float32), ACC_FP64)
        row_weight = tl.where(counted & ~in_range, float("nan"), row_weight)

        row_max = _to_acc(tl.full([BLOCK_R], float("-inf"), tl.float32), ACC_FP64)
        sum_exp = _to_acc(tl.zeros([BLOCK_R], tl.float32), ACC_FP64)
        if RESIDENT:
            if HAS_BODY:
                cols_b, z_b, a_b, b_b, x_b = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                              beta_ptr, s, row_mask, 0, num_classes, BLOCK_C, False,
                                                              ACC_FP64)
                row_max = tl.max(x_b, axis=1)
            cols_t, z_t, a_t, b_t, x_t = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                          beta_ptr, s, row_mask, body_end, num_classes, TAIL_C, True,
                                                          ACC_FP64)
            row_max = tl.maximum(row_max, tl.max(x_t, axis=1))
            shift = tl.where(row_max == float("-inf"), 0.0, row_max)
            e_t = tl.exp2(x_t - shift[:, None])
            sum_exp = tl.sum(e_t, axis=1)
            if HAS_BODY:
                e_b = tl.exp2(x_b - shift[:, None])
                sum_exp += tl.sum(e_b, axis=1)
            row_max = shift
        else:
            if ACC_FP64:
                lane_max = tl.full([BLOCK_R, BLOCK_C], -1.7976931348623157e308, tl.float64)
            else:
                lane_max = tl.full([BLOCK_R, BLOCK_C], -3.4028234663852886e38, tl.float32)
            lane_sum = _to_acc(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), ACC_FP64)
            for class_start in tl.range(0, body_end, BLOCK_C, num_stages=NUM_STAGES):  # SASS_LOOP(sweep1, tile)
                _, _, _, _, x = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr, beta_ptr,
                                                 s, row_mask, class_start, num_classes, BLOCK_C, False, ACC_FP64)
                lane_max, lane_sum = _lane_online_max_sum(lane_max, lane_sum, x)
            row_max, sum_exp = _rows_from_lanes(lane_max, lane_sum)
            if TAIL_C > 0:
                _, _, _, _, x = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr, beta_ptr,
                                                 s, row_mask, body_end, num_classes, TAIL_C, True, ACC_FP64)
                row_max, sum_exp = _online_max_sum(row_max, sum_exp, x)
        log2_normalizer = row_max + tl.log2(sum_exp)

        if LOSS_MODE != 2:
            z_y = _to_acc(tl.load(logits_ptr + row_offsets + safe_class * logits_stride_class, mask=valid, other=0.0),
                          ACC_FP64)
            a_y = _to_acc(tl.load(alpha_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
            b_y = _to_acc(tl.load(beta_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
            target_logit = (1.0 + s * a_y) * z_y + s * b_y
            row_loss = tl.where(counted, row_weight * (log2_normalizer * LN2 - target_logit), 0.0)
            if LOSS_MODE == 0:
                tl.store(loss_ptr + rows, row_loss, mask=row_mask)
            else:
                loss_sum += row_loss

        if WANT_GRADS:
            row_scale = _to_acc(tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_mask, other=0.0),
                                ACC_FP64)
            # Ignored rows get exactly no gradient, also when "mean" has no valid row (scale 1/0).
            row_grad = tl.where(counted, row_weight * row_scale, 0.0)
            row_grad_s = row_grad * s
            first_tile = tile == pid
            if RESIDENT:
                inv_sum = 1.0 / sum_exp
                ds, da, db = _block_vjp(e_t * inv_sum[:, None], cols_t, z_t, a_t, b_t, s, row_mask, target_class,
                                        row_grad, row_grad_s, num_classes, grad_logits_ptr, grad_row_offsets,
                                        grad_stride_class, True, GRAD_LOGITS, GRAD_CONFIDENCE)
                grad_confidence = tl.sum(ds, axis=1)
                da_tail += da
                db_tail += db
                if HAS_BODY:
                    ds, da, db = _block_vjp(e_b * inv_sum[:, None], cols_b, z_b, a_b, b_b, s, row_mask, target_class,
                                            row_grad, row_grad_s, num_classes, grad_logits_ptr, grad_row_offsets,
                                            grad_stride_class, False, GRAD_LOGITS, GRAD_CONFIDENCE)
                    grad_confidence += tl.sum(ds, axis=1)
                    da_body += da
                    db_body += db
            else:
                grad_confidence_lanes = _to_acc(tl.zeros([BLOCK_R, BLOCK_C], tl.float32), ACC_FP64)
                for class_start in tl.range(0, body_end, BLOCK_C, num_stages=NUM_STAGES):  # SASS_LOOP(sweep2, tile)
                    cols, z, a, b, x = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                        beta_ptr, s, row_mask, class_start, num_classes, BLOCK_C,
                                                        False, ACC_FP64)
                    ds, da, db = _block_vjp(tl.exp2(x - log2_normalizer[:, None]), cols, z, a, b, s, row_mask,
                                            target_class, row_grad, row_grad_s, num_classes, grad_logits_ptr,
                                            grad_row_offsets, grad_stride_class, False, GRAD_LOGITS, GRAD_CONFIDENCE)
                    grad_confidence_lanes += ds
                    _add_to_partial_rows(class_partials_ptr, partial_offset, beta_slot_offset, da, db, first_tile,
                                         cols, num_classes, False, GRAD_ALPHA, GRAD_BETA)
                grad_confidence = tl.sum(grad_confidence_lanes, axis=1)
                if TAIL_C > 0:
                    cols, z, a, b, x = _load_calibrated(logits_ptr, row_offsets, logits_stride_class, alpha_ptr,
                                                        beta_ptr, s, row_mask, body_end, num_classes, TAIL_C, True,
                                                        ACC_FP64)
                    ds, da, db = _block_vjp(tl.exp2(x - log2_normalizer[:, None]), cols, z, a, b, s, row_mask,
                                            target_class, row_grad, row_grad_s, num_classes, grad_logits_ptr,
                                            grad_row_offsets, grad_stride_class, True, GRAD_LOGITS, GRAD_CONFIDENCE)
                    grad_confidence += tl.sum(ds, axis=1)
                    _add_to_partial_rows(class_partials_ptr, partial_offset, beta_slot_offset, da, db, first_tile,
                                         cols, num_classes, True, GRAD_ALPHA, GRAD_BETA)
            if GRAD_CONFIDENCE:
                grad_confidence *= row_grad
                tl.store(grad_confidence_ptr + rows, grad_confidence.to(grad_confidence_ptr.dtype.element_ty),
                         mask=row_mask)
    if LOSS_MODE == 1:
        tl.store(loss_ptr + pid, tl.sum(loss_sum, axis=0))
    if RESIDENT and WANT_GRADS:  # every program has at least one tile, so first_tile=True writes the row
        tail_cols = body_end + tl.arange(0, TAIL_C)
        _add_to_partial_rows(class_partials_ptr, partial_offset, beta_slot_offset, da_tail, db_tail, True,
                             tail_cols, num_classes, True, GRAD_ALPHA, GRAD_BETA)
        if HAS_BODY:
            _add_to_partial_rows(class_partials_ptr, partial_offset, beta_slot_offset, da_body, db_body, True,
                                 tl.arange(0, BLOCK_C), num_classes, False, GRAD_ALPHA, GRAD_BETA)


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
    grad_confidence_ptr, class_partials_ptr, partial_stride,
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
    partial_offset = pid * partial_stride
    beta_slot_offset = GRAD_ALPHA * tl.num_programs(0).to(tl.int64) * partial_stride
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
