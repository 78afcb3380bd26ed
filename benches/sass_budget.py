"""SASS instruction budget of the GPU kernels, without a GPU (issue 9).

Compiles every CUDA kernel file of csrc/cuda to a cubin for sm_90 (nvcc -lineinfo -Xptxas -v),
disassembles it, finds the steady-state loops marked SASS_LOOP(name, V) in the sources
(benches/sass_utils.py), and reports per kernel and GPU benchmark shape class: registers, spills,
shared memory, blocks per SM and grid (from the planner itself, csrc/cuda/plan.cpp, built for the CPU
by benches/cuda_plan.py), and warp-instructions and MUFU.EX2 per logit element of each hot loop,
against issue 9's budget for an H200: summed over a kernel's passes, <= 0.5 warp-instructions per
bf16 element, <= 1.0 per fp32 element, <= 1 exp2 per element (per value a lane computes: no
value exponentiated twice; the Triton rows also show exp2 per real element, where a warp's padded
lanes count). The Triton section comes from the Triton backend's list of launches where it
provides one.

    python benches/sass_budget.py                 # table + benches/results/sass_budget.{json,md}
    python benches/sass_budget.py --out DIR --jobs 2

Report only (exit 0 whatever the counts): CI runs it. Without nvcc it prints a SKIPPED line and exits 0.
Last line: `stage-2 loops within budget: K of N`, N counting the CUDA stage-2 kernels per (benchmark
shape, dtype), each judged on the sum of its hot loops, plus the Triton stage-2 launches that loop
over the logits (the target prepass is listed, not counted).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import cuda_plan  # noqa: E402
import sass_utils as su  # noqa: E402

ARCH = "sm_90"
SOURCES = ["loss_kernels.cu", "calibrate_backward.cu", "calibrate_kernel.cu", "reduce_kernels.cu"]
MARKED = ["tile_kernel.cuh", "calibrate_kernel.cu"]  # files whose SASS_LOOP markers name the loops
FLAGS = ["-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
DTYPES = {"bf16": ("__nv_bfloat16", 2, 4), "fp32": ("float", 4, 4)}
# Loops of one tile-kernel call, in pass order (a kernel runs each once per element). Plans that cache
# the exponentials (e_cached) run the exponential pass on the zhat the max pass cached; the others
# (and calibrate_backward) run its "-uncached" loop.
PASSES = ["ce-classes-max", "ce-classes-exp", "sweep-classes", "ce-pixels-max", "ce-pixels-exp", "sweep-pixels"]
# Loops that run a few iterations per item of an enclosing loop: the (N, C) sweep walks the tile_rows /
# slices rows of one (slice, class vector) item, one row for cls-inat. The item loop's own instructions
# (accumulator load / store, item stepping) are then part of the per-element cost: counted as
# item_overhead / rows per item on top of the row loop.
PER_ITEM = {"sweep-classes"}
# The 16-bit unpacking lines (SASS_TAG(convert)) that count as arithmetic (sass_utils.arithmetic_count).
CONVERT_LINES = su.conversion_lines(ROOT / "csrc" / "cuda" / "device_math.cuh")


def passes_for(e_cached: bool) -> list[str]:
    return [p if e_cached or not p.endswith("-exp") else p + "-uncached" for p in PASSES]


def compile_all(out_dir: Path, jobs: int) -> dict[str, tuple[Path, str]]:
    """{source: (cubin, ptxas log)}; cubins are cached by the hash of the sources and flags."""
    macros = [f"-D{k}={v}" for k, v in cuda_plan.macros()]
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h") and path.is_file():
            digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS + macros + [ARCH]).encode())
    key = digest.hexdigest()[:16]

    def one(name: str):
        cubin = out_dir / f"{Path(name).stem}-{key}.cubin"
        log = cubin.with_suffix(".log")
        if not (cubin.exists() and log.exists()):
            text = su.compile_cubin(ROOT / "csrc" / "cuda" / name, cubin, ARCH, FLAGS + macros)
            log.write_text(text)
        return name, (cubin, log.read_text())

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(one, SOURCES))


def kernel_key(demangled: str) -> tuple | None:
    """(kind, scalar, pixels, calibrate, grad, reg_acc) of a tile kernel; (kind, scalar, pixels) of calibrate."""
    m = re.search(r"tile_kernel<([\w:]+), (\w+), (true|false), (true|false), (true|false)(?:, (true|false))?>", demangled)
    if m:
        return ("tile", m.group(1), m.group(3) == "true", m.group(4) == "true", m.group(5) == "true",
                m.group(6) == "true")
    m = re.search(r"calibrate_kernel<([\w:]+), (\w+), (true|false)>", demangled)
    if m:
        return ("calibrate", m.group(1), m.group(3) == "true")
    return None


def analyse(compiled: dict[str, tuple[Path, str]]) -> dict[tuple, dict]:
    """{kernel key: {name, registers, spills, loops: {marker: per-element counts}}} for sm_90."""
    markers = {name: su.source_markers(ROOT / "csrc" / "cuda" / name) for name in MARKED}
    tags = {name: su.source_tags(ROOT / "csrc" / "cuda" / name) for name in MARKED}
    kernels = {}
    for cubin, log in compiled.values():
        resources = {name: info for (name, arch), info in su.parse_ptxas_log(log).items() if arch == ARCH}
        functions = su.parse_sass(su.disassemble(cubin))
        names = list(functions)
        for mangled, demangled in zip(names, su.demangle(names)):
            key = kernel_key(demangled)
            info = resources.get(mangled, {})
            entry = {
                "kernel": re.sub(r"disalign::cuda::(\(anonymous namespace\)::)?", "", demangled).split("(")[0]
                .removeprefix("void "),
                "registers": info.get("registers"),
                "spill_bytes": info.get("spill_stores", 0) + info.get("spill_loads", 0),
                "stack": info.get("stack", 0),
                "loops": {},
            }
            elem = 2 if key and key[1] in ("__nv_bfloat16", "__half") else 8 if key and key[1] == "double" else 4
            for source in MARKED:
                found = su.find_marked_loops(functions[mangled], ROOT / "csrc" / "cuda" / source, markers[source])
                unrolled: dict[tuple, list] = {}
                for marker, elements, loop in found:
                    per_lane = 16 // elem if elements == "V" else int(elements)
                    counts = loop.per_element(per_lane, CONVERT_LINES)
                    loop_tags = su.loop_tags(loop, ROOT / "csrc" / "cuda" / source, tags[source])
                    body = loop.instructions
                    if marker in PER_ITEM and UNROLLED_ITEMS in loop_tags:
                        # One copy of the row loop per unrolled item (REG_ACC): counted per group below.
                        unrolled.setdefault((marker, per_lane, frozenset(loop_tags)), []).append(loop)
                        continue
                    if marker in PER_ITEM:
                        outer = su.enclosing_loop(functions[mangled], loop)
                        counts["item_overhead"] = len(outer.instructions) - len(loop.instructions) if outer else 0
                        counts["item_overhead_wavefronts"] = (outer.shared_wavefronts - loop.shared_wavefronts
                                                              if outer else 0)
                        counts["item_overhead_arithmetic"] = (
                            su.arithmetic_count(outer.instructions, CONVERT_LINES) - counts["arithmetic"]
                            if outer else 0)
                        if outer:
                            loop_tags |= su.loop_tags(outer, ROOT / "csrc" / "cuda" / source, tags[source])
                            body = outer.instructions
                    counts["tags"] = sorted(loop_tags)
                    # Generic / global loads and stores (LD, ST): in a sweep, the per-class accumulators
                    # behind a generic pointer (workspace plans); shared accumulators use LDS / STS.
                    counts["generic_memory"] = sum(1 for i in body if i.base in ("LD", "ST"))
                    entry["loops"].setdefault(marker, []).append(counts)
                for (marker, per_lane, loop_tags), copies in unrolled.items():
                    counts = unrolled_item_counts(functions[mangled], copies, per_lane)
                    counts["tags"] = sorted(loop_tags)
                    entry["loops"].setdefault(marker, []).append(counts)
                for tag, (marker, values) in STRAIGHT_LINE.items():
                    straight = su.tagged_instructions(functions[mangled], ROOT / "csrc" / "cuda" / source,
                                                      tags[source], tag)
                    per_lane = 16 // elem
                    # One run per compiled instance (e.g. the exponential pass with and without the dot).
                    for run in su.instruction_runs(functions[mangled], straight):
                        counts = straight_line_counts(run, values // per_lane, per_lane)
                        counts["tags"] = sorted({tag} | su.instruction_tags(run, ROOT / "csrc" / "cuda" / source,
                                                                            tags[source]))
                        entry["loops"].setdefault(marker, []).append(counts)
            kernels[key or ("other", demangled)] = entry
    return kernels


# The (N, C) sweep of the REG_ACC kernels: its items (the thread's class vectors, accumulated in
# registers) are unrolled, one copy of the row loop each, tagged by the call line's SASS_TAG.
UNROLLED_ITEMS = "reg-acc"
# Their max and exponential passes on one-row tiles (zhat kept in registers between them): the
# thread's vectors, unrolled straight-line code (no loop), tagged on its lines; kRegAccClasses / V
# copies (csrc/cuda/plan.h, read from there).
REG_ROW_PASSES = {"reg-max": "ce-classes-max", "reg-exp": "ce-classes-exp"}
REG_ACC_CLASSES = int(re.search(r"constexpr int kRegAccClasses = (\d+);",
                                (ROOT / "csrc" / "cuda" / "plan.h").read_text()).group(1))
# The pixels layout's max and exponential passes of 16-bit logits where zhat of a thread's classes
# stays in registers (kPixelRegValues / V classes a thread, tile_kernel.cuh, read from there): the
# thread's classes unrolled, tagged on their lines.
PIXEL_REG_VALUES = int(re.search(r"constexpr int kPixelRegValues = (\d+);",
                                 (ROOT / "csrc" / "cuda" / "tile_kernel.cuh").read_text()).group(1))
PIXEL_REG_PASSES = {"px-reg-max": "ce-pixels-max", "px-reg-exp": "ce-pixels-exp"}
# tag: (the pass it stands for, values a thread's unrolled copies cover)
STRAIGHT_LINE = {**{tag: (marker, REG_ACC_CLASSES) for tag, marker in REG_ROW_PASSES.items()},
                 **{tag: (marker, PIXEL_REG_VALUES) for tag, marker in PIXEL_REG_PASSES.items()}}


def pixel_regs(plan: dict, pixels: bool, elem: int) -> bool:
    """Whether a plan's pixel threads keep zhat in registers (tile_kernel.cuh px_in_regs): 16-bit
    logits, cached exponentials, every class within kPixelRegValues / V classes per thread."""
    classes_per_thread = PIXEL_REG_VALUES // plan["vec"]
    return (pixels and elem == 2 and plan["e_cached"] and classes_per_thread > 1
            and plan["chunk_classes"] <= classes_per_thread * plan["group"])


def straight_line_counts(instrs: list[su.Instruction], copies: int, per_lane: int) -> dict:
    """Counts per element of `copies` unrolled copies of a vector's work (per_lane elements a lane)."""
    n = len(instrs) / copies
    exp2 = sum(1 for i in instrs if i.opcode.startswith("MUFU.EX2")) / copies
    wavefronts = sum(i.shared_wavefronts for i in instrs) / copies
    arithmetic = su.arithmetic_count(instrs, CONVERT_LINES) / copies
    return {"instructions": n, "exp2": exp2, "shared_wavefronts": wavefronts, "arithmetic": arithmetic,
            "elements_per_iteration": per_lane * su.WARP, "per_element": n / (per_lane * su.WARP),
            "exp2_per_element": exp2 / per_lane, "shared_wavefronts_per_element": wavefronts / (per_lane * su.WARP),
            "arithmetic_per_element": arithmetic / (per_lane * su.WARP),
            "generic_memory": sum(1 for i in instrs if i.base in ("LD", "ST")), "unrolled_items": copies}


