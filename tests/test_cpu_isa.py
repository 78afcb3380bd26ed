"""Each per-ISA copy of the native CPU kernels (DEFAULT, AVX2, AVX512) is picked when
ATEN_CPU_CAPABILITY asks for it (capped at what the CPU supports, as ATen does) and agrees with
the reference. Each check runs in a fresh interpreter, since the copy is chosen once per process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import disalign_ops

pytestmark = pytest.mark.skipif(
    "native" not in disalign_ops.available_backends("cpu"), reason="the native CPU kernels are not built"
)

CAPABILITIES = ["default", "avx2", "avx512"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Runs in the child: report the copy in use and check it against the reference in both kernel
# layouts, for float32, bfloat16 and float64, every gradient included.
CHILD = r"""
import json
import torch
import disalign_ops
from conftest import assert_matches, backend_loss, loss_and_grads, make_inputs, reference_loss

cases = [
    ((70, 37), torch.float32, "nc", "mean"),
    ((2, 37, 9, 11), torch.float32, "nchw", "sum"),
    ((2, 37, 9, 11), torch.float32, "nchw_channels_last", "mean"),
    ((33, 19), torch.bfloat16, "nc", "none"),
    ((2, 19, 5, 7), torch.float16, "nchw", "mean"),
    ((2, 5, 3, 3), torch.float64, "nchw", "mean"),
]
for shape, dtype, layout, reduction in cases:
    inputs = make_inputs(shape, dtype=dtype, layout=layout)
    grad_output = torch.linspace(0.5, 1.5, inputs.target.numel()).view(inputs.target.shape) if reduction == "none" else None
    actual = loss_and_grads(backend_loss("native"), inputs, reduction, grad_output=grad_output)
    expected = loss_and_grads(reference_loss, inputs, reduction, grad_output=grad_output)
    assert_matches(actual, expected, dtype)
    calibrated = disalign_ops.calibrate(inputs.logits, inputs.alpha, inputs.beta, confidence=inputs.confidence, backend="native")
    reference = disalign_ops.reference.calibrate(inputs.logits, inputs.alpha, inputs.beta, inputs.confidence)
    torch.testing.assert_close(calibrated, reference)
print(json.dumps({"picked": torch.ops.disalign.cpu_capability(), "aten": torch.backends.cpu.get_cpu_capability()}))
"""


# Only reports the copy: torch >= 2.14 no longer caps ATEN_CPU_CAPABILITY at what the CPU supports,
# so its own kernels may hit illegal instructions when a capability above the CPU's is forced.
REPORT_ONLY = r"""
import json
import torch
import disalign_ops
print(json.dumps({"picked": torch.ops.disalign.cpu_capability(), "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def _run_child(capability, code=CHILD):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR] + sys.path)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=TESTS_DIR, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def best_capability():
    """The copy picked without ATEN_CPU_CAPABILITY: the best the CPU supports, as ATen sees it."""
    report = _run_child(None)
    aten = report["aten"].lower()
    if aten in CAPABILITIES:
        assert report["picked"] == aten
    return report["picked"]


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_kernel_copy_is_picked_and_matches_reference(capability, best_capability):
    above_cpu = CAPABILITIES.index(capability) > CAPABILITIES.index(best_capability)
    expected = best_capability if above_cpu else capability
    assert _run_child(capability, REPORT_ONLY if above_cpu else CHILD)["picked"] == expected


def test_this_process_reports_its_copy():
    assert torch.ops.disalign.cpu_capability() in CAPABILITIES
