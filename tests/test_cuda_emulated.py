"""The CUDA kernels of csrc/cuda, run on the CPU by tests/cuda_emu, against disalign_ops.reference.

No GPU has run these kernels yet. The emulation (tests/cuda_emu/emu.h) compiles the kernel files and
the CUDA binding (csrc/cuda/disalign_cuda.cpp) unchanged with the host compiler, runs each block's
256 threads as cooperative fibers with CUDA's barrier and warp-exchange semantics, and registers the
binding's ops as torch.ops.disalign_emu on CPU tensors, for an emulated device (SM count, shared
memory, occupancy) so that the planner's real plans run: cached and recomputed exponentials, chunked
classes, per-block accumulators in the workspace, several tiles per block, every copy unit. Besides
the values it checks what the GPU would refuse or what would be undefined there: divergent barriers,
shuffles with exited lanes, launch configurations, dynamic shared memory past the launch's size or
read before any thread wrote it (filled with NaN), and, by running the threads in other orders,
results that depend on the order of threads between barriers (races).

What it cannot tell: the GPU's own rounding (nvcc's FMA contraction, MUFU.EX2), timing, and
out-of-bounds global accesses (compute-sanitizer in benches/gpu_check.sh does that on a GPU).
Needs a C++ compiler, ninja and CUDA's headers (a toolkit, e.g. /usr/local/cuda); no GPU, no CUDA
build of torch.
"""

from __future__ import annotations

import glob
import math
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import GRAD_INPUTS, TOLERANCES, Result, assert_matches, loss_and_grads, make_inputs, reference_loss, upstream
from disalign_ops import reference

ROOT = Path(__file__).resolve().parent.parent
EMU = Path(__file__).resolve().parent / "cuda_emu"
SOURCES = [EMU / "emu_kernels.cpp", EMU / "emu_runtime.cpp", EMU / "emu_selftest.cpp", EMU / "emu_binding.cpp",
           ROOT / "csrc" / "cuda" / "plan.cpp", ROOT / "csrc" / "common" / "op_common.cpp"]

sys.path.insert(0, str(ROOT / "benches"))
import cuda_plan  # noqa: E402

sys.path.pop(0)

# Emulated devices: (multiprocessors, opt-in shared bytes per block, shared bytes per SM, registers
# per thread for the occupancy model, SMs per GPC where clusters are launched). "h200" launches
# thread-block clusters (sm_90), the others do not; "sm86" has the smallest opt-in limit of the
# targets (99 KiB), so long rows are chunked; "one_sm" runs every tile of a launch in one or two blocks.
DEVICES = {
    "h200": cuda_plan.Device("h200", 132, 232448, 233472, gpc_sms=16),
    "sm86": cuda_plan.Device("sm86", 84, 101376, 102400),
    "one_sm": cuda_plan.Device("one_sm", 1, 232448, 233472),
}
REGISTERS = 64


