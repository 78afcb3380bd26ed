"""benches/backend_choice.py: from bench_ops rows of a GPU run to disalign_ops/_cuda_choice.py."""

from __future__ import annotations

import json

import backend_choice


def _row(shape, mode, dtype, backend, ms, error=None):
    return {"device": "NVIDIA H200", "shape": shape, "mode": mode, "dtype": dtype, "backend": backend,
            "ms": ms, "error": error}


ROWS = [
    _row("cls-inat", "stage2", "bfloat16", "native", 1.00), _row("cls-inat", "stage2", "bfloat16", "triton", 0.90),
    _row("cls-inat", "stage2", "float16", "native", 1.00), _row("cls-inat", "stage2", "float16", "triton", 0.90),
    # 3% faster: inside the margin, native stays
    _row("cls-imagenet", "stage2", "bfloat16", "native", 1.00), _row("cls-imagenet", "stage2", "bfloat16", "triton", 0.97),
    _row("seg-ade", "full", "float32", "native", 2.0), _row("seg-ade", "full", "float32", "triton", None, "OOM"),
    _row("det-lvis", "stage2", "float32", "native", 1.0), _row("det-lvis", "stage2", "float32", "eager", 0.1),
    # like with like: float16 only measured on triton is left out where bfloat16 has both
    _row("det-lvis", "full", "bfloat16", "native", 1.0), _row("det-lvis", "full", "bfloat16", "triton", 1.2),
    _row("det-lvis", "full", "float16", "triton", 0.01),
]


def test_choose_fastest_gpu_backend_per_case():
    by_case = {(m["layout"], m["dtype"], m["mode"], m["classes"]): m for m in backend_choice.choose(ROWS)}
    assert by_case[("rows", "16-bit", "stage2", 8142)]["backend"] == "triton"
    assert by_case[("rows", "16-bit", "stage2", 8142)]["ms"] == {"native": 2.0, "triton": 1.8}
    assert by_case[("rows", "16-bit", "stage2", 1000)]["backend"] == "native"
    no_margin = {(m["layout"], m["classes"], m["mode"]): m for m in backend_choice.choose(ROWS, margin=0.0)}
    assert no_margin[("rows", 1000, "stage2")]["backend"] == "triton"  # cls-imagenet without a margin
    # A failed row does not count; eager is not a GPU backend.
    assert by_case[("pixels", "float32", "full", 150)] == {
        "layout": "pixels", "dtype": "float32", "mode": "full", "classes": 150, "backend": "native", "ms": {"native": 2.0}}
    assert by_case[("rows", "float32", "stage2", 1231)]["ms"] == {"native": 1.0}
    assert by_case[("rows", "16-bit", "full", 1231)]["backend"] == "native"
    assert len(by_case) == 5


def test_writes_the_module_that_backends_reads(tmp_path, capsys):
    results = tmp_path / "nvidia-h200.json"
    results.write_text(json.dumps({"device": {"device_type": "cuda", "device_name": "NVIDIA H200", "commit": "abc"},
                                   "rows": ROWS}))
    out = tmp_path / "_cuda_choice.py"
    assert backend_choice.main([str(results), "--out", str(out)]) == 0
    namespace: dict = {}
    exec(out.read_text(), namespace)
    assert namespace["MEASURED"] == tuple(backend_choice.choose(ROWS))
    assert namespace["SOURCE"]["devices"] == ["NVIDIA H200"] and namespace["SOURCE"]["commits"] == ["abc"]
    assert namespace["__doc__"].startswith("The automatic backend on CUDA")
    # A CPU run chooses nothing and writes nothing.
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"device": {"device_type": "cpu"}, "rows": ROWS}))
    out.unlink()
    assert backend_choice.main([str(cpu), "--out", str(out)]) == 1 and not out.exists()
