#!/usr/bin/env bash
# The GPU benchmark of SPEC section 5, in one command on a CUDA machine:
#   bash benches/run_gpu.sh [extra bench_ops.py arguments, e.g. --shapes seg-ade,cls-inat]
# Builds disalign_ops with its CUDA kernels (no dependency downloads: the machine may be offline),
# then times eager, torch.compile, native and triton on the GPU shapes in stage-2 and full mode.
# Writes <gpu-name>.json, build.log and bench.log to $OUT/benches/results/ when $OUT is set, else to benches/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS_DIR=${OUT:+$OUT/}benches/results
mkdir -p "$RESULTS_DIR"

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "run_gpu.sh needs a CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
DISALIGN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    2>&1 | tee "$RESULTS_DIR/build.log" | tail -n 3

PYTHONUNBUFFERED=1 "$PYTHON" benches/bench_ops.py --device cuda --backends eager,compile,native,triton \
    --modes stage2,full --results-dir "$RESULTS_DIR" "$@" 2>&1 | tee "$RESULTS_DIR/bench.log"