def _cuda_include() -> Path | None:
    """CUDA's headers for the host compiler (cuda_fp16.h and the crt/ headers it includes)."""
    from torch.utils import cpp_extension

    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    candidates = [Path(h) / "include" for h in homes if h]
    try:
        import nvidia

        candidates += [Path(p) for p in glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "include"))]
    except ImportError:
        pass
    for c in candidates:
        if (c / "cuda_fp16.h").exists() and (c / "crt" / "host_defines.h").exists():
            return c
    return None


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if not cpp_extension.is_ninja_available():
        pytest.skip("no ninja (torch.utils.cpp_extension.load needs it)")
    include = _cuda_include()
    if include is None:
        pytest.skip("no CUDA headers (cuda_fp16.h with crt/): set CUDA_HOME to a CUDA toolkit")
    macros = runpy.run_path(str(ROOT / "disalign_ops" / "_gpu_plan.py"))["compiler_macros"]()
    # A build directory per Python and torch release: torch's default (per Python and CUDA version)
    # would let two torch releases of one CUDA version (scripts/check_torch.sh) share, and load,
    # each other's objects.
    build = Path(cpp_extension.get_default_build_root()) / (
        f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}") / "disalign_cuda_emu"
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="disalign_cuda_emu",
        build_directory=str(build),
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(EMU / "include"), str(ROOT / "csrc"), str(include)],
        # -U_FORTIFY_SOURCE: the fibers switch stacks with _longjmp, which the fortified __longjmp_chk
        # (on by default in some distributions' compilers) refuses.
        # -fvisibility=hidden and -Bsymbolic: the emulation's CUDA runtime API functions are its own,
        # never exported to (or replaced by) libcudart where a CUDA build of torch loaded it.
        extra_cflags=["-O1", "-U_FORTIFY_SOURCE", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-sign-compare",
                      *(f"-D{k}={v}" for k, v in macros)],
        extra_ldflags=["-Wl,-Bsymbolic"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.disalign_emu


def _configure(emu, device: str, seed: int = 0):
    d = DEVICES[device]
    emu.configure(d.multiprocessors, d.max_shared_per_block, d.shared_per_sm, REGISTERS, d.gpc_sms, seed)


def _loss_args(inputs, logits=None):
    """The cross_entropy ops' arguments up to ignore_index (the logits replaced when given)."""
    return (inputs.logits if logits is None else logits, inputs.target, inputs.alpha, inputs.beta, inputs.confidence,
            inputs.weight, inputs.ignore_index)


def _emulated(emu, inputs, reduction: str, wrt, grad_output) -> Result:
    """The emulated ops as the autograd functions use them: the fused forward with the gradients for
    an upstream gradient of 1 ("mean" / "sum"), or the forward and the per-row backward ("none")."""
    mask = [name in wrt for name in GRAD_INPUTS]
    args = _loss_args(inputs)
    if reduction == "none":
        loss = emu.cross_entropy(*args, "none", [False] * 4)[0]
        grads = emu.cross_entropy_backward(grad_output, *args, mask) if wrt else ()
    else:
        assert float(grad_output) == 1.0
        loss, *grads = emu.cross_entropy(*args, reduction, mask)
    return Result(loss, {name: grads[i] for i, name in enumerate(GRAD_INPUTS) if name in wrt})


def _compare(emu, inputs, reduction: str, wrt=GRAD_INPUTS, equal_nan=False) -> Result:
    grad_output = upstream(inputs, reduction) if reduction == "none" else torch.tensor(1.0)
    expected = loss_and_grads(reference_loss, inputs, reduction, wrt, grad_output)
    actual = _emulated(emu, inputs, reduction, wrt, grad_output)
    assert_matches(actual, expected, inputs.logits.dtype, equal_nan=equal_nan)
    return actual


# Per conftest layout, a shape with ragged tiles and an odd or unaligned class / pixel count.
LAYOUT_SHAPES = {
    "nc": (37, 41),
    "nc_transposed": (37, 40),
    "nc_class_sliced": (19, 41),
    "nc_batch_strided": (9, 40),
    "nchw": (2, 40, 7, 9),
    "nchw_channels_last": (2, 40, 7, 9),
    "nchw_spatial_sliced": (2, 40, 7, 9),
    "nchw_batch_strided": (2, 12, 5, 5),
    "nchw_classes_outermost": (2, 12, 5, 5),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (reduction, gradients): full mode, stage 2, the per-row backward, the forward alone.
MODES = {
    "full": ("mean", GRAD_INPUTS),
    "stage2": ("sum", ("alpha", "beta", "confidence")),
    "none": ("none", GRAD_INPUTS),
    "forward": ("mean", ()),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUT_SHAPES)
def test_loss_every_layout(emu, layout, dtype, mode):
    _configure(emu, "h200")
    reduction, wrt = MODES[mode]
    _compare(emu, make_inputs(LAYOUT_SHAPES[layout], dtype=dtype, layout=layout, seed=1), reduction, wrt)


# Shapes and devices that reach the planner's other plans (test_plan_cases_reach_every_plan_feature
# checks which).
PLAN_CASES = {
    "many-tiles-per-block": ((300, 40), "nc", "one_sm"),
    "pixels-many-tiles": ((3, 20, 11, 13), "nchw", "one_sm"),
    "det-like-odd-rows": ((9, 1231), "nc", "h200"),
    "even-rows-4-byte-units": ((40, 1002), "nc", "one_sm"),  # half / bf16 rows in 4-byte cp.async, pipelined
    "long-rows-chunked": ((3, 3000), "nc", "sm86"),
    "long-rows-uncached": ((4, 20000), "nc", "h200"),
    "pixels-chunked": ((2, 3000, 3, 3), "nchw", "sm86"),
    "channels-last-long-rows": ((2, 3000, 2, 2), "nchw_channels_last", "sm86"),
    # Thread-block clusters (h200 launches them): the class gradients summed across a cluster's blocks.
    "classes-in-clusters": ((48, 1000), "nc", "h200"),
    "pixels-in-clusters-several-tiles": ((3, 30, 17, 19), "nchw", "h200"),
    # Class gradients in registers (plan.h kRegAccClasses; float accumulation, so not float64): many
    # one-row tiles per block (8142 = 8 * 1017 + 6: a tail left to the shared accumulators), tiles of
    # 2-4 rows at a 2-byte phase, and one-row tiles summed across clusters.
    "register-accumulators-many-tiles": ((20, 8142), "nc", "one_sm"),
    "register-accumulators-several-rows": ((37, 2003), "nc", "sm86"),
    "register-accumulators-in-clusters": ((24, 8142), "nc", "h200"),
}
REGISTER_ACCUMULATOR_CASES = [c for c in PLAN_CASES if c.startswith("register-accumulators")]


# Operands left out, int32 targets, another ignore_index, and every single gradient alone (the
# kernels skip the work of the gradients not asked for).
OPTIONS = {
    "no-confidence": dict(confidence=False),
    "no-weight": dict(weight=False),
    "int32-target-ignore-255": dict(target_dtype=torch.int32, ignore_index=255),
}
SUBSETS = (("logits",), ("alpha",), ("beta",), ("confidence",), ("alpha", "confidence"))


@pytest.mark.parametrize("option", list(OPTIONS) + [f"only-{'-'.join(s)}" for s in SUBSETS])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ["nc", "nchw", "long-rows-chunked"])
def test_options_and_gradient_subsets(emu, layout, dtype, option):
    shape, layout, device = PLAN_CASES[layout] if layout in PLAN_CASES else (LAYOUT_SHAPES[layout], layout, "h200")
    _configure(emu, device)
    kwargs = OPTIONS.get(option, {})
    wrt = next((s for s in SUBSETS if option == f"only-{'-'.join(s)}"), GRAD_INPUTS)
    if kwargs.get("confidence") is False:
        wrt = tuple(w for w in wrt if w != "confidence")
    for reduction in ("mean", "none"):
        _compare(emu, make_inputs(shape, dtype=dtype, layout=layout, seed=9, **kwargs), reduction, wrt)


@pytest.mark.parametrize("mode", ("full", "stage2", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("case", PLAN_CASES)
def test_loss_every_plan(emu, case, dtype, mode):
    shape, layout, device = PLAN_CASES[case]
    _configure(emu, device)
    reduction, wrt = MODES[mode]
    _compare(emu, make_inputs(shape, dtype=dtype, layout=layout, seed=2), reduction, wrt)


@pytest.mark.parametrize("case", ["classes-in-clusters", "pixels-in-clusters-several-tiles"])
def test_cluster_plans_launch_in_clusters_unless_disabled(emu, tmp_path, case, monkeypatch):
    """The tile kernel is launched as the planner says (grid and cluster size, benches/cuda_plan.py);
    DISALIGN_CUDA_CLUSTERS=0 launches one block per partial row instead, with the same values."""
    shape, layout, device = PLAN_CASES[case]
    plan = _plan_of(cuda_plan.build(tmp_path), shape, layout, device, torch.float32)
    assert plan["cluster"] > 1
    inputs = make_inputs(shape, dtype=torch.float32, layout=layout, seed=4)
    for clusters in ("1", "0"):
        monkeypatch.setenv("DISALIGN_CUDA_CLUSTERS", clusters)
        _configure(emu, device)
        _compare(emu, inputs, "sum", ("alpha", "beta", "confidence"))
        launched = [tuple(r) for r in emu.launches().tolist()]
        if clusters == "1":
            assert (plan["blocks"], 256, plan["cluster"]) in launched, launched
        else:
            assert launched and all(k == 1 for _, _, k in launched), launched


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", REGISTER_ACCUMULATOR_CASES)
def test_register_accumulator_cases_are_planned_so(tmp_path, case, dtype):
    """The register-accumulator cases above are REG_ACC plans (one block per SM, one slice, one
    chunk, several tiles per block or clusters as named), so test_loss_every_plan runs that kernel."""
    shape, layout, device = PLAN_CASES[case]
    plan = _plan_of(cuda_plan.build(tmp_path), shape, layout, device, dtype)
    assert plan["reg_acc"] and plan["blocks_per_sm"] == 1 and plan["slices"] == 1 and plan["num_chunks"] == 1
    if case.endswith("many-tiles"):
        assert plan["blocks"] == 1 and plan["num_tiles"] == shape[0]
    if case.endswith("several-rows"):
        assert plan["tile_rows"] > 1
    if case.endswith("in-clusters"):
        assert plan["cluster"] > 1
    # float64 accumulates in double: never in registers.
    assert not _plan_of(cuda_plan.build(tmp_path), shape, layout, device, torch.float64)["reg_acc"]


def _pixels_contiguous(layout: str) -> bool:
    """Whether the kernels see a conftest layout with the pixels contiguous (csrc/common: NCHW and
    its slices, a transposed (N, C)) rather than the classes ((N, C), channels-last)."""
    return layout in ("nchw", "nchw_spatial_sliced", "nchw_batch_strided", "nchw_classes_outermost", "nc_transposed")


def _stage2_plan(exe, batch, classes, spatial, pixels, device, dtype):
    """The planner's plan (benches/cuda_plan.py) of a stage-2 "sum" call."""
    request = dict(batch=batch, classes=classes, spatial=spatial, pixels=pixels,
                   elem=torch.empty((), dtype=dtype).element_size(), acc=8 if dtype == torch.float64 else 4,
                   want_loss=True, mean=False, registers=REGISTERS)
    return cuda_plan.plans(exe, [request], DEVICES[device])[0]


def _plan_of(exe, shape, layout, device, dtype):
    """The plan of a call with logits of `shape` in a conftest layout."""
    return _stage2_plan(exe, shape[0], shape[1], math.prod(shape[2:]), _pixels_contiguous(layout), device, dtype)


def test_plan_cases_reach_every_plan_feature(tmp_path):
    """PLAN_CASES run the plans they are meant to: if the planner changes, the cases are re-chosen."""
    exe = cuda_plan.build(tmp_path)
    found = set()
    for shape, layout, device in PLAN_CASES.values():
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            p = _plan_of(exe, shape, layout, device, dtype)
            kind = "pixels" if _pixels_contiguous(layout) else "classes"
            found.add(f"{kind} chunked" if p["num_chunks"] > 1 else f"{kind} one chunk")
            if p["num_tiles"] > p["blocks"]:
                found.add(f"{kind} several tiles per block")
            if not p["e_cached"]:
                found.add(f"{kind} exponentials recomputed" + (" in one chunk" if p["num_chunks"] == 1 else ""))
            if not p["acc_in_shared"]:
                found.add(f"{kind} accumulators in the workspace")
            if p["pipelined"] and p["num_tiles"] > p["blocks"]:
                found.add(f"{kind} pipelined over several tiles per block")
            if p["cluster"] > 1:
                found.add(f"{kind} in clusters")
                if p["num_tiles"] > p["blocks"]:
                    found.add(f"{kind} in clusters with several tiles per block")
            if p["reg_acc"]:
                found.add(f"{kind} register accumulators" + (" over several tiles per block"
                                                             if p["num_tiles"] > p["blocks"] else "")
                          + (" in clusters" if p["cluster"] > 1 else ""))
    assert "pixels in clusters with several tiles per block" in found, sorted(found)
    for feature in ("register accumulators over several tiles per block", "register accumulators in clusters"):
        assert f"classes {feature}" in found, (feature, sorted(found))
    for kind in ("pixels", "classes"):
        for feature in ("chunked", "several tiles per block", "exponentials recomputed",
                        "accumulators in the workspace", "pipelined over several tiles per block", "in clusters"):
            assert f"{kind} {feature}" in found, (kind, feature, sorted(found))
    assert "classes exponentials recomputed in one chunk" in found, sorted(found)


# The GPU benchmark shapes (docs/contract.md section 5), reduced to a few tiles with the same tile
# plan on an H200 (test_bench_cases_have_the_benchmark_plans checks it): what the lent GPU will run.
BENCH_CASES = {
    "cls-imagenet": (64, 1000),
    "cls-inat": (4, 8142),
    "seg-ade": (1, 150, 32, 32),
    "det-lvis": (16, 1231),
}
PLAN_KEYS = ("vec", "tile_rows", "pixel_vectors", "group", "chunk_classes", "num_chunks", "slices", "line_stride",
             "e_stride", "ab_stride", "acc_stride", "e_cached", "acc_in_shared", "pipelined", "shared_bytes", "reg_acc")


def test_bench_cases_have_the_benchmark_plans(tmp_path):
    exe = cuda_plan.build(tmp_path)
    for name, shape in BENCH_CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            layout = "nc" if len(shape) == 2 else "nchw"
            small = _plan_of(exe, shape, layout, "h200", dtype)
            full = _stage2_plan(exe, *cuda_plan.BENCH_SHAPES[name], "h200", dtype)
            assert {k: small[k] for k in PLAN_KEYS} == {k: full[k] for k in PLAN_KEYS}, (name, dtype)
            assert small["num_tiles"] > 1


@pytest.mark.parametrize("mode", ("full", "stage2"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", BENCH_CASES)
def test_loss_benchmark_plans(emu, case, dtype, mode):
    shape = BENCH_CASES[case]
    _configure(emu, "h200")
    reduction, wrt = MODES[mode]
    _compare(emu, make_inputs(shape, dtype=dtype, layout="nc" if len(shape) == 2 else "nchw", seed=7), reduction, wrt)


@pytest.mark.parametrize("case", ["nc", "nchw", "nc_transposed", "nchw_channels_last", "long-rows-chunked",
                                  "pixels-chunked", "classes-in-clusters", "pixels-in-clusters-several-tiles"])
def test_results_do_not_depend_on_thread_order(emu, case):
    """Bitwise the same results whatever order the threads run in between barriers (no shared-memory
    race), and the same as the first run (no state carried between calls)."""
    if case in PLAN_CASES:
        shape, layout, device = PLAN_CASES[case]
    else:
        shape, layout, device = LAYOUT_SHAPES[case], case, "h200"
    inputs = make_inputs(shape, dtype=torch.bfloat16, layout=layout, seed=3)
    args = (*_loss_args(inputs), "mean", [True] * 4)
    runs = []
    for seed in (0, 1, 2, 3, 0):
        _configure(emu, device, seed)
        runs.append(emu.cross_entropy(*args))
    for seed, run in zip((1, 2, 3, 0), runs[1:]):
        for name, a, b in zip(("loss",) + GRAD_INPUTS, runs[0], run):
            assert torch.equal(a, b), f"{name} differs with schedule seed {seed}"


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (0, 5, 4, 4), (2, 5, 0, 3)])
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_empty_and_single_class(emu, shape, reduction):
    _configure(emu, "h200")
    _compare(emu, make_inputs(shape, dtype=torch.float32), reduction, equal_nan=True)


def test_all_rows_ignored(emu):
    _configure(emu, "h200")
    actual = _compare(emu, make_inputs((6, 5), dtype=torch.float32, ignored_fraction=1.0), "mean",
                      equal_nan=True)
    assert actual.loss.isnan()  # 0 / 0, as F.cross_entropy
    assert all(torch.count_nonzero(g) == 0 for g in actual.grads.values())


@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_bad_targets_poison_their_rows_only(emu, layout):
    """Out-of-range targets are never used as an index: their rows get NaN, the others stay right."""
    _configure(emu, "h200")
    shape = (6, 5) if layout == "nc" else (2, 5, 3, 1)
    inputs = make_inputs(shape, dtype=torch.float32, layout=layout, ignored_fraction=0.0)
    target = inputs.target.clone().view(-1)
    bad = torch.tensor([2, 4])
    target[bad] = torch.tensor([7, -3])
    inputs = inputs.with_(target=target.view(inputs.target.shape))
    grad_output = torch.ones(inputs.target.shape)
    actual = _emulated(emu, inputs, "none", GRAD_INPUTS, grad_output)
    loss = actual.loss.view(-1)
    assert loss[bad].isnan().all() and loss[[0, 1, 3, 5]].isfinite().all()
    rows = actual.grads["logits"].movedim(1, -1).reshape(-1, shape[1])
    assert rows[bad].isnan().all() and rows[[0, 1, 3, 5]].isfinite().all()
    assert actual.grads["alpha"].isnan().all()  # every class gradient sums the poisoned rows
    assert actual.grads["confidence"].view(-1)[bad].isnan().all()
    good_target = target.clone()
    good_target[bad] = -100
    good = inputs.with_(target=good_target.view(inputs.target.shape))
    expected = loss_and_grads(reference_loss, good, "none", GRAD_INPUTS, grad_output)
    keep = torch.tensor([0, 1, 3, 5])
    torch.testing.assert_close(loss[keep], expected.loss.view(-1)[keep], **TOLERANCES[torch.float32])
    _configure(emu, "h200")
    mean = emu.cross_entropy(*_loss_args(inputs), "mean", [True] * 4)
    assert mean[0].isnan() and mean[1].isnan().all()


@pytest.mark.parametrize("layout", ["classes", "pixels"])
def test_offsets_past_2_31_elements(emu, layout):
    """Rows (classes contiguous) or class planes (pixels contiguous) 2^31 + 13 elements apart: the
    kernels' element offsets are 64-bit. The 4 GiB bf16 storage is allocated, never touched but
    for the elements used (the pages stay unmapped)."""
    _configure(emu, "h200")
    far = 2**31 + 13
    classes, n = (41, 2) if layout == "classes" else (2, 5)
    storage = torch.empty(far + max(classes, n), dtype=torch.bfloat16)
    if layout == "classes":
        logits = storage.as_strided((n, classes), (far, 1))
    else:
        logits = storage.as_strided((1, classes, n), (2 * far, far, 1))
    inputs = make_inputs(tuple(logits.shape), dtype=torch.bfloat16, ignored_fraction=0.0, seed=8)
    logits.copy_(inputs.logits)
    mask = [False, True, True, True]
    far_out = emu.cross_entropy(*_loss_args(inputs, logits), "sum", mask)
    dense_out = emu.cross_entropy(*_loss_args(inputs), "sum", mask)
    for name, a, b in zip(("loss", "logits", "alpha", "beta", "confidence"), far_out, dense_out):
        assert torch.equal(a, b), name
    _compare(emu, inputs, "sum", ("alpha", "beta", "confidence"))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_huge_logits(emu, dtype):
    """|z| near fp16's max and 1e4-scale float32 logits: finite and right (against a float64 reference)."""
    _configure(emu, "h200")
    inputs = make_inputs((8, 50), dtype=dtype, seed=4)
    with torch.no_grad():
        inputs.logits.mul_(6e4 / inputs.logits.abs().max() if dtype == torch.float16 else 3000.0)
    out = _emulated(emu, inputs, "mean", GRAD_INPUTS, torch.tensor(1.0))
    exact = loss_and_grads(reference_loss, inputs.double(), "mean", GRAD_INPUTS, torch.tensor(1.0, dtype=torch.float64))
    assert out.loss.isfinite() and all(g.isfinite().all() for g in out.grads.values())
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=0)
    for name in ("logits", "confidence"):
        got, want = out.grads[name].double(), exact.grads[name]
        assert (got - want).norm() <= 1e-2 * want.norm() + 1e-6, name


CALIBRATE_SHAPES = {"nc": (37, 41), "nchw": (2, 40, 7, 9), "nc_transposed": (9, 33),
                    "nchw_channels_last": (2, 13, 3, 5), "nc_class_sliced": (7, 41)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", CALIBRATE_SHAPES)
def test_calibrate_and_backward(emu, layout, dtype):
    _configure(emu, "h200")
    inputs = make_inputs(CALIBRATE_SHAPES[layout], dtype=dtype, layout=layout, seed=5)
    zhat = emu.calibrate(inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)
    expected = reference.calibrate(inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)
    assert zhat.dtype == dtype and zhat.shape == inputs.logits.shape
    torch.testing.assert_close(zhat, expected, **TOLERANCES[dtype])
    grad = torch.randn(inputs.logits.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = emu.calibrate_backward(grad, inputs.logits, inputs.alpha, inputs.beta, inputs.confidence, [True] * 4)
    leaves = [t.detach().clone().requires_grad_() for t in (inputs.logits, inputs.alpha, inputs.beta,
                                                          inputs.confidence)]
    reference.calibrate(*leaves).backward(grad)
    for name, g, leaf in zip(GRAD_INPUTS, got, leaves):
        scale = leaf.grad.double().abs().max().item() + 1.0  # sums of ~N products: absolute in their scale
        torch.testing.assert_close(g.double(), leaf.grad.double(), rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["rtol"] * scale, msg=lambda m: f"grad of {name}: {m}")


# ------------------------------------------------------------------------------------------------ the emulation itself


def test_emulation_finds_an_order_dependent_result(emu):
    """A kernel that reads another thread's shared slot without a barrier gives different results
    under different schedules; with the barrier it does not."""
    outs = {}
    for seed in (0, 1, 2):
        _configure(emu, "h200", seed)
        outs[seed] = (emu.selftest("missing_barrier", 1, 0), emu.selftest("with_barrier", 1, 0))
    assert any(not torch.equal(outs[0][0], outs[s][0]) for s in (1, 2))
    assert all(torch.equal(outs[0][1], outs[s][1]) for s in (1, 2))
    assert torch.equal(outs[0][1], (torch.arange(64) + 1) % 64)


@pytest.mark.parametrize("kernel, grid, shared, message", [
    ("divergent_barrier", 1, 0, "divergent __syncthreads"),
    ("shuffle_after_exit", 1, 0, "exited lanes"),
    ("shared_overrun", 1, 256, "past the 256 bytes"),
    ("with_barrier", 0, 0, "invalid launch configuration: grid 0"),
    ("with_barrier", 1, 60000, "above the kernel's limit 49152"),
    ("cluster_barrier_after_exit", 2, 0, "cluster barrier at line .* has exited"),
    ("cluster_peer_read", 3, 256, "not a multiple of the cluster 2"),
])
def test_emulation_reports_what_the_gpu_would_not_do(emu, kernel, grid, shared, message):
    _configure(emu, "h200")
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(kernel, grid, shared)


def test_emulation_refuses_clusters_where_the_device_has_none(emu):
    _configure(emu, "sm86")
    with pytest.raises(RuntimeError, match="does not launch thread-block clusters"):
        emu.selftest("cluster_peer_read", 2, 256)


def test_emulation_runs_the_blocks_of_a_cluster_together(emu):
    """Block 0 reads block 1's shared memory (distributed shared memory) after the cluster barrier:
    with the final barrier it reads 2 (block 1's rank + 1) under every schedule; without it, block 1
    may have exited, and some schedule reads its freed shared memory (0xff bytes: -1)."""
    with_final, without = [], []
    for seed in range(8):
        _configure(emu, "h200", seed)
        with_final.append(emu.selftest("cluster_peer_read", 2, 256))
        without.append(emu.selftest("cluster_no_final_barrier", 2, 256))
    assert all(torch.equal(o, torch.full((64,), 2)) for o in with_final)
    assert any(torch.equal(o, torch.full((64,), 2)) for o in without)
    assert any(bool((o == -1).any()) for o in without)


def test_emulation_poisons_unwritten_shared_memory(emu):
    _configure(emu, "h200")
    assert torch.equal(emu.selftest("uninitialised_shared", 1, 256), torch.full((64,), -1))
