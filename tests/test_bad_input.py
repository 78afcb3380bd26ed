"""docs/contract.md section 4: bad input raises a clear Python exception naming the argument and the offending
shape or value, through the public API and through direct calls of each backend's operators
(which bypass the Python checks and must still never read or write out of bounds)."""

import pytest
import torch

import disalign_ops
from disalign_ops.api import op_family
from conftest import make_inputs

C = 5


def _good(**changes):
    inputs = make_inputs((4, C, 3, 2), dtype=torch.float32)
    args = dict(
        logits=inputs.logits, target=inputs.target, alpha=inputs.alpha, beta=inputs.beta,
        confidence=inputs.confidence, weight=inputs.weight, ignore_index=-100, reduction="mean",
    )
    args.update(changes)
    return args


def _target_with(value):
    target = _good()["target"].clone()
    target[1, 2, 1] = value
    return target


# (id, changes to good arguments, exception type, fragments the message must contain)
LOSS_CASES = [
    ("logits_1d", dict(logits=torch.randn(C)), ValueError, ["logits", f"({C},)"]),
    ("logits_int", dict(logits=torch.zeros(4, C, 3, 2, dtype=torch.int64)), TypeError, ["logits", "torch.int64"]),
    ("logits_no_classes", dict(logits=torch.randn(4, 0, 3, 2)), ValueError, ["logits", "(4, 0, 3, 2)"]),
    ("target_shape", dict(target=torch.zeros(4, 3, dtype=torch.int64)), ValueError, ["target", "(4, 3)"]),
    ("target_float", dict(target=torch.zeros(4, 3, 2)), TypeError, ["target", "torch.float32"]),
    ("target_too_large", dict(target=_target_with(C)), IndexError, ["target", str(C), "ignore_index=-100"]),
    ("target_negative", dict(target=_target_with(-1)), IndexError, ["target", "-1", f"[0, {C})"]),
    ("target_int32_too_large", dict(target=_target_with(7).int()), IndexError, ["target", "7"]),
    ("alpha_length", dict(alpha=torch.zeros(C + 1)), ValueError, ["alpha", f"({C + 1},)", f"({C},)"]),
    ("beta_length", dict(beta=torch.zeros(C - 1)), ValueError, ["beta", f"({C - 1},)"]),
    ("alpha_2d", dict(alpha=torch.zeros(1, C)), ValueError, ["alpha", f"(1, {C})"]),
    ("alpha_int", dict(alpha=torch.zeros(C, dtype=torch.int64)), TypeError, ["alpha", "torch.int64"]),
    ("confidence_shape", dict(confidence=torch.rand(4, 2, 3)), ValueError, ["confidence", "(4, 2, 3)"]),
    ("weight_length", dict(weight=torch.ones(C + 2)), ValueError, ["weight", f"({C + 2},)"]),
    ("reduction", dict(reduction="average"), ValueError, ["reduction", "average"]),
    ("ignore_index_float", dict(ignore_index=1.5), TypeError, ["ignore_index", "1.5"]),
    ("alpha_device", dict(alpha=torch.zeros(C, device="meta")), RuntimeError, ["alpha", "meta", "cpu"]),
    ("target_device", dict(target=torch.zeros(4, 3, 2, dtype=torch.int64, device="meta")), RuntimeError, ["target", "meta"]),
]


