"""The heads reproduce the frozen classifier at initialisation and train only the calibration."""

import pytest
import torch
from torch import nn

import disalign_ops as da
from disalign_ops import reference
from disalign_ops.nn import CosineLinear, DisAlignConv2d, DisAlignLinear, DisAlignLoss, DisAlignROIHead


def _train_steps(head, loss_fn, x, target, steps=3):
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(head.calibration_inputs(x), target)
        loss.backward()
        opt.step()
    return loss


def _frozen_state(head):
    return {k: v.clone() for k, v in head.classifier.state_dict().items()}


@pytest.mark.parametrize("classifier", [nn.Linear(12, 7), CosineLinear(12, 7)], ids=["linear", "cosine"])
def test_linear_head_starts_equal_to_classifier_and_trains_only_calibration(classifier):
    torch.manual_seed(0)
    x = torch.randn(32, 12)
    target = torch.randint(0, 7, (32,))
    head = DisAlignLinear.from_linear(classifier)
    torch.testing.assert_close(head(x), classifier(x))
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable == {"magnitude", "margin", "confidence.weight", "confidence.bias"}

    frozen = _frozen_state(head)
    loss_fn = DisAlignLoss(class_counts=[50, 30, 20, 10, 5, 3, 1], rho=1.2)
    _train_steps(head, loss_fn, x, target)
    for name, value in head.classifier.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert not torch.equal(head.magnitude.detach(), torch.ones(7))
    assert not torch.equal(head.margin.detach(), torch.zeros(7))


def test_linear_head_loss_equals_reference_of_its_calibrated_logits():
    torch.manual_seed(1)
    head = DisAlignLinear.from_linear(nn.Linear(6, 5))
    with torch.no_grad():
        head.magnitude.uniform_(0.5, 1.5)
        head.margin.normal_()
    x, target = torch.randn(20, 6), torch.randint(0, 5, (20,))
    loss_fn = DisAlignLoss([40, 20, 10, 5, 2], rho=1.5)
    inputs = head.calibration_inputs(x)
    expected = reference.cross_entropy(
        inputs.logits, target, inputs.alpha, inputs.beta, inputs.confidence, weight=loss_fn.weight
    )
    torch.testing.assert_close(loss_fn(inputs, target), expected)
    # eq. 5 form: s*(a'*z + b) + (1-s)*z with a' = magnitude
    s = inputs.confidence.unsqueeze(1)
    eq5 = s * (head.magnitude * inputs.logits + head.margin) + (1 - s) * inputs.logits
    torch.testing.assert_close(head(x), eq5)


def test_input_agnostic_head_has_no_confidence_layer():
    head = DisAlignLinear.from_linear(nn.Linear(4, 3), input_aware=False)
    assert head.confidence is None
    assert head.calibration_inputs(torch.randn(2, 4)).confidence is None


def test_conv_head_is_per_pixel_and_reads_nchw():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 5, kernel_size=1)
    head = DisAlignConv2d.from_conv(conv)
    x = torch.randn(2, 8, 6, 7)
    torch.testing.assert_close(head(x), conv(x))
    inputs = head.calibration_inputs(x)
    assert inputs.logits.shape == (2, 5, 6, 7) and inputs.confidence.shape == (2, 6, 7)
    target = torch.randint(0, 5, (2, 6, 7))
    target[0, 0, :3] = 255
    frozen = _frozen_state(head)
    _train_steps(head, DisAlignLoss([900, 300, 90, 20, 3], rho=0.3, ignore_index=255), x, target)
    for name, value in head.classifier.state_dict().items():
        assert torch.equal(value, frozen[name])
    assert head.confidence.weight.grad is not None and head.confidence.weight.grad.abs().sum() > 0


def test_conv_head_rejects_non_1x1_conv():
    with pytest.raises(TypeError, match="1x1"):
        DisAlignConv2d.from_conv(nn.Conv2d(4, 3, kernel_size=3))


@pytest.mark.parametrize("background_index", [-1, 0])
def test_roi_head_leaves_background_untouched(background_index):
    torch.manual_seed(3)
    cls_score = nn.Linear(10, 6)  # K = 5 foreground + background
    head = DisAlignROIHead(cls_score, background_index=background_index)
    assert head.magnitude.shape == (5,)
    with torch.no_grad():
        head.magnitude.uniform_(0.5, 2.0)
        head.margin.normal_()
    x = torch.randn(9, 10)
    out, raw = head(x), cls_score(x)
    bg = background_index % 6
    torch.testing.assert_close(out[:, bg], raw[:, bg])
    assert not torch.allclose(out[:, [i for i in range(6) if i != bg]], raw[:, [i for i in range(6) if i != bg]])

    loss_fn = DisAlignLoss([300, 100, 30, 5, 1], rho=0.8, background_index=background_index)
    assert loss_fn.weight.shape == (6,) and loss_fn.weight[bg].item() == 1.0
    fg_weight = torch.cat([loss_fn.weight[:bg], loss_fn.weight[bg + 1 :]])
    torch.testing.assert_close(fg_weight, da.generalized_reweight([300, 100, 30, 5, 1], 0.8))
    target = torch.randint(0, 6, (9,))
    loss = _train_steps(head, loss_fn, x, target)
    assert torch.isfinite(loss)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="classifier must be"):
        DisAlignLinear.from_linear(nn.Conv2d(3, 3, 1))
