"""The automatic backend on CUDA from a GPU benchmark run: writes disalign_ops/_cuda_choice.py.

  python benches/backend_choice.py benches/results/nvidia-h200.json [more.json ...] [--check]

Reads the rows of bench_ops.py (gpu_check.sh's bench step; keys device, shape, mode, dtype, backend,
ms) measured on CUDA, and for every benchmark case (shape, mode, dtype class) keeps the median ms of
the native and the Triton backend (summed over the dtypes of one class, float16 and bfloat16) and
the backend to choose: "triton" where it is faster than native by more than --margin (default 5%,
timing noise), else "native". A case measured on one backend only takes that one. backend=None on
CUDA then picks, for a call, the choice of the case with its layout, dtype class and mode and the
nearest class count (disalign_ops.backends.measured_backend). --check prints the table and writes
nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pprint
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ops  # noqa: E402  (the benchmark shapes)
from gpu_check import GPU_BACKENDS  # noqa: E402

from disalign_ops import backends  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(os.path.dirname(HERE), "disalign_ops", "_cuda_choice.py")


def case_of(shape: str, dtype: str, mode: str) -> tuple[str, str, str, int]:
    """The key backends.measured_backend matches a call by (backends.case_key): that of the benchmark's
    contiguous logits of this shape and dtype, in the row's mode."""
    logits = torch.empty(bench_ops.SHAPES[shape].cuda_dims, dtype=bench_ops.DTYPES[dtype], device="meta")
    layout, dtype_class, _, classes = backends.case_key(logits)
    return layout, dtype_class, mode, classes


def choose(rows: list[dict], margin: float = 0.05) -> list[dict]:
    """One entry per (layout, dtype class, mode, classes) that a GPU backend measured."""
    per_dtype: dict[tuple, dict[str, float]] = collections.defaultdict(dict)  # (case, dtype): {backend: ms}
    for r in rows:
        if r.get("backend") not in GPU_BACKENDS or r.get("ms") is None or r.get("error"):
            continue
        if r.get("shape") not in bench_ops.SHAPES or r.get("dtype") not in bench_ops.DTYPES:
            continue
        per_dtype[(case_of(r["shape"], r["dtype"], r["mode"]), r["dtype"])][r["backend"]] = float(r["ms"])
    cases: dict[tuple, list[dict[str, float]]] = collections.defaultdict(list)
    for (case, _), times in per_dtype.items():
        cases[case].append(times)
    out = []
    for case in sorted(cases):
        # Like with like: the dtypes measured on both backends; else the one backend measured.
        paired = [t for t in cases[case] if all(b in t for b in GPU_BACKENDS)]
        if paired:
            times = {b: sum(t[b] for t in paired) for b in GPU_BACKENDS}
            backend = "triton" if times["triton"] < (1 - margin) * times["native"] else "native"
        else:
            times = {b: sum(t[b] for t in cases[case] if b in t) for b in GPU_BACKENDS if any(b in t for t in cases[case])}
            backend = min(times, key=times.get)
        layout, dtype, mode, classes = case
        out.append({"layout": layout, "dtype": dtype, "mode": mode, "classes": classes, "backend": backend,
                    "ms": {b: round(t, 4) for b, t in sorted(times.items())}})
    return out


def module_text(measured: list[dict], source: dict) -> str:
    """The text of disalign_ops/_cuda_choice.py for these entries (its docstring kept)."""
    with open(TARGET) as f:
        text = f.read()
    doc = text[: text.index('"""', 3) + 3]
    return (f"{doc}\n\nSOURCE = {pprint.pformat(source, sort_dicts=True)}\n"
            f"MEASURED = {pprint.pformat(tuple(measured), sort_dicts=True, width=110)}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="bench_ops JSON files of a GPU run")
    ap.add_argument("--margin", type=float, default=0.05, help="triton's required lead over native")
    ap.add_argument("--out", default=TARGET)
    ap.add_argument("--check", action="store_true", help="print the choice, write nothing")
    args = ap.parse_args(argv)
    rows, devices, commits = [], set(), set()
    for path in args.results:
        with open(path) as f:
            report = json.load(f)
        info = report.get("device") or {}
        if info.get("device_type") != "cuda":
            print(f"backend_choice: {path} was not measured on CUDA ({info.get('device_type')}); skipped")
            continue
        rows += report.get("rows", [])
        devices.add(info.get("device_name"))
        commits.add(info.get("commit"))
    measured = choose(rows, args.margin)
    if not measured:
        print("backend_choice: no CUDA rows of a GPU backend in", ", ".join(args.results))
        return 1
    for m in measured:
        print(f"{m['layout']:6} {m['dtype']:7} {m['mode']:6} C={m['classes']:<6} {m['backend']:6} {m['ms']}")
    if not args.check:
        source = {"files": sorted(os.path.basename(p) for p in args.results),
                  "devices": sorted(d for d in devices if d), "commits": sorted(c for c in commits if c),
                  "margin": args.margin}
        with open(args.out, "w") as f:
            f.write(module_text(measured, source))
        print("backend_choice: wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