def unrolled_item_counts(func: su.Function, copies: list[su.Loop], per_lane: int) -> dict:
    """Counts of a row loop whose items are unrolled copies: the row loop itself, and as item overhead
    what one item adds around it, the instructions from one copy's start to the next's (averaged over
    the copies)."""
    copies = sorted(copies, key=lambda loop: loop.start)
    first = copies[0]
    counts = first.per_element(per_lane, CONVERT_LINES)
    if len(copies) < 2:
        counts["item_overhead"] = counts["item_overhead_wavefronts"] = counts["item_overhead_arithmetic"] = 0
        counts["generic_memory"] = sum(1 for i in first.instructions if i.base in ("LD", "ST"))
        return counts
    span = func.instructions[first.start: copies[-1].start]
    n = len(copies) - 1
    counts["item_overhead"] = len(span) / n - len(first.instructions)
    counts["item_overhead_wavefronts"] = sum(i.shared_wavefronts for i in span) / n - first.shared_wavefronts
    counts["item_overhead_arithmetic"] = su.arithmetic_count(span, CONVERT_LINES) / n - counts["arithmetic"]
    counts["generic_memory"] = sum(1 for i in span if i.base in ("LD", "ST"))
    counts["unrolled_items"] = len(copies)
    return counts


def steady_state(variants: list[dict], marker: str, e_cached: bool, acc_shared: bool = True,
                 rows_per_item: int = 1, slices: int = 1, reg_acc: bool = False, tile_rows: int = 0,
                 px_regs: bool = False) -> dict:
    """The loop a planned launch spends its time in, among a marker's compiled variants: the sweep
    has one loop reading the cached exponentials (no MUFU.EX2) and one recomputing them (plans
    without the cache); every marker also has a one-element-per-lane loop for ragged tails, the
    smaller. With cached exponentials, dconfidence's dot is taken in the sweep (tile_kernel.cuh:
    dot_in_sweep; the benchmarks train the confidence in both modes): the sweep variant tagged
    `dot` and the exponential pass without it. So: the largest variant among those that fit."""
    def fits(v: dict) -> bool:
        dot = "dot" in v.get("tags", ())
        generic_acc = v.get("generic_memory", 0) > 0
        if marker.startswith("sweep"):
            # Cached sweeps with shared accumulators (every benchmark plan) address them as shared
            # memory; the others through a generic pointer (LD / ST in the loop or its item loop).
            ok = (v["exp2"] == 0) == e_cached and dot == e_cached and generic_acc == (not (e_cached and acc_shared))
            # The (N, C) sweep's item loop: the unrolled register-accumulator items (REG_ACC plans), one
            # per class vector where the plan has one slice (tag one-slice), else the (slice, vector) walk.
            if marker in PER_ITEM and (UNROLLED_ITEMS in v.get("tags", ())) != reg_acc:
                return False
            return ok and (marker not in PER_ITEM or reg_acc or ("one-slice" in v.get("tags", ())) == (slices == 1))
        # The unrolled register passes where the plan has them: pixel threads with zhat in registers;
        # REG_ACC plans of one-row tiles.
        for passes, chosen in ((PIXEL_REG_PASSES, px_regs), (REG_ROW_PASSES, reg_acc and tile_rows == 1)):
            for tag, name in passes.items():
                if name == marker and (tag in v.get("tags", ())) != chosen:
                    return False
        if marker.endswith("-exp"):  # the cached exponential pass (plans with e_cached)
            return not dot
        return True
    fitting = [v for v in variants if fits(v)] or variants
    best = dict(max(fitting, key=lambda v: v["instructions"]))
    if best.get("item_overhead"):
        best["rows_per_item"] = rows_per_item
        per_row = best["instructions"] + best["item_overhead"] / rows_per_item
        best["per_element"] = per_row / best["elements_per_iteration"]
        wavefronts = best["shared_wavefronts"] + best.get("item_overhead_wavefronts", 0) / rows_per_item
        best["shared_wavefronts_per_element"] = wavefronts / best["elements_per_iteration"]
        arithmetic = best.get("arithmetic", 0) + best.get("item_overhead_arithmetic", 0) / rows_per_item
        best["arithmetic_per_element"] = arithmetic / best["elements_per_iteration"]
    return best


