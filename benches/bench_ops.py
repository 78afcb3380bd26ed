"""Forward+backward benchmark of the DisAlign loss (docs/contract.md section 5).

Backends, each timed on the same inputs for one forward and one backward pass (reduction "mean"):

  eager    disalign_ops.reference.cross_entropy, the expression users write today: the calibrated
           logits (paper eq. 6), then F.cross_entropy with class weights, through autograd.
  compile  torch.compile(fullgraph=True, dynamic=False) of that same function; the first call
           (which compiles, inductor's disk caches disabled) is reported separately as "first call"
           and is never part of the timing.
  native   disalign_ops.disalign_cross_entropy(..., backend="native") (C++/CUDA extension).
  triton   disalign_ops.disalign_cross_entropy(..., backend="triton").
  liger    (CUDA, when liger_kernel imports) Liger-Kernel's fused cross entropy on the same logits
           as (N, C) rows, alpha = beta = 0, no confidence: a peer anchor (benches/liger_peer.py).

Modes: "stage2" freezes the logits (alpha, beta and the confidence, a leaf tensor in (0, 1) shaped
like the target, need gradients); "full" asks for the logits' gradient too.

Inputs are those of a long-tail training step: class weights from disalign_ops.generalized_reweight
of an exponentially decaying count profile (paper rho per task), targets drawn from that same
profile, ~5% ignored pixels (ignore_index 255) for segmentation, 75% background ROIs for detection
(background = last class, weight 1, alpha = beta = 0 there). Segmentation logits are NCHW contiguous.

Measurements (benches/utils.py holds the timer and the memory probes):

  ms        median over --repeat timed calls after --warmup untimed ones. The backends of a case
            run round-robin, one call each per round, so other load on a shared machine falls on
            all of them alike. Gradients are set to None before every call (so none accumulates)
            and the caches are flushed by reading a buffer of --flush-mib MiB (a read leaves no
            dirty lines to write back during the timed call). CUDA: CUDA events around the call.
            CPU: time.perf_counter around the call.
  GB/s      the bytes a fused kernel must move, divided by ms: the logits read once, plus
            grad_logits written once in "full" mode.
  fraction_of_copy_bandwidth   those GB/s over the bandwidth of dst.copy_(src) of a --copy-mib MiB
            tensor measured in the same run, counting the bytes read plus written (the better of a
            copy at the start and one at the end of the run). 1.0 is the read-once bound;
            bound_ratio ("x bound") is its inverse.
  x_eager / x_compile   speed-up: eager (compile) ms divided by this backend's ms.
  peak_extra_bytes      the most memory allocated during one forward+backward beyond what was live
            before it (inputs allocated, gradients set to None); gradients, the loss and every
            temporary count. CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
            minus memory_allocated() before the call. CPU (where PyTorch keeps no peak statistic):
            the call runs once under torch.profiler.profile(profile_memory=True), which records
            every allocation and free made through PyTorch's CPU allocator and through the native
            ops' output cache (csrc/cpu/output_cache.h, which reports its blocks as they are handed
            out and given back); the peak is the largest running sum of those byte counts, in time
            order, from the call's start. Every tensor (eager temporaries, inductor buffers,
            outputs of the extension's ops, gradients) goes through one of the two; scratch a C++
            kernel takes with malloc/new instead of a tensor would not be seen.
  % logits  peak extra memory as a percentage of the logits' size.
  loss_rel_err          |loss - loss of eager| / |loss of eager| on the first call (liger: against
            F.cross_entropy in float32 on its rows): a cheap check that a timed backend computes
            the right thing.

Usage:
  python benches/bench_ops.py                                   # all shapes, both modes, CPU
  python benches/bench_ops.py --device cuda --dtype bfloat16,float32
  python benches/bench_ops.py --shapes seg-ade,det-lvis --modes stage2 --repeat 5
  python benches/bench_ops.py --quick --repeat 1 --warmup 0     # tiny shapes: a smoke test

Writes Markdown tables to stdout and to <json stem>.md, and JSON to --json (default
benches/results/<device-slug>.json, with -<dtype> before .json for one half dtype). The JSON is
rewritten after every case, so a run stopped early keeps the cases it finished ("complete": false).
One JSON row per shape x mode x dtype x backend, with at least the keys of ROW_KEYS.
"""

