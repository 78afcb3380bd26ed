"""The Python side of benches/gpu_check.sh: small drivers that one step each runs, and the summary.

  env           versions of everything the check depends on (JSON to --out, text to stdout)
  cases         one small odd-C bfloat16 case per logits layout, stage 2 and full mode, on every GPU
                backend, checked against disalign_ops.reference: the program compute-sanitizer runs
  multi-device  logits on the last GPU while the current device is cuda:0, for every GPU backend
  ncu-case      one stage-2 call per GPU backend on seg-ade bfloat16 between cudaProfilerStart and
                cudaProfilerStop, so `ncu --profile-from-start off` measures just those launches
  summary       the Markdown + JSON summary of a gpu_check.sh run (steps, tests and the failed ones,
                SPEC checks, ncu)

Run as `python benches/gpu_check.py SUBCOMMAND ...`; gpu_check.sh sets PYTHONPATH to the checkout.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

# benches/ on the path: gpu_check.sh runs this file as a script; the benchmark's tests import it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytest_outcomes  # noqa: E402

GPU_BACKENDS = ("native", "triton")
# Tolerances against the reference for bfloat16 logits (tests/conftest.py TOLERANCES).
BF16_TOL = dict(rtol=1.6e-2, atol=2e-3)


def _command_version(*argv: str) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    text = (out.stdout or out.stderr).strip().splitlines()
    return " | ".join(line.strip() for line in text[-3:] if line.strip()) or None


def cmd_env(args) -> int:
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count(),
        "cpu_count": os.cpu_count(),
        "nvcc": _command_version("nvcc", "--version"),
        "ncu": _command_version("ncu", "--version"),
        "compute_sanitizer": _command_version("compute-sanitizer", "--version"),
        "nvidia_smi": _command_version("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                       "clocks.max.sm", "--format=csv,noheader"),
    }
    for module in ("triton", "liger_kernel", "pytest", "xdist", "pytest_timeout"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "present")
        except Exception as exc:  # absent, or broken against this torch
            info[module] = None if isinstance(exc, ImportError) else f"error: {exc}"
    info["gpus"] = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(dict(name=props.name, capability=f"{props.major}.{props.minor}",
                                 multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory))
    try:
        import disalign_ops

        info["disalign_backends"] = {d: disalign_ops.available_backends(d) for d in ("cpu", "cuda")}
    except Exception as exc:  # not built yet: the env step runs before the build
        info["disalign_backends"] = f"not importable: {type(exc).__name__}: {exc}".splitlines()[0]
    for key, value in info.items():
        print(f"{key}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
    return 0


# Small odd-C layouts, one per memory order the kernels distinguish: (N, C) rows, rows at an odd
# element offset, classes outermost (transposed), NCHW (odd C, odd H*W) and channels-last.
def _case_logits(layout: str, torch):
    c = 151

    def randn(*shape):  # bfloat16 from the start: arithmetic on a view would densify it
        return (3 * torch.randn(*shape)).bfloat16()

    if layout == "nc":
        return randn(37, c)
    if layout == "nc_misaligned":
        return randn(37, c + 2)[:, 1 : c + 1]
    if layout == "nc_transposed":
        return randn(c, 37).t()
    if layout == "nchw":
        return randn(2, c, 5, 7)
    if layout == "nchw_channels_last":
        return randn(2, 5, 7, c).permute(0, 3, 1, 2)
    raise ValueError(f"unknown layout {layout!r}")


CASE_LAYOUTS = ("nc", "nc_misaligned", "nc_transposed", "nchw", "nchw_channels_last")


def _leaf_view(t, torch):
    """(leaf over t's whole storage, view with t's sizes/strides/offset): gradients keep the layout."""
    storage_len = t.untyped_storage().nbytes() // t.element_size()
    leaf = t.detach().as_strided((storage_len,), (1,), 0).clone().requires_grad_()
    return leaf, leaf.as_strided(t.shape, t.stride(), t.storage_offset())


def _run_case(backend: str, logits, target, alpha, beta, confidence, weight, full: bool, torch):
    import disalign_ops

    leaf, view = _leaf_view(logits, torch)
    params = [p.detach().clone().requires_grad_() for p in (alpha, beta, confidence)]
    args = (view if full else logits, target, params[0], params[1])
    kwargs = dict(confidence=params[2], weight=weight, ignore_index=-100, reduction="mean")
    if backend == "reference":
        loss = disalign_ops.reference.cross_entropy(*args, **kwargs)
    else:
        loss = disalign_ops.disalign_cross_entropy(*args, backend=backend, **kwargs)
    loss.backward()
    grads = [p.grad for p in params]
    if full:
        grads.append(leaf.grad.as_strided(logits.shape, logits.stride(), logits.storage_offset()))
    return [loss.detach()] + grads


def cmd_cases(args) -> int:
    import torch

    import disalign_ops

    device = torch.device(args.device)  # "cpu" only to test this driver on a machine without a GPU
    backends = [b for b in GPU_BACKENDS if b in disalign_ops.available_backends(device)]
    if not backends:
        print(f"no GPU backend available: {disalign_ops.available_backends(device)}")
        return 2
    failures = 0
    for layout in args.layouts:
        torch.manual_seed(0)
        logits = _case_logits(layout, torch)
        storage = logits.detach().as_strided((logits.untyped_storage().nbytes() // 2,), (1,), 0).to(device)
        logits = storage.as_strided(logits.shape, logits.stride(), logits.storage_offset())
        c, rows = logits.shape[1], (logits.shape[0],) + tuple(logits.shape[2:])
        target = torch.randint(0, c, rows, device=device)
        target[torch.rand(rows, device=device) < 0.2] = -100
        alpha, beta = 0.5 * torch.randn(c, device=device), torch.randn(c, device=device)
        confidence, weight = torch.rand(rows, device=device), 0.25 + torch.rand(c, device=device)
        for full in (False, True):
            expected = _run_case("reference", logits, target, alpha, beta, confidence, weight, full, torch)
            for backend in backends:
                got = _run_case(backend, logits, target, alpha, beta, confidence, weight, full, torch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                names = ["loss", "dalpha", "dbeta", "dconfidence", "dlogits"]
                bad = []
                for name, g, e in zip(names, got, expected):
                    try:
                        torch.testing.assert_close(g.float(), e.float(), **BF16_TOL)
                    except AssertionError as exc:
                        bad.append(f"{name}: {str(exc).splitlines()[0]}")
                failures += bool(bad)
                mode = "full" if full else "stage2"
                status = "ok" if not bad else "MISMATCH " + "; ".join(bad)
                print(f"case {layout} {tuple(logits.shape)} strides {logits.stride()} offset {logits.storage_offset()} "
                      f"bf16 {mode} {backend}: {status}",
                      flush=True)
    print(f"cases: {failures} mismatching")
    return 1 if failures else 0


def cmd_multi_device(args) -> int:
    import torch

    import disalign_ops

    count = torch.cuda.device_count()
    if count < 2:
        print(f"multi-device: skipped, {count} GPU(s)")
        return 0
    other = torch.device(f"cuda:{count - 1}")
    torch.cuda.set_device(0)
    failures = 0
    for backend in [b for b in GPU_BACKENDS if b in disalign_ops.available_backends(other)]:
        torch.manual_seed(0)
        logits = torch.randn(67, 1231, device=other).bfloat16()
        target = torch.randint(0, 1231, (67,), device=other)
        alpha = torch.randn(1231, device=other).requires_grad_()
        beta = torch.randn(1231, device=other).requires_grad_()
        loss = disalign_ops.disalign_cross_entropy(logits, target, alpha, beta, backend=backend)
        loss.backward()
        ref_a, ref_b = alpha.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
        ref = disalign_ops.reference.cross_entropy(logits, target, ref_a, ref_b)
        ref.backward()
        torch.cuda.synchronize(other)
        problems = []
        if loss.device != other or alpha.grad.device != other:
            problems.append(f"results on {loss.device}/{alpha.grad.device}, logits on {other}")
        if torch.cuda.current_device() != 0:
            problems.append(f"current device changed to {torch.cuda.current_device()}")
        for name, g, e in (("loss", loss, ref), ("dalpha", alpha.grad, ref_a.grad), ("dbeta", beta.grad, ref_b.grad)):
            try:
                torch.testing.assert_close(g.float(), e.float(), **BF16_TOL)
            except AssertionError as exc:
                problems.append(f"{name}: {str(exc).splitlines()[0]}")
        failures += bool(problems)
        print(f"multi-device {backend} on {other} (current cuda:0): {'ok' if not problems else problems}")
    return 1 if failures else 0


def cmd_ncu_case(args) -> int:
    import torch

    import bench_ops

    device = torch.device(args.device)  # "cpu" (with --quick) only to test this driver without a GPU
    on_cuda = device.type == "cuda"
    problem = bench_ops.make_problem(args.shape, "stage2", device, bench_ops.DTYPES[args.dtype], quick=args.quick)
    backends = [b for b in GPU_BACKENDS if b in bench_ops.runnable_backends(device)]
    steps = {b: bench_ops.make_step(b, problem) for b in backends}
    for _ in range(2):  # compiles and loads every kernel before profiling starts
        for step in steps.values():
            problem.reset_grads()
            step()
    bench_ops.synchronize(device)
    if on_cuda:
        torch.cuda.profiler.start()
    for backend, step in steps.items():
        problem.reset_grads()
        if on_cuda:
            torch.cuda.nvtx.range_push(backend)
        step()
        bench_ops.synchronize(device)
        if on_cuda:
            torch.cuda.nvtx.range_pop()
    if on_cuda:
        torch.cuda.profiler.stop()
    print(f"ncu-case: {args.shape} {tuple(problem.logits.shape)} {args.dtype} stage2, backends {backends}, "
          f"logits {problem.logits_bytes} bytes, {problem.logits.numel()} elements")
    return 0


# ---------------------------------------------------------------------------------------------- summary


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _pytest_result(log: str, outcomes: list[dict]) -> str | None:
    """pytest's closing line; without one (the step was stopped), the count of what finished."""
    lines = [line.strip("= ") for line in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if lines:
        return lines[-1]
    if not outcomes:
        return None
    counts = collections.Counter(o["outcome"] for o in outcomes)
    return f"stopped after {len(outcomes)} tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _sanitizer_result(log: str) -> str | None:
    lines = [line.strip() for line in log.splitlines() if re.search(r"(ERROR|RACECHECK) SUMMARY", line)]
    cases = [line for line in log.splitlines() if line.startswith("cases:")]
    return "; ".join(lines[-1:] + cases[-1:]) or None


def ncu_kernels(path: str) -> list[dict]:
    """Rows of `ncu --csv --page raw`: kernel name, launch, and the metrics asked for (numbers)."""
    text = _read(path)
    start = text.find('"ID"')
    if start < 0:
        return []
    reader = csv.DictReader(io.StringIO(text[start:]))
    kernels = []
    for row in reader:
        if not row.get("ID", "").strip().isdigit():
            continue  # the units row
        entry = {"id": int(row["ID"]), "kernel": row.get("Kernel Name", "")[:120]}
        for key, value in row.items():
            if key and ("__" in key):
                try:
                    entry[key] = float(value.replace(",", ""))
                except (ValueError, AttributeError):
                    entry[key] = value
        kernels.append(entry)
    return kernels


def _bench_report(results_dir: str, env: dict) -> tuple[str | None, dict | None]:
    """The benchmark JSON bench_ops.py wrote for this GPU (<results>/<gpu-name slug>.json)."""
    from utils import slug

    gpus = env.get("gpus") or []
    if not gpus:
        return None, None
    path = os.path.join(results_dir, f"{slug(gpus[0]['name'])}.json")
    try:
        with open(path) as f:
            return path, json.load(f)
    except (OSError, ValueError):
        return None, None


def cmd_summary(args) -> int:
    steps = []
    for line in _read(args.steps).splitlines():
        name, status, rc, seconds, budget, note = (line.split("\t") + [""] * 6)[:6]
        steps.append(dict(name=name, status=status, rc=rc, seconds=int(seconds or 0), budget=int(budget or 0),
                          note=note))
    env = json.loads(_read(args.env) or "{}")
    failures = []
    for step in steps:
        log = _read(os.path.join(args.work, f"{step['name']}.log"))
        if step["name"] == "tests":
            outcomes = pytest_outcomes.read(args.outcomes) if args.outcomes else []
            step["result"] = _pytest_result(log, outcomes)
            failures = [o for o in outcomes if o["outcome"] in ("failed", "error")]
        elif step["name"] in ("memcheck", "racecheck"):
            step["result"] = _sanitizer_result(log)
        elif step["name"] == "multigpu":
            step["result"] = "; ".join(line for line in log.splitlines() if line.startswith("multi-device")) or None
        elif step["name"] == "build":
            found = [line for line in log.splitlines() if line.startswith("backends:")]
            step["result"] = found[-1] if found else None
    no_cuda = not env.get("cuda_available")
    bench_path, bench = _bench_report(args.results, env)
    kernels = ncu_kernels(args.ncu) if args.ncu else []

    md = ["# gpu_check summary", ""]
    gpus = env.get("gpus") or []
    if no_cuda:
        md += ["**no CUDA device**: the GPU steps were skipped (torch.cuda.is_available() is False here).", ""]
    md.append(f"- device: {', '.join(g['name'] for g in gpus) or 'none'}; torch {env.get('torch')} (CUDA "
              f"{env.get('torch_cuda')}), triton {env.get('triton')}, Python {env.get('python')}, "
              f"liger_kernel {env.get('liger_kernel')}")
    md.append(f"- nvcc: {env.get('nvcc')}")
    md.append(f"- driver / clocks: {env.get('nvidia_smi')}")
    md += ["", "| step | status | s | budget s | result / note |", "| --- | --- | ---: | ---: | --- |"]
    for s in steps:
        detail = "; ".join(x for x in (s.get("result"), s["note"]) if x)
        md.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget']} | {detail} |")
    checks = []
    if bench:
        rows = bench["rows"]
        checks = bench.get("spec_targets") or []
        measured = sum(r.get("ms") is not None for r in rows)
        errors = [r for r in rows if r.get("error")]
        md += ["", f"## Benchmark ({os.path.basename(bench_path)}, {'complete' if bench.get('complete') else 'PARTIAL'})",
               "", f"{measured} rows measured, {len(errors)} errors, copy bandwidth "
               f"{bench.get('copy_bandwidth_gbps', 0):.0f} GB/s."]
        if not checks:  # a partial run: check what was measured
            from bench_ops import check_targets

            checks = check_targets(rows, "cuda")
        for level in ("target", "minimum"):
            chosen = [c for c in checks if c["level"] == level]
            md.append(f"- SPEC {level}s met: {sum(c['met'] for c in chosen)} of {len(chosen)}")
        missed = [c for c in checks if c["level"] == "target" and not c["met"]]
        if missed:
            md += ["", "| shape | mode | dtype | backend | SPEC target missed | measured |", "| --- | --- | --- | --- | --- | ---: |"]
            md += [f"| {c['shape']} | {c['mode']} | {c['dtype']} | {c['backend']} | {c['target']} | {c['value']:.3g} |"
                   for c in missed]
        for r in errors[:10]:
            md.append(f"- error: {r['shape']} {r['mode']} {r['dtype']} {r['backend']}: {r['error']}")
    elif not no_cuda:
        md += ["", "## Benchmark", "", "no benchmark JSON was written"]
    if kernels:
        md += ["", "## ncu (stage 2 launches)", "",
               "| kernel | time us | DRAM read MB | DRAM write MB | warp instructions | XU (MUFU) warp instr |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for k in sorted(kernels, key=lambda k: -float(k.get("gpu__time_duration.sum", 0) or 0))[:8]:
            md.append(f"| {k['kernel'][:60]} | {float(k.get('gpu__time_duration.sum', 0) or 0) / 1e3:.1f} | "
                      f"{float(k.get('dram__bytes_read.sum', 0) or 0) / 1e6:.1f} | "
                      f"{float(k.get('dram__bytes_write.sum', 0) or 0) / 1e6:.1f} | "
                      f"{float(k.get('smsp__inst_executed.sum', 0) or 0):.3g} | "
                      f"{float(k.get('smsp__inst_executed_pipe_xu.sum', 0) or 0):.3g} |")
    if failures:
        md += ["", f"## Failed tests ({len(failures)}{', the first 30' if len(failures) > 30 else ''})", ""]
        md += [f"- {o['outcome']}: `{o['id']}`: {o['message']}" for o in failures[:30]]
    failed = [s["name"] for s in steps if s["status"] not in ("ok", "skipped")]
    md += ["", f"steps not ok: {', '.join(failed) or 'none'}"]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.results, "gpu_check-summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "gpu_check-summary.json"), "w") as f:
        json.dump(dict(env=env, steps=steps, failed_tests=failures, bench_json=bench_path and os.path.basename(bench_path),
                       spec_targets=checks, ncu=kernels, no_cuda=no_cuda), f, indent=2)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_env)
    p = sub.add_parser("cases")
    p.add_argument("--layouts", type=lambda s: s.split(","), default=list(CASE_LAYOUTS))
    p.add_argument("--device", default="cuda")
    p.set_defaults(fn=cmd_cases)
    p = sub.add_parser("multi-device")
    p.set_defaults(fn=cmd_multi_device)
    p = sub.add_parser("ncu-case")
    p.add_argument("--shape", default="seg-ade")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(fn=cmd_ncu_case)
    p = sub.add_parser("summary")
    for name in ("--steps", "--env", "--work", "--outcomes", "--results", "--ncu"):
        p.add_argument(name)
    p.set_defaults(fn=cmd_summary)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
