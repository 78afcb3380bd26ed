"""The warp-row kernel of the DisAlign loss: every row's classes in one warp's (or a few warps')
registers, so that the per-row softmax reductions stay inside the warp and the per-class dalpha /
dbeta sums stay inside each thread (issue 9: the SASS budget of benches/sass_budget.py).

The logits are seen as in kernels.py, a (B, C, S) view of B images of S rows, but a tile is a 4-d
register block [G, RW, LW, V] of RW rows (one per warp group) x all C classes:

* class-contiguous rows (stride_class == 1: (N, C) logits, channels-last maps), PIXEL = False:
  class c = g * (LW * V) + lw * V + v and row = rw: each thread holds G vectors of V consecutive
  classes (one 4..16-byte load each) of one row; a row spans LW lanes (LW / 32 warps);
* pixel-contiguous rows (stride_row == 1: NCHW maps read in place), PIXEL = True:
  class c = g * LW + lw and pixel = rw * V + v: each thread holds V consecutive pixels (one vector
  load) of G classes; a warp covers LW = 32 classes x V pixels, the RW warps RW x V pixels.

Triton's coalescing pass gives such a block the layout sizePerThread [1, 1, 1, V], lanes along
LW, warps along LW (when LW > 32) and then RW, so that

* a row reduction (max, sum of exponentials, dconfidence) is in-thread over G (and V) plus a warp
  shuffle tree over LW (shared memory only when a row spans several warps: LW > 32);
* dalpha / dbeta accumulate element-wise in registers across all the tiles of a program (no
  reduction per tile, no partial-row traffic per tile), reduced over the rows once at the end and
  written to the program's partial row (deterministic: fixed order, no atomics);
* every element is loaded once and exponentiated once (p = 2^(x - max) / sum stays in registers);
* alpha / beta come from L1 per tile in the logits' layout (class-contiguous: no layout conversion,
  no 2 x G x V registers held across tiles) or, pixel-contiguous, are loaded once per program.

The classes are a body of G groups (unmasked along the classes when G * group <= C) plus an
optional masked tail of GT groups (TAIL), so C = 1231 or 150 pads 4-7%, not up to 2x.

Semantics (targets, poisoned rows, LOSS_MODE, grad_scale) are those of kernels._cross_entropy_kernel.
"""

import triton
import triton.language as tl

from .kernels import LN2, LOG2E, _row_confidence, _to_acc


@triton.jit
def _aligned(value, ALIGN: tl.constexpr):
    """value, which ALIGN divides (the host checks it), written so that the compiler's alignment
    analysis sees the divisor (vector loads); tl.multiple_of hints on these 4-d / size-1 tensors
    crash Triton 3.8's AxisInfo (divisibility / contiguity rank mismatch)."""
    return value // ALIGN * ALIGN


@triton.jit
def _class_index(START: tl.constexpr, G: tl.constexpr, LW: tl.constexpr, VC: tl.constexpr):
    """([G, 1, LW, 1] first class of each thread's vector, [G, 1, LW, VC] class of each element)."""
    g = tl.arange(0, G)[:, None, None, None]
    lw = tl.arange(0, LW)[None, None, :, None]
    vc = tl.arange(0, VC)[None, None, None, :]
    first = START + g * (LW * VC) + lw * VC
    return first, first + vc


@triton.jit
def _thread_sum(x, PIXEL: tl.constexpr):
    """In-thread part of a sum over the classes of a [G, RW, LW, V] block: [1, RW, LW, 1 or V].
    Body and tail are combined at this stage, so that the warp shuffles (tl.sum over axis 2) run
    once per row and reduction, on one value per row (V per thread for NCHW pixels)."""
    if not PIXEL:
        x = tl.sum(x, axis=3, keep_dims=True)
    return tl.sum(x, axis=0, keep_dims=True)


