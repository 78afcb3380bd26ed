"""Edge cases an adversarial battery found (issue 10): empty logits with any strides, half logits
under loss scaling, direct op calls with a wrong gradient or grad_mask, integer-like ignore_index
and the messages of bad arguments. Every op backend on every device (see conftest)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import disalign_ops
from conftest import (
    GRAD_INPUTS,
    REDUCTIONS,
    LossInputs,
    assert_matches,
    backend_loss,
    compare,
    loss_and_grads,
    make_inputs,
    reference_loss,
)
from disalign_ops.nn import DisAlignLoss, DisAlignROIHead


def _empty_strided(kind):
    if kind == "nc_sliced":  # (0, 2) with strides (4, 2)
        return torch.randn(0, 4, dtype=torch.float64)[:, ::2]
    if kind == "nc_transposed":
        return torch.randn(3, 0, dtype=torch.float64).t()
    return torch.randn(2, 3, 4, 0, dtype=torch.float64).transpose(2, 3)  # (2, 3, 0, 4), spatial dims swapped


def _empty_inputs(kind, device):
    logits = _empty_strided(kind)
    classes = logits.shape[1]
    rows = (logits.shape[0],) + tuple(logits.shape[2:])
    inputs = LossInputs(
        logits=logits, target=torch.zeros(rows, dtype=torch.int64), alpha=torch.randn(classes, dtype=torch.float64),
        beta=torch.randn(classes, dtype=torch.float64), confidence=torch.rand(rows, dtype=torch.float64),
        weight=None,
    )
    return inputs.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["nc_sliced", "nc_transposed", "nchw_swapped"])
def test_empty_logits_with_any_strides(backend, kind, reduction):
    """As F.cross_entropy: nan for "mean", 0 for "sum", empty for "none"; empty gradients."""
    result = compare(backend, _empty_inputs(kind, backend.device), reduction, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(result.loss)
    elif reduction == "sum":
        assert result.loss.item() == 0
    assert result.grads["logits"].shape == _empty_strided(kind).shape


@pytest.mark.parametrize("kind", ["nc_sliced", "nc_transposed", "nchw_swapped"])
def test_calibrate_backward_of_empty_logits(backend, kind):
    logits = _empty_strided(kind).to(backend.device).requires_grad_()
    classes = logits.shape[1]
    alpha = torch.randn(classes, dtype=torch.float64, device=backend.device, requires_grad=True)
    beta = torch.randn(classes, dtype=torch.float64, device=backend.device, requires_grad=True)
    out = disalign_ops.calibrate(logits, alpha, beta, backend=backend)
    assert out.shape == logits.shape
    out.sum().backward()
    assert logits.grad.shape == logits.shape
    assert (alpha.grad == 0).all() and (beta.grad == 0).all()


def test_zero_roi_batch_through_the_roi_head(backend):
    torch.manual_seed(0)
    head = DisAlignROIHead(torch.nn.Linear(8, 6), backend=backend).to(backend.device)
    loss_fn = DisAlignLoss([30, 10, 5, 3, 1], rho=0.5, background_index=-1, backend=backend).to(backend.device)
    x = torch.randn(0, 8, device=backend.device)
    loss = loss_fn(head.calibration_inputs(x), torch.zeros(0, dtype=torch.int64, device=backend.device))
    assert torch.isnan(loss)  # "mean" over no rows, as F.cross_entropy
    loss.backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and (p.grad == 0).all(), name


def _shape(layout):
    return (6, 5) if layout == "nc" else (2, 5, 3, 2)


@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_reduction_none_backward_of_an_expanded_gradient(backend, layout):
    """loss.sum().backward() or loss.mean().backward() after reduction "none" hands the op's backward
    an expanded gradient (stride 0): it is read by its strides, not as a dense array past its one
    element (an out-of-bounds read, caught here as wrong gradients)."""
    inputs = make_inputs(_shape(layout), dtype=torch.float32, device=backend.device)
    rows = inputs.target.shape
    for grad_output in (torch.full((), 0.7).expand(rows), torch.randn(rows[-1]).expand(rows)):
        grad_output = grad_output.to(backend.device)
        expected = loss_and_grads(reference_loss, inputs, "none", grad_output=grad_output)
        actual = loss_and_grads(backend_loss(backend), inputs, "none", grad_output=grad_output)
        assert_matches(actual, expected, torch.float32)


def _not_contiguous(t, kind, filler):
    """t's values in a tensor that is not contiguous: every other element of a larger one (the others
    `filler`, which must never be read), or t's first value expanded to t's shape (stride 0)."""
    if kind == "expanded":
        return t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(t.shape)
    wide = torch.full(t.shape + (2,), filler, dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


@pytest.mark.parametrize("kind", ["sliced", "expanded"])
@pytest.mark.parametrize("operand", ["alpha", "beta", "confidence", "weight", "target"])
@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_small_operands_of_any_strides(backend, layout, operand, kind):
    """alpha / beta / confidence / weight / target sliced (stride 2) or expanded (stride 0) give the
    reference's loss and gradients, in the loss and in calibrate."""
    inputs = make_inputs(_shape(layout), dtype=torch.float32, device=backend.device)
    filler = 10**6 if operand == "target" else float("nan")  # a bad target or a nan, if it were read
    inputs = inputs.with_(**{operand: _not_contiguous(getattr(inputs, operand), kind, filler)})
    assert not getattr(inputs, operand).is_contiguous()
    for reduction in ("mean", "none"):
        compare(backend, inputs, reduction)
    if operand in ("alpha", "beta", "confidence"):
        out = disalign_ops.calibrate(inputs.logits, inputs.alpha, inputs.beta, confidence=inputs.confidence,
                                     backend=backend)
        torch.testing.assert_close(out, disalign_ops.reference.calibrated_logits(
            inputs.logits, inputs.alpha, inputs.beta, inputs.confidence).to(out.dtype))


