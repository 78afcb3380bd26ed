"""The authors' variants of the heads and loss, each against a few lines of plain torch restating the
authors' released formula (cvpods DisAlignLinear / DisAlignNormalizedLinear / DisAlign[Cosine]FastRCNN-
OutputLayers, mmseg DisAlignFCNHead + mmseg cross_entropy), forward and gradients, float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import OP_BACKENDS
from disalign_ops.nn import CalibrationInputs, ClassifierHead, CosineLinear, DisAlignConv2d, DisAlignLinear, DisAlignLoss, DisAlignROIHead

BACKENDS = ["eager", *OP_BACKENDS]
TOL = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the authors' formulas, restated


def authors_linear(x, z, conf_weight, conf_bias, logit_scale, logit_bias, normalize_input):
    """cvpods DisAlignLinear (normalize_input False) / DisAlignNormalizedLinear (True):
    (1 + s*scale) z + s*bias, s = sigmoid(v.x + b) on x or x/|x|."""
    xin = F.normalize(x, dim=1) if normalize_input else x
    s = torch.sigmoid(xin @ conf_weight.T + conf_bias)
    return (1 + s * logit_scale) * z + s * logit_bias


def authors_fcn(feat, out, conf_weight, bn_weight, bn_bias, logit_scale, logit_bias, eps=1e-5):
    """mmseg DisAlignFCNHead in training mode: s = sigmoid(ReLU(BN(conv1x1 no bias))) with batch
    statistics; s * (out*scale + bias) + (1 - s) * out."""
    y = F.conv2d(feat, conf_weight)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + eps) * bn_weight.view(1, -1, 1, 1) + bn_bias.view(1, -1, 1, 1)
    s = torch.sigmoid(torch.relu(y))
    scale, bias = logit_scale.view(1, -1, 1, 1), logit_bias.view(1, -1, 1, 1)
    return s * (out * scale + bias) + (1 - s) * out


def authors_fast_rcnn(x, scores, conf_weight, conf_bias, logit_scale, logit_bias):
    """cvpods DisAlign[Cosine]FastRCNNOutputLayers: background last and untouched; s on the raw x."""
    s = torch.sigmoid(x @ conf_weight.T + conf_bias)
    fg = scores[:, :-1]
    fg = s * (fg * logit_scale + logit_bias) + (1 - s) * fg
    return torch.cat([fg, scores[:, -1:]], dim=1)


def mmseg_cross_entropy(zhat, target, class_weight, ignore_index):
    """mmseg cross_entropy, avg_non_ignore=False: weighted per-pixel losses (0 where ignored) .mean()."""
    return F.cross_entropy(zhat, target, weight=class_weight, reduction="none", ignore_index=ignore_index).mean()


# ------------------------------------------------------------------ helpers


def _randomise(head):
    """Moves magnitude/margin/confidence away from their init so that every term of the formula counts."""
    with torch.no_grad():
        head.magnitude.uniform_(0.3, 1.7)
        head.margin.normal_()
        for p in head.confidence.parameters():
            p.normal_(0.0, 0.3)


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


def _assert_all_close(actual, expected, **tol):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, msg=lambda m: f"tensor {i}: {m}", **(tol or TOL))


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cosine,confidence_input", [(False, "features"), (True, "normalized"), (True, "features")],
    ids=["linear", "cosine-normalized", "cosine-raw"],
)
def test_linear_authors_init_and_formula(backend, cosine, confidence_input):
    torch.manual_seed(0)
    classifier = (CosineLinear(12, 7) if cosine else nn.Linear(12, 7)).double()
    head = DisAlignLinear.from_linear(
        classifier, backend=backend, init="authors", confidence_input=confidence_input
    ).double()
    x = torch.randn(16, 12, dtype=torch.float64) * 3
    z = classifier(x).detach()

    # cvpods init: logit_scale 1 (the parameter is alpha), logit_bias 0, confidence weight 0.1,
    # confidence bias nn.Linear's default U(-1/sqrt(D), 1/sqrt(D)).
    assert head.magnitude_offset == 0.0 and torch.equal(head.magnitude, torch.ones(7, dtype=torch.float64))
    assert torch.equal(head.margin, torch.zeros(7, dtype=torch.float64))
    assert torch.equal(head.confidence.weight, torch.full((1, 12), 0.1).double())  # set in float32, then .double()
    assert head.confidence.bias.abs().item() <= 12**-0.5
    at_init = authors_linear(
        x, z, head.confidence.weight, head.confidence.bias, torch.ones(7), torch.zeros(7),
        confidence_input == "normalized",
    )
    torch.testing.assert_close(head(x), at_init, **TOL)
    assert not torch.allclose(head(x), z)  # (1 + s) z: not the identity

    _randomise(head)
    target = torch.randint(0, 7, (16,))
    loss_fn = DisAlignLoss([40, 30, 20, 10, 5, 3, 1], rho=1.2, backend=backend).double()
    params = [head.magnitude, head.margin, head.confidence.weight, head.confidence.bias]
    expected_out = authors_linear(x, z, *params[2:], head.magnitude, head.margin, confidence_input == "normalized")
    expected_loss = F.cross_entropy(expected_out, target, weight=loss_fn.weight)
    loss = loss_fn(head.calibration_inputs(x), target)
    torch.testing.assert_close(head(x), expected_out, **TOL)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    _assert_all_close(_grads(loss, params), _grads(expected_loss, params))


def test_linear_paper_recipe_normalizes_confidence_input_of_cosine_heads_only():
    assert DisAlignLinear.paper_recipe(CosineLinear(4, 3)).confidence_input == "normalized"
    plain = DisAlignLinear.paper_recipe(nn.Linear(4, 3))
    assert plain.confidence_input == "features" and plain.init == "authors" and plain.magnitude_offset == 0.0


def test_identity_init_is_unchanged_default():
    head = DisAlignLinear.from_linear(nn.Linear(4, 3))
    assert head.init == "identity" and head.confidence_input == "features" and head.magnitude_offset == 1.0
    x = torch.randn(5, 4)
    torch.testing.assert_close(head(x), head.classifier(x))


# ------------------------------------------------------------------ segmentation


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_confidence_matches_authors_fcn_head(backend):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 5, kernel_size=1).double()
    head = DisAlignConv2d.from_conv(conv, backend=backend, init="authors", confidence="conv-bn-relu").double()
    assert [type(m) for m in head.confidence] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert head.confidence[0].bias is None and head.confidence_layer == "conv-bn-relu"
    feat = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    out = conv(feat).detach()
    head.train()
    torch.testing.assert_close(head(feat), out, **TOL)  # eq. 5 form, magnitude 1, margin 0: the identity
    s = head.calibration_inputs(feat).confidence
    assert s.min() >= 0.5 and s.max() < 1

    _randomise(head)
    with torch.no_grad():
        head.confidence[1].weight.fill_(1.3)
    target = torch.randint(0, 5, (2, 5, 6))
    target[0, :2] = 255
    loss_fn = DisAlignLoss([900, 300, 90, 20, 3], rho=0.2, ignore_index=255, backend=backend, normalize="elements")
    loss_fn = loss_fn.double()
    bn = head.confidence[1]
    params = [head.magnitude, head.margin, head.confidence[0].weight, bn.weight, bn.bias]
    expected_out = authors_fcn(feat, out, params[2], bn.weight, bn.bias, head.magnitude, head.margin)
    expected_loss = mmseg_cross_entropy(expected_out, target, loss_fn.weight, 255)
    torch.testing.assert_close(head(feat), expected_out, **TOL)
    loss = loss_fn(head.calibration_inputs(feat), target)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    _assert_all_close(_grads(loss, params), _grads(expected_loss, params))

    # Inference: BatchNorm reads its running statistics (updated by the training forwards above).
    head.eval()
    y = F.conv2d(feat, head.confidence[0].weight)
    y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    s = torch.sigmoid(torch.relu(y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)))
    torch.testing.assert_close(head.calibration_inputs(feat).confidence, s.squeeze(1), **TOL)


def test_conv_authors_init_follows_mmcv_conv_module():
    torch.manual_seed(2)
    for confidence in ("conv-bn-relu", "linear"):
        head = DisAlignConv2d.from_conv(nn.Conv2d(4096, 3, 1), init="authors", confidence=confidence)
        first = head.confidence[0] if confidence == "conv-bn-relu" else head.confidence
        # Kaiming normal, fan_out = 1 output channel, ReLU gain: std sqrt(2)
        std = first.weight.std().item()
        assert 1.3 < std < 1.53, std
        if first.bias is not None:
            assert torch.equal(first.bias, torch.zeros(1))
        assert torch.equal(head.magnitude, torch.ones(3)) and head.magnitude_offset == 1.0
    recipe = DisAlignConv2d.paper_recipe(nn.Conv2d(4, 3, 1))
    assert recipe.init == "authors" and recipe.confidence_layer == "conv-bn-relu"


def test_conv_bn_relu_input_agnostic_has_no_confidence():
    head = DisAlignConv2d.from_conv(nn.Conv2d(4, 3, 1), input_aware=False, confidence="conv-bn-relu")
    assert head.confidence is None


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cosine", [False, True], ids=["linear", "cosine"])
def test_roi_head_matches_authors_fast_rcnn_output_layers(backend, cosine):
    torch.manual_seed(3)
    cls_score = (CosineLinear(10, 6, scale=20.0) if cosine else nn.Linear(10, 6)).double()
    head = DisAlignROIHead.paper_recipe(cls_score, backend=backend).double()
    assert head.confidence_input == "features" and head.magnitude.shape == (5,)
    x = torch.randn(9, 10, dtype=torch.float64)
    scores = cls_score(x).detach()
    torch.testing.assert_close(head(x), scores, **TOL)  # eq. 5 form at init: the identity

    _randomise(head)
    target = torch.randint(0, 6, (9,))
    target[:2] = 5  # background rows
    loss_fn = DisAlignLoss([300, 100, 30, 5, 1], rho=0.8, background_index=-1, backend=backend).double()
    params = [head.magnitude, head.margin, head.confidence.weight, head.confidence.bias]
    expected_out = authors_fast_rcnn(x, scores, params[2], params[3], head.magnitude, head.margin)
    expected_loss = F.cross_entropy(expected_out, target, weight=loss_fn.weight)  # cvpods GRWFastRCNNOutputs
    out = head(x)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(out[:, -1], scores[:, -1], **TOL)
    loss = loss_fn(head.calibration_inputs(x), target)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    _assert_all_close(_grads(loss, params), _grads(expected_loss, params))


def test_roi_authors_init_confidence_is_small_normal_with_zero_bias():
    torch.manual_seed(4)
    head = DisAlignROIHead(nn.Linear(4096, 4), init="authors")
    assert torch.equal(head.confidence.bias, torch.zeros(1))
    std = head.confidence.weight.std().item()
    assert 0.0093 < std < 0.0107, std
    assert head.magnitude_offset == 1.0


def test_roi_head_normalized_confidence_input():
    torch.manual_seed(5)
    head = DisAlignROIHead(CosineLinear(6, 4), confidence_input="normalized").double()
    x = torch.randn(3, 6, dtype=torch.float64)
    s = torch.sigmoid(F.normalize(x, dim=1) @ head.confidence.weight.T + head.confidence.bias).squeeze(1)
    torch.testing.assert_close(head.calibration_inputs(x).confidence, s, **TOL)
    torch.testing.assert_close(head.calibration_inputs(5 * x).confidence, s, **TOL)  # scale-free


# ------------------------------------------------------------------ loss normalisation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["weights", "elements"])
def test_loss_normalize_rules(backend, normalize):
    torch.manual_seed(6)
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 5))
    target[1, 0] = 255
    loss_fn = DisAlignLoss([50, 20, 5, 1], rho=0.3, ignore_index=255, backend=backend, normalize=normalize).double()
    loss = loss_fn(CalibrationInputs(logits, alpha, beta, s), target)
    zhat = (1 + s.unsqueeze(1) * alpha.view(1, -1, 1, 1)) * logits + s.unsqueeze(1) * beta.view(1, -1, 1, 1)
    if normalize == "elements":
        expected = mmseg_cross_entropy(zhat, target, loss_fn.weight, 255)
    else:
        expected = F.cross_entropy(zhat, target, weight=loss_fn.weight, ignore_index=255)
    torch.testing.assert_close(loss, expected, **TOL)
    _assert_all_close(_grads(loss, [logits, alpha, beta, s]), _grads(expected, [logits, alpha, beta, s]))


def test_loss_elements_all_ignored_and_empty():
    loss_fn = DisAlignLoss([3, 1], rho=1.0, ignore_index=255, normalize="elements")
    logits = torch.randn(4, 2, requires_grad=True)
    zeros = torch.zeros(2)
    loss = loss_fn(CalibrationInputs(logits, zeros, zeros, None), torch.full((4,), 255))
    assert loss.item() == 0.0  # mmseg: ignored elements count in the mean and contribute 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 2))
    empty = loss_fn(CalibrationInputs(torch.randn(0, 2), zeros, zeros, None), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(empty)


def test_bad_options_name_the_argument_and_value():
    with pytest.raises(ValueError, match="init must be one of .* got 'paper'"):
        DisAlignLinear.from_linear(nn.Linear(3, 2), init="paper")
    with pytest.raises(ValueError, match="confidence_input must be one of .* got 'unit'"):
        DisAlignROIHead(nn.Linear(3, 3), confidence_input="unit")
    with pytest.raises(ValueError, match="confidence must be one of .* got 'mlp'"):
        DisAlignConv2d.from_conv(nn.Conv2d(3, 2, 1), confidence="mlp")
    with pytest.raises(ValueError, match="normalize must be one of .* got 'pixels'"):
        DisAlignLoss([2, 1], rho=1.0, normalize="pixels")
    with pytest.raises(ValueError, match="only applies to reduction='mean', got reduction='sum'"):
        DisAlignLoss([2, 1], rho=1.0, reduction="sum", normalize="elements")
    with pytest.raises(TypeError, match="cls_score must be nn.Linear or CosineLinear, got Conv2d"):
        DisAlignROIHead(nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------ the uncalibrated head


@pytest.mark.parametrize("frozen", [False, True])
def test_classifier_head_is_plain_reweighted_cross_entropy(frozen):
    torch.manual_seed(7)
    classifier = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5))
    head = ClassifierHead(classifier, frozen=frozen).train()
    assert classifier.training is not frozen
    x, target = torch.randn(10, 6), torch.randint(0, 4, (10,))
    loss_fn = DisAlignLoss([30, 10, 3, 1], rho=1.0)
    inputs = head.calibration_inputs(x)
    assert inputs.confidence is None and torch.equal(inputs.alpha, torch.zeros(4))
    assert inputs.alpha.dtype == torch.float32
    loss = loss_fn(inputs, target)
    if frozen:
        assert not loss.requires_grad and all(not p.requires_grad for p in head.parameters())
        torch.testing.assert_close(loss, F.cross_entropy(classifier(x), target, weight=loss_fn.weight))
        torch.testing.assert_close(head(x), classifier(x))
    else:
        weight = classifier[0].weight
        torch.manual_seed(8)
        logits = head.calibration_inputs(x).logits
        torch.manual_seed(8)
        expected = F.cross_entropy(classifier(x), target, weight=loss_fn.weight)
        loss = loss_fn(CalibrationInputs(logits, inputs.alpha, inputs.beta, None), target)
        torch.testing.assert_close(loss, expected)
        _assert_all_close(_grads(loss, [weight]), _grads(expected, [weight]), rtol=1e-5, atol=1e-6)  # float32


def test_classifier_head_over_conv_keeps_spatial_logits():
    conv = nn.Conv2d(5, 3, 1)
    inputs = ClassifierHead(conv).calibration_inputs(torch.randn(2, 5, 4, 4))
    assert inputs.logits.shape == (2, 3, 4, 4) and inputs.alpha.shape == (3,) and inputs.logits.requires_grad