from __future__ import annotations

import argparse
import math
import operator
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch._inductor.config

import cpu_floor
import disalign_ops
from disalign_ops import reference
import liger_peer
from utils import (  # noqa: F401  (synchronize and MIB are used by test_bench_ops.py through this module)
    MIB,
    Timer,
    copy_bandwidth_gbps,
    device_info,
    peak_extra_bytes,
    slug,
    synchronize,
    write_json,
)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BACKENDS = ("eager", "compile", "native", "triton", "liger")
MODES = ("stage2", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The keys every JSON row carries (None where a value does not apply or was not measured).
ROW_KEYS = ("device", "shape", "mode", "dtype", "backend", "ms", "fraction_of_copy_bandwidth", "x_eager",
            "x_compile", "peak_extra_bytes")


@dataclass(frozen=True)
class ShapeSpec:
    """One benchmark shape of docs/contract.md section 5 and the long-tail profile of its task."""

    task: str  # "cls", "seg" or "det"
    cuda_dims: tuple  # logits shape on CUDA: (N, C) or (B, C, H, W)
    cpu_dims: tuple  # logits shape on CPU
    quick_dims: tuple  # --quick: a tiny shape with the same class count, layout and task (smoke tests)
    rho: float  # generalized re-weight exponent the paper uses for the task
    max_count: int  # samples (pixels, instances) of the most frequent class
    imbalance: float  # most frequent / least frequent class count


SHAPES = {
    "cls-imagenet": ShapeSpec("cls", (4096, 1000), (4096, 1000), (64, 1000), rho=1.2, max_count=1280, imbalance=256),
    "cls-inat": ShapeSpec("cls", (4096, 8142), (1024, 8142), (16, 8142), rho=1.2, max_count=1000, imbalance=500),
    "seg-ade": ShapeSpec("seg", (8, 150, 512, 512), (4, 150, 128, 128), (1, 150, 16, 16), rho=0.3, max_count=10**8,
                         imbalance=1000),
    "det-lvis": ShapeSpec("det", (8192, 1231), (8192, 1231), (64, 1231), rho=0.8, max_count=50000, imbalance=50000),
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
    def dtype(self) -> str:
        return str(self.logits.dtype).removeprefix("torch.")

    @property
    def logits_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size()

    @property
    def min_bytes_moved(self) -> int:
        """Logits read once, plus grad_logits written once when the logits need gradients."""
        return self.logits_bytes * (2 if self.mode == "full" else 1)


def make_problem(name: str, mode: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 quick: bool = False) -> Problem:
    spec = SHAPES[name]
    dims = spec.quick_dims if quick else spec.cuda_dims if device.type == "cuda" else spec.cpu_dims
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
    """Benchmark backends that can run on the device: eager, compile, the library's others, liger."""
    library = disalign_ops.available_backends(device)
    names = ["eager", "compile"] + [b for b in ("native", "triton") if b in library]
    return names + (["liger"] if liger_peer.available(device) else [])


def make_step(backend: str, problem: Problem):
    """A zero-argument function running forward + backward of `problem` on `backend`; returns the loss.

    A step may carry `step.setup`, to run before each call outside the timing."""
    if backend == "liger":
        return liger_peer.make_step(problem)
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
        loss = loss_fn(*args)
        loss.backward()
        return loss.detach()

    return step


def _relative_error(loss: torch.Tensor, expected: torch.Tensor) -> float:
    loss, expected = loss.double(), expected.double()
    return float((loss - expected).abs() / expected.abs().clamp_min(1e-30))


def measure_case(problem: Problem, backends: list[str], timer: Timer, device: torch.device,
                 device_name: str = "") -> list[dict]:
    """One row per backend: first-call time, median ms, peak extra memory (or the error it raised)."""
    rows, steps, losses = {}, {}, {}
    for backend in backends:
        rows[backend] = dict.fromkeys(ROW_KEYS)
        rows[backend].update(device=device_name, shape=problem.name, dims=list(problem.logits.shape),
                             mode=problem.mode, dtype=problem.dtype, backend=backend)
        try:
            step = make_step(backend, problem)
            problem.reset_grads()
            if getattr(step, "setup", None):
                step.setup()
            start = time.perf_counter()
            losses[backend] = step()  # compiles (compile, triton) or loads kernels; excluded from the timing
            synchronize(device)
        except Exception as exc:  # a backend that cannot run a case is reported, not fatal
            rows[backend]["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{problem.name} {problem.mode} {problem.dtype} {backend}: {rows[backend]['error']}", file=sys.stderr)
            continue
        rows[backend]["first_call_s"] = time.perf_counter() - start
        if getattr(step, "note", None):
            rows[backend]["note"] = step.note
        steps[backend] = step

    def before_each(name):
        problem.reset_grads()
        setup = getattr(steps[name], "setup", None)
        if setup:
            setup()

    if device.type == "cpu":  # the CPU floor (cpu_floor.py), timed in the same round-robin
        steps.update(cpu_floor.floor_steps(problem))
    times = timer.median_ms(steps, before_each=before_each)
    floor_ms = {name: times.pop(name) for name in cpu_floor.FLOOR_STEPS if name in times}
    for name in floor_ms:
        del steps[name]
    for backend, ms in times.items():
        before_each(backend)
        peak = peak_extra_bytes(steps[backend], device)
        rows[backend].update(
            ms=ms,
            gbps=problem.min_bytes_moved / (ms * 1e-3) / 1e9,
            logits_mib=problem.logits_bytes / MIB,
            peak_extra_bytes=peak,
            peak_extra_mib=peak / MIB,
            peak_extra_pct_of_logits=100 * peak / problem.logits_bytes,
            min_bytes_moved=problem.min_bytes_moved,
        )
        expected = getattr(steps[backend], "expected_loss", losses.get("eager"))
        if expected is not None:
            rows[backend]["loss_reference"] = "F.cross_entropy" if backend == "liger" else "eager"
            rows[backend]["loss_rel_err"] = _relative_error(losses[backend], expected)
        print(f"{problem.name} {problem.mode} {problem.dtype} {backend}: {ms:.3f} ms", file=sys.stderr)
    if floor_ms:
        cpu_floor.add_floor_ratios(list(rows.values()), floor_ms)
    for row in rows.values():
        for ref in ("eager", "compile"):
            measured = row["ms"] is not None and ref in steps
            row[f"x_{ref}"] = rows[ref]["ms"] / row["ms"] if measured else None
    return list(rows.values())


def apply_copy_bandwidth(rows: list[dict], copy_gbps: float) -> None:
    """Fills in each measured row's read-once bound against the copy bandwidth."""
    for row in rows:
        if row["ms"] is not None:
            row["bound_ms"] = row["min_bytes_moved"] / (copy_gbps * 1e9) * 1e3
            row["bound_ratio"] = row["ms"] / row["bound_ms"]
            row["fraction_of_copy_bandwidth"] = row["bound_ms"] / row["ms"]


def format_table(rows: list[dict]) -> str:
    header = (
        "| shape | mode | dtype | backend | ms | GB/s | fraction of copy bw | x eager | x compile | peak extra MiB "
        "| % of logits |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [header]
    for r in rows:
        head = f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['backend']} |"
        if r.get("error"):
            lines.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"{head} {r['ms']:.3f} | {r['gbps']:.1f} | {fmt(r['fraction_of_copy_bandwidth'], '.2f')} | "
            f"{fmt(r['x_eager'], '.1f')} | {fmt(r['x_compile'], '.1f')} | {r['peak_extra_mib']:.2f} | "
            f"{r['peak_extra_pct_of_logits']:.1f} |"
        )
    return "\n".join(lines)


def format_first_calls(rows: list[dict]) -> str:
    lines = ["| shape | mode | dtype | backend | first call s (compile / JIT, not in ms above) |",
             "| --- | --- | --- | --- | ---: |"]
    lines += [
        f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['backend']} | {r['first_call_s']:.2f} |"
        for r in rows
        if r["backend"] in ("compile", "triton", "liger") and not r.get("error")
    ]
    return "\n".join(lines)


