"""What is specific to the Triton backend (`backend="triton"`, disalign_ops/triton_backend/).

The backend-parametrized suite (test_cross_entropy.py, test_calibrate.py, test_bad_input.py,
test_opcheck_compile.py) already runs "triton" against the reference on small shapes, opcheck and
torch.compile(fullgraph=True). This file adds the kernels' own edges: shapes at the tile boundaries
(ragged class blocks, ragged row tiles, more tiles than programs so that the persistent loop and
the da/db partial rows are exercised), the online softmax across blocks, determinism, the target
masking below the host checks, the layout canonicalisation, and, without a GPU, the CUDA path:
tracing the triton_ops with fake CUDA tensors and compiling every launch for sm_90.

Without a GPU the kernels run under the Triton interpreter on CPU tensors, enabled by
tests/conftest.py (TRITON_INTERPRET=1 before disalign_ops.triton_backend is imported); the
interpreter's tiles are small (BLOCK_C <= 16, 64 bytes of pixels), so small shapes reach every edge.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import disalign_ops as da  # noqa: E402
from conftest import (  # noqa: E402
    GRAD_INPUTS, assert_matches, backend_loss, loss_and_grads, make_inputs, reference_loss,
)
from disalign_ops import reference  # noqa: E402
from disalign_ops._validation import accumulation_dtype  # noqa: E402
from disalign_ops.triton_backend import ops as triton_ops  # noqa: E402

DEVICES = [device for device in ("cpu", "cuda") if "triton" in da.available_backends(device)]
_NO_DEVICE = pytest.param("cpu", marks=pytest.mark.skip(
    reason="no CUDA device, and TRITON_INTERPRET=1 was not set before disalign_ops.triton_backend was imported"))
runs_kernels = pytest.mark.parametrize("device", DEVICES or [_NO_DEVICE])
TENSOR_FIELDS = ("logits", "target", "alpha", "beta", "confidence", "weight")

# (shape, conftest layout): 37 rows = 3 tiles of 16 (the last ragged), C = 40 = 3 class blocks of 16
# (the last ragged), 7 x 9 = 63 pixels per image = 4 pixel tiles (the last ragged).
TILE_EDGES = {
    "rows": ((37, 40), "nc"),
    "transposed": ((37, 40), "nc_transposed"),
    "nchw": ((2, 40, 7, 9), "nchw"),
    "channels_last": ((2, 40, 7, 9), "nchw_channels_last"),
}


def _inputs(device, name="nchw", dtype=torch.float64, **kwargs):
    shape, layout = TILE_EDGES[name]
    inputs = make_inputs(shape, dtype=dtype, layout=layout, **kwargs)
    return inputs.with_(**{f: getattr(inputs, f).to(device) for f in TENSOR_FIELDS if getattr(inputs, f) is not None})


def _compare(inputs, reduction, wrt=GRAD_INPUTS, equal_nan=False):
    grad_output = None
    if reduction == "none":  # a per-row upstream gradient for the separate backward kernel
        generator = torch.Generator().manual_seed(1)
        grad_output = torch.rand(inputs.target.shape, generator=generator,
                                 dtype=accumulation_dtype(inputs.logits.dtype)).to(inputs.logits.device)
    expected = loss_and_grads(reference_loss, inputs, reduction, wrt, grad_output)
    actual = loss_and_grads(backend_loss("triton"), inputs, reduction, wrt, grad_output)
    assert_matches(actual, expected, inputs.logits.dtype, equal_nan=equal_nan)
    return actual


@runs_kernels
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", list(TILE_EDGES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_tile_edges_match_reference(device, layout, dtype, reduction):
    _compare(_inputs(device, layout, dtype), reduction)


@runs_kernels
@pytest.mark.parametrize("wrt", [("alpha", "beta", "confidence"), ("alpha",), ("beta",), ("logits",)], ids=str)
def test_gradient_subsets(device, wrt):
    """da and db share one partial buffer whose slots depend on which of them are wanted."""
    for layout in ("rows", "nchw"):
        _compare(_inputs(device, layout), "mean", wrt=wrt)


@runs_kernels
@pytest.mark.parametrize("num_classes", [1, 16, 17])
def test_class_counts_around_the_block_size(device, num_classes):
    inputs = _inputs(device, "rows")
    _compare(inputs.with_(logits=inputs.logits[:, :num_classes].contiguous(),
                          target=inputs.target.clamp(max=num_classes - 1), alpha=inputs.alpha[:num_classes],
                          beta=inputs.beta[:num_classes], weight=inputs.weight[:num_classes]), "mean")


@runs_kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) reports the inf/nan arithmetic
def test_online_softmax_across_blocks(device):
    """-inf over a whole first class block with finite values after it, a row of -inf, nan, 1e4."""
    inputs = _inputs(device, "rows")
    special = inputs.logits.clone()
    special[1, 3] = float("nan")
    special[2, :20] = float("-inf")
    special[4, :] = float("-inf")
    special[5] *= 1e4
    _compare(inputs.with_(logits=special), "none", wrt=("logits", "alpha", "beta", "confidence"), equal_nan=True)


@runs_kernels
def test_deterministic(device):
    """Bitwise equal twice: per-program partials reduced in a fixed order, no atomics."""
    inputs = _inputs(device, "rows", torch.float32)
    first, second = (loss_and_grads(backend_loss("triton"), inputs, "mean") for _ in range(2))
    assert torch.equal(first.loss, second.loss)
    for name, grad in first.grads.items():
        assert torch.equal(grad, second.grads[name]), name


@runs_kernels
def test_grad_mask_conventions_of_the_op(device):
    """Gradients not in grad_mask are 0-element tensors; dlogits keeps channels-last strides."""
    inputs = _inputs(device, "channels_last", torch.float32)
    ops = da.api.op_family("triton")
    args = (inputs.logits, inputs.target, inputs.alpha, inputs.beta, inputs.confidence, inputs.weight, -100)
    loss, d_logits, d_alpha, d_beta, d_conf = ops.cross_entropy(*args, "sum", [True, False, True, False])
    assert loss.shape == () and loss.dtype == torch.float32
    assert d_logits.shape == inputs.logits.shape and d_logits.stride() == inputs.logits.stride()
    assert d_alpha.numel() == 0 and d_conf.numel() == 0 and d_beta.shape == inputs.beta.shape
    with pytest.raises(ValueError, match="grad_mask"):
        ops.cross_entropy(*args, "none", [True] * 4)


@runs_kernels
@pytest.mark.parametrize("layout", ["rows", "nchw"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_bad_targets_poison_their_rows_with_nan(device, layout, reduction, monkeypatch):
    """The GPU policy (DECISIONS.md), run under the interpreter by skipping the CPU's IndexError:
    a target outside [0, C) that is not ignore_index is never an address; its row's loss and
    dlogits row are NaN, so are da/db/ds, and for "mean" the denominator; other rows are exact."""
    monkeypatch.setattr(triton_ops, "check_target_values", lambda *args: None)
    inputs = _inputs(device, layout)
    bad = inputs.target.clone().view(-1)
    bad[3], bad[7] = 1 << 40, -5
    bad = bad.view(inputs.target.shape)
    ops = da.api.op_family("triton")
    args = (inputs.logits, bad, inputs.alpha, inputs.beta, inputs.confidence, inputs.weight, -100)
    mask = [False] * 4 if reduction == "none" else [True] * 4
    loss, d_logits, d_alpha, d_beta, d_conf = ops.cross_entropy(*args, reduction, mask)
    if reduction == "none":
        rows = loss.reshape(-1)
        assert rows[3].isnan() and rows[7].isnan()
        good = torch.ones_like(rows, dtype=torch.bool)
        good[3] = good[7] = False
        as_ignored = bad.clone().view(-1)
        as_ignored[3] = as_ignored[7] = -100
        expected = reference.cross_entropy(inputs.logits, as_ignored.view(bad.shape), inputs.alpha, inputs.beta,
                                           inputs.confidence, inputs.weight, reduction="none").reshape(-1)
        torch.testing.assert_close(rows[good], expected[good], rtol=1e-10, atol=1e-12)
        d_logits, d_alpha, d_beta, d_conf = ops.cross_entropy_backward(torch.ones_like(loss), *args, [True] * 4)
        d_rows = d_logits.movedim(1, -1).reshape(-1, d_logits.shape[1])
        assert d_rows[3].isnan().all() and d_rows[7].isnan().all() and not d_rows[good].isnan().any()
        flat_conf = d_conf.reshape(-1)
        assert flat_conf[3].isnan() and flat_conf[7].isnan() and not flat_conf[good].isnan().any()
    else:
        assert loss.isnan()
        counted = (bad != -100).reshape(-1)
        d_rows = d_logits.movedim(1, -1).reshape(-1, d_logits.shape[1])
        assert d_rows[3].isnan().all() and d_rows[7].isnan().all()
        if reduction == "mean":  # the denominator is NaN: so is every counted row's gradient
            assert d_rows[counted].isnan().all() and d_conf.reshape(-1)[counted].isnan().all()
    assert d_alpha.isnan().all() and d_beta.isnan().all()


@runs_kernels
def test_stats_kernel_poisons_the_denominator(device):
    inputs = _inputs(device, "rows")
    bad = inputs.target.clone()
    assert torch.isfinite(triton_ops._target_stats(bad, inputs.weight, 40, -100, torch.float64))
    bad[5] = 40
    assert triton_ops._target_stats(bad, inputs.weight, 40, -100, torch.float64).isnan()


@runs_kernels
def test_streaming_kernel_matches_reference(device, monkeypatch):
    """The tile kernel's two-sweep path (C above resident_max_classes, in a layout the warp-row
    kernel does not take): forced here."""
    monkeypatch.setattr(triton_ops, "_WARP_LIMITS", None)
    monkeypatch.setattr(triton_ops, "_LIMITS", dataclasses.replace(triton_ops._LIMITS, resident_max_classes=0))
    for layout in TILE_EDGES:
        _compare(_inputs(device, layout, torch.float64), "mean")
        _compare(_inputs(device, layout, torch.bfloat16), "none")


@runs_kernels
def test_tile_kernel_matches_reference(device, monkeypatch):
    """The tile kernel's resident path (layouts that are neither class- nor pixel-contiguous, e.g. a
    strided W): forced here for every layout, the warp-row kernel being off."""
    monkeypatch.setattr(triton_ops, "_WARP_LIMITS", None)
    for layout in TILE_EDGES:
        _compare(_inputs(device, layout, torch.float64), "mean")
        _compare(_inputs(device, layout, torch.bfloat16), "none")


@runs_kernels
@pytest.mark.parametrize("case", ["rows_over_warps", "pixel_vectors", "short_images"])
def test_warp_row_kernel_blocks(device, case, monkeypatch):
    """The warp-row kernel's other block shapes: a row spread over several warps (cross-warp
    reductions, cls-inat on a GPU), NCHW pixels in vectors of V > 1 (seg-ade), and images shorter
    than a tile (row masks instead of the shifted last tile)."""
    if case == "rows_over_warps":
        monkeypatch.setattr(triton_ops, "_WARP_LIMITS", dataclasses.replace(triton_ops._WARP_LIMITS, max_values=4,
                                                                           max_values_with_dlogits=4))
        inputs = _inputs(device, "rows")
    else:
        shape = (2, 6, 8, 8) if case == "pixel_vectors" else (3, 40, 1, 3)
        inputs = make_inputs(shape, dtype=torch.float64, layout="nchw")
        inputs = inputs.with_(**{f: getattr(inputs, f).to(device) for f in TENSOR_FIELDS})
    plan = triton_ops._TilePlan(inputs.logits, inputs.alpha, inputs.beta, inputs.confidence, [True] * 4,
                                warp_rows=True)
    expected = {"rows_over_warps": lambda w: w.lane_width > triton_ops._WARP_LIMITS.lanes,
                "pixel_vectors": lambda w: w.pixel and w.vector > 1 and not w.rows_masked,
                "short_images": lambda w: w.pixel and w.rows_masked}[case]
    assert plan.warp is not None and expected(plan.warp), plan.warp
    _compare(inputs, "mean")
    _compare(inputs.with_(logits=inputs.logits.to(torch.bfloat16)), "none")


@runs_kernels
def test_empty_logits_with_odd_strides(device):
    """numel 0 with strides no layout collapses (issue 10): nothing launched, torch's values."""
    z = torch.randn(2, 3, 4, 0, dtype=torch.float64).transpose(2, 3).to(device).requires_grad_()
    target = torch.zeros(2, 0, 4, dtype=torch.long, device=device)
    a = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss = da.disalign_cross_entropy(z, target, a, a, reduction=reduction, backend="triton")
        expected = torch.nn.functional.cross_entropy(z.detach(), target, reduction=reduction)
        torch.testing.assert_close(loss, expected, equal_nan=True)
    grads = torch.autograd.grad(da.disalign_cross_entropy(z, target, a, a, reduction="sum", backend="triton"), (z, a))
    assert grads[0].shape == z.shape and torch.equal(grads[1], torch.zeros_like(a))
    out = da.calibrate(z, a, a, backend="triton")
    assert out.shape == z.shape


