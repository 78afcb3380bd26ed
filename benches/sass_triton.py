"""Every Triton launch of the GPU benchmark shapes, compiled ahead of time for sm_90a (no GPU needed).

`triton_launches()` runs the operators of disalign_ops.triton_backend.ops on meta tensors of the GPU
benchmark shapes (benches/bench_ops.py:SHAPES, CUDA dims) with `ops._launch` replaced by a recorder,
so the configurations are the ones the operators plan (same code path, no second planner): kernel,
signature, constexprs, num_warps, num_stages, grid. `triton_rows()` compiles each for sm_90a and
reports registers, spills, shared memory, grid, and the steady-state loop instructions per logit
element (total and exp2, from the SASS), against the issue-9 budget. benches/sass_budget.py (owned
by the `cuda` helper) calls `triton_rows()`; `python benches/sass_triton.py` prints the table.

Per element = (instructions of one loop iteration x warps) / (logit elements one iteration covers),
i.e. warp-instructions per element, for the innermost loops of the kernel: the tile loop of the
warp-row kernel (warp_kernels.py: RW rows, or RW x V NCHW pixels, x C real classes; padded lanes
count as cost, not as elements), else the two class-block sweeps of the tile kernel's streaming
path (BLOCK_R x BLOCK_C elements) or its resident tile loop (BLOCK_R x C).

    python benches/sass_triton.py [--out benches/results]   # table (+ sass_triton.{md,json}) Budget: <= 0.5 warp-instructions per bf16 element, <= 1.0 per fp32 one,
summed over the loops one element passes through, and at most one exp2 per element.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODES = {"stage2": [False, True, True, True], "full": [True, True, True, True]}
DTYPES = ("float32", "bfloat16")
BUDGET = {"bfloat16": 0.5, "float16": 0.5, "float32": 1.0, "float64": 2.0}


@dataclass
class Launch:
    shape: str
    mode: str
    dtype: str
    kernel: str
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict
    num_classes: int
    signature: dict = field(repr=False, default_factory=dict)
    compiled: object = field(repr=False, default=None)


def _gpu_shapes():
    sys.path.insert(0, HERE)
    from bench_ops import SHAPES  # noqa: E402  (the one definition of the benchmark shapes)

    return {name: spec.cuda_dims for name, spec in SHAPES.items()}


def _inputs(dims, dtype):
    import torch

    param = torch.float64 if dtype == torch.float64 else torch.float32
    rows = (dims[0],) + tuple(dims[2:])
    meta = dict(device="meta")
    return (torch.empty(dims, dtype=dtype, **meta), torch.zeros(rows, dtype=torch.long, **meta),
            torch.empty(dims[1], dtype=param, **meta), torch.empty(dims[1], dtype=param, **meta),
            torch.empty(rows, dtype=param, **meta), torch.empty(dims[1], dtype=param, **meta))


def triton_launches(shapes=None, modes=tuple(MODES), dtypes=DTYPES, num_sms=132, compile_sm90=True):
    """The launches ops.cross_entropy makes (forward of reduction "mean", which computes every wanted
    gradient in its one pass) per shape x mode x dtype, compiled for sm_90a when compile_sm90."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from disalign_ops.triton_backend import ops

    if ops.INTERPRETED:
        raise RuntimeError("sass_triton needs compiled Triton kernels: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    launches, context, context_classes = [], {}, [0]

    def record(kernel, grid):
        def launch(*args, **kwargs):
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            compiled = None
            if compile_sm90:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            names = {k[0] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
            plain = {kernel.arg_names[i] if isinstance(i, int) else i: v for i, v in names.items()}
            launches.append(Launch(**context, num_classes=context_classes[0], kernel=kernel.fn.__name__, grid=tuple(int(g) for g in grid),
                                   num_warps=options.num_warps, num_stages=options.num_stages,
                                   constexprs={k: v for k, v in plain.items() if k.isupper()},
                                   signature=dict(signature), compiled=compiled))
        return launch

    saved = ops._launch, ops._num_sms
    ops._launch, ops._num_sms = record, (lambda device: num_sms)
    try:
        for shape, dims in (shapes or _gpu_shapes()).items():
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                logits, target_, alpha, beta, confidence, weight = _inputs(dims, dtype)
                context_classes[0] = dims[1]
                for mode in modes:
                    context.update(shape=shape, mode=mode, dtype=dtype_name)
                    ops.cross_entropy(logits, target_, alpha, beta, confidence, weight, -100, "mean", MODES[mode])
    finally:
        ops._launch, ops._num_sms = saved
    return launches


# --- SASS analysis -------------------------------------------------------------------------------
def _sass_loops(cubin: bytes):
    """Innermost loops of a cubin: [(instruction count, exp2 count)], by benches/sass_utils.py (the
    `cuda` helper's SASS parser, shared with sass_budget.py) when present, else a minimal fallback."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sys.path.insert(0, HERE)
            import sass_utils
        except ImportError:  # PLACEHOLDER until sass_utils.py is merged: nvdisasm + backward branches
            return _fallback_loops(f.name)
        functions = sass_utils.parse_sass(sass_utils.disassemble(f.name))
    return [(len(loop.instructions), loop.exp2) for fn in functions.values() for loop in fn.innermost_loops]


def _fallback_loops(path):
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = os.path.join(os.path.dirname(get_ptxas(90).path), "nvdisasm")
    text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in text.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            instrs.append(m.group(2).strip())
    loops = []
    for i, ins in enumerate(instrs):
        t = re.search(r"\bBRA\b.*\.L_x_(\d+)", ins)
        if t and t.group(1) in labels and labels[t.group(1)] < i:
            loops.append((labels[t.group(1)], i))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [(b - a + 1, sum("MUFU.EX2" in x for x in instrs[a:b + 1])) for a, b in inner]


def _ptxas_info(compiled):
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return int(regs.group(1)) if regs else None, (int(spills.group(1)) + int(spills.group(2))) if spills else None


def _elements_per_iteration(launch, num_classes):
    """Logit elements one iteration of the kernel's innermost loop covers: a class block of the
    streaming sweeps (BLOCK_R x BLOCK_C, unmasked), or a whole tile (BLOCK_R x C) of the resident
    kernel, whose innermost loop is the tile loop."""
    c = launch.constexprs
    if "RW" in c:  # warp_kernels._warp_rows_kernel: RW rows (RW x V pixels) x all C classes per tile
        return c["RW"] * (c["V"] if c["PIXEL"] else 1) * num_classes
    if c.get("RESIDENT"):
        return c["BLOCK_R"] * num_classes
    if "BLOCK_R" in c and "BLOCK_C" in c:
        return c["BLOCK_R"] * c["BLOCK_C"]
    return c.get("BLOCK", 1)


def _values_per_iteration(launch, num_classes):
    """Values one iteration's lanes compute, padded lanes included: the warp-row kernel's classes
    are (G + GT) x LW (x V) slots, C rounded up to them; a tile kernel block has no padded lanes
    in the body sweeps (the count equals _elements_per_iteration)."""
    c = launch.constexprs
    if "RW" in c:
        slots = (c["G"] + c["GT"]) * c["LW"] * (1 if c["PIXEL"] else c["V"])
        return c["RW"] * (c["V"] if c["PIXEL"] else 1) * max(slots, num_classes)
    return _elements_per_iteration(launch, num_classes)


def triton_rows(**kwargs):
    """One dict per launch: shape, mode, dtype, kernel, grid, num_warps, num_stages, constexprs,
    registers, spills, shared_bytes, loops = [{instructions, exp2, per_element, exp2_per_element,
    exp2_per_value}], per_element (sum over the kernel's steady-state loops), budget, within_budget.
    exp2_per_element counts a warp's padded lanes (C = 1000 in slots of 1024) as cost;
    exp2_per_value is per value a lane computes, as the CUDA rows count it: the budget's "one exp2
    per element" means no value exponentiated twice, and is checked on it. Runs in a
    subprocess without TRITON_INTERPRET when this process interprets Triton."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "python"), env.get("PYTHONPATH", "")])
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", json.dumps(kwargs)], env=env,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])
    rows = []
    for launch in triton_launches(**kwargs):
        compiled = launch.compiled
        registers, spills = _ptxas_info(compiled)
        elements = _elements_per_iteration(launch, launch.num_classes)
        values = _values_per_iteration(launch, launch.num_classes)
        # n instructions per thread per iteration: n warp-instructions per warp; exp2 per lane.
        loops = [dict(instructions=n, exp2=e, per_element=n * launch.num_warps / elements,
                      exp2_per_element=e * launch.num_warps * 32 / elements,
                      exp2_per_value=e * launch.num_warps * 32 / values)
                 for n, e in _sass_loops(compiled.asm["cubin"])]
        row = dict(shape=launch.shape, mode=launch.mode, dtype=launch.dtype, kernel=launch.kernel, grid=launch.grid,
                   num_warps=launch.num_warps, num_stages=launch.num_stages, constexprs=launch.constexprs)
        row.update(registers=registers, spills=spills, shared_bytes=compiled.metadata.shared, loops=loops,
                   per_element=sum(l["per_element"] for l in loops),
                   exp2_per_element=sum(l["exp2_per_element"] for l in loops),
                   exp2_per_value=sum(l["exp2_per_value"] for l in loops), budget=BUDGET[launch.dtype])
        row["within_budget"] = row["per_element"] <= row["budget"] and row["exp2_per_value"] <= 1.0 + 1e-9
        rows.append(row)
    return rows


def _table(rows):
    lines = ["| shape | mode | dtype | kernel | grid | warps | stages | BLOCK_R x BLOCK_C | regs | spills | smem |"
             " loops: instr (exp2) per iteration | per element | exp2/elem | exp2/value | budget |",
             "|" + " --- |" * 16]
    for r in rows:
        c = r["constexprs"]
        tile = f"{c.get('BLOCK_R', '-')} x {c.get('BLOCK_C', c.get('BLOCK', '-'))}"
        loops = ", ".join(f"{l['instructions']} ({l['exp2']})" for l in r["loops"])
        lines.append(f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['kernel']} | {r['grid'][0]} | {r['num_warps']} |"
                     f" {r['num_stages']} | {tile} | {r['registers']} | {r['spills']} | {r['shared_bytes']} |"
                     f" {loops} | {r['per_element']:.3f} | {r['exp2_per_element']:.2f} | {r['exp2_per_value']:.2f} |"
                     f" {'ok' if r['within_budget'] else 'OVER'} ({r['budget']}) |")
    return "\n".join(lines)


def main(argv=None):
    """Prints the table; with --out DIR also writes DIR/sass_triton.{md,json} (the Triton launches
    alone: benches/sass_budget.py writes the combined CUDA + Triton report)."""
    import argparse

    ap = argparse.ArgumentParser(description="Triton launches of the GPU benchmark shapes vs the SASS budget")
    ap.add_argument("--json", help=argparse.SUPPRESS)  # internal: triton_rows() in a subprocess
    ap.add_argument("--out", help="directory for sass_triton.md / sass_triton.json")
    args = ap.parse_args(argv)
    if args.json is not None:
        print(json.dumps(triton_rows(**json.loads(args.json))))
        return
    rows = triton_rows()
    stage2 = [r for r in rows if r["mode"] == "stage2" and r["loops"]]
    table = _table(rows) + (f"\ntriton stage-2 loops within budget: {sum(r['within_budget'] for r in stage2)}"
                            f" of {len(stage2)}\n")
    print(table, end="")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sass_triton.md"), "w") as f:
            f.write(table)
        with open(os.path.join(args.out, "sass_triton.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
            f.write("\n")


if __name__ == "__main__":
    main()
