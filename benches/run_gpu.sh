#!/usr/bin/env bash
# Kept for older instructions: the GPU check and benchmark are benches/gpu_check.sh now.
#   bash benches/run_gpu.sh [RESULTS_DIR]   ==   bash benches/gpu_check.sh [RESULTS_DIR]
# ($OUT/results when $OUT is set and no directory is given, as before.)
exec bash "$(dirname "$0")/gpu_check.sh" "${1:-${OUT:+$OUT/results}}"
