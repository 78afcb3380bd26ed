"""Launch planning of the warp-row kernel (warp_kernels.py): its register block [G, RW, LW, V] from
the memory layout, or None where that kernel does not apply (then ops.py runs kernels.py's tile
kernel). Pure Python on plain ints, so the choices can be unit-tested without a GPU.

GPU choices, from the SASS of benches/sass_triton.py (registers, spills, instructions per element;
not yet timed on a GPU):

* V: 4 values (16 bytes of fp32, 8 of bf16) per vector load where the strides allow it. bf16 takes
  4, not 8, so that alpha / beta (fp32) load in the logits' layout without a conversion;
* a row spans as few warps as keep <= 32 values per thread in registers (32 x 4 bytes x (z, e, da,
  db) plus temporaries fit 255 registers without spills): one warp for C <= 1024 (fp32 / bf16),
  so the row reductions need no shared memory;
* with dlogits, a row over several warps keeps <= 24 values per thread: the shared-memory row
  reductions and the dlogits stores take the rest (32 spill on Triton 3.6 and 3.9 at C = 4096
  and 8142, not on 3.8); blocks that hold alpha / beta too (NCHW pixels, rows with V = 1, see
  WarpConfig.holds_params) keep <= 16 (C = 150 pixels and C = 1231 rows: 20 spill on Triton 3.6);
* a float64 value counts as 4: register pairs, and a software exp2 with its own temporaries
  (C = 1000 with 16 values over two warps spills on Triton 3.6);
* 8 warps per program, at most 8 per row: a 16-warp program has 128 registers per thread, and
  spills on every Triton tested (C = 12000: 100-400 bytes, stage 2 too). Rows longer than that
  (C > 8192 at V = 4, C = 8142 at V = 2 with dlogits) take the tile kernel.

Interpreter (CPU tests): 4 lanes and 4 warps, so that the small test shapes still cover several
rows per tile, ragged tiles, the masked tail, rows spanning several warps and the persistent loop.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class WarpLimits:
    lanes: int  # threads per warp (the LW unit)
    num_warps: int  # warps per program, unless one row needs more
    max_warps: int
    max_values: int  # per thread and block, body + tail
    max_values_with_dlogits: int  # the same when dlogits is written (more live registers)
    max_values_split_rows_with_dlogits: int  # ... and a row spans several warps
    max_values_held_params_with_dlogits: int  # ... where alpha / beta are held (holds_params)
    float64_cost: int  # float32 values one float64 value counts as
    vector_bytes: int
    max_vector: int  # values per vector


GPU_LIMITS = WarpLimits(lanes=32, num_warps=8, max_warps=8, max_values=32, max_values_with_dlogits=32,
                        max_values_split_rows_with_dlogits=24, max_values_held_params_with_dlogits=16,
                        float64_cost=4, vector_bytes=16, max_vector=4)
# No registers to run out of: the interpreter's limits only shape the tiles the CPU tests cover.
INTERPRETER_LIMITS = WarpLimits(lanes=4, num_warps=4, max_warps=8, max_values=32, max_values_with_dlogits=32,
                                max_values_split_rows_with_dlogits=32, max_values_held_params_with_dlogits=32,
                                float64_cost=2, vector_bytes=16, max_vector=4)


@dataclass(frozen=True)
class WarpConfig:
    pixel: bool  # pixel-contiguous (NCHW) rather than class-contiguous
    groups: int  # G: body class groups
    tail_groups: int  # GT: masked tail class groups, 0 = none
    row_warps: int  # RW: rows (pixel vectors) per tile, along warps (and lanes, for pixels)
    lane_width: int  # LW: lanes (x warps) along the classes
    vector: int  # V
    body_masked: bool  # the body itself runs past C (no tail)
    align: int  # divides every stride but the unit one
    num_warps: int
    rows_masked: bool  # images shorter than a tile: row masks (else the last tile shifts back)

    @property
    def rows_per_tile(self) -> int:
        return self.row_warps * (self.vector if self.pixel else 1)

    @property
    def holds_params(self) -> bool:
        """alpha / beta loaded once per program and held in registers (the kernel's HOIST) where a
        load per tile would not get the logits' layout: NCHW (their classes run along lanes) and
        V = 1 (alpha is aligned where the logits rows are not: Triton would vectorise it along the
        lanes and convert it through shared memory every tile). Class-contiguous rows with vectors
        reload them from L1 per tile instead of holding a and t across the softmax (32 registers
        each at 32 values per thread; the SASS is smaller with the two extra vector loads)."""
        return _holds_params(self.pixel, self.vector)

    @property
    def classes(self) -> int:
        return (self.groups + self.tail_groups) * self.lane_width * (1 if self.pixel else self.vector)

    def meta(self) -> dict:
        return dict(PIXEL=self.pixel, G=self.groups, GT=self.tail_groups, RW=self.row_warps, LW=self.lane_width,
                    V=self.vector, BODY_MASKED=self.body_masked, ALIGN=self.align, ROWS_MASKED=self.rows_masked,
                    HOIST=self.holds_params, num_warps=self.num_warps)


def _holds_params(pixel: bool, vector: int) -> bool:
    return pixel or vector == 1


def _pow2_divisor(values, cap) -> int:
    d = cap
    for v in values:
        while d > 1 and v % d:
            d //= 2
    return d


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _prev_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _split(num_classes: int, unit: int):
    """(G, GT, body_masked) covering C with groups of `unit` classes and the fewest padded lanes:
    one masked block of next_pow2 groups, or an unmasked body of the largest power of two of whole
    groups plus a masked power-of-two tail (C = 1231 in groups of 64: 16 + 4 groups, 4% padding)."""
    single = _next_pow2(-(-num_classes // unit))
    full = num_classes // unit
    if full == 0:
        return single, 0, True
    body = _prev_pow2(full)
    rest = num_classes - body * unit
    if rest == 0:
        return body, 0, False
    tail = _next_pow2(-(-rest // unit))
    if body + tail <= single:  # a tie: the split masks only the tail
        return body, tail, False
    return single, 0, single * unit > num_classes


def warp_config(strides, rows_per_image: int, num_classes: int, element_size: int,
                limits: WarpLimits, acc_size: int = 4, exact: bool = True) -> Optional[WarpConfig]:
    """strides: one (stride_image, stride_class, stride_row) per logits-shaped tensor of the launch
    (logits, dlogits when written); acc_size: bytes of the accumulation dtype (float64 values
    count limits.float64_cost each); exact: the strides and rows are the launch's own (not a
    symbolic size's example), else no alignment and no row count is assumed. None where no tensor
    layout fits (neither every class stride nor every row stride is 1) or C needs more than
    limits.max_warps warps per row."""
    if num_classes < 1 or rows_per_image < 1:
        return None
    if all(st[1] == 1 for st in strides):
        pixel = False
        others = [v for st in strides for v in (st[0], st[2])] + [num_classes]
    elif rows_per_image > 1 and all(st[2] == 1 for st in strides):
        pixel = True
        others = [v for st in strides for v in (st[0], st[1])] + [rows_per_image]
    else:
        return None
    cap = min(limits.max_vector, max(1, limits.vector_bytes // max(element_size, 4)))
    vector = _pow2_divisor(others, cap) if exact else 1
    # Values per thread: for a row in one warp (and NCHW pixel blocks), and for a row over several.
    if len(strides) == 1:
        max_values = split_row_values = limits.max_values
    elif _holds_params(pixel, vector):  # dlogits, alpha / beta held (pixels whatever V they end with)
        max_values = split_row_values = limits.max_values_held_params_with_dlogits
    else:  # dlogits: dz and its multiplier live too
        max_values, split_row_values = limits.max_values_with_dlogits, limits.max_values_split_rows_with_dlogits
    if acc_size > 4:
        max_values = max(1, max_values // limits.float64_cost)
        split_row_values = max(1, split_row_values // limits.float64_cost)
    if pixel:
        # A warp spans LW classes x (lanes / LW) pixel vectors of V pixels. Fewer class lanes mean
        # fewer shuffle steps per row reduction (log2 LW, three reductions, one per value in a
        # thread's vector) but more classes per thread: pick the cheapest fit (C = 150: 8 lanes of
        # 20 classes x 1 pixel, ~0.9 shuffle instructions per element instead of 6 with 32 x 4).
        best = None
        for lane_width in (limits.lanes // 4, limits.lanes // 2, limits.lanes):
            if lane_width < 1:
                continue
            g, t, masked = _split(num_classes, lane_width)
            v = vector
            # Not below 2 pixels (unless the strides force 1): with V = 1 the RW axis would be the
            # contiguous one, and Triton's coalescing would give the block another layout.
            while (g + t) * v > max_values and v > min(2, vector):
                v //= 2
            if (g + t) * v > max_values:
                continue
            cost = 6 * (lane_width.bit_length() - 1) / (g + t) + 1 / v
            if best is None or cost < best[0]:
                best = (cost, lane_width, g, t, masked, v)
        if best is None:
            return None
        _, lane_width, groups, tail, body_masked, vector = best
        warps_per_row = 1
    else:  # a row spans LW = lanes x warps_per_row lanes of V classes
        warps_per_row = 1
        while True:
            lane_width = limits.lanes * warps_per_row
            groups, tail, body_masked = _split(num_classes, lane_width * vector)
            if (groups + tail) * vector <= (max_values if warps_per_row == 1 else split_row_values):
                break
            if warps_per_row * 2 > limits.max_warps:
                return None
            warps_per_row *= 2
    num_warps = max(limits.num_warps, warps_per_row)
    row_warps = num_warps // warps_per_row * (limits.lanes // lane_width if pixel else 1)
    rows_per_tile = row_warps * (vector if pixel else 1)
    return WarpConfig(pixel, groups, tail, row_warps, lane_width, vector, body_masked, vector, num_warps,
                      rows_masked=rows_per_image < rows_per_tile or not exact)
