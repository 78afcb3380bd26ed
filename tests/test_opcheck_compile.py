"""The operators pass torch.library.opcheck (schema, fake kernels, autograd registration, AOT
dispatch) and functions calling them compile with torch.compile(fullgraph=True), forward and
backward, to the same values as eager."""

import pytest
import torch

import disalign_ops
from disalign_ops.api import op_family
from conftest import TOLERANCES, make_inputs


def _leaf(t, requires_grad=True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def _opcheck_inputs():
    """(id, LossInputs) covering both kernel layouts, optional inputs absent, half logits."""
    return [
        ("nc", make_inputs((6, 5))),
        ("nchw", make_inputs((2, 5, 3, 2))),
        ("channels_last_half", make_inputs((2, 5, 3, 2), dtype=torch.float16, layout="nchw_channels_last")),
        ("no_confidence_no_weight", make_inputs((6, 5), confidence=False, weight=False)),
    ]


OPCHECK_INPUTS = _opcheck_inputs()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", OPCHECK_INPUTS, ids=[c[0] for c in OPCHECK_INPUTS])
def test_opcheck_cross_entropy(backend, case, reduction):
    _, inputs = case
    ops = op_family(backend)
    mask = [False] * 4 if reduction == "none" else [True, True, True, inputs.confidence is not None]
    args = (
        _leaf(inputs.logits, mask[0]), inputs.target, _leaf(inputs.alpha, mask[1]), _leaf(inputs.beta, mask[2]),
        _leaf(inputs.confidence, mask[3]), inputs.weight, inputs.ignore_index, reduction, mask,
    )
    torch.library.opcheck(ops.cross_entropy.default, args)


@pytest.mark.parametrize("case", OPCHECK_INPUTS, ids=[c[0] for c in OPCHECK_INPUTS])
def test_opcheck_cross_entropy_backward(backend, case):
    _, inputs = case
    ops = op_family(backend)
    acc = torch.float64 if inputs.logits.dtype == torch.float64 else torch.float32
    grad_loss = torch.randn(inputs.target.shape, dtype=acc)
    for mask in ([True, True, True, True], [False, True, False, True]):
        args = (
            grad_loss, inputs.logits, inputs.target, inputs.alpha, inputs.beta, inputs.confidence, inputs.weight,
            inputs.ignore_index, mask,
        )
        torch.library.opcheck(ops.cross_entropy_backward.default, args)


@pytest.mark.parametrize("case", OPCHECK_INPUTS, ids=[c[0] for c in OPCHECK_INPUTS])
def test_opcheck_calibrate(backend, case):
    _, inputs = case
    ops = op_family(backend)
    args = (_leaf(inputs.logits), _leaf(inputs.alpha), _leaf(inputs.beta), _leaf(inputs.confidence))
    torch.library.opcheck(ops.calibrate.default, args)


@pytest.mark.parametrize("case", OPCHECK_INPUTS, ids=[c[0] for c in OPCHECK_INPUTS])
def test_opcheck_calibrate_backward(backend, case):
    _, inputs = case
    ops = op_family(backend)
    grad = torch.randn(inputs.logits.shape).to(inputs.logits.dtype)
    for mask in ([True, True, True, True], [False, True, True, False]):
        args = (grad, inputs.logits, inputs.alpha, inputs.beta, inputs.confidence, mask)
        torch.library.opcheck(ops.calibrate_backward.default, args)


def _loss_step(logits, target, alpha, beta, confidence, weight, backend, reduction):
    loss = disalign_ops.disalign_cross_entropy(
        logits, target, alpha, beta, confidence=confidence, weight=weight, ignore_index=-100, reduction=reduction,
        backend=backend,
    )
    return loss if reduction != "none" else (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("stage2", [False, True], ids=["full", "stage2"])
def test_compile_fullgraph_cross_entropy_forward_and_backward(backend, stage2, reduction):
    torch._dynamo.reset()
    inputs = make_inputs((2, 5, 3, 4), dtype=torch.float32)

    def run(fn):
        logits = _leaf(inputs.logits, not stage2)
        params = [_leaf(t) for t in (inputs.alpha, inputs.beta, inputs.confidence)]
        loss = fn(logits, inputs.target, *params, inputs.weight, backend, reduction)
        loss.backward()
        grads = [p.grad for p in params] + ([] if stage2 else [logits.grad])
        return loss.detach(), grads

    eager_loss, eager_grads = run(_loss_step)
    compiled_loss, compiled_grads = run(torch.compile(_loss_step, fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss, **TOLERANCES[torch.float32])
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, **TOLERANCES[torch.float32])


def test_compile_fullgraph_calibrate(backend):
    torch._dynamo.reset()
    inputs = make_inputs((6, 5), dtype=torch.float32)

    def head(logits, alpha, beta, confidence):
        return disalign_ops.calibrate(logits, alpha, beta, confidence=confidence, backend=backend).softmax(dim=1)[:, 0].sum()

    def run(fn):
        leaves = [_leaf(t) for t in (inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)]
        out = fn(*leaves)
        out.backward()
        return out.detach(), [t.grad for t in leaves]

    eager_out, eager_grads = run(head)
    compiled_out, compiled_grads = run(torch.compile(head, fullgraph=True))
    torch.testing.assert_close(compiled_out, eager_out, **TOLERANCES[torch.float32])
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, **TOLERANCES[torch.float32])
