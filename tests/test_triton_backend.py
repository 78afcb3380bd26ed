"""The Triton backend (`backend="triton"`) against the eager reference.

Without a GPU the kernels run under the Triton interpreter on CPU tensors, which Triton only does
when TRITON_INTERPRET=1 is set before the kernels are defined (the first import of
`disalign_ops.triton_backend`): this module sets it before importing the package, tests/conftest.py
should do the same for the whole suite. Shapes are small (the interpreter runs each program in
Python) but are chosen so that the interpreter's small tiles leave ragged class blocks and ragged
row tiles, and so that da/db use the persistent loop (fewer programs than tiles).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import disalign_ops as da  # noqa: E402
from disalign_ops import reference  # noqa: E402

DEVICE = "cuda" if "triton" in da.available_backends("cuda") else "cpu"
if "triton" not in da.available_backends(DEVICE):
    pytest.skip(
        "the Triton backend cannot run here: no CUDA device, and TRITON_INTERPRET=1 was not set before "
        "disalign_ops.triton_backend was first imported",
        allow_module_level=True,
    )

from disalign_ops.triton_backend import ops as triton_ops  # noqa: E402

C = 40  # 3 class blocks of the interpreter's BLOCK_C = 16, the last one ragged

TOLERANCES = {  # (rtol, atol) of losses and gradients, per logits dtype
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (2e-3, 2e-4),
}


def _logits(layout, dtype, num_classes=C):
    """Logits of each memory layout the kernels distinguish, with (N, d...) row shape."""
    if layout == "rows":  # (N, C), 37 rows: 3 ragged tiles of 16 rows
        z = torch.randn(37, num_classes, dtype=torch.float64)
    elif layout == "nchw":  # 7 x 9 = 63 pixels per image, read in place along pixels
        z = torch.randn(2, num_classes, 7, 9, dtype=torch.float64)
    elif layout == "channels_last":
        z = torch.randn(2, num_classes, 7, 9, dtype=torch.float64).to(memory_format=torch.channels_last)
    elif layout == "transposed":  # (N, C) with the rows contiguous
        z = torch.randn(num_classes, 37, dtype=torch.float64).t()
    elif layout == "permuted":  # spatial dims that cannot be collapsed: the copy fallback
        z = torch.randn(2, num_classes, 5, 4, 3, dtype=torch.float64).permute(0, 1, 4, 3, 2)
    else:
        raise ValueError(layout)
    return (3 * z).to(dtype).to(DEVICE)


def _inputs(layout, dtype, with_confidence=True, with_weight=True, num_classes=C, ignore_every=5):
    torch.manual_seed(0)
    logits = _logits(layout, dtype, num_classes)
    row_shape = (logits.shape[0],) + tuple(logits.shape[2:])
    target = torch.randint(0, num_classes, row_shape)
    target.view(-1)[::ignore_every] = -100
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = 0.5 * torch.randn(num_classes, dtype=param_dtype)
    beta = torch.randn(num_classes, dtype=param_dtype)
    confidence = torch.rand(row_shape, dtype=param_dtype) if with_confidence else None
    weight = torch.rand(num_classes, dtype=param_dtype) + 0.1 if with_weight else None
    to_device = (lambda t: None if t is None else t.to(DEVICE))
    return logits, target.to(DEVICE), alpha.to(DEVICE), beta.to(DEVICE), to_device(confidence), to_device(weight)


def _loss_and_grads(backend, logits, target, alpha, beta, confidence, weight, reduction, grad_output=None,
                    requires_grad=(True, True, True, True)):
    """The loss and the autograd gradients of (grad_output * loss).sum() for the inputs asked for."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(r)
              for t, r in zip((logits, alpha, beta, confidence), requires_grad)]
    loss = da.disalign_cross_entropy(leaves[0], target, leaves[1], leaves[2], leaves[3], weight,
                                     reduction=reduction, backend=backend)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if not wanted:
        return loss, []
    scale = torch.ones_like(loss) if grad_output is None else grad_output
    return loss, list(torch.autograd.grad((loss * scale).sum(), wanted))


