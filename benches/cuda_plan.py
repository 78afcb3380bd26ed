"""The CUDA tile planner (csrc/cuda/plan.cpp) on the CPU: builds tests/cuda_plan/plan_main.cpp with the
host C++ compiler (with the partial-sum constants of disalign_ops/_gpu_plan.py, as setup.py passes
them) and returns its plans as dicts. Used by tests/test_cuda_plan.py and benches/sass_budget.py, so
the plans they check and report are the planner's own, not a re-implementation."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "cuda_plan" / "plan_main.cpp", ROOT / "csrc" / "cuda" / "plan.cpp"]

# The GPU benchmark shapes of docs/contract.md section 5 as (batch, classes, spatial, pixels layout).
BENCH_SHAPES = {
    "cls-imagenet": (4096, 1000, 1, False),
    "cls-inat": (4096, 8142, 1, False),
    "seg-ade": (8, 150, 512 * 512, True),
    "det-lvis": (8192, 1231, 1, False),
}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    multiprocessors: int
    max_shared_per_block: int
    shared_per_sm: int
    # SMs per GPC where thread-block clusters are launched (sm_90; occupancy.h's cluster model stands
    # in for cudaOccupancyMaxActiveClusters); 0: no clusters.
    gpc_sms: int = 0


H200 = Device("H200 (sm_90)", 132, 232448, 233472, gpc_sms=16)
A100 = Device("A100 (sm_80)", 108, 166912, 167936)


def macros() -> list[tuple[str, str]]:
    return runpy.run_path(str(ROOT / "disalign_ops" / "_gpu_plan.py"))["compiler_macros"]()


def build(out_dir: str | os.PathLike | None = None, cxx: str | None = None) -> Path:
    """Compiles the planner driver; returns the executable's path."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++ / c++) found")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="cuda_plan_"))
    exe = out_dir / "plan_main"
    defs = [f"-D{k}={v}" for k, v in macros()]
    cmd = [cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", *defs, *map(str, SOURCES), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def plans(exe: Path, requests: list[dict], device: Device = H200, registers: int = 64) -> list[dict]:
    """Plans for requests with keys batch, classes, spatial, pixels, elem, acc and the optional flags
    calibrate, want_alpha, want_beta, want_loss, mean (stage 2 of cross entropy by default). With
    `operand` = (data address, (batch, classes, spatial) element strides) the plan also carries the
    planner's copy unit for that operand ("copy_unit": bytes, or COPY_REALIGN), else -1."""
    lines = []
    for r in requests:
        fields = [r["batch"], r["classes"], r["spatial"], int(r["pixels"]), r["elem"], r.get("acc", 4),
                  int(r.get("calibrate", False)), int(r.get("want_alpha", True)), int(r.get("want_beta", True)),
                  int(r.get("want_loss", True)), int(r.get("mean", True)), device.multiprocessors,
                  device.max_shared_per_block, device.shared_per_sm, r.get("registers", registers), device.gpc_sms]
        if "operand" in r:
            address, strides = r["operand"]
            fields += [address, *strides]
        lines.append(" ".join(str(f) for f in fields))
    out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


# copy_unit's value for lines copied by csrc/cuda/line_copy.h (plan.h kCopyRealign).
COPY_REALIGN = 0


def line_copies(exe: Path, cases: list[tuple[int, int, int]]) -> list[dict]:
    """The kernel's realigned line copy (csrc/cuda/line_copy.h) emulated on the CPU for lines of
    (address mod 16, elements, element bytes): the head / body / tail split and what the emulation
    found (see tests/cuda_plan/plan_main.cpp, `copy` lines)."""
    text = "".join(f"copy {a} {n} {e}\n" for a, n, e in cases)
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]
