"""The CUDA tile planner (csrc/cuda/plan.cpp), compiled for the CPU (benches/cuda_plan.py): the plans
of the GPU benchmark shapes and of awkward shapes satisfy what the kernel (csrc/cuda/tile_kernel.cuh)
relies on. Needs a C++ compiler, not a GPU or a CUDA build."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import cuda_plan  # noqa: E402

sys.path.pop(0)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")

ELEMS = {"bf16": (2, 4), "fp32": (4, 4), "fp64": (8, 8)}


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    return cuda_plan.build(tmp_path_factory.mktemp("plan"))


def _request(shape, dtype, **flags):
    batch, classes, spatial, pixels = shape
    elem, acc = ELEMS[dtype]
    return dict(batch=batch, classes=classes, spatial=spatial, pixels=pixels, elem=elem, acc=acc, **flags)


def _check_layout(req, p, device):
    """The shared-memory regions are in order, 16-byte aligned, large enough, and fit the device."""
    T, V, acc, elem = p["tile_rows"], p["vec"], req["acc"], req["elem"]
    lines = p["chunk_classes"] if req["pixels"] else T
    offsets = [0, p["offset_tile2"], p["offset_e"], p["offset_ab"], p["offset_acc"], p["offset_partials"],
               p["offset_rows"]]
    if p["pipelined"]:  # the next tile's buffer and row bases after the row metadata
        offsets += [p["offset_tile_next"], p["offset_rows_next"]]
        assert p["offset_tile_next"] - p["offset_rows"] >= p["row_meta_bytes"]
        assert p["offset_rows_next"] - p["offset_tile_next"] >= lines * p["line_stride"] * req["elem"]
        assert p["shared_bytes"] - p["offset_rows_next"] >= T * 8
        assert p["num_chunks"] == 1 and not req.get("calibrate")
    offsets.append(p["shared_bytes"])
    assert offsets == sorted(offsets)
    assert all(o % 16 == 0 for o in offsets)
    tiles = 2 if req.get("calibrate") else 1
    assert p["offset_e"] >= tiles * lines * p["line_stride"] * elem
    assert p["offset_ab"] - p["offset_e"] >= lines * p["e_stride"] * acc
    assert p["offset_acc"] - p["offset_ab"] >= 2 * p["ab_stride"] * acc
    assert p["ab_stride"] >= p["chunk_classes"]
    assert p["acc_stride"] >= req["classes"] and (p["acc_stride"] * acc) % 16 == 0
    if p["acc_in_shared"] and (req.get("want_alpha", True) or req.get("want_beta", True)):
        assert p["offset_partials"] - p["offset_acc"] >= 2 * p["slices"] * p["acc_stride"] * acc
    assert p["offset_rows"] - p["offset_partials"] >= 2 * p["row_partial_entries"] * acc
    assert (p["offset_tile_next"] if p["pipelined"] else p["shared_bytes"]) - p["offset_rows"] >= p["row_meta_bytes"]
    assert p["shared_bytes"] <= device.max_shared_per_block
    # 16-byte vectors: lines start on 16 bytes; the kernel's vector loops read vec elements at a time.
    assert (p["line_stride"] * elem) % 16 == 0 and V * elem == 16
    if p["e_cached"]:
        assert (p["e_stride"] * acc) % 16 == 0
        assert not req.get("calibrate")
    if req["pixels"]:
        assert p["line_stride"] >= -(-T // V) * V
        # Pixel lines an odd number of 16-byte units apart: the sweep's 8-lane phases hit distinct banks.
        if T >= 2 * V:
            assert (p["line_stride"] * elem // 16) % 2 == 1
            if p["e_cached"]:
                assert (p["e_stride"] * acc // 16) % 2 == 1
        assert p["pixel_vectors"] == max(1, T // V) and p["group"] * p["pixel_vectors"] == 256
        assert p["slices"] == p["pixel_vectors"]
        assert p["row_partial_entries"] >= p["group"] * p["pixel_vectors"] * V
    else:
        assert p["line_stride"] >= p["chunk_classes"]
        assert p["group"] * T == 256 and 1 <= p["slices"] <= T
    assert p["num_chunks"] * p["chunk_classes"] >= req["classes"] > (p["num_chunks"] - 1) * p["chunk_classes"]
    if p["num_chunks"] > 1:
        assert p["chunk_classes"] % 32 == 0 and not p["e_cached"]


def _covered_rows(req, p):
    """Every row lies in exactly one tile (tile walk of the kernel: tiles of T rows, or of T pixels of one image)."""
    T = p["tile_rows"]
    if req["pixels"]:
        assert p["tiles_per_image"] * T >= req["spatial"] > (p["tiles_per_image"] - 1) * T
        return p["num_tiles"] == req["batch"] * p["tiles_per_image"]
    rows = req["batch"] * req["spatial"]
    return p["num_tiles"] * T >= rows > (p["num_tiles"] - 1) * T


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(cuda_plan.BENCH_SHAPES))
@pytest.mark.parametrize("mode", ["stage2", "full"])
def test_benchmark_shapes_fill_the_gpu(planner, name, dtype, mode):
    """Every benchmark shape keeps the GPU busy (a block per SM; in thread-block clusters at least
    7/8 of that), computes one exponential per element (e_cached) and pipelines its copies (H200), and writes
    partial rows within the budget: on sm_90 (clusters) always, on sm_80 unless the
    one-block-per-SM floor needs more."""
    shape = cuda_plan.BENCH_SHAPES[name]
    batch, classes, spatial, _ = shape
    req = _request(shape, dtype)
    budget = batch * classes * spatial * req["elem"] * 0.01
    for device in (cuda_plan.H200, cuda_plan.A100):
        (p,) = cuda_plan.plans(planner, [req], device)
        _check_layout(req, p, device)
        assert _covered_rows(req, p)
        sms = device.multiprocessors
        floor = min(sms, p["num_tiles"])
        assert p["blocks"] >= (floor if p["cluster"] == 1 else 0.875 * floor), (device, p["blocks"], p["cluster"])
        assert p["blocks_per_sm"] >= 1
        if device is cuda_plan.H200:  # (an A100's 164 KiB do not hold cls-inat's exponentials)
            assert p["e_cached"], "one exponential per element needs the exponentials cached"
            assert p["pipelined"], "the next tile's copy overlaps this tile's passes"
        partial_bytes = p["partial_rows"] * p["ws_slices"] * p["acc_stride"] * req["acc"] * 2
        if device.gpc_sms:
            assert partial_bytes <= budget, (device, partial_bytes, budget, p["blocks"], p["cluster"])
        else:
            assert p["cluster"] == 1
            assert partial_bytes <= budget or p["blocks"] <= sms, (partial_bytes, budget, p["blocks"])


AWKWARD = [
    (5, 3, 1, False), (67, 1000, 1, False), (301, 37, 1, False), (3, 1231, 1, False), (2, 40000, 1, False),
    (2, 19, 17 * 17, True), (3, 150, 9 * 11, True), (1, 7, 5, True), (1, 1000, 301, True), (1, 9000, 64, True),
    (2, 1, 1, False), (1, 100000, 1, False),
]


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("shape", AWKWARD, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("device", [cuda_plan.H200, cuda_plan.A100], ids=["sm90", "sm80"])
def test_awkward_shapes_have_consistent_plans(planner, shape, dtype, calibrate, device):
    req = _request(shape, dtype, calibrate=calibrate, want_loss=not calibrate, mean=not calibrate)
    (p,) = cuda_plan.plans(planner, [req], device)
    _check_layout(req, p, device)
    assert _covered_rows(req, p)
    assert 1 <= p["blocks"] <= max(1, p["num_tiles"])
    ws = [p["ws_alpha"], p["ws_beta"]] + ([p["ws_loss"], p["ws_weight"]] if not calibrate else [])
    assert all(w >= 0 for w in ws) and p["workspace_bytes"] >= max(ws)
    # Clusters: only with shared accumulators on a device that has them; whole clusters; one
    # partial row per cluster, and the workspace holds them.
    K = p["cluster"]
    assert K in (1, 2, 4, 8, 16) and p["blocks"] % K == 0 and p["partial_rows"] * K == p["blocks"]
    if K > 1:
        assert device.gpc_sms and p["acc_in_shared"]
    rows_bytes = p["partial_rows"] * p["ws_slices"] * p["acc_stride"] * req["acc"]
    assert p["ws_beta"] - p["ws_alpha"] >= rows_bytes
    if not calibrate:
        assert p["ws_loss"] - p["ws_beta"] >= rows_bytes
        assert p["ws_weight"] - p["ws_loss"] >= p["blocks"] * req["acc"]  # one loss partial per block
    # Register accumulators (plan.h kRegAccClasses): only where a thread's class vectors are fixed over
    # the tiles and fit its registers, and the kernel's one-block-per-SM bound costs no residency.
    if p["reg_acc"]:
        vectors = p["chunk_classes"] // p["vec"]
        assert not shape[3] and not calibrate and dtype != "fp64"
        assert p["blocks_per_sm"] == 1 and p["slices"] == 1 and p["num_chunks"] == 1
        assert p["e_cached"] and p["acc_in_shared"]
        assert -(-vectors // 256) * p["vec"] <= 32


def test_register_accumulators_where_one_block_per_sm_holds_large_rows(planner):
    """cls-inat (one 8142-class row per tile, one block per SM) accumulates in registers on an H200
    model; the benchmark shapes with several blocks per SM, the pixels layout and float64 do not."""
    for name, shape in cuda_plan.BENCH_SHAPES.items():
        for dtype in ("bf16", "fp32", "fp64"):
            (p,) = cuda_plan.plans(planner, [_request(shape, dtype)], cuda_plan.H200)
            assert p["reg_acc"] == (name == "cls-inat" and dtype != "fp64"), (name, dtype, p["blocks_per_sm"])


def test_partial_budget_comes_from_the_shared_constant(planner):
    """A shape with rows enough for the budget to bind above the floor uses exactly the budget's rows
    (one row per block: no clusters needed)."""
    req = _request((1 << 20, 1000, 1, False), "bf16")
    (p,) = cuda_plan.plans(planner, [req], cuda_plan.H200, registers=32)
    assert p["cluster"] == 1 and p["partial_rows"] == p["blocks"]
    from_file = dict(cuda_plan.macros())
    fraction = float(from_file["DISALIGN_PARTIALS_BUDGET_FRACTION"])
    per_block = 2 * p["ws_slices"] * p["acc_stride"] * req["acc"]
    budget_rows = int((1 << 20) * 1000 * 2 * fraction) // per_block
    assert p["blocks"] == min(p["num_tiles"], p["blocks_per_sm"] * 132, max(132, budget_rows))


@pytest.mark.parametrize("shape", list(cuda_plan.BENCH_SHAPES.values()) + AWKWARD, ids=str)
def test_python_and_cuda_partial_rows_are_one_rule(planner, shape):
    """disalign_ops/_gpu_plan.py's partial_rows (the Triton launcher's) gives the CUDA planner's
    blocks wherever the planner keeps one partial row per block (no clusters: the A100)."""
    from disalign_ops._gpu_plan import partial_rows

    req = _request(shape, "bf16")
    (p,) = cuda_plan.plans(planner, [req], cuda_plan.A100)
    batch, classes, spatial, _ = shape
    sms = cuda_plan.A100.multiprocessors
    wanted = min(p["num_tiles"], p["blocks_per_sm"] * sms)
    per_block = 2 * p["ws_slices"] * p["acc_stride"] * req["acc"]
    assert p["cluster"] == 1
    assert p["blocks"] == partial_rows(batch * classes * spatial * req["elem"], per_block, sms, wanted)


# Misaligned 2-byte lines (csrc/cuda/line_copy.h, the kernel's kCopyRealign copies, run on the CPU):
# (address mod 16, elements, element bytes). det-lvis rows (1231 bf16) start at every even phase;
# slices start anywhere; lines shorter than 16 bytes or than their head have no body.
LINES = [(a, n, 2) for a in range(0, 16, 2) for n in (0, 1, 3, 7, 8, 9, 15, 16, 17, 23, 24, 150, 1231)]
LINES += [(a, n, 4) for a in (0, 4, 8, 12) for n in (1, 3, 4, 5, 9, 1231)]


def test_line_copy_split_and_emulation(planner):
    """Head / body / tail of each line, and the item walk both ways: every element copied, nothing
    read or written outside the line (global) or its padded shared line, 16-byte accesses aligned,
    and at most 2V - 1 + V elements per line go one by one."""
    results = cuda_plan.line_copies(planner, LINES)
    for (addr, n, elem), r in zip(LINES, results):
        vec = 16 // elem
        head = min(n, (16 - addr % 16) % 16 // elem)
        assert (r["head"], r["blocks"], r["tail"]) == (head, (n - head) // vec, n - head - (n - head) // vec * vec)
        assert r["head"] + r["blocks"] * vec + r["tail"] == n and 0 <= r["tail"] < vec
        assert r["items"] == -(-n // vec)
        assert r["mismatch_to_shared"] == r["mismatch_to_global"] == r["clobbered"] == 0, (addr, n, r)
        assert r["outside"] == 0 and r["misaligned16"] == 0, (addr, n, r)
        # Global side: whole body blocks only, 16 bytes each; the rest element by element.
        assert r["elements_to_global"] == n - r["blocks"] * vec
        assert r["elements_to_shared"] <= min(n, 3 * vec - 1)
        if n * elem < 16:
            assert r["blocks"] == 0 and r["elements_to_shared"] == n
        if head == 0:  # aligned lines: one load per vector, no realignment
            assert r["vector_loads_to_shared"] == r["blocks"] and r["vector_loads_to_global"] == r["blocks"]
        else:  # two 16-byte loads per realigned vector
            assert r["vector_loads_to_global"] == 2 * r["blocks"]
            assert r["vector_loads_to_shared"] == 2 * max(0, r["blocks"] - 1)


def _unit(planner, shape, dtype, address, strides):
    req = _request(shape, dtype, operand=(address, strides))
    (p,) = cuda_plan.plans(planner, [req], cuda_plan.H200)
    return p["copy_unit"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_planner_chooses_the_realigned_copy_for_misaligned_2_byte_lines(planner, dtype):
    """2-byte types along a stride-1 axis without an aligned 4-byte unit (odd C as det-lvis, odd
    H*W, offset slices, odd row strides) are copied by line_copy.h; aligned ones keep cp.async in
    16-, 8- or 4-byte units (cls-inat's 8142 classes: 4); a non-unit stride along the line stays
    element by element; fp32 keeps its units."""
    elem = ELEMS[dtype][0]
    realign_or = (lambda unit: cuda_plan.COPY_REALIGN) if elem == 2 else (lambda unit: unit)
    base = 1 << 20  # 256-byte aligned, as a fresh allocation
    # (N, C) rows, classes contiguous.
    assert _unit(planner, (8192, 1232, 1, False), dtype, base, (1232, 1, 1)) == 16
    assert _unit(planner, (8192, 1231, 1, False), dtype, base, (1231, 1, 1)) == realign_or(4 if elem == 4 else 2)
    assert _unit(planner, (4096, 1000, 1, False), dtype, base + elem, (1000, 1, 1)) == realign_or(elem)  # slice [:, 1:]
    assert _unit(planner, (4096, 1000, 1, False), dtype, base, (1002, 1, 1)) == (4 if elem == 2 else 8)  # padded rows
    assert _unit(planner, (4096, 8142, 1, False), dtype, base, (8142, 1, 1)) == (4 if elem == 2 else 8)  # cls-inat
    assert _unit(planner, (4096, 1000, 1, False), dtype, base, (1001, 1, 1)) == realign_or(4)  # odd row stride
    assert _unit(planner, (64, 1000, 1, False), dtype, base, (1000 * 3, 3, 1)) == elem  # classes not contiguous
    # NCHW, pixels contiguous: odd H*W, an image slice.
    assert _unit(planner, (8, 150, 64 * 64, True), dtype, base, (150 * 4096, 4096, 1)) == 16
    assert _unit(planner, (2, 19, 17 * 17, True), dtype, base, (19 * 289, 289, 1)) == realign_or(elem)
    assert _unit(planner, (8, 150, 64 * 64, True), dtype, base + 3 * elem, (150 * 4096, 4096, 1)) == realign_or(elem)
