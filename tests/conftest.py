"""Shared fixtures and helpers of the op tests: the backends under test on every device, input
builders in every logits layout, and loss/gradient evaluation for comparison against
disalign_ops.reference.

Device axis (as torchvision's cpu_and_cuda()): the `device` fixture runs a test on the CPU and on
CUDA, the CUDA case skipping without a GPU; the `backend` fixture depends on it, so every
backend-parametrised test runs each op backend on each device the machine has. The backend value
is its name (a str) carrying `.device`; build inputs with make_inputs(..., device=backend.device)
or move them with on_device. A test module that is about one device overrides the axis with
@pytest.mark.parametrize("device", ["cuda"])."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors only under its interpreter, which must be enabled
# before disalign_ops.triton_backend is first imported: enable it for the whole suite.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import disalign_ops  # noqa: E402

CUDA_AVAILABLE = torch.cuda.is_available()


def cpu_and_cuda():
    """The devices of the device axis; the CUDA case is marked needs_cuda and skips without a GPU."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def _devices_here():
    return ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])


# Every op-based backend that runs on one of this machine's devices ("native"; "triton" on CUDA, or
# on the CPU under TRITON_INTERPRET=1).
OP_BACKENDS = [
    name for name in ("native", "triton") if any(name in disalign_ops.available_backends(d) for d in _devices_here())
]
# The Triton interpreter runs each kernel program in Python: tests marked large_shape skip it.
SLOW_BACKENDS = {"triton"}

REDUCTIONS = ("mean", "sum", "none")
GRAD_INPUTS = ("logits", "alpha", "beta", "confidence")

# Logits layouts: name -> (shape kind, builder of a tensor with the given logical shape).
# "nc" layouts take shape (N, C); "spatial" ones (N, C, d1, ...).


def _transposed(shape, dtype):
    n, c = shape
    return torch.randn(c, n, dtype=dtype).t()


def _class_sliced(shape, dtype):
    n, c = shape
    return torch.randn(n, c + 3, dtype=dtype)[:, 1 : c + 1]


def _batch_strided(shape, dtype):
    return torch.randn((2 * shape[0],) + tuple(shape[1:]), dtype=dtype)[::2]


def _channels_last(shape, dtype):
    # (N, d1, ..., C) in memory, for any number of spatial dims.
    dims = list(range(len(shape)))
    storage = torch.randn([shape[0], *shape[2:], shape[1]], dtype=dtype)
    return storage.permute(0, dims[-1], *dims[1:-1])


def _spatial_sliced(shape, dtype):
    padded = list(shape)
    padded[-1] += 2
    return torch.randn(padded, dtype=dtype)[..., 1 : shape[-1] + 1]


def _classes_outermost(shape, dtype):
    # Memory order (C, N, d1, ...): pixels contiguous, images interleaved per class.
    return torch.randn((shape[1], shape[0]) + tuple(shape[2:]), dtype=dtype).transpose(0, 1)


LAYOUTS = {
    "nc": ("nc", lambda shape, dtype: torch.randn(shape, dtype=dtype)),
    "nc_transposed": ("nc", _transposed),
    "nc_class_sliced": ("nc", _class_sliced),
    "nc_batch_strided": ("nc", _batch_strided),
    "nchw": ("spatial", lambda shape, dtype: torch.randn(shape, dtype=dtype)),
    "nchw_channels_last": ("spatial", _channels_last),
    "nchw_spatial_sliced": ("spatial", _spatial_sliced),
    "nchw_batch_strided": ("spatial", _batch_strided),
    "nchw_classes_outermost": ("spatial", _classes_outermost),
}


def make_logits(layout: str, shape, dtype=torch.float64, scale: float = 3.0) -> torch.Tensor:
    kind, build = LAYOUTS[layout]
    assert (kind == "nc") == (len(shape) == 2), f"layout {layout} does not fit shape {shape}"
    logits = build(tuple(shape), dtype)
    with torch.no_grad():
        logits.mul_(scale)
    return logits


@dataclass(frozen=True)
class LossInputs:
    logits: torch.Tensor
    target: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    confidence: torch.Tensor | None
    weight: torch.Tensor | None
    ignore_index: int = -100

    def with_(self, **changes) -> "LossInputs":
        return replace(self, **changes)

    def to(self, device) -> "LossInputs":
        names = ("logits", "target", "alpha", "beta", "confidence", "weight")
        return replace(self, **{name: on_device(getattr(self, name), device) for name in names})

    def double(self) -> "LossInputs":
        """The same values in float64 (target and absent inputs unchanged): for a float64 evaluation."""
        names = ("logits", "alpha", "beta", "confidence", "weight")
        return replace(self, **{n: getattr(self, n) if getattr(self, n) is None else getattr(self, n).double()
                                for n in names})