def _masked_inputs(layout, dtype, device):
    """Logits with masked classes (-inf) in every row, at alpha = 0 (the heads' initial value), < 0 and
    > 0, and one row masked everywhere but its target; no target is masked."""
    shape = (5, 7) if layout == "nc" else (2, 7, 3, 2)
    inputs = make_inputs(shape, dtype=dtype, layout=layout, ignored_fraction=0.0)
    params = inputs.alpha.dtype
    alpha = torch.tensor([0.0, -0.4, 0.3, 0.0, -0.2, 0.5, 0.0], dtype=params)
    target = torch.full_like(inputs.target, 6)
    target.view(-1)[1::2] = 5
    logits = inputs.logits.detach().clone()  # keeps the layout's strides
    with torch.no_grad():
        logits[:, :3] = float("-inf")
        first_row = logits[0] if layout == "nc" else logits[0, :, 0, 0]
        first_row[:6] = float("-inf")  # only its target, class 6, is left
    return inputs.with_(logits=logits, alpha=alpha, target=target).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_masked_classes_keep_the_reference_loss_at_any_alpha(backend, layout, reduction, dtype):
    """-inf logits are masked classes: zhat = (1 + s*a) * -inf + s*b = -inf, p = 0, a finite loss and
    finite dlogits / dbeta. (zhat as z + s*(a*z + b) is nan there for a <= 0.) dalpha and dconfidence
    are nan where the reference's are (0 * inf)."""
    inputs = _masked_inputs(layout, dtype, backend.device)
    result = compare(backend, inputs, reduction, equal_nan=True)
    assert torch.isfinite(result.loss).all()
    assert torch.isfinite(result.grads["logits"]).all() and torch.isfinite(result.grads["beta"]).all()