# docs/contract.md section 5: (device type, level, backends, shapes, modes, row field, comparison, limit). "target" is
# the raised target of 2026-12, "minimum" the older floor the SPEC still states. Speed-ups are checked in
# both modes, the bandwidth and stage-2 memory in stage 2 only; every dtype measured is checked.
GPU = ("native", "triton")
SPEC_TARGETS = [
    ("cpu", "target", ("native",), ("seg-ade", "det-lvis"), MODES, "x_eager", ">=", 5.0),
    ("cpu", "target", ("native",), ("seg-ade", "det-lvis"), MODES, "x_compile", ">=", 2.0),
    ("cpu", "target", ("native",), tuple(SHAPES), ("stage2",), "peak_extra_pct_of_logits", "<", 10.0),
    ("cuda", "target", GPU, ("seg-ade", "cls-inat"), ("stage2",), "fraction_of_copy_bandwidth", ">=", 0.8),
    ("cuda", "target", GPU, tuple(SHAPES), MODES, "x_eager", ">=", 15.0),
    ("cuda", "target", GPU, tuple(SHAPES), MODES, "x_compile", ">=", 3.0),
    ("cuda", "target", GPU, tuple(SHAPES), ("stage2",), "peak_extra_pct_of_logits", "<", 1.0),
    ("cuda", "target", GPU, tuple(SHAPES), ("full",), "peak_extra_pct_of_logits", "<", 110.0),
    ("cuda", "minimum", GPU, ("seg-ade", "cls-inat"), ("stage2",), "bound_ratio", "<=", 1.25),
    ("cuda", "minimum", GPU, tuple(SHAPES), MODES, "x_eager", ">=", 10.0),
    ("cuda", "minimum", GPU, tuple(SHAPES), MODES, "x_compile", ">=", 2.0),
    ("cuda", "minimum", GPU, tuple(SHAPES), ("stage2",), "peak_extra_pct_of_logits", "<", 5.0),
]


