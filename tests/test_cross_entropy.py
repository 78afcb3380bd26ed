"""disalign_cross_entropy of every op backend against the eager reference (docs/contract.md section 2) and
F.cross_entropy itself: reductions, optional inputs, layouts, dtypes, edge cases, determinism."""

import os

import pytest
import torch
import torch.nn.functional as F

import disalign_ops
from conftest import (
    GRAD_INPUTS,
    LAYOUTS,
    REDUCTIONS,
    TOLERANCES,
    assert_matches,
    backend_loss,
    check_indexing_beyond_2_to_31,
    compare,
    loss_and_grads,
    make_inputs,
    reference_loss,
)

NC_LAYOUTS = [name for name, (kind, _) in LAYOUTS.items() if kind == "nc"]
SPATIAL_LAYOUTS = [name for name, (kind, _) in LAYOUTS.items() if kind == "spatial"]


_compare = compare


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_confidence", [True, False], ids=["confidence", "no_confidence"])
@pytest.mark.parametrize("layout", NC_LAYOUTS)
def test_nc_matches_reference(backend, layout, with_confidence, with_weight, reduction):
    inputs = make_inputs((13, 7), layout=layout, confidence=with_confidence, weight=with_weight, device=backend.device)
    _compare(backend, inputs, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_confidence", [True, False], ids=["confidence", "no_confidence"])
@pytest.mark.parametrize("layout", SPATIAL_LAYOUTS)
def test_nchw_matches_reference(backend, layout, with_confidence, with_weight, reduction):
    inputs = make_inputs(
        (3, 6, 4, 5), layout=layout, confidence=with_confidence, weight=with_weight, device=backend.device
    )
    _compare(backend, inputs, reduction)


@pytest.mark.parametrize("layout", ["nchw", "nchw_channels_last"])
@pytest.mark.parametrize("shape", [(3, 6, 7), (2, 4, 3, 2, 3)], ids=["1d", "3d"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_other_spatial_ranks_match_reference(backend, shape, layout, reduction):
    _compare(backend, make_inputs(shape, layout=layout, device=backend.device), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(9, 7), (2, 5, 3, 4)], ids=["nc", "nchw"])
def test_float64_equals_f_cross_entropy_of_calibrated_logits(backend, shape, reduction):
    """The contract's defining identity (docs/contract.md section 2), written out independently of disalign_ops.reference."""
    inputs = make_inputs(shape, dtype=torch.float64, device=backend.device)

    def calibrated_cross_entropy(logits, target, alpha, beta, confidence, weight, ignore_index, reduction):
        view = (1, -1) + (1,) * (logits.dim() - 2)
        s = confidence.unsqueeze(1)
        zhat = (1 + s * alpha.view(view)) * logits + s * beta.view(view)
        return F.cross_entropy(zhat, target, weight=weight, ignore_index=ignore_index, reduction=reduction)

    expected = loss_and_grads(calibrated_cross_entropy, inputs, reduction)
    actual = loss_and_grads(backend_loss(backend), inputs, reduction)
    assert_matches(actual, expected, torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 2, 3)], ids=["nc", "nchw"])
@pytest.mark.parametrize("with_confidence", [True, False], ids=["confidence", "no_confidence"])
def test_gradcheck(backend, shape, reduction, with_confidence):
    inputs = make_inputs(
        shape, dtype=torch.float64, confidence=with_confidence, ignored_fraction=0.2, seed=3, device=backend.device
    )
    tensors = [t.detach().clone().requires_grad_() for t in (inputs.logits, inputs.alpha, inputs.beta)]
    if with_confidence:
        tensors.append(inputs.confidence.detach().clone().requires_grad_())

    def loss(logits, alpha, beta, confidence=None):
        return disalign_ops.disalign_cross_entropy(
            logits, inputs.target, alpha, beta, confidence=confidence, weight=inputs.weight, reduction=reduction,
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(33, 19), (2, 11, 5, 7)], ids=["nc", "nchw"])
def test_reduced_precision_matches_reference(backend, dtype, shape, reduction):
    _compare(backend, make_inputs(shape, dtype=dtype, device=backend.device), reduction)


def test_half_logits_with_half_parameters(backend):
    """Every input in float16: loss in float32, each gradient in its input's dtype."""
    inputs = make_inputs((17, 9), dtype=torch.float16, param_dtype=torch.float16, device=backend.device)
    result = _compare(backend, inputs, "mean")
    assert result.loss.dtype == torch.float32
    assert all(g.dtype == torch.float16 for g in result.grads.values())