def tile_copy_wavefronts(elem: int, grad: bool) -> float:
    """Shared-memory wavefronts per element of the tile copies around the loops: the logits into shared
    memory (cp.async or the realigning copy) and, in full mode, grad_logits out of it; each moves the
    element's bytes through the shared-memory pipe once."""
    return (2 if grad else 1) * elem / su.WAVEFRONT_BYTES


def model_cap(per_element: float, wavefronts: float, elem: int, grad: bool = False) -> float:
    """The fraction of the copy bandwidth that the issue slots and the shared-memory pipe leave at most,
    from the static counts, as bench_ops counts it (logits bytes read, plus grad_logits written in full
    mode: there the element's time budget is twice stage 2's). A model from the budget's figures (perfect
    overlap of issue, shared-memory pipe and memory), not a measurement."""
    moved = 2 if grad else 1
    return min(1.0, moved * su.BUDGET_PER_ELEMENT[elem] / max(per_element, 1e-12),
               moved * su.BUDGET_SHARED_WAVEFRONTS_PER_ELEMENT[elem] / max(wavefronts, 1e-12))


def rows_for_benchmarks(kernels: dict, planner: Path) -> list[dict]:
    rows = []
    for shape_name, (batch, classes, spatial, pixels) in cuda_plan.BENCH_SHAPES.items():
        for dtype, (scalar, elem, acc) in DTYPES.items():
            for mode in ("stage2", "full"):
                grad = mode == "full"
                k = kernels.get(("tile", scalar, pixels, False, grad, False))
                if k is None:
                    continue
                req = dict(batch=batch, classes=classes, spatial=spatial, pixels=pixels, elem=elem, acc=acc,
                           registers=k["registers"] or 64)
                (plan,) = cuda_plan.plans(planner, [req], cuda_plan.H200)
                if plan.get("reg_acc"):  # the launcher's choice where the planner proposes it (plan.h)
                    k = kernels.get(("tile", scalar, pixels, False, grad, True), k)
                rows_per_item = -(-plan["tile_rows"] // max(1, plan["slices"]))
                reg_acc = bool(plan.get("reg_acc")) and ("tile", scalar, pixels, False, grad, True) in kernels
                loops = {name: steady_state(k["loops"][name], name, plan["e_cached"], plan["acc_in_shared"],
                                            rows_per_item, plan["slices"], reg_acc, plan["tile_rows"],
                                            pixel_regs(plan, pixels, elem))
                         for name in passes_for(plan["e_cached"]) if name in k["loops"]}
                total = sum(v["per_element"] for v in loops.values())
                exp2 = sum(v["exp2_per_element"] for v in loops.values())
                wavefronts = sum(v["shared_wavefronts_per_element"] for v in loops.values()) + tile_copy_wavefronts(elem, grad)
                arithmetic = sum(v["arithmetic_per_element"] for v in loops.values())
                budget = su.BUDGET_PER_ELEMENT[elem]
                wf_budget = su.BUDGET_SHARED_WAVEFRONTS_PER_ELEMENT[elem]
                logits_bytes = batch * classes * spatial * elem
                partial_bytes = plan["partial_rows"] * plan["ws_slices"] * plan["acc_stride"] * acc * 2
                rows.append({
                    "shape": shape_name, "dtype": dtype, "mode": mode, "kernel": k["kernel"],
                    "registers": k["registers"], "spill_bytes": k["spill_bytes"], "shared_bytes": plan["shared_bytes"],
                    "blocks_per_sm": plan["blocks_per_sm"], "grid": plan["blocks"], "cluster": plan["cluster"],
                    "tiles": plan["num_tiles"],
                    "tile_rows": plan["tile_rows"], "e_cached": plan["e_cached"], "reg_acc": reg_acc,
                    "pixel_regs": pixel_regs(plan, pixels, elem),
                    "partials_fraction_of_logits": partial_bytes / logits_bytes,
                    "loops": loops, "per_element": total, "exp2_per_element": exp2, "budget_per_element": budget,
                    "within_budget": bool(loops) and total <= budget and exp2 <= su.BUDGET_EXP2_PER_ELEMENT + 1e-9,
                    "arithmetic_per_element": arithmetic, "arithmetic_within_budget": bool(loops) and arithmetic <= budget,
                    "shared_wavefronts_per_element": wavefronts, "budget_shared_wavefronts_per_element": wf_budget,
                    "within_shared_budget": bool(loops) and wavefronts <= wf_budget + 1e-9,
                    "model_cap": model_cap(total, wavefronts, elem, grad),
                })
    return rows


def triton_rows() -> tuple[list[dict], str]:
    """The Triton launches of the benchmark shapes (benches/sass_triton.py, the Triton backend's own
    list of what its operators launch), compiled for sm_90a; skipped where that cannot run."""
    for path in (str(ROOT / "python"), str(ROOT)):  # disalign_ops from this checkout
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import sass_triton  # benches/sass_triton.py (the `triton` helper's)

        rows = list(sass_triton.triton_rows())
    except Exception as exc:  # noqa: BLE001 - any failure only skips the section, with the reason
        return [], f"Triton section SKIPPED ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
    return rows, f"Triton section: {len(rows)} launches"


def markdown(rows: list[dict], others: list[dict], triton: list[dict]) -> str:
    out = ["| shape | dtype | mode | regs | spill B | smem B | blocks/SM | grid (cluster) | partials % | loops (warp-instr/elem, exp2/elem, smem wavefronts/elem) | total/elem | arith/elem | exp2/elem | budget | ok | smem wf/elem (budget) | smem ok | model cap |",
           "|" + " --- |" * 18]
    for r in rows:
        loops = ", ".join(f"{n} {v['per_element']:.3f}/{v['exp2_per_element']:.2f}/{v['shared_wavefronts_per_element']:.3f}"
                          for n, v in r["loops"].items())
        out.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['registers']} | {r['spill_bytes']} | "
                   f"{r['shared_bytes']} | {r['blocks_per_sm']} | {r['grid']} ({r['cluster']}) | {100 * r['partials_fraction_of_logits']:.2f} | "
                   f"{loops} | {r['per_element']:.3f} | {r['arithmetic_per_element']:.3f} | {r['exp2_per_element']:.2f} | {r['budget_per_element']} | "
                   f"{'yes' if r['within_budget'] else 'NO'} | {r['shared_wavefronts_per_element']:.3f} "
                   f"({r['budget_shared_wavefronts_per_element']}) | {'yes' if r['within_shared_budget'] else 'NO'} | "
                   f"{r['model_cap']:.2f} |")
    out += ["", "| other kernel | regs | spill B | loops (warp-instr/elem) |", "| --- | --- | --- | --- |"]
    for k in others:
        loops = ", ".join(f"{n} {max(v, key=lambda x: x['instructions'])['per_element']:.3f}"
                          for n, v in k["loops"].items()) or "-"
        out.append(f"| {k['kernel']} | {k['registers']} | {k['spill_bytes']} | {loops} |")
    if triton:
        out += ["", "| triton launch | shape | mode | dtype | grid | warps | regs | spills | smem B | per elem | exp2/elem"
                " | exp2/value | budget | ok |", "|" + " --- |" * 14]
        for r in triton:
            out.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['dtype']} | {r['grid'][0]} | {r['num_warps']} | "
                       f"{r['registers']} | {r['spills']} | {r['shared_bytes']} | {r['per_element']:.3f} | "
                       f"{r['exp2_per_element']:.2f} | {r['exp2_per_value']:.2f} | {r['budget']} | "
                       f"{'yes' if r['within_budget'] else 'NO'} |")
    return "\n".join(out) + "\n"