@runs_kernels
def test_half_logits_under_loss_scaling(device):
    """GradScaler's default scale (65536) is inf in float16: the upstream gradient is applied in
    float32 (issue 10), so the gradients stay finite where torch's are."""
    inputs = _inputs(device, "rows", torch.float16)
    z = inputs.logits.detach().requires_grad_()
    loss = da.disalign_cross_entropy(z, inputs.target, inputs.alpha, inputs.beta, reduction="none", backend="triton")
    (loss.mean() * 65536).backward()  # per-row upstream 65536 / N, applied in float32 by the kernel
    ref = inputs.logits.detach().double().requires_grad_()
    zhat = reference.calibrate(ref, inputs.alpha.double(), inputs.beta.double())
    (torch.nn.functional.cross_entropy(zhat, inputs.target, reduction="none").mean() * 65536).backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad.double(), ref.grad, rtol=2e-2, atol=1.0)


@runs_kernels
def test_ops_reject_bad_grad_masks_and_integer_gradients(device):
    inputs = _inputs(device, "rows", torch.float32)
    ops = da.api.op_family("triton")
    args = (inputs.logits, inputs.target, inputs.alpha, inputs.beta, inputs.confidence, inputs.weight, -100)
    for mask in ([True] * 3, [True] * 5):
        with pytest.raises(ValueError, match="grad_mask"):
            ops.cross_entropy(*args, "sum", mask)
        with pytest.raises(ValueError, match="grad_mask"):
            ops.calibrate_backward(torch.ones_like(inputs.logits), inputs.logits, inputs.alpha, inputs.beta,
                                   inputs.confidence, mask)
    with pytest.raises(TypeError, match="grad_loss"):
        ops.cross_entropy_backward(torch.ones(inputs.target.shape, dtype=torch.long, device=device), *args, [True] * 4)
    with pytest.raises(TypeError, match="grad"):
        ops.calibrate_backward(torch.ones(inputs.logits.shape, dtype=torch.int32, device=device), inputs.logits,
                               inputs.alpha, inputs.beta, inputs.confidence, [True] * 4)
    with pytest.raises(ValueError, match="grad_loss"):
        ops.cross_entropy_backward(torch.ones(3, device=device), *args, [True] * 4)