def test_float32_logits_with_float64_parameters(backend):
    inputs = make_inputs((17, 9), dtype=torch.float32, param_dtype=torch.float64, device=backend.device)
    result = _compare(backend, inputs, "sum")
    assert result.grads["logits"].dtype == torch.float32
    assert result.grads["alpha"].dtype == torch.float64


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
@pytest.mark.parametrize("shape", [(8, 6), (2, 6, 3, 3)], ids=["nc", "nchw"])
def test_huge_float32_logits_are_finite_and_correct(backend, shape, magnitude):
    inputs = make_inputs(shape, dtype=torch.float32, device=backend.device)
    logits = inputs.logits / inputs.logits.abs().amax() * magnitude
    inputs = inputs.with_(logits=logits, alpha=inputs.alpha * 0.1, beta=inputs.beta * 100)
    result = _compare(backend, inputs, "mean")
    assert torch.isfinite(result.loss).all()
    # The float32 loss is also right in absolute terms (float64 evaluation of the same inputs).
    exact = loss_and_grads(reference_loss, inputs.double(), "mean", wrt=())
    torch.testing.assert_close(result.loss.double(), exact.loss, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("shape", [(8, 6), (2, 6, 3, 3)], ids=["nc", "nchw"])
def test_float16_logits_near_max_accumulate_in_float32(backend, shape):
    inputs = make_inputs(shape, dtype=torch.float16, seed=5, device=backend.device)
    logits = (inputs.logits.float() / inputs.logits.float().abs().amax() * 6.0e4).half()
    assert torch.isfinite(logits).all()
    inputs = inputs.with_(logits=logits, alpha=torch.zeros_like(inputs.alpha), beta=torch.zeros_like(inputs.beta))
    result = _compare(backend, inputs, "sum")
    assert torch.isfinite(result.loss).all()
    assert all(torch.isfinite(g).all() for g in result.grads.values())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3, 3)], ids=["nc", "nchw"])
def test_nan_logits_propagate_like_f_cross_entropy(backend, shape, reduction):
    inputs = make_inputs(shape, dtype=torch.float32, ignored_fraction=0.0, device=backend.device)
    logits = inputs.logits.clone()
    logits[1, 2] = float("nan")  # one element of row (or image) 1
    inputs = inputs.with_(logits=logits)
    expected = loss_and_grads(reference_loss, inputs, reduction, wrt=())
    actual = loss_and_grads(backend_loss(backend), inputs, reduction, wrt=())
    assert torch.isnan(actual.loss).any()
    torch.testing.assert_close(actual.loss, expected.loss, equal_nan=True, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3, 3)], ids=["nc", "nchw"])
def test_all_targets_ignored(backend, shape, reduction):
    """As F.cross_entropy: "mean" gives nan, "sum" 0, "none" zeros; every gradient is zero."""
    inputs = make_inputs(shape, ignored_fraction=1.0, device=backend.device)
    assert (inputs.target == inputs.ignore_index).all()
    result = _compare(backend, inputs, reduction, equal_nan=True)
    if reduction == "mean":
        assert torch.isnan(result.loss)
    else:
        assert (result.loss == 0).all()
    for name, grad in result.grads.items():
        assert (grad == 0).all(), name


@pytest.mark.parametrize("ignore_index", [0, 3, 255])
def test_ignore_index_values(backend, ignore_index):
    inputs = make_inputs((2, 5, 4, 4), ignore_index=ignore_index, ignored_fraction=0.3, device=backend.device)
    _compare(backend, inputs, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3, 3), (2, 5, 0, 3)], ids=["n0", "b0", "h0"])
def test_empty_batches(backend, shape, reduction):
    result = _compare(backend, make_inputs(shape, device=backend.device), reduction, equal_nan=True)
    for name, grad in result.grads.items():
        assert (grad == 0).all(), name


@pytest.mark.parametrize("shape", [(9, 6), (2, 6, 3, 4)], ids=["nc", "nchw"])
def test_int32_targets_equal_int64(backend, shape):
    inputs = make_inputs(shape, device=backend.device)
    as_int64 = loss_and_grads(backend_loss(backend), inputs, "mean")
    as_int32 = loss_and_grads(backend_loss(backend), inputs.with_(target=inputs.target.int()), "mean")
    assert_matches(as_int32, as_int64, torch.float64)


def test_zero_weights_and_single_class(backend):
    inputs = make_inputs((8, 1), ignored_fraction=0.3, device=backend.device)
    _compare(backend, inputs, "mean")
    inputs = make_inputs((12, 5), device=backend.device)
    weight = inputs.weight.clone()
    weight[inputs.target[0]] = 0
    _compare(backend, inputs.with_(weight=weight), "sum")


