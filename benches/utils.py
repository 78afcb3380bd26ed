"""Timing, memory and machine-description helpers shared by the benchmarks (bench_ops.py, gpu_check.py).

Nothing here knows about the DisAlign loss: a step is any zero-argument function.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time

import torch

MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Median times of steps with cold caches, using CUDA events on CUDA and perf_counter on CPU.

    The steps run round-robin (one call of each per round), so load from other processes on a
    shared machine falls on every backend alike instead of on whichever ran at that moment.
    """

    def __init__(self, device: torch.device, flush_buffer: torch.Tensor, warmup: int, repeat: int):
        self.device, self.flush_buffer, self.warmup, self.repeat = device, flush_buffer, warmup, repeat

    def _timed_call_ms(self, step, flush: bool) -> float:
        if flush:
            self.flush_buffer.sum()  # evicts the inputs from the caches without leaving dirty lines
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    def median_ms(self, steps: dict, before_each=lambda name: None, flush: bool = True) -> dict:
        """{name: median ms} of each step in `steps` ({name: zero-argument function}).

        before_each(name) runs before every call of step `name`, outside the timed region."""
        for _ in range(self.warmup):
            for name, step in steps.items():
                before_each(name)
                step()
        synchronize(self.device)
        times = {name: [] for name in steps}
        for _ in range(self.repeat):
            for name, step in steps.items():
                before_each(name)
                times[name].append(self._timed_call_ms(step, flush))
        return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth_gbps(timer: Timer, copy_buffer: torch.Tensor | None = None) -> float:
    """Bandwidth of a large dst.copy_(src) on the device, counting bytes read plus written."""
    src = timer.flush_buffer if copy_buffer is None else copy_buffer
    dst = torch.empty_like(src)
    # No flush: the copy itself outgrows the caches.
    ms = timer.median_ms({"copy": lambda: dst.copy_(src)}, flush=False)["copy"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def peak_extra_bytes_cuda(step, device: torch.device) -> int:
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def peak_extra_bytes_cpu(step) -> int:
    """Peak of the bytes allocated during the step beyond those live at its start, from the profiler's
    memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    deltas = sorted(
        ((e["ts"], e["args"]["Bytes"]) for e in events
         if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda event: event[0],  # stable: events of one timestamp keep the trace's order
    )
    # The running sum of the allocations and frees, in time order, from the step's start. Each
    # allocator reports its own running total ("Total Allocated": c10's CPU allocator and the native
    # ops' output cache, csrc/cpu/output_cache.h, count separately), so the totals are not summed;
    # the byte counts are. c10 reports no free of a block allocated before profiling started, so the
    # peak can be overstated, never understated.
    running, peak = 0, 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_extra_bytes(step, device: torch.device) -> int:
    if device.type == "cuda":
        return peak_extra_bytes_cuda(step, device)
    return peak_extra_bytes_cpu(step)


def device_info(device: torch.device) -> dict:
    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_name": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        info["cuda"] = torch.version.cuda
        info["multiprocessors"] = props.multi_processor_count
        info["gpu_memory_bytes"] = props.total_memory
        info["capability"] = f"{props.major}.{props.minor}"
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    info["device_name"] = info.get("gpu_name", info["cpu_name"])
    return info


def git_commit() -> str | None:
    """The checkout's HEAD, with "+dirty" when tracked files differ from it; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(name: str) -> str:
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def write_json(path: str, payload) -> None:
    """Writes through a temporary file and a rename, so a run killed mid-write leaves the last whole file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
