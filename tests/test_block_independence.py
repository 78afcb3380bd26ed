"""A row's results must not depend on which rows share its kernel block (issue 10, item 4).

The CPU kernels run blocks of rows (4 rows of an (N, C), up to 64 pixels of an NCHW image); an
ignored row whose logits make its softmax NaN gets NaN gradients, as in F.cross_entropy (its
upstream coefficient is 0, and 0 * NaN is NaN), whether the other rows of its block are ignored or
not, and its loss contribution stays 0.
"""

import pytest
import torch

from conftest import assert_matches, backend_loss, loss_and_grads, make_inputs, reference_loss


def _ignored_nan_row_case(layout, shape, first_valid_row, nan_row, seed):
    inputs = make_inputs(shape, torch.float64, layout=layout, ignored_fraction=0.0, seed=seed)
    target = inputs.target.clone()
    flat_target = target.view(-1)  # row order = target.flatten() order
    flat_target[:first_valid_row] = inputs.ignore_index
    logits = inputs.logits.clone()
    rows_view = logits.movedim(1, -1).reshape(-1, shape[1]) if logits.dim() > 2 else logits
    with torch.no_grad():
        rows_view[nan_row, 1] = float("nan")
    if logits.dim() > 2:
        logits = rows_view.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()
    return inputs.with_(logits=logits, target=target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "layout, shape, first_valid_row",
    [
        ("nc", (8, 5), 4),  # rows 0-3 (a whole classes-layout block) ignored, 4-7 valid
        ("nc", (8, 5), 2),  # the NaN row's block mixes ignored and valid rows
        ("nc", (8, 5), 8),  # every row ignored
        ("nchw", (1, 5, 4, 32), 64),  # pixel blocks: a whole block of ignored pixels
        ("nchw", (1, 5, 4, 32), 3),
    ],
)
def test_nan_in_ignored_row_as_torch(backend, reduction, layout, shape, first_valid_row):
    inputs = _ignored_nan_row_case(layout, shape, first_valid_row, nan_row=0, seed=1)
    actual = loss_and_grads(backend_loss(backend), inputs, reduction)
    expected = loss_and_grads(reference_loss, inputs, reduction)
    assert_matches(actual, expected, torch.float64, equal_nan=True)
    # The NaN stays in its row's gradient (and the sums it feeds); the loss of the valid rows is finite.
    assert actual.grads["logits"].movedim(1, -1).reshape(-1, shape[1])[0].isnan().all()
    if reduction == "none":
        assert torch.isfinite(actual.loss).all()


@pytest.mark.parametrize("layout, shape", [("nc", (12, 7)), ("nchw", (2, 7, 5, 13))])
def test_row_result_independent_of_block_neighbours(backend, layout, shape):
    """Each row's loss and logits gradient equal those of the same row computed alone."""
    inputs = make_inputs(shape, torch.float64, layout=layout, ignored_fraction=0.3, seed=2)
    together = loss_and_grads(backend_loss(backend), inputs, "none", wrt=("logits",))
    rows_logits = inputs.logits.movedim(1, -1).reshape(-1, shape[1])
    rows_grad = together.grads["logits"].movedim(1, -1).reshape(-1, shape[1])
    flat = dict(target=inputs.target.reshape(-1), confidence=inputs.confidence.reshape(-1))
    for row in range(rows_logits.shape[0]):
        alone = inputs.with_(
            logits=rows_logits[row : row + 1].contiguous(), target=flat["target"][row : row + 1],
            confidence=flat["confidence"][row : row + 1],
        )
        single = loss_and_grads(backend_loss(backend), alone, "none", wrt=("logits",))
        torch.testing.assert_close(single.loss[0], together.loss.reshape(-1)[row], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(single.grads["logits"][0], rows_grad[row], rtol=1e-12, atol=1e-14)
