"""Forward+backward benchmark of the DisAlign loss (SPEC section 5).

Backends, each timed on the same inputs for one forward and one backward pass (reduction "mean"):

  eager    disalign_ops.reference.cross_entropy, the expression users write today: the calibrated
           logits (paper eq. 6), then F.cross_entropy with class weights, through autograd.
  compile  torch.compile(fullgraph=True, dynamic=False) of that same function; the first call
           (which compiles, inductor's disk caches disabled) is reported separately as "first call"
           and is never part of the timing.
  native   disalign_ops.disalign_cross_entropy(..., backend="native") (C++/CUDA extension).
  triton   disalign_ops.disalign_cross_entropy(..., backend="triton").

Modes: "stage2" freezes the logits (alpha, beta and the confidence, a leaf tensor in (0, 1) shaped
like the target, need gradients); "full" asks for the logits' gradient too.

Inputs are those of a long-tail training step: class weights from disalign_ops.generalized_reweight
of an exponentially decaying count profile (paper rho per task), targets drawn from that same
profile, ~5% ignored pixels (ignore_index 255) for segmentation, 75% background ROIs for detection
(background = last class, weight 1, alpha = beta = 0 there). Segmentation logits are NCHW contiguous.

Measurements:

  ms        median over --repeat timed calls after --warmup untimed ones. The backends of a case
            run round-robin, one call each per round, so other load on a shared machine falls on
            all of them alike. Gradients are set to None before every call (so none accumulates)
            and the caches are flushed by reading a buffer of --copy-mib MiB (a read leaves no
            dirty lines to write back during the timed call). CUDA: CUDA events around the call.
            CPU: time.perf_counter around the call.
  GB/s      the bytes a fused kernel must move, divided by ms: the logits read once, plus
            grad_logits written once in "full" mode.
  x bound   ms divided by the read-once bound: those same bytes / the copy bandwidth, which is
            measured in the same run as dst.copy_(src) of a --copy-mib MiB tensor, counting the
            bytes read plus written (the better of a copy at the start and one at the end of the
            run). 1.0 is the bound; the H100 target is <= 1.25.
  x eager / x compile   speed-up: eager (compile) ms divided by this backend's ms.
  peak extra MiB        the most memory allocated during one forward+backward beyond what was live
            before it (inputs allocated, gradients set to None); gradients, the loss and every
            temporary count. CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
            minus memory_allocated() before the call. CPU (where PyTorch keeps no peak statistic):
            the call runs once under torch.profiler.profile(profile_memory=True), which records
            every allocation and free made through PyTorch's CPU allocator with the allocator's
            running total ("Total Allocated"); the peak is the largest running total minus the
            total before the call's first allocation. Every tensor (eager temporaries, inductor
            buffers, outputs of the extension's ops, gradients) goes through that allocator;
            scratch a C++ kernel takes with malloc/new instead of a tensor would not be seen.
  % logits  peak extra memory as a percentage of the logits' size.

Usage:
  python benches/bench_ops.py                                   # all shapes, both modes, CPU
  python benches/bench_ops.py --device cuda --backends eager,compile,native,triton
  python benches/bench_ops.py --shapes seg-ade,det-lvis --modes stage2 --repeat 5

Writes a Markdown table to stdout and JSON to --json (default benches/results/<device-slug>.json,
with -<dtype> before .json for half dtypes).
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch._inductor.config

import disalign_ops
from disalign_ops import reference

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BACKENDS = ("eager", "compile", "native", "triton")
MODES = ("stage2", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


@dataclass(frozen=True)
class ShapeSpec:
    """One benchmark shape of SPEC section 5 and the long-tail profile of its task."""

    task: str  # "cls", "seg" or "det"
    cuda_dims: tuple  # logits shape on CUDA: (N, C) or (B, C, H, W)
    cpu_dims: tuple  # logits shape on CPU
    rho: float  # generalized re-weight exponent the paper uses for the task
    max_count: int  # samples (pixels, instances) of the most frequent class
    imbalance: float  # most frequent / least frequent class count


SHAPES = {
    "cls-imagenet": ShapeSpec("cls", (4096, 1000), (4096, 1000), rho=1.2, max_count=1280, imbalance=256),
    "cls-inat": ShapeSpec("cls", (4096, 8142), (1024, 8142), rho=1.2, max_count=1000, imbalance=500),
    "seg-ade": ShapeSpec("seg", (8, 150, 512, 512), (4, 150, 128, 128), rho=0.3, max_count=10**8, imbalance=1000),
    "det-lvis": ShapeSpec("det", (8192, 1231), (8192, 1231), rho=0.8, max_count=50000, imbalance=50000),
}
SEG_IGNORE_INDEX = 255
SEG_IGNORED_FRACTION = 0.05
DET_BACKGROUND_FRACTION = 0.75


def long_tail_counts(num_classes: int, max_count: int, imbalance: float) -> torch.Tensor:
    """Exponentially decaying class counts, max_count down to max_count / imbalance (at least 1)."""
    decay = torch.arange(num_classes, dtype=torch.float64) / max(num_classes - 1, 1)
    return (max_count * imbalance ** (-decay)).round().clamp(min=1)


@dataclass
class Problem:
    """The inputs of one benchmark case; the leaves that need gradients depend on the mode."""

    name: str
    mode: str
    logits: torch.Tensor
    target: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    confidence: torch.Tensor
    weight: torch.Tensor
    ignore_index: int

    def args(self):
        tensors = (self.logits, self.target, self.alpha, self.beta, self.confidence, self.weight)
        return tensors + (self.ignore_index, "mean")

    def reset_grads(self) -> None:
        for t in (self.logits, self.alpha, self.beta, self.confidence):
            t.grad = None

    @property
    def logits_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()

    @property
    def min_bytes_moved(self) -> int:
        """Logits read once, plus grad_logits written once when the logits need gradients."""
        return self.logits_bytes * (2 if self.mode == "full" else 1)


def make_problem(name: str, mode: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Problem:
    spec = SHAPES[name]
    dims = spec.cuda_dims if device.type == "cuda" else spec.cpu_dims
    num_classes = dims[1]
    row_shape = (dims[0],) + tuple(dims[2:])
    num_rows = math.prod(row_shape)
    cpu_gen = torch.Generator().manual_seed(seed)

    # Detection: the background (last class) is neither re-weighted (weight 1) nor calibrated.
    calibrated_classes = num_classes - 1 if spec.task == "det" else num_classes
    counts = long_tail_counts(calibrated_classes, spec.max_count, spec.imbalance)
    weight = disalign_ops.generalized_reweight(counts, spec.rho)
    target = torch.multinomial(counts / counts.sum(), num_rows, replacement=True, generator=cpu_gen)
    ignore_index = -100
    if spec.task == "det":
        weight = torch.cat([weight, torch.ones(1)])
        target[torch.rand(num_rows, generator=cpu_gen) < DET_BACKGROUND_FRACTION] = num_classes - 1
    elif spec.task == "seg":
        ignore_index = SEG_IGNORE_INDEX
        target[torch.rand(num_rows, generator=cpu_gen) < SEG_IGNORED_FRACTION] = ignore_index

    alpha = 0.1 * torch.randn(num_classes, generator=cpu_gen)
    beta = 0.1 * torch.randn(num_classes, generator=cpu_gen)
    if spec.task == "det":
        alpha[-1] = beta[-1] = 0.0
    confidence = torch.sigmoid(torch.randn(row_shape, generator=cpu_gen))

    dev_gen = torch.Generator(device=device).manual_seed(seed)
    logits = 2.0 * torch.randn(dims, generator=dev_gen, device=device, dtype=torch.float32)
    return Problem(
        name=name,
        mode=mode,
        logits=logits.to(dtype).requires_grad_(mode == "full"),
        target=target.view(row_shape).to(device),
        alpha=alpha.to(device).requires_grad_(),
        beta=beta.to(device).requires_grad_(),
        confidence=confidence.to(device).requires_grad_(),
        weight=weight.to(device),
        ignore_index=ignore_index,
    )


def runnable_backends(device: torch.device) -> list[str]:
    """Benchmark backends that can run on the device: eager, compile, and the library's others."""
    library = disalign_ops.available_backends(device)
    return ["eager", "compile"] + [b for b in ("native", "triton") if b in library]