@triton.jit
def _thread_max(x, PIXEL: tl.constexpr):
    if not PIXEL:
        x = tl.max(x, axis=3, keep_dims=True)
    return tl.max(x, axis=0, keep_dims=True)


@triton.jit
def _column_reduce(x, PIXEL: tl.constexpr):
    """Sum over the rows of a [G, RW, LW, V] block, keeping dims: [G, 1, LW, V or 1]."""
    x = tl.sum(x, axis=1, keep_dims=True)
    if PIXEL:
        x = tl.sum(x, axis=3, keep_dims=True)
    return x


@triton.jit
def _load_params(alpha_ptr, beta_ptr, cls, SHAPE: tl.constexpr, ACC_FP64: tl.constexpr):
    """alpha, beta of each element's (clamped, see _clamped) class, broadcast to the block's shape
    so that they load in the logits' layout (no shared-memory conversion)."""
    offsets = tl.broadcast_to(cls, SHAPE)
    return _to_acc(tl.load(alpha_ptr + offsets), ACC_FP64), _to_acc(tl.load(beta_ptr + offsets), ACC_FP64)


@triton.jit
def _clamped(cls_first, num_classes, MASKED: tl.constexpr, VC: tl.constexpr, SCALAR_ROWS: tl.constexpr):
    """Class of every element for the loads: a thread vector past C reads the last vector of
    classes instead (VC divides C: the host checks it), so no load needs a mask, a zero fill or a
    predicate; such elements get zhat = -inf, hence p = 0 and zero gradients (the same class's
    own element already gives whatever inf/nan its z carries).

    SCALAR_ROWS (class-contiguous rows with V = 1, e.g. C = 1231: rows start unaligned): every
    class goes through the minimum, also in the body where it changes nothing, so that the
    compiler sees no contiguity along the lanes; otherwise Triton's coalescing gives the logits
    (and dlogits) 4 consecutive classes per thread and converts every tile to the block's layout
    through shared memory. Loop-invariant: no cost per tile."""
    if MASKED or SCALAR_ROWS:
        cls_first = tl.minimum(cls_first, _aligned(num_classes, VC) - VC)
    return cls_first + tl.arange(0, VC)[None, None, None, :]


@triton.jit
def _load_block(logits_ptr, row_offsets, class_offsets, row_mask, cls_first, num_classes, a, b, s,
                MASKED: tl.constexpr, ROWS_MASKED: tl.constexpr, ACC_FP64: tl.constexpr):
    """(z, t, zhat) of one block: t = a*z + b and zhat = (1 + s*a) * z + s*b (paper eq. 6), in this
    multiplier form, which keeps zhat = -inf for z = -inf. Classes past C get zhat = -inf; rows past
    the end (ROWS_MASKED only) read z = 0. t is used where alpha / beta are held for the program
    (HOIST); otherwise the kernel reloads them for the gradients (RELOAD) and t here is dead code."""
    ptrs = logits_ptr + (row_offsets + class_offsets)
    if ROWS_MASKED:
        z = _to_acc(tl.load(ptrs, mask=row_mask, other=0.0), ACC_FP64)
    else:
        z = _to_acc(tl.load(ptrs), ACC_FP64)
    zhat = (1.0 + s * a) * z + s * b
    if MASKED:
        zhat = tl.where(cls_first < num_classes, zhat, float("-inf"))
    return z, a * z + b, zhat


@triton.jit
def _reload(logits_ptr, row_offsets, class_offsets, row_mask, ROWS_MASKED: tl.constexpr, ACC_FP64: tl.constexpr):
    ptrs = logits_ptr + (row_offsets + class_offsets)
    if ROWS_MASKED:
        return _to_acc(tl.load(ptrs, mask=row_mask, other=0.0), ACC_FP64)
    return _to_acc(tl.load(ptrs), ACC_FP64)


