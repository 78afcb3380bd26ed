#!/usr/bin/env bash
# One-shot check of the GPU side of disalign_ops on a bare, offline CUDA machine (issue 9):
#
#   bash benches/gpu_check.sh [RESULTS_DIR]          # default RESULTS_DIR: benches/results
#
# Steps, in this order, each under its own `timeout` and all under one deadline (GPU_CHECK_BUDGET_S,
# default 450 s, so the whole script stays under 8 minutes); a failing or timed-out step is recorded
# and the script goes on to the next:
#   env        versions (python, torch, triton, nvcc, driver, ncu, compute-sanitizer, GPUs)
#   build      DISALIGN_CUDA=1 MAX_JOBS=16 setup.py build_ext --inplace (no downloads)
#   tests      pytest tests -k "cuda or test_triton_backend" (not the CPU emulation of the kernels,
#              test_cuda_emulated.py) with DISALIGN_BIG_TESTS=1 (>2^31 elements),
#              each outcome recorded as it finishes (benches/pytest_outcomes.py: a timeout keeps them)
#   bench      benches/bench_ops.py: SPEC shapes, stage2 + full, bfloat16 + float32, native, triton,
#              eager, compile, liger (from benches/wheels), copy yardstick, JSON + Markdown
#   memcheck   compute-sanitizer --tool memcheck on gpu_check.py cases (odd-C bf16, every layout)
#   ncu        ncu DRAM bytes + instructions of one stage-2 call per GPU backend (seg-ade bf16)
#   racecheck  compute-sanitizer --tool racecheck on the same cases
#   multigpu   gpu_check.py multi-device, where more than one GPU is visible
# Without a CUDA device every GPU step is skipped and the summary says "no CUDA device"; build runs
# without one only when GPU_CHECK_STEPS names it.
#
# RESULTS_DIR receives at most 6 files (the device tool returns at most 8): gpu_check.log (every
# step's output), gpu_check-summary.md/.json, gpu_check-ncu.csv, <gpu-name>.json/.md (the benchmark).
# The summary is printed last.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (comma list, e.g.
# bench,ncu for a rerun), GPU_CHECK_STEP_BUDGETS (e.g. "build=900 bench=240"), GPU_CHECK_BENCH_ARGS (replaces the benchmark's default selection, e.g.
# "--shapes seg-ade --dtype float32"), MAX_JOBS.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/benches/gpu_check.sh"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1

# Per-step budgets in seconds (each is also cut to what is left of the deadline).
declare -A BUDGET=([env]=30 [build]=180 [tests]=110 [bench]=180 [memcheck]=60 [ncu]=45 [racecheck]=60 [multigpu]=30)
for kv in ${GPU_CHECK_STEP_BUDGETS:-}; do BUDGET[${kv%%=*}]=${kv#*=}; done  # e.g. "build=900 bench=240"
ALL_STEPS=(env build tests bench memcheck ncu racecheck multigpu)
GPU_STEPS=" build tests bench memcheck ncu racecheck multigpu "
BENCH_ARGS_DEFAULT="--shapes seg-ade,cls-inat,det-lvis,cls-imagenet --modes stage2,full --dtype bfloat16,float32 \
--backends native,triton,eager,compile,liger --repeat 20 --warmup 3 --copy-mib 4096"
NCU_METRICS="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,smsp__inst_executed.sum,\
smsp__inst_executed_pipe_xu.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,\
dram__throughput.avg.pct_of_peak_sustained_elapsed"
NCU_METRICS_BASIC="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,smsp__inst_executed.sum"

find_tool() {  # a CUDA tool on PATH, else in the usual install places
    command -v "$1" 2>/dev/null && return
    local c
    for c in "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /usr/local/cuda/bin/$1 /usr/local/cuda/compute-sanitizer/$1 \
             /opt/nvidia/nsight-compute/*/$1; do
        [[ -x $c ]] && { echo "$c"; return; }
    done
    return 1
}

# ------------------------------------------------------------------ steps (run as `gpu_check.sh --step NAME`)

step_env() {
    "$PYTHON" "$ROOT/benches/gpu_check.py" env --out "$WORK/env.json"
    if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | head -n 20; else echo "nvidia-smi: none"; fi
    echo "ncu: $(find_tool ncu || echo none); compute-sanitizer: $(find_tool compute-sanitizer || echo none)"
}

step_build() {
    cd "$ROOT" || return 1
    find_tool nvcc > /dev/null || { echo "no nvcc"; return 1; }
    # The toolkit (CUDA_HOME, also where nvcc is a wrapper script) and the math-library headers
    # torch's headers include (CPATH, from the pip nvidia packages where the toolkit lacks them):
    # the project's one detection, as scripts/install.sh uses it.
    # shellcheck source=../scripts/cuda_env.sh
    source "$ROOT/scripts/cuda_env.sh" "$PYTHON"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16}"
    DISALIGN_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" setup.py build_ext --inplace || return 1
    "$PYTHON" -c 'import disalign_ops as d; print("backends:", {x: d.available_backends(x) for x in ("cpu", "cuda")})'
}