def on_device(t, device):
    """t on `device` with the same sizes, strides and storage offset (Tensor.to would densify)."""
    if t is None or t.device == torch.device(device):
        return t
    storage_len = t.untyped_storage().nbytes() // t.element_size()
    base = t.detach().as_strided((storage_len,), (1,), 0).to(device)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def make_inputs(
    shape=(6, 5),
    dtype=torch.float64,
    layout=None,
    confidence=True,
    weight=True,
    ignore_index=-100,
    ignored_fraction=0.25,
    target_dtype=torch.int64,
    param_dtype=None,
    seed=0,
    device="cpu",
) -> LossInputs:
    """Random DisAlign loss inputs; alpha/beta/confidence/weight in param_dtype (default: float32 for
    half logits, else the logits' dtype), some targets set to ignore_index. Drawn on the CPU (the
    same values on every device), then moved to `device` with their strides."""
    torch.manual_seed(seed)
    layout = layout or ("nc" if len(shape) == 2 else "nchw")
    logits = make_logits(layout, shape, dtype)
    param_dtype = param_dtype or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    classes = shape[1]
    rows = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, classes, rows)
    target[torch.rand(rows) < ignored_fraction] = ignore_index
    inputs = LossInputs(
        logits=logits,
        target=target.to(target_dtype),
        alpha=(0.5 * torch.randn(classes)).to(param_dtype),
        beta=torch.randn(classes).to(param_dtype),
        confidence=torch.rand(rows).to(param_dtype) if confidence else None,
        weight=(0.25 + torch.rand(classes)).to(param_dtype) if weight else None,
        ignore_index=ignore_index,
    )
    return inputs.to(device)


def differentiable_view(t: torch.Tensor):
    """(leaf, view): a leaf over a copy of t's whole storage and its view with t's exact sizes, strides
    and offset, so sliced / transposed / channels-last layouts reach the op unchanged."""
    storage_len = t.untyped_storage().nbytes() // t.element_size()
    leaf = t.detach().as_strided((storage_len,), (1,), 0).clone().requires_grad_()
    return leaf, leaf.as_strided(t.shape, t.stride(), t.storage_offset())


@dataclass
class Result:
    loss: torch.Tensor
    grads: dict


def loss_and_grads(fn, inputs: LossInputs, reduction: str, wrt=GRAD_INPUTS, grad_output=None) -> Result:
    """fn(logits, target, alpha, beta, confidence, weight, ignore_index, reduction), then backward with
    grad_output (default: ones) into the inputs named in wrt; gradients have each input's strides."""
    args, leaves = {}, {}
    for name in GRAD_INPUTS:
        t = getattr(inputs, name)
        if t is not None and name in wrt:
            leaves[name], args[name] = differentiable_view(t)
        else:
            args[name] = t
    loss = fn(
        args["logits"], inputs.target, args["alpha"], args["beta"], args["confidence"], inputs.weight,
        inputs.ignore_index, reduction,
    )
    grads = {}
    if leaves:
        loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
        for name, leaf in leaves.items():
            t = getattr(inputs, name)
            grads[name] = leaf.grad.as_strided(t.shape, t.stride(), t.storage_offset())
    return Result(loss.detach(), grads)


def backend_loss(backend: str):
    backend = str(backend)

    def fn(logits, target, alpha, beta, confidence, weight, ignore_index, reduction):
        return disalign_ops.disalign_cross_entropy(
            logits, target, alpha, beta, confidence=confidence, weight=weight, ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )

    return fn


def reference_loss(logits, target, alpha, beta, confidence, weight, ignore_index, reduction):
    return disalign_ops.reference.cross_entropy(logits, target, alpha, beta, confidence, weight, ignore_index, reduction)


# Absolute/relative tolerances against the reference, by logits dtype. Half inputs accumulate in
# float32 like the reference; their gradients are rounded once to the half dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
}