@triton.jit
def _block_grads(e, z, t, a, s, target_class, row_grad, row_grad_over_sum, da, db, ds,
                 grad_logits_ptr, grad_row_offsets, grad_class_offsets, row_mask, cls_first, num_classes,
                 MASKED: tl.constexpr, GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr,
                 GRAD_BETA: tl.constexpr, GRAD_CONFIDENCE: tl.constexpr, SHARED_VQ: tl.constexpr):
    """With q = p - onehot(y) and g = row_grad: gq = g * q = e * (g / sum) - g * [c == y];
    dz = gq * (1 + s*a) (stored), ds += gq * t (t = a*z + b; in-thread, reduced per row by the caller),
    da += s * gq * z, db += s * gq (element-wise accumulators across tiles)."""
    # class == y as (first class of the thread's vector) == y - v: G + V live integers per thread,
    # not G x V class indices.
    gq = e * row_grad_over_sum - tl.where(cls_first == target_class, row_grad, 0.0)
    if GRAD_LOGITS:
        grad_ptrs = grad_logits_ptr + (grad_row_offsets + grad_class_offsets)
        # gq * (1 + s*a); as gq + (s*gq)*a (s*gq is vq below) it is one instruction less, but it
        # changes ptxas's register allocation at its 255 limit: that form spills for rows in one
        # warp (cls-imagenet bf16), the other for rows over 8 warps (cls-inat bf16), so each
        # takes the form that does not (benches/sass_triton.py, tests: no spills).
        if SHARED_VQ:
            grad_z = (gq + (s * gq) * a).to(grad_logits_ptr.dtype.element_ty)
        else:
            grad_z = (gq * (1.0 + s * a)).to(grad_logits_ptr.dtype.element_ty)
        if MASKED:  # rows: only the tile's own (see the kernel: the last tile of an image overlaps)
            tl.store(grad_ptrs, grad_z, mask=row_mask & (cls_first < num_classes))
        else:
            tl.store(grad_ptrs, grad_z, mask=row_mask)
    if GRAD_CONFIDENCE:
        ds += gq * t
    vq = s * gq
    if GRAD_ALPHA:
        da += vq * z
    if GRAD_BETA:
        db += vq
    return da, db, ds


@triton.jit
def _store_partial(ptr, acc, cls_first, cls, num_classes, MASKED: tl.constexpr, PIXEL: tl.constexpr):
    column = _column_reduce(acc, PIXEL)
    if MASKED:
        tl.store(ptr + cls, column, mask=cls_first < num_classes)
    else:
        tl.store(ptr + cls, column)


