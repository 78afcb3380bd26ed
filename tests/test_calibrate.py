"""disalign_ops.calibrate (paper eq. 6) of every op backend against the eager reference: values,
dtype and strides of the output, and the gradients of logits, alpha, beta and confidence."""

import pytest
import torch

import disalign_ops
from conftest import LAYOUTS, TOLERANCES, differentiable_view, make_inputs

CALIBRATE_INPUTS = ("logits", "alpha", "beta", "confidence")


def _calibrate_and_grads(fn, inputs, wrt, grad_of_output):
    leaves = {}
    args = []
    for name in CALIBRATE_INPUTS:
        t = getattr(inputs, name)
        if t is not None and name in wrt:
            leaves[name], t = differentiable_view(t)
        args.append(t)
    out = fn(*args)
    grads = {}
    if leaves:
        out.backward(grad_of_output(out))
        for name, leaf in leaves.items():
            t = getattr(inputs, name)
            grads[name] = leaf.grad.as_strided(t.shape, t.stride(), t.storage_offset())
    return out.detach(), grads


def _compare(backend, inputs, wrt=CALIBRATE_INPUTS, grad_of_output=None):
    grad_of_output = grad_of_output or (
        lambda out: torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    )
    expected, expected_grads = _calibrate_and_grads(disalign_ops.reference.calibrate, inputs, wrt, grad_of_output)

    def backend_calibrate(*args):
        return disalign_ops.calibrate(*args[:3], confidence=args[3], backend=backend)

    actual, grads = _calibrate_and_grads(backend_calibrate, inputs, wrt, grad_of_output)
    tol = TOLERANCES[inputs.logits.dtype]
    assert actual.dtype == inputs.logits.dtype
    assert actual.stride() == torch.empty_like(inputs.logits).stride()
    torch.testing.assert_close(actual, expected, **tol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grads[name].dtype == grad.dtype, name
        torch.testing.assert_close(grads[name], grad, msg=lambda m: f"grad of {name}: {m}", **tol)


@pytest.mark.parametrize("with_confidence", [True, False], ids=["confidence", "no_confidence"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_reference_in_every_layout(backend, layout, with_confidence):
    shape = (11, 6) if LAYOUTS[layout][0] == "nc" else (3, 6, 4, 5)
    _compare(backend, make_inputs(shape, layout=layout, confidence=with_confidence))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(21, 13), (2, 13, 5, 3)], ids=["nc", "nchw"])
def test_reduced_precision_matches_reference(backend, dtype, shape):
    _compare(backend, make_inputs(shape, dtype=dtype))


@pytest.mark.parametrize("wrt", [("logits",), ("alpha", "beta"), ("confidence",), ("alpha",)], ids=str)
def test_partial_gradients(backend, wrt):
    _compare(backend, make_inputs((2, 5, 3, 4)), wrt=wrt)


def test_broadcast_upstream_gradient(backend):
    """out.sum().backward() hands the backward an expanded (stride 0) gradient."""
    _compare(backend, make_inputs((2, 5, 3, 4)), grad_of_output=lambda out: torch.ones((), dtype=out.dtype).expand(out.shape))


@pytest.mark.parametrize("shape", [(0, 5), (2, 5, 0, 3)], ids=["n0", "h0"])
def test_empty(backend, shape):
    _compare(backend, make_inputs(shape))


def test_nan_and_huge_values(backend):
    inputs = make_inputs((4, 6), dtype=torch.float32)
    logits = inputs.logits * 1e4
    logits[1, 3] = float("nan")
    out = disalign_ops.calibrate(logits, inputs.alpha, inputs.beta, confidence=inputs.confidence, backend=backend)
    expected = disalign_ops.reference.calibrate(logits, inputs.alpha, inputs.beta, inputs.confidence)
    torch.testing.assert_close(out, expected, equal_nan=True, **TOLERANCES[torch.float32])
    assert torch.isnan(out[1, 3]) and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("with_confidence", [True, False], ids=["confidence", "no_confidence"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)], ids=["nc", "nchw"])
def test_gradcheck(backend, shape, with_confidence):
    inputs = make_inputs(shape, confidence=with_confidence, seed=4)
    tensors = [t.detach().clone().requires_grad_() for t in (inputs.logits, inputs.alpha, inputs.beta)]
    if with_confidence:
        tensors.append(inputs.confidence.detach().clone().requires_grad_())

    def calibrated(logits, alpha, beta, confidence=None):
        return disalign_ops.calibrate(logits, alpha, beta, confidence=confidence, backend=backend)

    assert torch.autograd.gradcheck(calibrated, tensors)