@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_calibrate_keeps_masked_classes_at_minus_inf(backend, layout):
    inputs = _masked_inputs(layout, torch.float32, backend.device)
    out = disalign_ops.calibrate(inputs.logits, inputs.alpha, inputs.beta, confidence=inputs.confidence,
                                 backend=backend)
    masked = torch.isneginf(inputs.logits)
    assert masked.any() and torch.isneginf(out[masked]).all()
    torch.testing.assert_close(out[~masked], disalign_ops.reference.calibrated_logits(
        inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)[~masked])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_logits_under_loss_scaling_give_finite_gradients(backend, dtype):
    """(loss * 65536).backward(), GradScaler's default scale: 65536 is inf in float16, so the
    upstream gradient must not be cast to the logits' dtype before multiplying. Expected: the
    float32 gradient of F.cross_entropy, rounded once to the logits' dtype."""
    inputs = make_inputs((64, 10), dtype=dtype, confidence=False, weight=False, device=backend.device)
    zero = torch.zeros(10, device=backend.device)
    z = inputs.logits.detach().clone().requires_grad_()
    (disalign_ops.disalign_cross_entropy(z, inputs.target, zero, zero, backend=backend) * 65536).backward()
    z32 = inputs.logits.detach().float().requires_grad_()
    (F.cross_entropy(z32, inputs.target) * 65536).backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().max() > 100  # the scale reached the gradient
    torch.testing.assert_close(z.grad.float(), z32.grad.to(dtype).float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_upstream_gradient_keeps_its_precision(backend, dtype):
    """grad * 3.7 is rounded once to the logits' dtype, not 3.7 rounded first (bf16: 3.703)."""
    inputs = make_inputs((16, 7), dtype=dtype, confidence=False, weight=False, device=backend.device)
    zero = torch.zeros(7, device=backend.device)
    results = []
    for scale in (1.0, 3.7):
        z = inputs.logits.detach().clone().requires_grad_()
        (disalign_ops.disalign_cross_entropy(z, inputs.target, zero, zero, reduction="sum", backend=backend)
         * scale).backward()
        results.append(z.grad)
    expected = (results[0].double() * 3.7).to(dtype)
    assert torch.equal(results[1], expected)


def _op(backend, name):
    namespace = torch.ops.disalign if str(backend) == "native" else torch.ops.disalign_triton
    return getattr(namespace, name)


def _direct_args(device):
    inputs = make_inputs((4, 5), dtype=torch.float32, device=device)
    return inputs


@pytest.mark.parametrize("op", ["calibrate_backward", "cross_entropy_backward"])
def test_direct_backward_call_checks_the_gradient_device(backend, op):
    """A gradient on meta with the rest on the backend's device: an error, never uninitialised memory."""
    x = _direct_args(backend.device)
    shape = x.logits.shape if op == "calibrate_backward" else x.target.shape
    grad = torch.randn(shape, device="meta")
    args = (x.logits, x.alpha, x.beta, x.confidence) if op == "calibrate_backward" else (
        x.logits, x.target, x.alpha, x.beta, x.confidence, x.weight, -100)
    with pytest.raises(RuntimeError, match="is on meta but logits is on"):
        _op(backend, op)(grad, *args, [True] * 4)


@pytest.mark.parametrize("op", ["calibrate_backward", "cross_entropy_backward"])
def test_direct_backward_call_checks_the_gradient_dtype(backend, op):
    x = _direct_args(backend.device)
    shape = x.logits.shape if op == "calibrate_backward" else x.target.shape
    grad = torch.ones(shape, dtype=torch.int64, device=backend.device)
    args = (x.logits, x.alpha, x.beta, x.confidence) if op == "calibrate_backward" else (
        x.logits, x.target, x.alpha, x.beta, x.confidence, x.weight, -100)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        _op(backend, op)(grad, *args, [True] * 4)


@pytest.mark.parametrize("mask", [[True] * 3, [True] * 5, []], ids=["3", "5", "0"])
@pytest.mark.parametrize("op", ["cross_entropy", "calibrate_backward"])
def test_direct_call_rejects_a_grad_mask_of_the_wrong_length(backend, op, mask):
    x = _direct_args(backend.device)
    if op == "cross_entropy":
        args = (x.logits, x.target, x.alpha, x.beta, x.confidence, x.weight, -100, "mean", mask)
    else:
        args = (torch.ones_like(x.logits), x.logits, x.alpha, x.beta, x.confidence, mask)
    with pytest.raises(ValueError, match="grad_mask must have 4 entries|grad_mask must be a list of 4"):
        _op(backend, op)(*args)


def test_fake_kernels_check_grad_mask_and_gradient():
    from disalign_ops._validation import check_grad_mask

    assert check_grad_mask([True, False, True, False]) == [True, False, True, False]
    with pytest.raises(TypeError, match="grad_mask entries must be bools"):
        check_grad_mask([1, 1, 1, 1])
    with pytest.raises(ValueError, match="grad_mask"):
        check_grad_mask([True] * 5)
    x = make_inputs((4, 5), dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.disalign.calibrate_backward(
            torch.ones(3, 5, device="meta"), x.logits, x.alpha, x.beta, None, [True] * 4
        )


@pytest.mark.parametrize(
    "value", [np.int64(-100), np.int32(-100), torch.tensor(-100)], ids=["np.int64", "np.int32", "tensor"]
)
def test_ignore_index_accepts_integer_likes_as_torch_does(backend, value):
    inputs = make_inputs((12, 5), device=backend.device)
    ours = disalign_ops.disalign_cross_entropy(
        inputs.logits, inputs.target, inputs.alpha, inputs.beta, ignore_index=value, backend=backend)
    expected = disalign_ops.disalign_cross_entropy(
        inputs.logits, inputs.target, inputs.alpha, inputs.beta, ignore_index=-100, backend=backend)
    assert torch.equal(ours, expected)
    F.cross_entropy(inputs.logits, inputs.target, ignore_index=value)  # torch accepts it too


@pytest.mark.parametrize("backend_name", ["eager", "op"])
@pytest.mark.parametrize("value", [2**63, 2**70, -(2**63) - 1])
def test_ignore_index_outside_int64_names_it(backend, backend_name, value):
    inputs = make_inputs((6, 5), device=backend.device)
    name = "eager" if backend_name == "eager" else backend
    with pytest.raises(ValueError, match=rf"ignore_index must fit in int64 .* got {value}"):
        disalign_ops.disalign_cross_entropy(
            inputs.logits, inputs.target, inputs.alpha, inputs.beta, ignore_index=value, backend=name)


@pytest.mark.parametrize("value", [1.0, True, "x", torch.tensor([1, 2]), torch.tensor(1.0)], ids=str)
def test_ignore_index_rejects_non_integers(value):
    inputs = make_inputs((6, 5))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        disalign_ops.disalign_cross_entropy(inputs.logits, inputs.target, inputs.alpha, inputs.beta, ignore_index=value)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_check_targets_env_var_checks_before_the_launch(backend, reduction, monkeypatch):
    """DISALIGN_CHECK_TARGETS=1: the front end raises IndexError naming the value before any op runs
    (on every device; on CUDA the kernels would otherwise give NaN rows)."""
    inputs = make_inputs((10, 5), device=backend.device)
    target = inputs.target.clone()
    target[3] = 9
    monkeypatch.setenv("DISALIGN_CHECK_TARGETS", "1")

    def no_launch(name):
        raise AssertionError("the op was launched before the targets were checked")

    monkeypatch.setattr(disalign_ops.api, "op_family", no_launch)
    with pytest.raises(IndexError, match=r"target contains 9, which is outside \[0, C\) = \[0, 5\)"):
        disalign_ops.disalign_cross_entropy(
            inputs.logits, target, inputs.alpha, inputs.beta, reduction=reduction, backend=backend)


def test_check_targets_env_var_leaves_good_targets_alone(backend, monkeypatch):
    monkeypatch.setenv("DISALIGN_CHECK_TARGETS", "1")
    compare(backend, make_inputs((10, 5), device=backend.device), "mean")


def test_grad_inputs_constant_is_the_grad_mask_order():
    assert GRAD_INPUTS == ("logits", "alpha", "beta", "confidence")
