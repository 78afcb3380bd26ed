"""backend=None on CUDA from measured timings (disalign_ops/_cuda_choice.py, written by
benches/backend_choice.py): the case key of a call, the nearest measured case, and the order of
precedence (an explicit backend and DISALIGN_BACKEND first; the provisional order without a table)."""

import pytest
import torch

from disalign_ops import _cuda_choice, backends

TABLE = (
    {"layout": "rows", "dtype": "16-bit", "mode": "stage2", "classes": 1000, "backend": "native"},
    {"layout": "rows", "dtype": "16-bit", "mode": "stage2", "classes": 8142, "backend": "triton"},
    {"layout": "pixels", "dtype": "16-bit", "mode": "stage2", "classes": 150, "backend": "triton"},
    {"layout": "rows", "dtype": "float32", "mode": "full", "classes": 1231, "backend": "native"},
)


def test_case_key_of_layouts_dtypes_and_modes():
    assert backends.case_key(torch.zeros(4, 10, dtype=torch.bfloat16)) == ("rows", "16-bit", "stage2", 10)
    assert backends.case_key(torch.zeros(2, 7, 3, 5)) == ("pixels", "float32", "stage2", 7)
    cl = torch.zeros(2, 7, 3, 5, dtype=torch.float16).to(memory_format=torch.channels_last)
    assert backends.case_key(cl) == ("rows", "16-bit", "stage2", 7)
    assert backends.case_key(torch.zeros(3, 9, dtype=torch.float64, requires_grad=True)) == ("rows", "float64", "full", 9)
    assert backends.case_key(torch.zeros(9, 3).t()) == ("pixels", "float32", "stage2", 9)  # classes strided


def test_nearest_measured_case(monkeypatch):
    monkeypatch.setattr(_cuda_choice, "MEASURED", TABLE)
    pick = backends.measured_backend
    assert pick(("rows", "16-bit", "stage2", 1000)) == "native"
    assert pick(("rows", "16-bit", "stage2", 5000)) == "triton"  # log scale: nearer 8142 than 1000
    assert pick(("rows", "16-bit", "stage2", 2500)) == "native"
    assert pick(("rows", "16-bit", "stage2", 100000)) == "triton"
    assert pick(("pixels", "16-bit", "stage2", 19)) == "triton"
    assert pick(("rows", "float32", "full", 10)) == "native"
    # Nothing measured for that layout, dtype class or mode: no measured choice.
    assert pick(("pixels", "float32", "stage2", 150)) is None
    assert pick(("rows", "16-bit", "full", 1000)) is None
    assert pick(None) is None


def test_measured_case_only_on_cuda_with_a_table(monkeypatch):
    logits = torch.zeros(4, 10)
    monkeypatch.setattr(_cuda_choice, "MEASURED", ())
    assert backends.measured_case(logits) is None
    monkeypatch.setattr(_cuda_choice, "MEASURED", TABLE)
    assert backends.measured_case(logits) is None  # a CPU tensor


def test_resolve_takes_the_measured_choice_after_explicit_and_environment(monkeypatch):
    monkeypatch.setattr(_cuda_choice, "MEASURED", TABLE)
    monkeypatch.setattr(backends, "available_backends", lambda device="cpu": ["eager", "native", "triton"])
    monkeypatch.setattr(backends, "_native_has_kernel", lambda device_type: True)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    big = ("rows", "16-bit", "stage2", 8142)
    resolve = backends.resolve_backend
    assert resolve(None, cuda, big) == "triton"
    assert resolve(None, cuda, ("rows", "16-bit", "stage2", 1000)) == "native"
    assert resolve(None, cuda, None) == "native"  # no case: the provisional order
    assert resolve("native", cuda, big) == "native"  # an explicit backend wins
    monkeypatch.setenv(backends.ENV_VAR, "native")
    assert resolve(None, cuda, big) == "native"  # so does the environment variable
    monkeypatch.delenv(backends.ENV_VAR)
    # The measured backend is taken only where it is available.
    monkeypatch.setattr(backends, "available_backends", lambda device="cpu": ["eager", "native"])
    assert resolve(None, cuda, big) == "native"
    # Not on other devices.
    assert resolve(None, torch.device("cpu"), big) == "native"


def test_the_shipped_table_is_well_formed():
    for row in _cuda_choice.MEASURED:
        assert row["layout"] in ("rows", "pixels") and row["mode"] in ("stage2", "full")
        assert row["dtype"] in ("16-bit", "float32", "float64") and row["backend"] in ("native", "triton")
        assert isinstance(row["classes"], int) and row["classes"] > 0
    if not _cuda_choice.MEASURED:
        pytest.skip("no GPU run measured yet: the table is empty (backend=None keeps the provisional order)")
