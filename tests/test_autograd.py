"""Autograd contract of the op backends beyond first-order values (issue 10): second derivatives
are refused clearly (never wrong), every backward returns storage the caller owns, and weight is
not differentiable. Every op backend on every device (see conftest)."""

import pytest
import torch
import torch.nn.functional as F

import disalign_ops
from conftest import make_inputs


def _loss_fn(backend, inputs, reduction):
    def loss(logits, alpha, beta, confidence):
        out = disalign_ops.disalign_cross_entropy(
            logits, inputs.target, alpha, beta, confidence=confidence, weight=inputs.weight, reduction=reduction,
            backend=backend,
        )
        return out if reduction != "none" else (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out).to(out))

    return loss


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in (inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_create_graph_raises_instead_of_a_wrong_second_derivative(backend, reduction):
    inputs = make_inputs((4, 5), device=backend.device)
    leaves = _leaves(inputs)
    loss = _loss_fn(backend, inputs, reduction)(*leaves).sum()
    with pytest.raises(RuntimeError, match="double backward is not supported.*create_graph=True"):
        torch.autograd.grad(loss, leaves[0], create_graph=True)


def test_gradgradcheck_raises_clearly(backend):
    inputs = make_inputs((3, 4), device=backend.device)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.gradgradcheck(_loss_fn(backend, inputs, "mean"), _leaves(inputs))


def test_calibrate_create_graph_raises(backend):
    inputs = make_inputs((4, 5), device=backend.device)
    logits, alpha, beta, confidence = _leaves(inputs)
    out = disalign_ops.calibrate(logits, alpha, beta, confidence=confidence, backend=backend)
    with pytest.raises(RuntimeError, match="disalign calibrate: double backward is not supported"):
        torch.autograd.grad(out.pow(2).sum(), alpha, create_graph=True)


def test_gradient_penalty_works_on_the_eager_backend_and_first_derivatives_still_work(backend):
    """What the error message recommends gives torch's values; plain backward is unaffected."""
    inputs = make_inputs((4, 5), device=backend.device, weight=False, confidence=False)
    zero = torch.zeros(5, dtype=inputs.logits.dtype, device=backend.device)
    z = inputs.logits.detach().clone().requires_grad_()
    loss = disalign_ops.disalign_cross_entropy(z, inputs.target, zero, zero, backend="eager")
    g, = torch.autograd.grad(loss, z, create_graph=True)
    (loss + g.pow(2).sum()).backward()
    z_ref = inputs.logits.detach().clone().requires_grad_()
    loss_ref = F.cross_entropy(z_ref, inputs.target)
    g_ref, = torch.autograd.grad(loss_ref, z_ref, create_graph=True)
    (loss_ref + g_ref.pow(2).sum()).backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    leaves = _leaves(inputs.with_(confidence=torch.rand(4, dtype=inputs.logits.dtype, device=backend.device)))
    assert torch.autograd.gradcheck(_loss_fn(backend, inputs, "mean"), leaves)


def _first_backward_results(backend, reduction, device):
    inputs = make_inputs((6, 5), dtype=torch.float32, device=device)
    leaves = _leaves(inputs)
    loss = _loss_fn(backend, inputs, reduction)(*leaves).sum()
    return inputs, leaves, loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_repeated_autograd_grad_returns_owned_storage(backend, reduction):
    """g1.mul_(0) between two backwards must neither fail nor change the second result."""
    _, leaves, loss = _first_backward_results(backend, reduction, backend.device)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    expected = [g.clone() for g in first]
    for g in first:
        g.mul_(0)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    third = torch.autograd.grad(loss, leaves)
    for a, b, e in zip(second, third, expected):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(b, e, rtol=0, atol=0)


@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_in_place_gradient_hook_then_a_second_backward(backend, upstream):
    _, leaves, loss = _first_backward_results(backend, "mean", backend.device)
    logits = leaves[0]
    logits.register_hook(lambda g: g.mul_(2))
    (loss * upstream).backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    (loss * upstream).backward()
    torch.testing.assert_close(logits.grad, first, rtol=0, atol=0)


def test_last_backward_hands_over_the_buffer_scaled(backend):
    """The last backward through the node may hand the forward's buffer over (scaled in place): the
    result equals a retained backward's."""
    _, leaves, loss = _first_backward_results(backend, "mean", backend.device)
    retained = torch.autograd.grad(loss * 3.0, leaves, retain_graph=True)
    last = torch.autograd.grad(loss * 3.0, leaves)
    for a, b in zip(retained, last):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_requiring_grad_raises_like_torch(backend, reduction):
    inputs = make_inputs((6, 5), device=backend.device)
    weight = inputs.weight.detach().clone().requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(inputs.logits, inputs.target, weight=weight, reduction=reduction)
    for logits in (inputs.logits, inputs.logits.detach().clone().requires_grad_()):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            disalign_ops.disalign_cross_entropy(
                logits, inputs.target, inputs.alpha, inputs.beta, weight=weight, reduction=reduction, backend=backend
            )
    with torch.no_grad():  # no graph, nothing to differentiate: as torch
        disalign_ops.disalign_cross_entropy(
            inputs.logits, inputs.target, inputs.alpha, inputs.beta, weight=weight, reduction=reduction, backend=backend
        )
