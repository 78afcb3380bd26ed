"""The CPU floor of the fused loss, and the native kernels measured against it (issue 10).

Two floor measurements run in the same round-robin as the backends of a case (benches/bench_ops.py
calls `floor_steps` and `add_floor_ratios`):

  read        torch.amax(logits): the logits read once, nothing written.
  exp floor   torch.exp(logits, out=buf), buf allocated once: one exponential of every logit plus a
              read and a write, the least a softmax gradient can cost on a CPU.
  exp fresh   torch.exp(logits): the same into a new tensor each call, as full mode's grad_logits is
              (an output this large is mapped afresh by the allocator every time, and the page faults
              that zero it cost about as much as the exponentials on these machines).
  autograd    (alpha.sum() + beta.sum() + confidence.sum()).backward(): a trivial loss of the same
              parameter leaves, forward and backward, i.e. what autograd alone costs a training step
              when it starts with cold caches (the Timer flushes them before every call). Every
              fwd+bwd step pays it and the exp floor does not; it is reported beside the ratios,
              never subtracted from them.

and each native row gets `x_exp_floor` = its ms / the exp floor's ms of the same case (the ratio
the targets are stated in) and `x_exp_fresh` = its ms / the fresh exp's ms: stage 2 reads the
logits once and writes nothing N x C, so it should cost about one exp floor; full mode also writes
grad_logits into a fresh tensor, which the exp floor's preallocated buffer does not pay for.

Timings on a machine where other processes hold the cores are meaningless at 2 threads (a busy
second core makes every op ~8 ms): `load_report` records the load average before and after and
warns when it exceeds the cores the run leaves idle.

Standalone, this script measures only native and the floors, on the four CPU shapes in both modes,
at each of --threads (default 1,2), in about a minute on a quiet 2-core machine:

  python benches/cpu_floor.py                       # JSON: benches/results/cpu-floor-<cpu>.json

and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

FLOOR_STEPS = ("read", "exp floor", "exp fresh", "autograd")


def floor_steps(problem) -> dict:
    """{name: zero-argument step} of the floor measurements on the problem's logits."""
    logits = problem.logits.detach()
    buf = torch.empty_like(logits)
    leaves = (problem.alpha, problem.beta, problem.confidence)  # their grads are reset before each call
    return {
        "read": lambda: torch.amax(logits),
        "exp floor": lambda: torch.exp(logits, out=buf),
        "exp fresh": lambda: torch.exp(logits),
        "autograd": lambda: sum(t.sum() for t in leaves).backward(),
    }


def add_floor_ratios(rows: list[dict], floor_ms: dict) -> None:
    """Adds read_ms, exp_floor_ms, exp_fresh_ms, autograd_ms, x_exp_floor (ms / exp floor ms) and x_exp_fresh
    (ms / fresh exp ms) to the case's native rows."""
    for row in rows:
        if row["backend"] == "native" and "ms" in row:
            row["read_ms"] = floor_ms["read"]
            row["exp_floor_ms"] = floor_ms["exp floor"]
            row["exp_fresh_ms"] = floor_ms["exp fresh"]
            row["autograd_ms"] = floor_ms["autograd"]
            row["x_exp_floor"] = row["ms"] / floor_ms["exp floor"]
            row["x_exp_fresh"] = row["ms"] / floor_ms["exp fresh"]


def load_report(threads: int) -> dict:
    """The 1-minute load average and whether it leaves the run's `threads` cores idle."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    # The run itself adds up to about one to the load (the average lags), so allow that much.
    busy = load > max(cores - threads, 0) + 1.0
    report = {"load_average": load, "cores": cores, "threads": threads, "busy": busy}
    if busy:
        report["warning"] = (
            f"machine busy: load average {load:.2f} on {cores} cores while timing with {threads} "
            f"thread(s); other work shares the cores, so these timings (2-thread ones above all) are not "
            f"meaningful"
        )
    return report


def warn_if_busy(threads: int, when: str) -> dict:
    report = load_report(threads)
    if report["busy"]:
        print(f"WARNING ({when}): {report['warning']}", file=sys.stderr)
    return report


def format_floor_table(rows: list[dict]) -> str:
    """shape | threads | read | exp floor | exp fresh | autograd | stage 2 | full | ratios, from the native rows."""
    lines = [
        "| shape | threads | read ms | exp floor ms | exp fresh ms | autograd ms | stage 2 ms | full ms "
        "| stage 2 / floor | full / floor | full / fresh |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    cases = {}
    for r in rows:
        if r["backend"] == "native" and "x_exp_floor" in r:
            cases.setdefault((r["shape"], r.get("threads", torch.get_num_threads())), {})[r["mode"]] = r
    for (shape, threads), modes in cases.items():
        s2, full = modes.get("stage2"), modes.get("full")
        base = s2 or full

        def cell(r, key, spec):
            return "-" if r is None else format(r[key], spec)

        lines.append(
            f"| {shape} | {threads} | {base['read_ms']:.2f} | {base['exp_floor_ms']:.2f} | {base['exp_fresh_ms']:.2f} | "
            f"{base['autograd_ms']:.2f} | "
            f"{cell(s2, 'ms', '.2f')} | {cell(full, 'ms', '.2f')} | {cell(s2, 'x_exp_floor', '.2f')} | "
            f"{cell(full, 'x_exp_floor', '.2f')} | {cell(full, 'x_exp_fresh', '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    import bench_ops  # bench_ops imports this module: import it only when running standalone

    parser = argparse.ArgumentParser(description="native CPU kernels against the exp floor")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--shapes", type=bench_ops.csv_list(tuple(bench_ops.SHAPES)), default=list(bench_ops.SHAPES))
    parser.add_argument("--modes", type=bench_ops.csv_list(bench_ops.MODES), default=list(bench_ops.MODES))
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--copy-mib", type=int, default=128, help="cache flush buffer (above the L3 size)")
    parser.add_argument("--json", default=None, help="default benches/results/cpu-floor-<cpu>.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import bench_ops

    args = parse_args(argv)
    device = torch.device("cpu")
    flush = torch.ones(args.copy_mib * bench_ops.MIB // 4)
    timer = bench_ops.Timer(device, flush, args.warmup, args.repeat)
    rows, loads = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        loads.append(dict(warn_if_busy(threads, f"{threads} thread(s), start"), when="start"))
        for name in args.shapes:
            for mode in args.modes:
                problem = bench_ops.make_problem(name, mode, device, torch.float32)
                case = bench_ops.measure_case(problem, ["native"], timer, device)
                for row in case:
                    row["threads"] = threads
                rows += case
        loads.append(dict(warn_if_busy(threads, f"{threads} thread(s), end"), when="end"))
    info = bench_ops.device_info(device)
    loads_text = ", ".join(f"{r['threads']} thread(s) {r['when']} {r['load_average']:.2f}" for r in loads)
    print(f"# {info['cpu_name']} | torch {info['torch']} | CPU capability {info['cpu_capability']} | "
          f"commit {info['commit']} | median of {args.repeat} | load average: {loads_text}")
    print(format_floor_table(rows))
    path = args.json or os.path.join(bench_ops.RESULTS_DIR, f"cpu-floor-{bench_ops.slug(info['cpu_name'])}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": info, "repeat": args.repeat, "warmup": args.warmup, "load": loads, "rows": rows}, f,
                  indent=2)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
