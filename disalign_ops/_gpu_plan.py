"""Launch-planning constants shared by the two GPU backends (CUDA kernels in csrc/cuda, Triton kernels
in disalign_ops/triton_backend). Pure Python without imports: setup.py reads this file (it runs before
the package is importable) and passes each constant to the C++/CUDA compiler as a macro, so the
native kernels and the Triton launcher use the same values from this single definition.

Stage 2 (docs/contract.md section 5) reduces dalpha / dbeta over all rows. Deterministic reductions rule out
floating-point atomics, so every block / program accumulates its rows into its own partial row of C
values per wanted gradient, and a second kernel sums those rows in a fixed order. The partial rows are
the stage-2 kernels' only extra memory beyond their outputs.
"""

# The partial rows may take at most this fraction of the logits' bytes (docs/contract.md section 5, the stage-2 target:
# extra memory < 1% of the logits) ...
PARTIALS_FRACTION_OF_LOGITS = 0.01

# ... except that the grid never drops below this many resident blocks per SM (docs/contract.md section 5 and issue 9: at least
# one per SM on every benchmark shape; fewer leaves SMs, i.e. bandwidth, idle). The floor wins where
# the two conflict: with one partial row per block and 132 SMs, (N, C) logits need
# N >= 132 * 2 * 4 / (elem_size * PARTIALS_FRACTION_OF_LOGITS) rows (52800 for bf16, 26400 for fp32) to
# fit 1%; cls-imagenet / cls-inat (N = 4096) then take ~12.9% (bf16) / ~6.4% (fp32) of the logits,
# det-lvis (N = 8192) half of that. Where that happens on sm_90, the CUDA planner launches the grid in
# thread-block clusters whose blocks sum their accumulators through distributed shared memory, one
# partial row per cluster of 2-16 blocks (csrc/cuda/plan.cpp); the Triton backend and sm_80 keep one
# row per block.
MIN_BLOCKS_PER_SM = 1


def partial_rows(logits_bytes: int, row_bytes: int, multiprocessors: int, wanted_blocks: int) -> int:
    """Blocks (= partial rows) of a stage-2 launch: wanted_blocks, capped by the budget, floored at
    MIN_BLOCKS_PER_SM per SM (but never above wanted_blocks). row_bytes: one block's partial bytes.
    The CUDA planner (csrc/cuda/plan.h, partial_rows) implements the same rule on the same macros."""
    if row_bytes <= 0:
        return max(1, wanted_blocks)
    budget = int(logits_bytes * PARTIALS_FRACTION_OF_LOGITS) // row_bytes
    floor = min(wanted_blocks, MIN_BLOCKS_PER_SM * multiprocessors)
    return max(1, floor, min(wanted_blocks, budget))


def compiler_macros() -> list[tuple[str, str]]:
    """The constants as C macros (setup.py, benches/sass_budget.py, the planner's CPU test)."""
    return [
        ("DISALIGN_PARTIALS_BUDGET_FRACTION", repr(float(PARTIALS_FRACTION_OF_LOGITS))),
        ("DISALIGN_MIN_BLOCKS_PER_SM", str(int(MIN_BLOCKS_PER_SM))),
    ]