step_tests() {
    cd "$ROOT" || return 1
    local extra=()
    "$PYTHON" -c 'import xdist' 2>/dev/null && extra+=(-n 8)
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 90)
    # test_cuda_emulated.py is the CPU emulation of the same kernels, for machines without a GPU.
    # Each outcome goes to tests-outcomes.jsonl as it finishes (benches/pytest_outcomes.py), so a step
    # stopped at its limit still tells how far it got and what failed.
    GPU_CHECK_OUTCOMES="$OUTCOMES" PYTHONPATH="$ROOT/benches:$PYTHONPATH" DISALIGN_BIG_TESTS=1 \
        "$PYTHON" -m pytest tests -k "cuda or test_triton_backend" -q -rfE -p no:cacheprovider -p pytest_outcomes \
        --ignore tests/test_cuda_emulated.py \
        --maxfail 50 ${extra[@]+"${extra[@]}"}
}

step_bench() {
    cd "$ROOT" || return 1
    # Liger-Kernel travels as a pure-Python wheel (the machine is offline); it imports the system torch/triton.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$ROOT"/benches/wheels/liger_kernel-*.whl \
        || echo "liger-kernel wheel did not install: the liger rows will be missing"
    # shellcheck disable=SC2086  # the arguments are a word list
    "$PYTHON" benches/bench_ops.py --device cuda --results-dir "$RESULTS_DIR" ${GPU_CHECK_BENCH_ARGS:-$BENCH_ARGS_DEFAULT}
}

sanitize() {  # $1: memcheck | racecheck
    cd "$ROOT" || return 1
    local tool
    tool=$(find_tool compute-sanitizer) || { echo "unavailable: no compute-sanitizer"; return 3; }
    # Triton compiles on the host (the sanitizer does not slow that down much); the racecheck run then
    # finds the kernels in Triton's cache.
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees an access past a
    # tensor's end instead of landing inside the allocator's pool.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$1" --error-exitcode 9 --print-limit 25 \
        "$PYTHON" benches/gpu_check.py cases
    local rc=$?
    ((rc == 0)) && return 0
    grep -qiE "not supported|LibraryNotLoaded|error 999" "$WORK/$1.log" && { echo "unavailable: tool refused the device"; return 3; }
    return $rc
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck; }

run_ncu() {  # $1: ncu, $2: metrics
    "$1" --clock-control none --profile-from-start off --target-processes all --csv --page raw \
        --metrics "$2" --log-file "$RESULTS_DIR/gpu_check-ncu.csv" \
        "$PYTHON" benches/gpu_check.py ncu-case --shape seg-ade --dtype bfloat16
}

step_ncu() {
    cd "$ROOT" || return 1
    local tool rc
    tool=$(find_tool ncu) || { echo "unavailable: no ncu"; return 3; }
    run_ncu "$tool" "$NCU_METRICS"
    rc=$?
    if grep -qiE "metric.*(not found|invalid|unknown)|failed to find metric" "$RESULTS_DIR/gpu_check-ncu.csv" 2>/dev/null; then
        echo "retrying with the basic metrics only"
        run_ncu "$tool" "$NCU_METRICS_BASIC"
        rc=$?
    fi
    if grep -qiE "ERR_NVGPUCTRPERM|LibraryNotLoaded|not supported|Failed to initialize" "$RESULTS_DIR/gpu_check-ncu.csv" "$WORK/ncu.log" 2>/dev/null; then
        echo "unavailable: ncu cannot read the counters here"
        return 3
    fi
    head -c 4000 "$RESULTS_DIR/gpu_check-ncu.csv"
    return $rc
}

step_multigpu() {
    cd "$ROOT" || return 1
    if (( NGPU < 2 )); then echo "unavailable: $NGPU GPU"; return 3; fi
    "$PYTHON" benches/gpu_check.py multi-device
}