def test_tile_plan_of_the_gpu_shapes():
    """The warp-row planner's choices for the benchmark layouts (no GPU: the GPU limits, planning
    only): every benchmark shape runs the warp-row kernel in stage 2, with at most 32 values per
    thread, under 10% padded lanes, vector loads where the strides allow, one warp per row up to
    C = 1024, and cls-inat's 8142 classes over the 8 warps of a program; full mode keeps rows over
    several warps to 24 values per thread (see warp_plan: the register limits)."""
    from disalign_ops.triton_backend.warp_plan import GPU_LIMITS, warp_config

    plans = {}
    for name, shape, size in [("imagenet", (4096, 1000), 2), ("inat", (4096, 8142), 2), ("lvis", (8192, 1231), 4),
                              ("ade", (8, 150, 512, 512), 2)]:
        x = torch.empty(shape, device="meta")
        layout = triton_ops._row_layout(x.shape, x.stride())
        plan = warp_config(layout.strides, layout.rows_per_image, shape[1], size, GPU_LIMITS)
        assert plan is not None, name
        assert (plan.groups + plan.tail_groups) * plan.vector <= GPU_LIMITS.max_values, plan
        assert shape[1] <= plan.classes < 1.1 * shape[1], plan  # 1000 -> 1024, 150 -> 160
        assert not plan.rows_masked and plan.num_warps == 8, plan
        plans[name] = plan
    assert not plans["imagenet"].pixel and plans["imagenet"].vector == 4 and plans["imagenet"].lane_width == 32
    assert plans["inat"].lane_width == 32 * 8 and plans["inat"].row_warps == 1 and plans["inat"].vector == 2
    assert plans["lvis"].vector == 1  # rows of 1231 values start at odd offsets: no vector loads
    assert plans["ade"].pixel and plans["ade"].vector == 2
    # Full mode (dlogits strides too): a row over several warps holds at most 24 values per thread,
    # so cls-inat's 32 (V = 2 over 8 warps) take the tile kernel, and blocks holding alpha / beta
    # (NCHW pixels, det-lvis's rows of V = 1) 16; no
    # program has 16 warps (128 registers a thread), so C = 12000 takes it in stage 2 too.
    for name, shape, size in [("imagenet", (4096, 1000), 2), ("lvis", (8192, 1231), 4), ("ade", (8, 150, 512, 512), 2),
                              ("c4096", (64, 4096), 4)]:
        layout = triton_ops._row_layout(shape, torch.empty(shape, device="meta").stride())
        full = warp_config(layout.strides * 2, layout.rows_per_image, shape[1], size, GPU_LIMITS)
        assert full is not None and full.num_warps == 8, (name, full)
        values = (full.groups + full.tail_groups) * full.vector
        assert values <= (16 if full.holds_params else 24 if full.lane_width > GPU_LIMITS.lanes else 32), full
    inat = triton_ops._row_layout((4096, 8142), (8142, 1))
    assert warp_config(inat.strides * 2, inat.rows_per_image, 8142, 2, GPU_LIMITS) is None
    wide = triton_ops._row_layout((64, 12000), (12000, 1))
    assert warp_config(wide.strides, wide.rows_per_image, 12000, 2, GPU_LIMITS) is None
    # A symbolic row count (torch.compile, dynamic shapes): nothing assumed of it, so the compiled
    # launch is right for every size: no vector alignment claims, row masks.
    x = torch.empty(8, 150, 512, 512, device="meta")
    layout = triton_ops._row_layout(x.shape, x.stride())
    loose = warp_config(layout.strides, layout.rows_per_image, 150, 2, GPU_LIMITS, exact=False)
    assert loose.vector == 1 and loose.align == 1 and loose.rows_masked