def make_step(backend: str, problem: Problem):
    """A zero-argument function running forward + backward of `problem` on `backend`."""
    if backend == "eager":
        loss_fn = reference.cross_entropy
    elif backend == "compile":
        torch._dynamo.reset()  # a fresh compile per case: no recompilation limits, honest compile time
        loss_fn = torch.compile(reference.cross_entropy, fullgraph=True, dynamic=False)
    else:

        def loss_fn(logits, target, alpha, beta, confidence, weight, ignore_index, reduction):
            return disalign_ops.disalign_cross_entropy(
                logits, target, alpha, beta, confidence=confidence, weight=weight, ignore_index=ignore_index,
                reduction=reduction, backend=backend,
            )

    args = problem.args()

    def step():
        loss_fn(*args).backward()

    return step


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

    def median_ms(self, steps: dict, before_each=lambda: None, flush: bool = True) -> dict:
        """{name: median ms} of each step in `steps` ({name: zero-argument function})."""
        for _ in range(self.warmup):
            for step in steps.values():
                before_each()
                step()
        synchronize(self.device)
        times = {name: [] for name in steps}
        for _ in range(self.repeat):
            for name, step in steps.items():
                before_each()
                times[name].append(self._timed_call_ms(step, flush))
        return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth_gbps(timer: Timer) -> float:
    """Bandwidth of a large dst.copy_(src) on the device, counting bytes read plus written."""
    src = timer.flush_buffer
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
    """Peak of the CPU allocator's running total during the step, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = [
        (e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    if not totals:
        return 0
    # Each event carries the running total after it, so total - bytes is the total before it. The
    # smallest of those is the total before the step's first allocation, or lower if the step frees a
    # block allocated under an earlier profiler session: the peak is then overstated, never understated.
    before = min(total - nbytes for total, nbytes in totals)
    return max(0, max(total for total, _ in totals) - before)


def peak_extra_bytes(step, problem: Problem, device: torch.device) -> int:
    problem.reset_grads()
    if device.type == "cuda":
        return peak_extra_bytes_cuda(step, device)
    return peak_extra_bytes_cpu(step)


def measure_case(problem: Problem, backends: list[str], timer: Timer, device: torch.device) -> list[dict]:
    """One row per backend: first-call time, median ms, peak extra memory (or the error it raised)."""
    rows, steps = {}, {}
    for backend in backends:
        rows[backend] = {"shape": problem.name, "dims": list(problem.logits.shape), "mode": problem.mode,
                         "backend": backend}
        try:
            step = make_step(backend, problem)
            problem.reset_grads()
            start = time.perf_counter()
            step()  # compiles (compile, triton) or loads kernels; excluded from the timing
            synchronize(device)
        except Exception as exc:  # a backend that cannot run a case is reported, not fatal
            rows[backend]["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{problem.name} {problem.mode} {backend}: {rows[backend]['error']}", file=sys.stderr)
            continue
        rows[backend]["first_call_s"] = time.perf_counter() - start
        steps[backend] = step
    for backend, ms in timer.median_ms(steps, before_each=problem.reset_grads).items():
        peak = peak_extra_bytes(steps[backend], problem, device)
        rows[backend].update(
            ms=ms,
            gbps=problem.min_bytes_moved / (ms * 1e-3) / 1e9,
            logits_mib=problem.logits_bytes / MIB,
            peak_extra_bytes=peak,
            peak_extra_mib=peak / MIB,
            peak_extra_pct_of_logits=100 * peak / problem.logits_bytes,
            min_bytes_moved=problem.min_bytes_moved,
        )
        print(f"{problem.name} {problem.mode} {backend}: {ms:.3f} ms", file=sys.stderr)
    for row in rows.values():
        for ref in ("eager", "compile"):
            measured = "ms" in row and ref in steps
            row[f"speedup_vs_{ref}"] = rows[ref]["ms"] / row["ms"] if measured else None
    return list(rows.values())


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
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
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


def format_table(rows: list[dict]) -> str:
    header = (
        "| shape | mode | backend | ms | GB/s | x bound | x eager | x compile | peak extra MiB | % of logits |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['backend']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['ms']:.3f} | {r['gbps']:.1f} | "
            f"{r['bound_ratio']:.2f} | {fmt(r['speedup_vs_eager'], '.1f')} | {fmt(r['speedup_vs_compile'], '.1f')} | "
            f"{r['peak_extra_mib']:.2f} | {r['peak_extra_pct_of_logits']:.1f} |"
        )
    return "\n".join(lines)


def format_first_calls(rows: list[dict]) -> str:
    lines = ["| shape | mode | backend | first call s (compile / JIT, not in ms above) |", "| --- | --- | --- | ---: |"]
    lines += [
        f"| {r['shape']} | {r['mode']} | {r['backend']} | {r['first_call_s']:.2f} |"
        for r in rows
        if r["backend"] in ("compile", "triton") and "error" not in r
    ]
    return "\n".join(lines)


# SPEC section 5 targets: (device type, backends, shapes, modes, row field, comparison, limit).
# Speed-ups are checked in both modes, the bandwidth bound and stage-2 memory in stage 2 only.
SPEC_TARGETS = [
    ("cpu", ("native",), ("seg-ade", "det-lvis"), MODES, "speedup_vs_eager", ">=", 5.0),
    ("cpu", ("native",), ("seg-ade", "det-lvis"), MODES, "speedup_vs_compile", ">=", 2.0),
    ("cpu", ("native",), tuple(SHAPES), ("stage2",), "peak_extra_pct_of_logits", "<", 10.0),
    ("cuda", ("native", "triton"), ("seg-ade", "cls-inat"), ("stage2",), "bound_ratio", "<=", 1.25),
    ("cuda", ("native", "triton"), tuple(SHAPES), MODES, "speedup_vs_eager", ">=", 10.0),
    ("cuda", ("native", "triton"), tuple(SHAPES), MODES, "speedup_vs_compile", ">=", 2.0),
    ("cuda", ("native", "triton"), tuple(SHAPES), ("stage2",), "peak_extra_pct_of_logits", "<", 5.0),
    ("cuda", ("native", "triton"), tuple(SHAPES), ("full",), "peak_extra_pct_of_logits", "<", 110.0),
]


COMPARISONS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
FIELD_LABELS = {
    "speedup_vs_eager": "x eager",
    "speedup_vs_compile": "x compile",
    "bound_ratio": "x bound",
    "peak_extra_pct_of_logits": "% of logits",
}


def check_targets(rows: list[dict], device_type: str) -> list[dict]:
    """Each SPEC target that applies to a measured row, with the measured value and whether it is met."""
    checks = []
    for target_device, backends, shapes, modes, field, comparison, limit in SPEC_TARGETS:
        for r in rows:
            applies = target_device == device_type and r["backend"] in backends and r["shape"] in shapes
            if not applies or r["mode"] not in modes or r.get(field) is None:
                continue
            met = COMPARISONS[comparison](r[field], limit)
            target = f"{FIELD_LABELS[field]} {comparison} {limit:g}"
            checks.append(dict(shape=r["shape"], mode=r["mode"], backend=r["backend"], target=target, value=r[field],
                               met=met))
    return checks


def format_checks(checks: list[dict]) -> str:
    lines = ["| shape | mode | backend | SPEC target | measured | met |", "| --- | --- | --- | --- | ---: | --- |"]
    lines += [
        f"| {c['shape']} | {c['mode']} | {c['backend']} | {c['target']} | {c['value']:.2f} | "
        f"{'yes' if c['met'] else 'NO'} |"
        for c in checks
    ]
    return "\n".join(lines)


def csv_list(allowed):
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=csv_list(tuple(SHAPES)), default=list(SHAPES), help="comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", type=csv_list(BACKENDS), default=None, help="default: all that can run")
    parser.add_argument("--modes", type=csv_list(MODES), default=list(MODES))
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per case (default 10 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 2 CPU, 10 CUDA)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy/flush buffer (default 512 CPU, 1024 CUDA)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the default JSON path lies")
    parser.add_argument("--json", default=None, help="output path (default <results-dir>/<device-slug>.json)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.repeat = args.repeat or (50 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.copy_mib = args.copy_mib or (1024 if on_cuda else 512)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    # The compile backend's first call then measures a whole compile, not a hit in inductor's disk cache.
    torch._inductor.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # repeated once per compile
    info = device_info(device)
    runnable = runnable_backends(device)
    backends = [b for b in (args.backends or runnable) if b in runnable]
    skipped = [b for b in (args.backends or []) if b not in runnable]
    if skipped:
        print(f"skipping backends not available on {device}: {skipped} (available: {runnable})", file=sys.stderr)

    flush_buffer = torch.ones(args.copy_mib * MIB // 4, dtype=torch.float32, device=device)
    timer = Timer(device, flush_buffer, args.warmup, args.repeat)
    copy_gbps_start = copy_bandwidth_gbps(timer)

    rows = []
    for name in args.shapes:
        for mode in args.modes:
            problem = make_problem(name, mode, device, dtype)
            rows += measure_case(problem, backends, timer, device)
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # The bound uses the better of two copies (start and end of the run): load from other work only
    # lowers a copy's bandwidth, and a bound that is too easy would flatter the fused kernels.
    copy_gbps_end = copy_bandwidth_gbps(timer)
    copy_gbps = max(copy_gbps_start, copy_gbps_end)
    for row in rows:
        if "ms" in row:
            row["bound_ms"] = row["min_bytes_moved"] / (copy_gbps * 1e9) * 1e3
            row["bound_ratio"] = row["ms"] / row["bound_ms"]

    print(f"# {info['device_name']} | torch {info['torch']} | {info['threads']} threads | "
          f"CPU capability {info['cpu_capability']} | copy bandwidth {copy_gbps:.1f} GB/s | {args.dtype}")
    print(format_table(rows))
    print()
    print(format_first_calls(rows))
    checks = check_targets(rows, device.type)
    print()
    print(format_checks(checks))

    path = args.json
    if path is None:
        suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
        path = os.path.join(args.results_dir, f"{slug(info['device_name'])}{suffix}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    report = {
        "device": info,
        "dtype": args.dtype,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "copy_buffer_mib": args.copy_mib,
        "copy_bandwidth_gbps": copy_gbps,
        "copy_bandwidth_gbps_start_end": [copy_gbps_start, copy_gbps_end],
        "rows": rows,
        "spec_targets": checks,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