if [[ ${1:-} == --step ]]; then
    "step_$2"
    exit $?
fi

# ------------------------------------------------------------------------------------------ runner

run_step() {
    local name=$1 budget=${BUDGET[$1]:-60} now left limit status rc=0 note=""
    now=$(date +%s)
    left=$((DEADLINE - now - 15))  # 15 s: timeout's grace period, then the summary
    if [[ $GPU_STEPS == *" $name "* ]] && (( NGPU == 0 )) && ! [[ $name == build && -n ${GPU_CHECK_STEPS:-} ]]; then
        status=skipped; note="no CUDA device"
    elif (( left < 10 )); then
        status=skipped; note="out of time (deadline)"
    else
        limit=$(( budget < left ? budget : left ))
        echo "=== [$name] start, limit ${limit} s ($(date -u +%H:%M:%S))" | tee -a "$LOG"
        timeout --kill-after=5 "$limit" bash "$SELF" --step "$name" > "$WORK/$name.log" 2>&1
        rc=$?
        cat "$WORK/$name.log" >> "$LOG"
        tail -n 15 "$WORK/$name.log"
        if (( rc == 0 )); then status=ok
        elif (( rc == 124 || rc == 137 )); then status=timeout; note="hit its ${limit} s limit"
        elif (( rc == 3 )); then status=skipped; note=$(grep -m1 '^unavailable' "$WORK/$name.log")
        else status=failed; note="exit $rc"
        fi
    fi
    local took=$(( $(date +%s) - now ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$budget" "$note" >> "$STEPS_TSV"
    echo "=== [$name] $status ${note:+($note) }after ${took} s" | tee -a "$LOG"
}

# The whole runner is one function, parsed before it runs: editing this file during a run cannot break it.
main() {
    RESULTS_DIR=${1:-$ROOT/benches/results}
    mkdir -p "$RESULTS_DIR" && RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    export ROOT PYTHON RESULTS_DIR WORK
    export PYTHONPATH="$ROOT:$ROOT/python:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    START=$(date +%s)
    DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-450}))
    LOG="$RESULTS_DIR/gpu_check.log"
    STEPS_TSV="$WORK/steps.tsv"
    OUTCOMES="$WORK/tests-outcomes.jsonl"  # the tests step's outcomes (benches/pytest_outcomes.py)
    export OUTCOMES
    : > "$LOG"
    : > "$STEPS_TSV"
    rm -f "$RESULTS_DIR/gpu_check-ncu.csv"

    NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
    [[ $NGPU =~ ^[0-9]+$ ]] || NGPU=0
    export NGPU
    echo "gpu_check: $NGPU CUDA device(s), budget ${GPU_CHECK_BUDGET_S:-450} s, results in $RESULTS_DIR, work in $WORK" | tee -a "$LOG"

    IFS=, read -r -a SELECTED <<< "${GPU_CHECK_STEPS:-$(IFS=,; echo "${ALL_STEPS[*]}")}"


    for step in "${SELECTED[@]}"; do
        if [[ -z ${BUDGET[$step]:-} ]]; then echo "unknown step $step (known: ${ALL_STEPS[*]})" | tee -a "$LOG"; continue; fi
        run_step "$step"
    done

    [[ -s $WORK/env.json ]] || "$PYTHON" "$ROOT/benches/gpu_check.py" env --out "$WORK/env.json" > /dev/null 2>&1
    "$PYTHON" "$ROOT/benches/gpu_check.py" summary --steps "$STEPS_TSV" --env "$WORK/env.json" --work "$WORK" \
        --outcomes "$OUTCOMES" --results "$RESULTS_DIR" --ncu "$RESULTS_DIR/gpu_check-ncu.csv" 2>&1 | tee -a "$LOG"
    NOT_OK=$(awk -F'\t' '$2 != "ok" && $2 != "skipped" {print $1}' "$STEPS_TSV" | tr '\n' ' ')
    if (( NGPU == 0 )); then VERDICT="no CUDA device: GPU steps skipped"; else VERDICT="steps not ok: ${NOT_OK:-none}"; fi
    echo "gpu_check: done in $(( $(date +%s) - START )) s; $VERDICT; $(ls "$RESULTS_DIR" | wc -l) files in $RESULTS_DIR" | tee -a "$LOG"
    [[ -z $NOT_OK ]]
}

main "$@"
exit $?