@runs_kernels
@pytest.mark.parametrize("layout", ["rows", "nchw"])
def test_calibrate_at_tile_edges(device, layout):
    inputs = _inputs(device, layout)
    results = []
    for backend in ("eager", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (inputs.logits, inputs.alpha, inputs.beta,
                                                                inputs.confidence)]
        out = da.calibrate(*leaves[:3], confidence=leaves[3], backend=backend)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype).to(device)
        results.append((out, torch.autograd.grad((out * upstream).sum(), leaves)))
    for got, want in zip([results[1][0], *results[1][1]], [results[0][0], *results[0][1]]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_row_layout_collapses_like_the_native_kernels():
    x = torch.empty(2, 5, 6, 7)
    layout = triton_ops._row_layout(x.shape, x.stride())
    assert (layout.images, layout.rows_per_image, layout.strides) == (2, 42, ((210, 42, 1),))
    x = x.to(memory_format=torch.channels_last)
    layout = triton_ops._row_layout(x.shape, x.stride())
    assert (layout.images, layout.rows_per_image, layout.strides) == (1, 84, ((0, 1, 5),))
    x = torch.empty(5, 9).t()
    layout = triton_ops._row_layout(x.shape, x.stride())
    assert (layout.images, layout.rows_per_image, layout.strides) == (1, 9, ((0, 9, 1),))
    x = torch.empty(2, 5, 3, 4, 6).permute(0, 1, 4, 3, 2)
    assert triton_ops._row_layout(x.shape, x.stride()) is None  # copied to contiguous before the kernels


def test_schemas_match_the_native_ops():
    """Same arguments and returns. The schema is inferred from type hints (triton_op ignores an
    explicit one), which spells `int` as `SymInt` and `bool[4]` as `bool[]`."""
    for name in ("cross_entropy", "cross_entropy_backward", "calibrate", "calibrate_backward"):
        ours = str(getattr(torch.ops.disalign_triton, name).default._schema)
        theirs = str(getattr(torch.ops.disalign, name).default._schema)
        inferred_spelling = (theirs.replace("disalign::", "disalign_triton::").replace("bool[4]", "bool[]")
                             .replace("int ignore_index", "SymInt ignore_index"))
        assert ours == inferred_spelling


def _run_without_interpreter(script: str) -> None:
    """Runs `script` in a fresh interpreter where Triton compiles kernels (no TRITON_INTERPRET)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=repo,
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_cuda_path_is_a_traceable_triton_op():
    """Without the interpreter the ops are triton_ops whose fake kernel is the op itself: tracing
    with fake CUDA tensors (no GPU needed) must see the Triton kernels and no data-dependent code,
    and symbolic sizes must not add guards."""
    _run_without_interpreter(
        """
        import torch
        from torch._functorch.aot_autograd import aot_function
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx
        import disalign_ops as da
        from disalign_ops.triton_backend import is_available, ops

        assert not ops.INTERPRETED and not is_available("cpu")
        ops._num_sms = lambda device: 132  # an H100, so no CUDA driver is asked
        graphs = []

        def capture(graph_module, example_inputs):  # stops before running: that needs a GPU
            graphs.append(graph_module.code)
            raise RuntimeError("captured")

        family = da.api.op_family("triton")

        def stage2(logits, target, alpha, beta, confidence):
            return family.cross_entropy(logits, target, alpha, beta, confidence, None, -100, "mean",
                                        [False, True, True, True])

        with FakeTensorMode():
            logits = torch.empty(4, 150, 16, 16, device="cuda", dtype=torch.bfloat16)
            target = torch.zeros(4, 16, 16, device="cuda", dtype=torch.long)
            alpha, beta = torch.empty(150, device="cuda"), torch.empty(150, device="cuda")
            confidence = torch.empty(4, 16, 16, device="cuda")
            try:
                aot_function(stage2, fw_compiler=capture)(logits, target, alpha, beta, confidence)
            except RuntimeError as error:
                assert "captured" in str(error), error
        code = graphs[0]
        assert code.count("triton_kernel_wrapper_functional(") == 2, code
        assert "_assert_async" not in code and "_local_scalar_dense" not in code, code

        # Dynamic shapes (a last partial batch recompiles with symbolic sizes): the host code of
        # the op, here its fake kernel, must handle symbolic sizes without guarding on them.
        for shape in [(4, 150, 16, 16), (64, 1231)]:
            rows = (shape[0],) + shape[2:]
            example = (torch.empty(shape, device="meta", dtype=torch.bfloat16),
                       torch.zeros(rows, device="meta", dtype=torch.long), torch.empty(shape[1], device="meta"),
                       torch.empty(shape[1], device="meta"), torch.empty(rows, device="meta"))
            graph = make_fx(stage2, tracing_mode="symbolic")(*example)
            assert not graph.shape_env.guards, graph.shape_env.guards
        """
    )


def test_every_launch_compiles_for_sm90_without_spills():
    """Each launch the host makes for benchmark-like layouts and class counts (C = 8142, 12000 and
    4096 rows, C = 150 NCHW, C = 1231 rows, float64), compiled for an H100 with the launch's own
    specialisation (no GPU needed): catches code the interpreter accepts but the compiler does
    not, and register spills. Skips where this Triton lacks the APIs it drives."""
    _run_without_interpreter(
        """
        import re, subprocess, sys, tempfile
        import torch, triton
        try:
            from triton.backends.compiler import GPUTarget
            from triton.backends.nvidia.compiler import get_ptxas
            from triton.compiler import ASTSource, make_backend
            from triton.runtime.jit import create_function_from_signature
            sm90 = GPUTarget("cuda", 90, 32)
            backend = make_backend(sm90)
            ptxas = get_ptxas(90).path
        except Exception as error:  # another Triton version: nothing to check with
            print(f"cannot compile for sm_90 offline with this Triton: {error!r}")
            sys.exit(77)
        from disalign_ops.triton_backend import ops

        ops._num_sms = lambda device: 132
        launches = []

        class CompileOnly:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    k = self.kernel
                    binder = create_function_from_signature(k.signature, k.params, backend)
                    bound, specialization, options = binder(*args, **kwargs)
                    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, specialization,
                                                                         options)
                    compiled = triton.compile(ASTSource(k, signature, constexprs, attrs), target=sm90,
                                              options=options.__dict__)
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                        ptx.write(compiled.asm["ptx"])
                        ptx.flush()
                        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                                             capture_output=True, text=True).stderr
                    spills = re.search(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log)
                    launches.append((k.fn.__name__, kwargs.get("BLOCK_R"), kwargs.get("BLOCK_C"), log))
                    assert spills and spills.groups() == ("0", "0"), (k.fn.__name__, kwargs, log)
                return launch

        torch.library.wrap_triton = CompileOnly
        for shape, dtype in [((8, 8142), torch.bfloat16), ((8, 8142), torch.float32), ((4, 12000), torch.bfloat16),
                             ((8, 4096), torch.float32), ((2, 150, 32, 32), torch.bfloat16),
                             ((8, 1231), torch.float32), ((2, 150, 32, 32), torch.float32),
                             ((8, 1000), torch.float64)]:
            param = torch.float64 if dtype == torch.float64 else torch.float32
            logits = torch.empty(shape, dtype=dtype)
            rows = (shape[0],) + shape[2:]
            target, s = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=param)
            a = b = w = torch.zeros(shape[1], dtype=param)
            ops.cross_entropy(logits, target, a, b, s, None, -100, "mean", [False, True, True, True])
            ops.cross_entropy(logits, target, a, b, s, w, -100, "sum", [True, True, True, True])
            ops.cross_entropy(logits, target, a, b, s, w, -100, "none", [False] * 4)
            ops.cross_entropy_backward(torch.ones(rows), logits, target, a, b, s, w, -100, [True] * 4)
            ops.calibrate(logits, a, b, s)
            ops.calibrate_backward(torch.empty_like(logits), logits, a, b, s, [True] * 4)
        assert len(launches) == 8 * 8, len(launches)  # 8 launches per shape ("none" needs no prepass)
        """
    )