def _assert_raises(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_cross_entropy_bad_input(backend, case):
    _, changes, error, fragments = case
    _assert_raises(lambda: disalign_ops.disalign_cross_entropy(**_good(**changes), backend=backend), error, fragments)


CALIBRATE_CASES = [c for c in LOSS_CASES if c[0].split("_")[0] in ("logits", "alpha", "beta", "confidence")]


@pytest.mark.parametrize("case", CALIBRATE_CASES, ids=[c[0] for c in CALIBRATE_CASES])
def test_calibrate_bad_input(backend, case):
    _, changes, error, fragments = case
    args = _good(**changes)
    _assert_raises(
        lambda: disalign_ops.calibrate(args["logits"], args["alpha"], args["beta"], confidence=args["confidence"], backend=backend),
        error,
        fragments,
    )


def test_unknown_and_unavailable_backends():
    args = _good()
    _assert_raises(lambda: disalign_ops.disalign_cross_entropy(**args, backend="cudnn"), ValueError, ["backend", "cudnn"])
    missing = [name for name in ("native", "triton") if name not in disalign_ops.available_backends("cpu")]
    for name in missing:
        _assert_raises(
            lambda: disalign_ops.disalign_cross_entropy(**args, backend=name), RuntimeError, [name, "available"]
        )


# Direct operator calls skip the Python checks: the backend's own checks must catch size mismatches
# (a wrong size would otherwise read or write out of bounds) and out-of-range targets.
DIRECT_CASES = [c for c in LOSS_CASES if c[2] in (ValueError, IndexError) and c[0] not in ("reduction", "logits_1d")]


def _direct_args(changes):
    args = _good(**changes)
    return (
        args["logits"], args["target"], args["alpha"], args["beta"], args["confidence"], args["weight"],
        args["ignore_index"],
    )


@pytest.mark.parametrize("case", DIRECT_CASES, ids=[c[0] for c in DIRECT_CASES])
def test_direct_op_calls_check_sizes_and_targets(backend, case):
    _, changes, error, fragments = case
    ops = op_family(backend)
    args = _direct_args(changes)
    _assert_raises(lambda: ops.cross_entropy(*args, "sum", [False] * 4), error, fragments)
    _assert_raises(lambda: ops.cross_entropy(*args, "sum", [True] * 4), error, fragments)
    grad_loss = torch.ones(args[1].shape)
    _assert_raises(lambda: ops.cross_entropy_backward(grad_loss, *args, [True] * 4), error, fragments)


def test_direct_op_calls_check_upstream_gradient_shapes(backend):
    ops = op_family(backend)
    logits, target, alpha, beta, confidence, weight, ignore_index = _direct_args({})
    _assert_raises(
        lambda: ops.cross_entropy_backward(
            torch.ones(4, 3), logits, target, alpha, beta, confidence, weight, ignore_index, [True] * 4
        ),
        (ValueError, RuntimeError),
        ["grad_loss", "(4, 3)"],
    )
    _assert_raises(
        lambda: ops.calibrate_backward(torch.ones(4, C, 3), logits, alpha, beta, confidence, [True] * 4),
        (ValueError, RuntimeError),
        ["grad", "(4, 5, 3)"],
    )
    for bad in (torch.zeros(C + 1), torch.zeros(C, 1)):
        _assert_raises(lambda: ops.calibrate(logits, bad, beta, confidence), ValueError, ["alpha"])


def test_arguments_after_beta_are_keyword_only():
    """F.cross_entropy users pass class weights positionally; it must never be taken as the confidence,
    even when N == C makes the shapes fit."""
    logits, target = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    alpha = beta = torch.zeros(4, dtype=torch.float64)
    weight = torch.rand(4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"keyword-only: pass confidence= or weight="):
        disalign_ops.disalign_cross_entropy(logits, target, alpha, beta, weight)
    with pytest.raises(TypeError, match=r"keyword-only: pass confidence="):
        disalign_ops.calibrate(logits, alpha, beta, weight)
    loss = disalign_ops.disalign_cross_entropy(logits, target, alpha, beta, weight=weight, backend="eager")
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target, weight=weight))


def test_error_classes_are_exported():
    assert issubclass(disalign_ops.InputTypeError, TypeError) and issubclass(disalign_ops.InputTypeError, ValueError)
    with pytest.raises(disalign_ops.InputTypeError, match="target"):
        disalign_ops.disalign_cross_entropy(
            torch.randn(2, 3), torch.zeros(2), torch.zeros(3), torch.zeros(3), backend="eager"
        )