@triton.jit
def _warp_rows_kernel(
    logits_ptr, logits_stride_image, logits_stride_class, logits_stride_row,
    target_ptr, alpha_ptr, beta_ptr, confidence_ptr, weight_ptr,
    grad_scale_ptr, grad_scale_stride,
    loss_ptr,
    grad_logits_ptr, grad_stride_image, grad_stride_class, grad_stride_row,
    grad_confidence_ptr, class_partials_ptr, partial_stride,
    num_tiles, tiles_per_image, rows_per_image, num_classes, ignore_index,
    HAS_CONFIDENCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, LOSS_MODE: tl.constexpr,
    GRAD_LOGITS: tl.constexpr, GRAD_ALPHA: tl.constexpr, GRAD_BETA: tl.constexpr, GRAD_CONFIDENCE: tl.constexpr,
    ACC_FP64: tl.constexpr, PIXEL: tl.constexpr, G: tl.constexpr, GT: tl.constexpr, RW: tl.constexpr,
    LW: tl.constexpr, V: tl.constexpr, BODY_MASKED: tl.constexpr, ALIGN: tl.constexpr, ROWS_MASKED: tl.constexpr,
    HOIST: tl.constexpr,
):
    """Fused calibration + softmax + weighted cross entropy and its gradients, one sweep, one exp2
    per element. Programs loop over tiles pid, pid + num_programs, ... (persistent grid, so the
    da/db partial rows are bounded by the grid). ALIGN divides every row / image / class stride
    that is not 1 (the host checks it), so that vector loads are provably aligned.

    Unless ROWS_MASKED (an image of fewer rows than a tile), the last tile of an image is shifted
    back to end at the image's last row: its loads need no row mask (no zero fill, no predicates,
    vector loads of NCHW pixels), and the rows it shares with the previous tile are not its own
    (row_mask False: no loss, zero gradient, nothing stored), so every row counts once."""
    WANT_GRADS: tl.constexpr = GRAD_LOGITS or GRAD_ALPHA or GRAD_BETA or GRAD_CONFIDENCE
    TAIL: tl.constexpr = GT > 0
    VC: tl.constexpr = 1 if PIXEL else V  # classes per thread vector
    VR: tl.constexpr = V if PIXEL else 1  # rows per thread vector
    ROWS: tl.constexpr = RW * VR  # rows per tile
    SHAPE: tl.constexpr = [G, RW, LW, V]
    TSHAPE: tl.constexpr = [GT if TAIL else 1, RW, LW, V]
    pid = tl.program_id(0).to(tl.int64)
    partial_offset = pid * partial_stride
    beta_slot_offset = GRAD_ALPHA * tl.num_programs(0).to(tl.int64) * partial_stride

    # Loop-invariant class indices and offsets (int64: C x H x W may exceed 2^31).
    cls_first, cls = _class_index(0, G, LW, VC)
    t_first, t_cls = _class_index(G * LW * VC, GT if TAIL else 1, LW, VC)
    SCALAR_ROWS: tl.constexpr = not PIXEL and V == 1
    load_cls = _clamped(cls_first, num_classes, BODY_MASKED, VC, SCALAR_ROWS)
    t_load_cls = _clamped(t_first, num_classes, True, VC, SCALAR_ROWS)
    if PIXEL:
        class_offsets = load_cls.to(tl.int64) * _aligned(logits_stride_class, ALIGN)
        t_class_offsets = t_load_cls.to(tl.int64) * _aligned(logits_stride_class, ALIGN)
        grad_class_offsets = cls.to(tl.int64) * _aligned(grad_stride_class, ALIGN)
        t_grad_class_offsets = t_cls.to(tl.int64) * _aligned(grad_stride_class, ALIGN)
    else:
        class_offsets, t_class_offsets = load_cls, t_load_cls
        # dlogits: at the real classes (the stores are masked to C), through the clamped index where
        # that hides the lanes' contiguity (then equal in range).
        grad_class_offsets, t_grad_class_offsets = (load_cls, t_load_cls) if SCALAR_ROWS else (cls, t_cls)
    row_in_tile = (tl.arange(0, RW)[None, :, None, None] * VR + tl.arange(0, VR)[None, None, None, :])
    # HOIST (the planner's WarpConfig.holds_params): alpha / beta loaded once per program and held;
    # otherwise from L1 per tile, again for the gradients instead of a and t held across the softmax.
    RELOAD: tl.constexpr = not HOIST
    if HOIST:
        a_b, b_b = _load_params(alpha_ptr, beta_ptr, load_cls, SHAPE, ACC_FP64)
        if TAIL:
            a_t, b_t = _load_params(alpha_ptr, beta_ptr, t_load_cls, TSHAPE, ACC_FP64)

    loss_sum = _to_acc(tl.zeros([1, RW, 1, VR], tl.float32), ACC_FP64)
    da_b = _to_acc(tl.zeros(SHAPE, tl.float32), ACC_FP64)
    db_b = _to_acc(tl.zeros(SHAPE, tl.float32), ACC_FP64)
    da_t = _to_acc(tl.zeros(TSHAPE, tl.float32), ACC_FP64)
    db_t = _to_acc(tl.zeros(TSHAPE, tl.float32), ACC_FP64)
    # Tile and image indices in int32 (fewer tiles than 2^31 rows; the int64 division costs ~30
    # instructions per tile), widened before they address anything.
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        image32 = tile // tiles_per_image
        start = ((tile - image32 * tiles_per_image) * ROWS).to(tl.int64)
        image = image32.to(tl.int64)
        if ROWS_MASKED:
            pixel = start + row_in_tile  # [1, RW, 1, VR]
            row_mask = pixel < rows_per_image
        else:
            pixel = tl.minimum(start, _aligned(rows_per_image, ALIGN if PIXEL else 1) - ROWS) + row_in_tile
            row_mask = pixel >= start
        rows = image * rows_per_image + pixel
        if PIXEL:
            row_offsets = image * _aligned(logits_stride_image, ALIGN) + pixel
            grad_row_offsets = image * _aligned(grad_stride_image, ALIGN) + pixel
        else:
            row_offsets = image * _aligned(logits_stride_image, ALIGN) + pixel * _aligned(logits_stride_row, ALIGN)
            grad_row_offsets = image * _aligned(grad_stride_image, ALIGN) + pixel * _aligned(grad_stride_row, ALIGN)
        target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)  # owned rows only
        counted = row_mask & (target != ignore_index)
        in_range = (target >= 0) & (target < num_classes)
        valid = counted & in_range
        target_class = tl.where(valid, target, -1).to(tl.int32)  # range-checked: fits; others match no class
        target_v = target_class - tl.arange(0, VC)[None, None, None, :]  # see _block_grads
        safe_class = tl.where(valid, target, 0)
        if HAS_CONFIDENCE:
            s = _to_acc(tl.load(confidence_ptr + rows, mask=row_mask, other=1.0), ACC_FP64)
        else:
            s = _to_acc(tl.full([1, RW, 1, VR], 1.0, tl.float32), ACC_FP64)
        if HAS_WEIGHT:
            row_weight = _to_acc(tl.load(weight_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
        else:
            row_weight = _to_acc(valid.to(tl.float32), ACC_FP64)
        row_weight = tl.where(counted & ~in_range, float("nan"), row_weight)  # poisoned row

        if not HOIST:
            a_b, b_b = _load_params(alpha_ptr, beta_ptr, load_cls, SHAPE, ACC_FP64)
            if TAIL:
                a_t, b_t = _load_params(alpha_ptr, beta_ptr, t_load_cls, TSHAPE, ACC_FP64)
        z_b, t_b, x_b = _load_block(logits_ptr, row_offsets, class_offsets, row_mask, cls_first, num_classes, a_b,
                                    b_b, s, BODY_MASKED, ROWS_MASKED, ACC_FP64)
        row_max = _thread_max(x_b, PIXEL)
        if TAIL:
            z_t, t_t, x_t = _load_block(logits_ptr, row_offsets, t_class_offsets, row_mask, t_first, num_classes,
                                        a_t, b_t, s, True, ROWS_MASKED, ACC_FP64)
            row_max = tl.maximum(row_max, _thread_max(x_t, PIXEL))
        row_max = tl.max(row_max, axis=2, keep_dims=True)
        # A row of -inf only keeps a finite shift, so that exp2 never sees inf - inf.
        shift = tl.where(row_max == float("-inf"), 0.0, row_max) * LOG2E
        e_b = tl.exp2(x_b * LOG2E - shift)
        sum_exp = _thread_sum(e_b, PIXEL)
        if TAIL:
            e_t = tl.exp2(x_t * LOG2E - shift)
            sum_exp += _thread_sum(e_t, PIXEL)
        sum_exp = tl.sum(sum_exp, axis=2, keep_dims=True)

        if LOSS_MODE != 2:
            z_y = _to_acc(tl.load(logits_ptr + row_offsets + safe_class * logits_stride_class, mask=valid,
                                  other=0.0), ACC_FP64)
            a_y = _to_acc(tl.load(alpha_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
            b_y = _to_acc(tl.load(beta_ptr + safe_class, mask=valid, other=0.0), ACC_FP64)
            target_logit = (1.0 + s * a_y) * z_y + s * b_y
            log_normalizer = (shift + tl.log2(sum_exp)) * LN2
            row_loss = tl.where(counted, row_weight * (log_normalizer - target_logit), 0.0)
            if LOSS_MODE == 0:
                tl.store(loss_ptr + rows, row_loss, mask=row_mask)
            else:
                loss_sum += row_loss

        if WANT_GRADS:
            row_scale = _to_acc(tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_mask, other=0.0),
                                ACC_FP64)
            # Ignored rows get exactly no gradient, also when "mean" has no valid row (scale 1/0).
            row_grad = tl.where(counted, row_weight * row_scale, 0.0)
            row_grad_over_sum = row_grad / sum_exp
            ds = tl.zeros_like(x_b)
            if RELOAD:
                a_b, b_b = _load_params(alpha_ptr, beta_ptr, load_cls, SHAPE, ACC_FP64)
                if GRAD_LOGITS:  # z too (L1): dz's pointers and values need the registers
                    z_b = _reload(logits_ptr, row_offsets, class_offsets, row_mask, ROWS_MASKED, ACC_FP64)
                t_b = a_b * z_b + b_b
            da_b, db_b, ds = _block_grads(e_b, z_b, t_b, a_b, s, target_v, row_grad, row_grad_over_sum,
                                          da_b, db_b, ds, grad_logits_ptr, grad_row_offsets, grad_class_offsets,
                                          row_mask, cls_first, num_classes, BODY_MASKED, GRAD_LOGITS, GRAD_ALPHA,
                                          GRAD_BETA, GRAD_CONFIDENCE, LW > 32)
            if GRAD_CONFIDENCE:
                grad_confidence = _thread_sum(ds, PIXEL)
            if TAIL:
                ds_t = tl.zeros_like(x_t)
                if RELOAD:
                    a_t, b_t = _load_params(alpha_ptr, beta_ptr, t_load_cls, TSHAPE, ACC_FP64)
                    if GRAD_LOGITS:
                        z_t = _reload(logits_ptr, row_offsets, t_class_offsets, row_mask, ROWS_MASKED, ACC_FP64)
                    t_t = a_t * z_t + b_t
                da_t, db_t, ds_t = _block_grads(e_t, z_t, t_t, a_t, s, target_v, row_grad,
                                                row_grad_over_sum, da_t, db_t, ds_t, grad_logits_ptr,
                                                grad_row_offsets, t_grad_class_offsets, row_mask, t_first,
                                                num_classes, True, GRAD_LOGITS, GRAD_ALPHA, GRAD_BETA,
                                                GRAD_CONFIDENCE, LW > 32)
                if GRAD_CONFIDENCE:
                    grad_confidence += _thread_sum(ds_t, PIXEL)
            if GRAD_CONFIDENCE:
                grad_confidence = tl.sum(grad_confidence, axis=2, keep_dims=True)
                tl.store(grad_confidence_ptr + rows, grad_confidence.to(grad_confidence_ptr.dtype.element_ty),
                         mask=row_mask)
    if LOSS_MODE == 1:
        tl.store(loss_ptr + pid, tl.sum(tl.reshape(loss_sum, [ROWS]), axis=0))
    # Every program has at least one tile, so its partial rows are written (no zero fill needed).
    if GRAD_ALPHA:
        _store_partial(class_partials_ptr + partial_offset, da_b, cls_first, cls, num_classes, BODY_MASKED, PIXEL)
        if TAIL:
            _store_partial(class_partials_ptr + partial_offset, da_t, t_first, t_cls, num_classes, True, PIXEL)
    if GRAD_BETA:
        _store_partial(class_partials_ptr + beta_slot_offset + partial_offset, db_b, cls_first, cls, num_classes,
                       BODY_MASKED, PIXEL)
        if TAIL:
            _store_partial(class_partials_ptr + beta_slot_offset + partial_offset, db_t, t_first, t_cls,
                           num_classes, True, PIXEL)