COMPARISONS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
FIELD_LABELS = {
    "x_eager": "x eager",
    "x_compile": "x compile",
    "bound_ratio": "x bound",
    "fraction_of_copy_bandwidth": "fraction of copy bw",
    "peak_extra_pct_of_logits": "% of logits",
}


def check_targets(rows: list[dict], device_type: str) -> list[dict]:
    """Each SPEC target that applies to a measured row, with the measured value and whether it is met."""
    checks = []
    for target_device, level, backends, shapes, modes, field, comparison, limit in SPEC_TARGETS:
        for r in rows:
            applies = target_device == device_type and r["backend"] in backends and r["shape"] in shapes
            if not applies or r["mode"] not in modes or r.get(field) is None:
                continue
            met = COMPARISONS[comparison](r[field], limit)
            target = f"{FIELD_LABELS[field]} {comparison} {limit:g}"
            checks.append(dict(shape=r["shape"], mode=r["mode"], dtype=r["dtype"], backend=r["backend"],
                               level=level, target=target, value=r[field], met=met))
    return checks


def format_checks(checks: list[dict]) -> str:
    lines = ["| shape | mode | dtype | backend | level | SPEC target | measured | met |",
             "| --- | --- | --- | --- | --- | --- | ---: | --- |"]
    lines += [
        f"| {c['shape']} | {c['mode']} | {c['dtype']} | {c['backend']} | {c['level']} | {c['target']} | "
        f"{c['value']:.2f} | {'yes' if c['met'] else 'NO'} |"
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
    parser.add_argument("--shapes", type=csv_list(tuple(SHAPES)), default=list(SHAPES),
                        help="comma-separated, run in this order")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", type=csv_list(BACKENDS), default=None, help="default: all that can run")
    parser.add_argument("--modes", type=csv_list(MODES), default=list(MODES))
    parser.add_argument("--dtype", type=csv_list(tuple(DTYPES)), default=["float32"],
                        help="comma-separated logits dtypes, run in this order (outermost loop)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes with the real class counts (smoke test)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per case (default 10 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 2 CPU, 10 CUDA)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy yardstick buffer (default 512 CPU, 2048 CUDA)")
    parser.add_argument("--flush-mib", type=int, default=None,
                        help="cache-flush buffer read before each timed call (default: --copy-mib on CPU, 256 CUDA)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the default JSON path lies")
    parser.add_argument("--json", default=None, help="output path (default <results-dir>/<device-slug>.json)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.repeat = args.repeat or (50 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 2)
    args.copy_mib = args.copy_mib or (2048 if on_cuda else 512)
    args.flush_mib = args.flush_mib or (min(256, args.copy_mib) if on_cuda else args.copy_mib)
    return args


def default_json_path(args, device_name: str) -> str:
    single_half = len(args.dtype) == 1 and args.dtype[0] != "float32"
    suffix = f"-{args.dtype[0]}" if single_half else ""
    return os.path.join(args.results_dir, f"{slug(device_name)}{suffix}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    # The compile backend's first call then measures a whole compile, not a hit in inductor's disk cache.
    torch._inductor.config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # repeated once per compile
    info = device_info(device)
    runnable = runnable_backends(device)
    backends = [b for b in (args.backends or runnable) if b in runnable]
    skipped = [b for b in (args.backends or []) if b not in runnable]
    if skipped:
        print(f"skipping backends not available on {device}: {skipped} (available: {runnable})", file=sys.stderr)

    copy_buffer = torch.ones(args.copy_mib * MIB // 4, dtype=torch.float32, device=device)
    flush_buffer = copy_buffer if args.flush_mib == args.copy_mib else copy_buffer[: args.flush_mib * MIB // 4]
    timer = Timer(device, flush_buffer, args.warmup, args.repeat)
    copy_gbps_start = copy_bandwidth_gbps(timer, copy_buffer)
    print(f"copy bandwidth {copy_gbps_start:.1f} GB/s ({args.copy_mib} MiB, read + write)", file=sys.stderr)
    if device.type == "cpu":
        info["load_start"] = cpu_floor.warn_if_busy(torch.get_num_threads(), "start")

    path = args.json or default_json_path(args, info["device_name"])
    report = {
        "device": info,
        "dtypes": args.dtype,
        "quick": args.quick,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "copy_buffer_mib": args.copy_mib,
        "flush_buffer_mib": args.flush_mib,
        "backends": backends,
        "complete": False,
        "rows": [],
    }
    rows = report["rows"]
    for dtype in args.dtype:
        for name in args.shapes:
            for mode in args.modes:
                problem = make_problem(name, mode, device, DTYPES[dtype], quick=args.quick)
                case_rows = measure_case(problem, backends, timer, device, info["device_name"])
                del problem
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                apply_copy_bandwidth(case_rows, copy_gbps_start)  # provisional: the start copy only
                rows += case_rows
                report["copy_bandwidth_gbps"] = copy_gbps_start
                write_json(path, report)  # a run stopped early keeps the cases it finished

    # The bound uses the better of two copies (start and end of the run): load from other work only
    # lowers a copy's bandwidth, and a bound that is too easy would flatter the fused kernels.
    copy_gbps_end = copy_bandwidth_gbps(timer, copy_buffer)
    if device.type == "cpu":
        info["load_end"] = cpu_floor.warn_if_busy(torch.get_num_threads(), "end")
    copy_gbps = max(copy_gbps_start, copy_gbps_end)
    apply_copy_bandwidth(rows, copy_gbps)
    checks = [] if args.quick else check_targets(rows, device.type)  # the SPEC targets are for the real shapes

    title = (f"# {info['device_name']} | torch {info['torch']} | {info['threads']} threads | "
             f"CPU capability {info['cpu_capability']} | copy bandwidth {copy_gbps:.1f} GB/s | "
             f"{', '.join(args.dtype)}")
    tables = "\n\n".join([title, format_table(rows), format_first_calls(rows)]
                         + ([cpu_floor.format_floor_table(rows)] if device.type == "cpu" else [])
                         + [format_checks(checks)])
    print(tables)
    report.update(copy_bandwidth_gbps=copy_gbps, copy_bandwidth_gbps_start_end=[copy_gbps_start, copy_gbps_end],
                  spec_targets=checks, complete=True)
    write_json(path, report)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(tables + "\n")
    print(f"\nwrote {path} and its .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