def _assert_matches_reference(args, reduction, dtype, grad_output=None, requires_grad=(True, True, True, True)):
    rtol, atol = TOLERANCES[dtype]
    expected = _loss_and_grads("eager", *args, reduction, grad_output, requires_grad)
    actual = _loss_and_grads("triton", *args, reduction, grad_output, requires_grad)
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol, equal_nan=True)
    assert actual[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for got, want in zip(actual[1], expected[1]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    return actual


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["rows", "nchw", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_matches_reference(layout, dtype, reduction):
    args = _inputs(layout, dtype)
    grad_output = None
    if reduction == "none":  # a per-row upstream gradient exercises the separate backward kernel
        grad_output = torch.rand(args[1].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _assert_matches_reference(args, reduction, dtype, grad_output)


@pytest.mark.parametrize("layout", ["rows", "nchw", "permuted"])
def test_float16_and_fallback_layout(layout):
    _assert_matches_reference(_inputs(layout, torch.float16), "mean", torch.float16)


@pytest.mark.parametrize(
    "requires_grad",
    [(False, True, True, True), (True, False, False, False), (False, False, True, False), (False, False, False, True)],
    ids=["stage2", "logits-only", "beta-only", "confidence-only"],
)
def test_gradient_subsets(requires_grad):
    args = _inputs("nchw", torch.float64)
    _assert_matches_reference(args, "mean", torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("with_confidence,with_weight", [(False, False), (False, True), (True, False)])
def test_optional_confidence_and_weight(with_confidence, with_weight):
    for reduction in ("mean", "none"):
        args = _inputs("rows", torch.float64, with_confidence=with_confidence, with_weight=with_weight)
        _assert_matches_reference(args, reduction, torch.float64)


def test_grad_mask_conventions_of_the_op():
    """Gradients not in grad_mask come back as 0-element tensors; dlogits has the logits' strides."""
    logits, target, alpha, beta, confidence, weight = _inputs("channels_last", torch.float32)
    ops = da.api.op_family("triton")
    loss, d_logits, d_alpha, d_beta, d_conf = ops.cross_entropy(
        logits, target, alpha, beta, confidence, weight, -100, "sum", [True, False, True, False])
    assert loss.shape == () and loss.dtype == torch.float32
    assert d_logits.shape == logits.shape and d_logits.stride() == logits.stride()
    assert d_alpha.numel() == 0 and d_alpha.dtype == alpha.dtype
    assert d_beta.shape == beta.shape
    assert d_conf.numel() == 0 and d_conf.dtype == confidence.dtype
    loss_rows = ops.cross_entropy(logits, target, alpha, beta, confidence, weight, -100, "none", [False] * 4)[0]
    assert loss_rows.shape == target.shape
    with pytest.raises(ValueError, match="grad_mask"):
        ops.cross_entropy(logits, target, alpha, beta, confidence, weight, -100, "none", [True] * 4)


def test_none_backward_with_expanded_grad_output():
    """loss.sum() sends a stride-0 grad_loss to the "none" backward."""
    args = _inputs("nchw", torch.float64)
    expected = _loss_and_grads("eager", *args, "none")
    actual = _loss_and_grads("triton", *args, "none")
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) reports the inf/nan arithmetic
def test_edge_cases_match_torch():
    """All rows ignored (mean is nan, gradients 0), no rows, logits of magnitude 1e4, -inf and nan."""
    logits, target, alpha, beta, confidence, weight = _inputs("rows", torch.float64)
    ignored = torch.full_like(target, -100)
    for reduction in ("mean", "sum", "none"):
        _assert_matches_reference((logits, ignored, alpha, beta, confidence, weight), reduction, torch.float64)
        _assert_matches_reference((logits[:0], target[:0], alpha, beta, confidence[:0], weight), reduction,
                                  torch.float64)
    _assert_matches_reference((logits * 1e4, target, alpha, beta, confidence, weight), "none", torch.float64)
    special = logits.clone()
    special[1, 3] = float("nan")
    special[2, :20] = float("-inf")  # a whole first class block at -inf, finite values later in the row
    special[4, :] = float("-inf")
    expected = _loss_and_grads("eager", special, target, alpha, beta, confidence, weight, "none")
    actual = _loss_and_grads("triton", special, target, alpha, beta, confidence, weight, "none")
    for got, want in zip([actual[0], *actual[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_half_precision_near_its_maximum_gives_a_finite_loss():
    logits, target, alpha, beta, confidence, weight = _inputs("rows", torch.float16)
    big = (logits.float() * 2e4).clamp(-65000, 65000).half()
    loss = da.disalign_cross_entropy(big, target, alpha * 0, beta * 0, None, weight, backend="triton")
    assert torch.isfinite(loss)
    expected = da.disalign_cross_entropy(big, target, alpha * 0, beta * 0, None, weight, backend="eager")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


def test_deterministic():
    """Bitwise equal results twice: per-program partials reduced in a fixed order, no atomics."""
    args = _inputs("rows", torch.float32)
    first = _loss_and_grads("triton", *args, "mean")
    second = _loss_and_grads("triton", *args, "mean")
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


def test_out_of_range_target_raises_naming_the_value():
    logits, target, alpha, beta, confidence, weight = _inputs("rows", torch.float32)
    bad = target.clone()
    bad[3] = C
    with pytest.raises(IndexError, match=f"target contains {C}"):
        da.disalign_cross_entropy(logits, bad, alpha, beta, confidence, weight, backend="triton")


def test_kernels_ignore_out_of_range_targets_without_reading_them():
    """Below the host check: bad targets are counted and treated as ignored rows, never used as addresses."""
    logits, target, alpha, beta, confidence, weight = _inputs("rows", torch.float64)
    bad = target.clone()
    bad[3], bad[7] = 1 << 40, -5
    weight_sum, bad_count = triton_ops._target_stats(bad, weight, C, -100, torch.float64)
    assert int(bad_count) == 2
    as_ignored = bad.clone()
    as_ignored[3] = as_ignored[7] = -100
    valid = as_ignored != -100
    torch.testing.assert_close(weight_sum, weight[as_ignored[valid]].sum())
    loss_rows = triton_ops._launch_cross_entropy(logits, bad, alpha, beta, confidence, weight, -100,
                                                 triton_ops.LOSS_PER_ROW, None, 0, [False] * 4)[0]
    expected = reference.cross_entropy(logits, as_ignored, alpha, beta, confidence, weight, reduction="none")
    torch.testing.assert_close(loss_rows, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_classes", [1, 17])
def test_class_counts_around_the_block_size(num_classes):
    args = _inputs("nchw", torch.float64, num_classes=num_classes)
    _assert_matches_reference(args, "mean", torch.float64)


@pytest.mark.parametrize("layout", ["rows", "nchw", "channels_last", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_calibrate_matches_reference(layout, dtype):
    logits, _, alpha, beta, confidence, _ = _inputs(layout, dtype)
    rtol, atol = TOLERANCES[dtype]
    results = []
    for backend in ("eager", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (logits, alpha, beta, confidence)]
        out = da.calibrate(*leaves, backend=backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        results.append((out, torch.autograd.grad((out * grad).sum(), leaves)))
    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.dtype == logits.dtype and actual.stride() == torch.empty_like(logits).stride()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for got, want in zip(actual_grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=rtol, atol=max(atol, 1e-4 if dtype != torch.float64 else 0))


def test_calibrate_without_confidence_and_partial_grads():
    logits, _, alpha, beta, _, _ = _inputs("nchw", torch.float64)
    ops = da.api.op_family("triton")
    torch.testing.assert_close(ops.calibrate(logits, alpha, beta, None), reference.calibrate(logits, alpha, beta))
    grad = torch.randn_like(logits)
    d_logits, d_alpha, d_beta, d_conf = ops.calibrate_backward(grad, logits, alpha, beta, None,
                                                               [False, True, False, True])
    assert d_logits.numel() == 0 and d_beta.numel() == 0 and d_conf.numel() == 0
    leaf = alpha.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((reference.calibrate(logits, leaf, beta) * grad).sum(), [leaf])
    torch.testing.assert_close(d_alpha, expected, rtol=1e-10, atol=1e-12)


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
    assert triton_ops._row_layout(x.shape, x.stride()) is None


def test_schemas_match_the_native_ops():
    """Same arguments and returns. The schema is inferred from type hints (triton_op ignores an
    explicit one), which spells `int` as `SymInt` and `bool[4]` as `bool[]`."""
    native = pytest.importorskip("disalign_ops._C")  # noqa: F841
    for name in ("cross_entropy", "cross_entropy_backward", "calibrate", "calibrate_backward"):
        ours = str(getattr(torch.ops.disalign_triton, name).default._schema)
        theirs = str(getattr(torch.ops.disalign, name).default._schema)
        inferred_spelling = (theirs.replace("disalign::", "disalign_triton::").replace("bool[4]", "bool[]")
                             .replace("int ignore_index", "SymInt ignore_index"))
        assert ours == inferred_spelling


def test_opcheck():
    logits, target, alpha, beta, confidence, weight = _inputs("rows", torch.float32, num_classes=10)
    logits, target, confidence = logits[:6], target[:6], confidence[:6]
    ops = torch.ops.disalign_triton
    torch.library.opcheck(ops.cross_entropy.default,
                          (logits, target, alpha, beta, confidence, weight, -100, "mean", [True] * 4))
    torch.library.opcheck(ops.cross_entropy.default,
                          (logits, target, alpha, beta, confidence, weight, -100, "none", [False] * 4))
    torch.library.opcheck(ops.cross_entropy_backward.default,
                          (torch.rand(6, device=DEVICE), logits, target, alpha, beta, confidence, weight, -100,
                           [True] * 4))
    torch.library.opcheck(ops.calibrate.default, (logits, alpha, beta, confidence))
    torch.library.opcheck(ops.calibrate_backward.default,
                          (torch.randn_like(logits), logits, alpha, beta, confidence, [True] * 4))


def test_torch_compile_fullgraph():
    """Under the interpreter the ops are opaque custom ops; on CUDA Inductor traces into the kernels."""
    logits, target, alpha, beta, confidence, weight = _inputs("nchw", torch.float32)

    def loss_fn(logits, alpha, beta, confidence):
        return 2 * da.disalign_cross_entropy(logits, target, alpha, beta, confidence, weight, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (logits, alpha, beta, confidence)]
        loss = fn(*leaves)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    for got, want in zip([results[1][0], *results[1][1]], [results[0][0], *results[0][1]]):
        torch.testing.assert_close(got, want)


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
        import disalign_ops as da
        from disalign_ops.triton_backend import is_available, ops

        assert not ops.INTERPRETED and not is_available("cpu")
        ops._num_sms = lambda device: 132  # an H100, so no CUDA driver is asked
        graphs = []

        def capture(graph_module, example_inputs):  # stops before running: that needs a GPU
            graphs.append(graph_module.code)
            raise RuntimeError("captured")

        family = da.api.op_family("triton")
        with FakeTensorMode():
            logits = torch.empty(4, 150, 16, 16, device="cuda", dtype=torch.bfloat16)
            target = torch.zeros(4, 16, 16, device="cuda", dtype=torch.long)
            alpha, beta = torch.empty(150, device="cuda"), torch.empty(150, device="cuda")
            confidence = torch.empty(4, 16, 16, device="cuda")

            def stage2(logits, target, alpha, beta, confidence):
                return family.cross_entropy(logits, target, alpha, beta, confidence, None, -100, "mean",
                                            [False, True, True, True])

            try:
                aot_function(stage2, fw_compiler=capture)(logits, target, alpha, beta, confidence)
            except RuntimeError as error:
                assert "captured" in str(error), error
        code = graphs[0]
        assert code.count("triton_kernel_wrapper_functional(") == 2, code
        assert "_assert_async" in code and "_local_scalar_dense" not in code, code

        # Dynamic shapes (a last partial batch recompiles with symbolic sizes): the host code of
        # the op, here its fake kernel, must handle symbolic sizes without guarding on them.
        from torch.fx.experimental.proxy_tensor import make_fx
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
    """Each launch the host makes for benchmark-like layouts and class counts (C = 8142 rows,
    C = 150 NCHW, C = 1231 rows, float64), compiled for an H100 with the launch's own
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
        for shape, dtype in [((8, 8142), torch.bfloat16), ((2, 150, 32, 32), torch.bfloat16),
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
        assert len(launches) == 5 * 9, len(launches)  # 9 launches per shape
        """
    )