@pytest.mark.parametrize("layout", ["nc", "nchw"])
def test_stage2_gradients_equal_full_gradients(backend, layout):
    """Logits frozen (stage 2) gives the same alpha/beta/confidence gradients, bit for bit, and none for the logits."""
    shape = (70, 9) if layout == "nc" else (2, 9, 6, 6)
    inputs = make_inputs(shape, dtype=torch.float32, layout=layout, device=backend.device)
    full = loss_and_grads(backend_loss(backend), inputs, "mean")
    stage2 = loss_and_grads(backend_loss(backend), inputs, "mean", wrt=("alpha", "beta", "confidence"))
    assert "logits" not in stage2.grads
    assert torch.equal(full.loss, stage2.loss)
    for name in ("alpha", "beta", "confidence"):
        assert torch.equal(full.grads[name], stage2.grads[name]), name
    only_alpha = loss_and_grads(backend_loss(backend), inputs, "mean", wrt=("alpha",))
    assert torch.equal(only_alpha.grads["alpha"], full.grads["alpha"])


def test_no_grad_forward_matches(backend):
    inputs = make_inputs((2, 6, 5, 5), device=backend.device)
    with torch.no_grad():
        actual = loss_and_grads(backend_loss(backend), inputs, "mean", wrt=())
    expected = loss_and_grads(reference_loss, inputs, "mean", wrt=())
    torch.testing.assert_close(actual.loss, expected.loss, **TOLERANCES[torch.float64])


def _run_twice_identical(backend, inputs, reduction):
    first = loss_and_grads(backend_loss(backend), inputs, reduction)
    second = loss_and_grads(backend_loss(backend), inputs, reduction)
    return first, second


@pytest.mark.large_shape
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(64 * 70 + 5, 37), (3, 37, 40, 41)], ids=["nc", "nchw"])
def test_deterministic_across_runs_and_thread_counts(backend, shape, reduction):
    inputs = make_inputs(shape, dtype=torch.float32, device=backend.device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _run_twice_identical(backend, inputs, reduction)
        torch.set_num_threads(1)
        single, _ = _run_twice_identical(backend, inputs, reduction)
    finally:
        torch.set_num_threads(threads)
    for other in (second, single):
        assert torch.equal(first.loss, other.loss)
        for name in GRAD_INPUTS:
            assert torch.equal(first.grads[name], other.grads[name]), name


@pytest.mark.large_shape
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(1000, 300), (2, 150, 32, 33)], ids=["nc", "nchw"])
def test_larger_shapes_match_reference(backend, shape, reduction):
    """Many chunks and blocks per chunk, partial blocks at image boundaries."""
    _compare(backend, make_inputs(shape, dtype=torch.float32, ignore_index=255, device=backend.device), reduction)


@pytest.mark.large_shape
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "shape", [(2, 40, 160, 208), (2, 40, 161, 207)], ids=["aligned_planes", "odd_planes"]
)
def test_large_float32_nchw_grad_logits_match_reference(backend, shape, reduction):
    """grad_logits above the size where the CPU kernel writes it with non-temporal stores (8 MiB of
    float32, csrc/cpu/kernel_common.h), with every class plane 32-byte aligned (those stores) and
    with odd planes (plain stores for the misaligned runs)."""
    _compare(backend, make_inputs(shape, dtype=torch.float32, device=backend.device), reduction)


@pytest.mark.large_shape
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "shape, layout",
    [((2100, 1024), "nc"), ((2200, 1000), "nc"), ((1750, 1231), "nc"), ((440000, 5), "nc"),
     ((2, 150, 100, 70), "nchw_channels_last")],
    ids=["every_row_on_a_line", "every_other_row", "one_row_in_16", "rows_shorter_than_a_line", "channels_last"],
)
def test_large_float32_class_rows_grad_logits_match_reference(backend, shape, layout, reduction):
    """grad_logits above the non-temporal size in the classes layout (csrc/cpu/loss_blocks.h): a
    row that starts on a cache line is written from the gradient sweep, any other row is staged in
    the scratch and copied out, and only whole lines are written non-temporally. C = 1024 puts
    every row on a line, 1000 every other one, 1231 one in 16; rows of 5 classes are shorter than
    a line."""
    _compare(backend, make_inputs(shape, dtype=torch.float32, layout=layout, device=backend.device), reduction)


@pytest.mark.skipif(os.environ.get("DISALIGN_BIG_TESTS") != "1", reason="needs ~7 GiB; set DISALIGN_BIG_TESTS=1")
@pytest.mark.large_shape
@pytest.mark.parametrize("layout", ["pixels", "classes"])
def test_more_than_2_to_31_elements(backend, layout):
    check_indexing_beyond_2_to_31(backend, layout, backend.device)