def triton_logit_loops(triton_rows: list[dict]) -> list[dict]:
    """The Triton stage-2 launches that loop over the logits. The target prepass reads only targets
    (no loop over logit elements, 0 per element): counting it as "within budget" would flatter K."""
    return [r for r in triton_rows if r.get("mode") == "stage2" and r.get("loops")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="directory of sass_budget.json / .md")
    ap.add_argument("--build", default=os.path.join(tempfile.gettempdir(), "disalign_sass_budget"),
                    help="cubin cache directory")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cuda-only", action="store_true",
                    help="skip the Triton section (its AOT compiles); the K of N line then counts CUDA only")
    args = ap.parse_args(argv)
    if su.find_tool("nvcc") is None:
        print("sass_budget: SKIPPED - nvcc not found (CUDA kernels not compiled)")
        print("stage-2 loops within budget: 0 of 0")
        return 0
    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    kernels = analyse(compile_all(build, args.jobs))
    planner = cuda_plan.build(build)
    rows = rows_for_benchmarks(kernels, planner)
    others = [k for key, k in kernels.items() if key[0] == "calibrate" or (key[0] == "tile" and key[3])]
    others += [k for key, k in kernels.items() if key[0] == "other"]
    triton, triton_status = ([], "Triton section SKIPPED (--cuda-only)") if args.cuda_only else triton_rows()
    table = markdown(rows, others, triton)
    print(table)
    print(triton_status)
    stage2 = [r for r in rows if r["mode"] == "stage2"]
    full = [r for r in rows if r["mode"] == "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"arch": ARCH, "budget_per_element": su.BUDGET_PER_ELEMENT, "budget_exp2_per_element":
              su.BUDGET_EXP2_PER_ELEMENT, "cuda": rows, "other_kernels": others, "triton": triton,
              "triton_status": triton_status,
              "stage2_within_budget": [sum(r["within_budget"] for r in stage2)
                                       + sum(bool(r["within_budget"]) for r in triton_logit_loops(triton)),
                                       len(stage2) + len(triton_logit_loops(triton))],
              "full_within_budget": [sum(r["within_budget"] for r in full), len(full)],
              "budget_shared_wavefronts_per_element": su.BUDGET_SHARED_WAVEFRONTS_PER_ELEMENT,
              "stage2_within_shared_budget": [sum(r["within_shared_budget"] for r in stage2), len(stage2)],
              "stage2_arithmetic_within_budget": [sum(r["arithmetic_within_budget"] for r in stage2), len(stage2)]}
    (out / "sass_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sass_budget.md").write_text(table)
    t2 = triton_logit_loops(triton)
    print(f"CUDA full-mode kernels within budget: {sum(r['within_budget'] for r in full)} of {len(full)}")
    print(f"CUDA stage-2 kernels within budget: {sum(r['within_budget'] for r in stage2)} of {len(stage2)}")
    print(f"CUDA stage-2 kernels within the shared-memory budget: {sum(r['within_shared_budget'] for r in stage2)}"
          f" of {len(stage2)}")
    print(f"CUDA stage-2 kernels whose arithmetic alone is within the instruction budget: "
          f"{sum(r['arithmetic_within_budget'] for r in stage2)} of {len(stage2)}")
    print(f"Triton stage-2 launches within budget: {sum(bool(r['within_budget']) for r in t2)} of {len(t2)}")
    ok = sum(r["within_budget"] for r in stage2) + sum(bool(r["within_budget"]) for r in t2)
    print(f"stage-2 loops within budget: {ok} of {len(stage2) + len(t2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
