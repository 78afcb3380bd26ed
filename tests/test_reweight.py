import math

import pytest
import torch

import disalign_ops as da


def test_formula_matches_paper_eq11_normalised_to_mean_one():
    counts = torch.tensor([500.0, 120.0, 30.0, 4.0])
    rho = 1.2
    r = counts / counts.sum()
    expected = (1 / r) ** rho
    expected = counts.numel() * expected / expected.sum()
    got = da.generalized_reweight(counts, rho)
    torch.testing.assert_close(got, expected.float())
    assert got.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_rho_zero_is_instance_balanced_and_rho_one_class_balanced():
    counts = [1000, 100, 10, 1]
    torch.testing.assert_close(da.generalized_reweight(counts, 0.0), torch.ones(4))
    balanced = da.generalized_reweight(counts, 1.0)
    # class-balanced: w_c proportional to 1/n_c
    ratios = balanced * torch.tensor(counts, dtype=torch.float32)
    torch.testing.assert_close(ratios, ratios[0].expand(4))


def test_weights_increase_towards_the_tail_and_with_rho():
    counts = [800, 200, 50, 5]
    low, high = da.generalized_reweight(counts, 0.3), da.generalized_reweight(counts, 1.5)
    assert torch.all(low[1:] > low[:-1])
    assert high[-1] > low[-1] and high[0] < low[0]


def test_extreme_imbalance_stays_finite():
    counts = [1e9, 1.0]
    w = da.generalized_reweight(counts, 3.0, dtype=torch.float64)
    assert torch.isfinite(w).all()
    assert w.sum().item() == pytest.approx(2.0)
    assert w[1].item() == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize(
    "counts, rho, match",
    [
        ([10, 0, 3], 1.0, r"class_counts\[1\] = 0"),
        ([10, -2], 1.0, r"class_counts\[1\] = -2"),
        ([], 1.0, "non-empty"),
        ([[1, 2]], 1.0, "1-D"),
        ([1, 2], -0.5, "rho must be"),
        ([1, 2], math.nan, "rho must be"),
    ],
)
def test_bad_input_names_the_argument(counts, rho, match):
    with pytest.raises(ValueError, match=match):
        da.generalized_reweight(counts, rho)


@pytest.mark.parametrize("counts", [["a", "b"], [object()], "abc"], ids=["strings", "objects", "str"])
def test_non_numeric_counts_name_the_argument(counts):
    with pytest.raises(ValueError, match="class_counts must be"):
        da.generalized_reweight(counts, 1.0)


def test_rho_may_be_a_0d_tensor_or_a_numpy_number():
    import numpy as np

    expected = da.generalized_reweight([5, 2, 1], 0.7)
    torch.testing.assert_close(da.generalized_reweight([5, 2, 1], torch.tensor(0.7)), expected)
    torch.testing.assert_close(da.generalized_reweight([5, 2, 1], np.float64(0.7)), expected)


@pytest.mark.parametrize("rho", [torch.tensor([1.0]), torch.tensor(True), "1", None], ids=["1d", "bool", "str", "none"])
def test_bad_rho_says_what_it_got(rho):
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        da.generalized_reweight([5, 2, 1], rho)