def assert_matches(actual: Result, expected: Result, dtype: torch.dtype, equal_nan=False):
    tol = TOLERANCES[dtype]
    assert actual.loss.dtype == expected.loss.dtype
    assert actual.loss.shape == expected.loss.shape
    torch.testing.assert_close(actual.loss, expected.loss, equal_nan=equal_nan, **tol)
    assert actual.grads.keys() == expected.grads.keys()
    for name, grad in expected.grads.items():
        got = actual.grads[name]
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == grad.dtype, name
        assert got.shape == grad.shape, name
        torch.testing.assert_close(got, grad, equal_nan=equal_nan, msg=lambda m: f"grad of {name}: {m}", **tol)


def upstream(inputs: LossInputs, reduction: str) -> torch.Tensor:
    """A non-trivial upstream gradient for the loss (per row for reduction="none"), on its device."""
    dtype = torch.float64 if inputs.logits.dtype == torch.float64 else torch.float32
    device = inputs.logits.device
    if reduction != "none":
        return torch.tensor(0.75, dtype=dtype, device=device)
    return torch.randn(inputs.target.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)


def compare(backend: str, inputs: LossInputs, reduction: str, wrt=GRAD_INPUTS, equal_nan=False) -> Result:
    """The backend against the reference on the backend's device (inputs are moved there), with a
    non-trivial upstream gradient; returns the backend's result."""
    inputs = inputs.to(getattr(backend, "device", inputs.logits.device))
    grad_output = upstream(inputs, reduction)
    expected = loss_and_grads(reference_loss, inputs, reduction, wrt, grad_output)
    actual = loss_and_grads(backend_loss(backend), inputs, reduction, wrt, grad_output)
    assert actual.loss.device == inputs.logits.device
    assert_matches(actual, expected, inputs.logits.dtype, equal_nan=equal_nan)
    return actual


def pytest_configure(config):
    config.addinivalue_line("markers", "large_shape: too large for the Triton interpreter; skipped for triton")
    config.addinivalue_line("markers", "needs_cuda: the CUDA case of the device axis; skipped without a GPU")


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("needs_cuda"):
            item.add_marker(skip)


class Backend(str):
    """An op backend's name (pass it as backend=) and the device its test runs on."""

    device: str

    def __new__(cls, name: str, device: str):
        self = super().__new__(cls, name)
        self.device = device
        return self


@pytest.fixture(params=cpu_and_cuda())
def device(request):
    if request.param == "cuda" and not CUDA_AVAILABLE:
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(params=OP_BACKENDS)
def backend(request, device):
    if request.param not in disalign_ops.available_backends(device):
        pytest.skip(f"{request.param} does not run on {device} here")
    if device == "cpu" and request.param in SLOW_BACKENDS and request.node.get_closest_marker("large_shape"):
        pytest.skip(f"{request.param}: shape too large for the interpreter")
    return Backend(request.param, device)


def check_indexing_beyond_2_to_31(backend, layout, device):
    """Stage 2 on bfloat16 logits of 2^31 + 2^20 elements, (1, C, S) or (S, C): 64-bit indexing.

    All rows but the last few are ignored, so the expected values are the reference on those few rows,
    which lie beyond element 2^31."""
    classes = 8
    rows = (2**31 + 2**20) // classes
    tail = 5
    torch.manual_seed(0)
    tail_logits = (torch.randn(tail, classes, device=device) * 3).bfloat16()
    tail_target = torch.randint(0, classes, (tail,), device=device)
    if layout == "pixels":
        logits = torch.zeros(1, classes, rows, dtype=torch.bfloat16, device=device)
        logits[0, :, -tail:] = tail_logits.t()
        target = torch.full((1, rows), -100, dtype=torch.int64, device=device)
        target[0, -tail:] = tail_target
    else:
        logits = torch.zeros(rows, classes, dtype=torch.bfloat16, device=device)
        logits[-tail:] = tail_logits
        target = torch.full((rows,), -100, dtype=torch.int64, device=device)
        target[-tail:] = tail_target
    alpha = (0.3 * torch.randn(classes, device=device)).requires_grad_()
    beta = torch.randn(classes, device=device).requires_grad_()
    loss = disalign_ops.disalign_cross_entropy(logits, target, alpha, beta, reduction="sum", backend=backend)
    loss.backward()
    del logits, target
    ref_alpha = alpha.detach().clone().requires_grad_()
    ref_beta = beta.detach().clone().requires_grad_()
    expected = disalign_ops.reference.cross_entropy(tail_logits, tail_target, ref_alpha, ref_beta, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(alpha.grad, ref_alpha.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(beta.grad, ref_beta.grad, **TOLERANCES[torch.float32])
